"""The layout of a run directory, in one place: `fit` writes it, `evaluate` and `export` read it.

    runs/NAME/
      run_config.json          every option, grouped: data, model, training, distill, evaluation
      split.json               source sha256 + row ids of train/valid/test (never text)
      history.jsonl            one line of validation metrics per epoch
      train_summary.json       steps, epochs, training seconds, device, precision, processes
      tracking.json            where `fit --report-to` logs (MLflow store and run id, or tensorboard/); absent: none
      tensorboard/             TensorBoard event files (`--report-to tensorboard`)
      checkpoints/epoch-N/     save_pretrained() of the student + tokenizer + checkpoint.json (epoch, valid)
      checkpoints/best-M       symlink to the epoch that is best for validation metric M (auroc, brier, loss, f1)
      checkpoints/resume.pt    the resumable state of a run in progress (training/resume.py); removed at its end
      eval/                    test report of one checkpoint: metrics.json (with the decision threshold),
                               report.md, roc.png, pr.png, reliability.png, predictions.csv
      eval-external/           the same for `evaluate --data FILE` (no decision threshold)
      eval-render-STYLE/       the same for `evaluate --render STYLE`: the test split rendered in STYLE

The decision threshold (policy and value) is stored once, as `decision` in eval/metrics.json, beside the
`checkpoint` it was chosen for. Light imports only (no torch): the CLI uses this before validating.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from training.config import (
    SELECT_METRICS,
    DataArguments,
    DistillArguments,
    EvalArguments,
    ModelArguments,
    SelectMetric,
    TrainingArguments,
)
from training.errors import RunDirectoryError

CONFIG_FILE = "run_config.json"
SPLIT_FILE = "split.json"
HISTORY_FILE = "history.jsonl"
SUMMARY_FILE = "train_summary.json"
TRACKING_FILE = "tracking.json"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_INFO_FILE = "checkpoint.json"
RESUME_FILE = "resume.pt"
EVAL_DIR = "eval"
EXTERNAL_EVAL_DIR = "eval-external"
RENDER_EVAL_DIR = "eval-render-{style}"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"


@dataclass(frozen=True)
class RunDirectory:
    """Paths and files of the run directory `root` (nothing is created until something is written)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ------------------------------------------------------------------ paths

    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def split_file(self) -> Path:
        return self.root / SPLIT_FILE

    @property
    def history_file(self) -> Path:
        return self.root / HISTORY_FILE

    @property
    def summary_file(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def tracking_file(self) -> Path:
        return self.root / TRACKING_FILE

    @property
    def tensorboard_dir(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def resume_file(self) -> Path:
        return self.checkpoints_dir / RESUME_FILE

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints_dir / f"epoch-{epoch}"

    def best_link(self, metric: SelectMetric) -> Path:
        """The symlink `checkpoints/best-<metric>` (it may not exist yet)."""
        return self.checkpoints_dir / f"best-{metric}"

    def checkpoint(self, metric: SelectMetric) -> Path:
        """The resolved directory of the best checkpoint for `metric`; FileNotFoundError when there is none."""
        link = self.best_link(metric)
        if not link.exists():
            raise FileNotFoundError(f"{link}: no checkpoint; metrics kept are {', '.join(SELECT_METRICS)}")
        return link.resolve()

    @staticmethod
    def checkpoint_info_file(checkpoint: Path) -> Path:
        return checkpoint / CHECKPOINT_INFO_FILE

    def eval_dir(self, external: bool = False, render: str | None = None) -> Path:
        if render:
            return self.root / RENDER_EVAL_DIR.format(style=render)
        return self.root / (EXTERNAL_EVAL_DIR if external else EVAL_DIR)

    def metrics_file(self, external: bool = False, render: str | None = None) -> Path:
        return self.eval_dir(external, render) / METRICS_FILE

    def predictions_file(self, external: bool = False, render: str | None = None) -> Path:
        return self.eval_dir(external, render) / PREDICTIONS_FILE

    # ------------------------------------------------------------------ the options of the run

    def write_config(
        self,
        data: DataArguments,
        model: ModelArguments,
        training: TrainingArguments,
        distill: DistillArguments,
        evaluation: EvalArguments,
    ) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(json.dumps(run_config(data, model, training, distill, evaluation), indent=2))

    def read_config(self) -> dict[str, Any]:
        if not self.config_file.is_file():
            raise FileNotFoundError(f"{self.root}: not a run directory (no {CONFIG_FILE})")
        config: dict[str, Any] = json.loads(self.config_file.read_text())
        return config

    def data_arguments(self, **overrides: Any) -> DataArguments:
        """The run's data options, reading its saved split (unless `overrides` say otherwise)."""
        return DataArguments(**{**self.read_config()["data"], "split_file": str(self.split_file), **overrides})

    def model_arguments(self) -> ModelArguments:
        return ModelArguments(**self.read_config()["model"])

    def eval_arguments(self) -> EvalArguments:
        known = {f.name for f in fields(EvalArguments)}
        return EvalArguments(**{k: v for k, v in self.read_config().get("evaluation", {}).items() if k in known})

    # ------------------------------------------------------------------ the test report and the decision

    def relative(self, path: Path) -> str:
        """`path` (inside the run) relative to the run, as recorded in reports."""
        return str(Path(path).resolve().relative_to(self.root.resolve()))

    def test_report(self, checkpoint: Path | None = None) -> dict[str, Any]:
        """eval/metrics.json; with `checkpoint`, it must be the report of that checkpoint."""
        path = self.metrics_file()
        if not path.is_file():
            raise RunDirectoryError(f"{path}: missing; run `python -m training evaluate --run {self.root}` first")
        report: dict[str, Any] = json.loads(path.read_text())
        if checkpoint is not None:
            evaluated = (self.root / report["checkpoint"]["path"]).resolve()
            if evaluated != Path(checkpoint).resolve():
                raise RunDirectoryError(
                    f"{path} describes {evaluated.name}, not {Path(checkpoint).name}; run "
                    f"`python -m training evaluate --run {self.root} --metric <the checkpoint's metric>` first"
                )
        return report

    def decision(self, checkpoint: Path | None = None) -> dict[str, Any]:
        """The decision threshold chosen on the run's own data: {policy, threshold, target_sensitivity}."""
        report = self.test_report(checkpoint)
        if "decision" not in report:
            raise RunDirectoryError(f"{self.metrics_file()}: no decision threshold; evaluate the run again")
        decision: dict[str, Any] = report["decision"]
        return decision


def run_config(
    data: DataArguments,
    model: ModelArguments,
    training: TrainingArguments,
    distill: DistillArguments,
    evaluation: EvalArguments,
) -> dict[str, Any]:
    """Every option of a run, grouped as run_config.json keeps them."""
    groups: dict[str, Any] = {
        "data": data,
        "model": model,
        "training": training,
        "distill": distill,
        "evaluation": evaluation,
    }
    return {name: {f.name: getattr(group, f.name) for f in fields(group)} for name, group in groups.items()}
