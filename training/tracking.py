"""Experiment tracking of a run (`fit --report-to mlflow|tensorboard`): its options, per-epoch metrics, test
report and exported bundle.

`fit` starts the tracker and records in the run directory where it logs (`tracking.json`); `evaluate` and
`export` of that run read it and log their report and bundle to the same MLflow run or TensorBoard directory,
without being told again. mlflow and tensorboard come with the `tracking` extra and are imported only when used.

MLflow logs to a SQLite store by default (`mlruns/mlflow.db`, artifacts beside it in `mlruns/artifacts/`): it needs
no server, and MLflow 3 refuses its older file store unless told to allow it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from training.config import TrainingArguments
from training.errors import ConfigError
from training.run_dir import RunDirectory

log = logging.getLogger(__name__)

DEFAULT_MLFLOW_STORE = Path("mlruns") / "mlflow.db"
# What `evaluate` writes that is worth keeping beside the run: not predictions.csv, whose rows name source rows.
REPORT_FILES = ("roc.png", "pr.png", "reliability.png", "report.md", "metrics.json")
MLFLOW_BATCH = 100  # MLflow takes at most 100 params per log_batch call


class Tracker(Protocol):
    def log_epoch(self, record: Mapping[str, Any]) -> None:
        """One line of history.jsonl: its numbers, at step `epoch`."""

    def log_report(self, eval_dir: Path) -> None:
        """An evaluation directory: the plots and report, and the test metrics."""

    def log_bundle(self, bundle: Path) -> None:
        """A model bundle exported from the run."""

    def finish(self) -> None:
        """Training is over (the tracker may still log reports and bundles later, reopened by `open_tracking`)."""


class NoTracker:
    """--report-to none: logs nothing."""

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        pass

    def log_report(self, eval_dir: Path) -> None:
        pass

    def log_bundle(self, bundle: Path) -> None:
        pass

    def finish(self) -> None:
        pass


class MlflowTracker:
    """One MLflow run per training run, driven through `MlflowClient` (no global active run)."""

    def __init__(self, client: Any, tracking_uri: str, run_id: str) -> None:
        self.client, self.tracking_uri, self.run_id = client, tracking_uri, run_id

    @classmethod
    def start(cls, tracking_uri: str, experiment_name: str, run: RunDirectory) -> MlflowTracker:
        mlflow = _import("mlflow", "mlflow")
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        try:
            client = mlflow.MlflowClient(tracking_uri)
            experiment = client.get_experiment_by_name(experiment_name)
            experiment_id = (
                experiment.experiment_id
                if experiment
                else client.create_experiment(experiment_name, artifact_location=_artifact_location(tracking_uri))
            )
            created = client.create_run(
                experiment_id, run_name=run.root.name, tags={"run_dir": str(run.root.resolve())}
            )
        except MlflowException as err:
            raise ConfigError(f"--tracking-uri {tracking_uri}: {err.message}") from None
        tracker = cls(client, tracking_uri, created.info.run_id)
        params = [Param(key, _param_value(value)) for key, value in _leaves(run.read_config(), ".")]
        for first in range(0, len(params), MLFLOW_BATCH):
            tracker.client.log_batch(tracker.run_id, params=params[first : first + MLFLOW_BATCH])
        log.info("tracking in MLflow run %s (experiment %r, %s)", tracker.run_id, experiment_name, tracking_uri)
        return tracker

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        self._log_metrics(_numbers(record), step=record["epoch"])

    def log_report(self, eval_dir: Path) -> None:
        self._log_metrics(_report_metrics(eval_dir), step=0)
        for name in REPORT_FILES:
            if (eval_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(eval_dir / name), artifact_path=eval_dir.name)

    def log_bundle(self, bundle: Path) -> None:
        self.client.log_artifacts(self.run_id, str(bundle), artifact_path=f"bundle/{bundle.name}")

    def finish(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")

    def _log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])


class TensorBoardTracker:
    """Event files under the run directory (`<run>/tensorboard/`), written with torch's SummaryWriter."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.writer = _import("torch.utils.tensorboard", "tensorboard").SummaryWriter(str(log_dir))

    @classmethod
    def start(cls, run: RunDirectory) -> TensorBoardTracker:
        tracker = cls(run.tensorboard_dir)
        from torch.utils.tensorboard.summary import hparams

        # Only the session's start: TensorBoard's HParams tab then takes the metrics from the scalars logged.
        _, session_start, _ = hparams({k: _hparam_value(v) for k, v in _leaves(run.read_config(), ".")}, {})
        tracker.writer.file_writer.add_summary(session_start)
        tracker.writer.flush()
        log.info("tracking in TensorBoard: tensorboard --logdir %s", run.tensorboard_dir)
        return tracker

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        for tag, value in _numbers(record).items():
            self.writer.add_scalar(tag, value, global_step=record["epoch"])
        self.writer.flush()

    def log_report(self, eval_dir: Path) -> None:
        from matplotlib.image import imread

        for tag, value in _report_metrics(eval_dir).items():
            self.writer.add_scalar(tag, value, global_step=0)
        for name in REPORT_FILES:
            path = eval_dir / name
            if path.suffix == ".png" and path.is_file():
                self.writer.add_image(f"{eval_dir.name}/{path.stem}", imread(path), dataformats="HWC")
        if (eval_dir / "report.md").is_file():
            self.writer.add_text(f"{eval_dir.name}/report", (eval_dir / "report.md").read_text())
        self.writer.flush()

    def log_bundle(self, bundle: Path) -> None:
        # TensorBoard keeps no files: the bundle's manifest is logged as text, with where the bundle is.
        manifest = (bundle / "manifest.json").read_text()
        self.writer.add_text("bundle", f"`{bundle.resolve()}`\n\n```json\n{manifest}\n```")
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


def start_tracking(run: RunDirectory, train_args: TrainingArguments) -> Tracker:
    """The tracker of a new training run; records it in `run.tracking_file` (removes a stale one for none)."""
    tracker: Tracker
    if train_args.report_to == "mlflow":
        uri = mlflow_tracking_uri(train_args.tracking_uri)
        mlflow_tracker = MlflowTracker.start(uri, train_args.experiment_name, run)
        record = {"report_to": "mlflow", "tracking_uri": uri, "run_id": mlflow_tracker.run_id}
        tracker = mlflow_tracker
    elif train_args.report_to == "tensorboard":
        tracker = TensorBoardTracker.start(run)
        record = {"report_to": "tensorboard", "log_dir": run.relative(run.tensorboard_dir)}
    else:
        run.tracking_file.unlink(missing_ok=True)
        return NoTracker()
    run.tracking_file.write_text(json.dumps(record, indent=2))
    return tracker


def open_tracking(run: RunDirectory) -> Tracker:
    """The tracker `fit` started for `run`, reopened (NoTracker when the run was not tracked)."""
    if not run.tracking_file.is_file():
        return NoTracker()
    record = json.loads(run.tracking_file.read_text())
    if record["report_to"] == "tensorboard":
        return TensorBoardTracker(run.root / record["log_dir"])
    mlflow = _import("mlflow", "mlflow")
    from mlflow.exceptions import MlflowException

    uri, run_id = record["tracking_uri"], record["run_id"]
    try:
        client = mlflow.MlflowClient(uri)
        client.get_run(run_id)
    except MlflowException as err:
        raise ConfigError(
            f"{run.tracking_file}: the run was tracked as MLflow run {run_id} in {uri}, which cannot be reached "
            f"({err.message}); delete {run.tracking_file.name} to go on without tracking"
        ) from None
    return MlflowTracker(client, uri, run_id)


def mlflow_tracking_uri(given: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else a SQLite store in ./mlruns; a SQLite path made absolute, so
    that `evaluate` and `export` find the store from any directory."""
    uri = given or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_MLFLOW_STORE}"
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///")).resolve()
        database.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{database}"
    return uri


def _artifact_location(tracking_uri: str) -> str | None:
    """Beside a SQLite store (MLflow's own default is ./mlruns of whatever the current directory is); a server or
    another database decides for itself."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()


def _import(module: str, extra_package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(
            f"--report-to needs {extra_package}, from the `tracking` extra: pip install -e '.[tracking]' ({err})"
        ) from None


def _leaves(tree: Mapping[str, Any], separator: str, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, separator, f"{prefix}{key}{separator}")
        else:
            yield f"{prefix}{key}", value


def _numbers(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a history record, as train/ce, valid/auroc, step, elapsed_s (the epoch is the step axis)."""
    return {
        key: float(value)
        for key, value in _leaves(record, "/")
        if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool)
    }


def _report_metrics(eval_dir: Path) -> dict[str, float]:
    """Test metrics of an evaluation: threshold-free ones, and those at the decision threshold when it has one."""
    report = json.loads((eval_dir / "metrics.json").read_text())
    metrics = {name: m["value"] for name, m in report["threshold_free"].items()}
    if "decision" in report:
        policy = report["decision"]["policy"]
        metrics["threshold"] = report["decision"]["threshold"]
        metrics |= {name: m["value"] for name, m in report["thresholds"][policy]["metrics"].items()}
    return {f"{eval_dir.name}/{name}": float(value) for name, value in metrics.items() if value is not None}


def _param_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _hparam_value(value: Any) -> str | int | float | bool:
    return value if isinstance(value, str | int | float | bool) else json.dumps(value)
