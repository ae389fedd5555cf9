"""`fit --report-to mlflow|tensorboard` on a tiny run (SYNTHETIC notes), read back with MLflow's client and
TensorBoard's EventAccumulator; `evaluate` and `export` of the run log to the same place."""

import json
import re
import sys
from pathlib import Path

import mlflow
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from typer.testing import CliRunner

from tests.training.test_resume import Stopped, stop_during_step
from training.cli import app
from training.config import ConfigError, DataArguments, DistillArguments, EvalArguments, ModelArguments
from training.config import TrainingArguments as Training
from training.fit import fit
from training.run_dir import RunDirectory
from training.tracking import REPORT_FILES, open_tracking, start_tracking

TINY_RUN = ["--epochs", "2", "--batch-size", "16", "--encoder-lr", "2e-3", "--head-lr", "5e-3", "--seed", "1"]
PLOTS = ("roc", "pr", "reliability")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlruns') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory, notes_csv, tiny_bert_dir, store):
    out = tmp_path_factory.mktemp("runs") / "tracked"
    args = ["fit", "--data", str(notes_csv), "--student", str(tiny_bert_dir), "--max-length", "64", *TINY_RUN]
    args += ["--bootstrap", "20", "--out", str(out), "--report-to", "mlflow", "--tracking-uri", store]
    result = CliRunner().invoke(app, [*args, "--experiment-name", "tiny"])
    assert result.exit_code == 0, result.output
    return RunDirectory(out)


@pytest.fixture(scope="module")
def bundle(mlflow_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    result = CliRunner().invoke(app, ["export", "--run", str(mlflow_run.root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def history(run: RunDirectory) -> list[dict]:
    return [json.loads(line) for line in run.history_file.read_text().splitlines()]


def mlflow_run_id(run: RunDirectory) -> str:
    return json.loads(run.tracking_file.read_text())["run_id"]


def artifact_bytes(store: str, run_id: str, path: str) -> bytes:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=store)).read_bytes()


def test_mlflow_run_holds_the_options_each_epoch_and_the_test_report(mlflow_run, store):
    client = mlflow.MlflowClient(store)
    tracked = client.get_run(mlflow_run_id(mlflow_run))
    assert tracked.info.status == "FINISHED" and tracked.info.run_name == "tracked"
    assert client.get_experiment(tracked.info.experiment_id).name == "tiny"

    config = mlflow_run.read_config()
    params = tracked.data.params
    assert set(params) == {f"{group}.{name}" for group, options in config.items() for name in options}
    assert params["training.epochs"] == "2" and params["model.max_length"] == "64"
    assert params["data.text_columns"] == '["text"]' and params["distill.layer_map"] == "null"
    assert params["training.report_to"] == "mlflow"

    epochs = history(mlflow_run)
    assert len(epochs) == 2
    for key, value_of in [("valid/auroc", lambda h: h["valid"]["auroc"]), ("train/ce", lambda h: h["train"]["ce"])]:
        logged = [(m.step, m.value) for m in client.get_metric_history(tracked.info.run_id, key)]
        assert logged == [(h["epoch"], pytest.approx(value_of(h))) for h in epochs], key

    report = json.loads(mlflow_run.metrics_file().read_text())
    assert tracked.data.metrics["eval/auroc"] == pytest.approx(report["threshold_free"]["auroc"]["value"])
    assert tracked.data.metrics["eval/threshold"] == pytest.approx(report["decision"]["threshold"])
    artifacts = {a.path for a in client.list_artifacts(tracked.info.run_id, "eval")}
    assert artifacts == {f"eval/{name}" for name in REPORT_FILES}  # not predictions.csv
    roc = artifact_bytes(store, tracked.info.run_id, "eval/roc.png")
    assert roc == (mlflow_run.eval_dir() / "roc.png").read_bytes()


def test_export_logs_the_bundle_to_the_same_mlflow_run(mlflow_run, bundle, store):
    client = mlflow.MlflowClient(store)
    run_id = mlflow_run_id(mlflow_run)
    logged = {a.path for a in client.list_artifacts(run_id, "bundle/tiny")}
    assert {f"bundle/tiny/{p.name}" for p in bundle.iterdir()} == logged
    assert "bundle/tiny/model.onnx" in logged
    manifest = artifact_bytes(store, run_id, "bundle/tiny/manifest.json")
    assert manifest == (bundle / "manifest.json").read_bytes()
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1  # no second run


def test_a_later_evaluation_is_logged_beside_the_first(mlflow_run, notes_csv, store):
    result = CliRunner().invoke(
        app, ["evaluate", "--run", str(mlflow_run.root), "--data", str(notes_csv), "--bootstrap", "10"]
    )
    assert result.exit_code == 0, result.output
    client = mlflow.MlflowClient(store)
    run_id = mlflow_run_id(mlflow_run)
    assert {a.path for a in client.list_artifacts(run_id, "eval-external")} == {
        f"eval-external/{name}" for name in REPORT_FILES
    }
    external = json.loads(mlflow_run.metrics_file(external=True).read_text())
    auroc = client.get_run(run_id).data.metrics["eval-external/auroc"]
    assert auroc == pytest.approx(external["threshold_free"]["auroc"]["value"])


def test_tensorboard_event_files_hold_the_options_each_epoch_and_the_report(tmp_path, notes_csv, tiny_bert_dir, bundle):
    out = tmp_path / "tb"
    fit(
        DataArguments(data=str(notes_csv)),
        ModelArguments(student=str(tiny_bert_dir), max_length=64),
        Training(out=str(out), epochs=2, encoder_lr=2e-3, head_lr=5e-3, seed=1, report_to="tensorboard"),
        DistillArguments(),
        EvalArguments(bootstrap=20),
    )
    run = RunDirectory(out)
    open_tracking(run).log_bundle(bundle)  # what `export` does for a run tracked in TensorBoard
    events = EventAccumulator(str(run.tensorboard_dir), size_guidance={"images": 0, "tensors": 0}).Reload()

    epochs = history(run)
    assert [(e.step, e.value) for e in events.Scalars("valid/auroc")] == [
        (h["epoch"], pytest.approx(h["valid"]["auroc"])) for h in epochs
    ]
    report = json.loads(run.metrics_file().read_text())
    assert events.Scalars("eval/auroc")[0].value == pytest.approx(report["threshold_free"]["auroc"]["value"])
    assert {f"eval/{plot}" for plot in PLOTS} <= set(events.Tags()["images"])
    assert all(events.Images(f"eval/{plot}")[0].width > 0 for plot in PLOTS)

    session = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams = session.session_start_info.hparams
    assert hparams["training.report_to"].string_value == "tensorboard" and hparams["training.epochs"].number_value == 2
    texts = {
        tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode()
        for tag in events.Tags()["tensors"]
        if tag.endswith("text_summary")
    }
    assert "## Calibration" in texts["eval/report/text_summary"]
    assert json.loads((bundle / "manifest.json").read_text())["name"] in texts["bundle/text_summary"]


def test_a_resumed_run_goes_on_logging_to_its_mlflow_run(tmp_path, monkeypatch, notes_csv, tiny_bert_dir, store):
    out = tmp_path / "resumed"
    training = {"out": str(out), "epochs": 2, "encoder_lr": 2e-3, "head_lr": 5e-3, "seed": 1, "threads": 1}
    training |= {"report_to": "mlflow", "tracking_uri": store, "experiment_name": "resumed"}
    options = (DataArguments(data=str(notes_csv)), ModelArguments(student=str(tiny_bert_dir), max_length=64))
    with monkeypatch.context() as patch:
        stop_during_step(patch, 12)  # 9 steps an epoch: during epoch 2
        with pytest.raises(Stopped):
            fit(*options, Training(**training), DistillArguments(), EvalArguments(bootstrap=10))
    run = RunDirectory(out)
    client, run_id = mlflow.MlflowClient(store), mlflow_run_id(run)
    assert client.get_run(run_id).info.status == "RUNNING"

    fit(*options, Training(**training, resume=True), DistillArguments(), EvalArguments(bootstrap=10))
    assert mlflow_run_id(run) == run_id and client.get_run(run_id).info.status == "FINISHED"
    logged = [(m.step, m.value) for m in client.get_metric_history(run_id, "valid/auroc")]
    assert logged == [(h["epoch"], pytest.approx(h["valid"]["auroc"])) for h in history(run)]  # each epoch once
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1


def test_report_to_none_forgets_an_earlier_tracker_of_the_directory(mlflow_run, tmp_path):
    run = RunDirectory(tmp_path / "reused")
    run.root.mkdir()
    run.tracking_file.write_text(mlflow_run.tracking_file.read_text())
    assert type(start_tracking(run, Training(out=str(run.root)))).__name__ == "NoTracker"
    assert not run.tracking_file.exists()  # an export of the new run must not log into the old MLflow run


def test_an_unreachable_mlflow_run_is_a_clear_error(mlflow_run, tmp_path, store):
    run = RunDirectory(tmp_path / "moved")
    run.root.mkdir()
    run.tracking_file.write_text(json.dumps({"report_to": "mlflow", "tracking_uri": store, "run_id": "0" * 32}))
    with pytest.raises(ConfigError, match=r"cannot be reached .*delete tracking.json"):
        open_tracking(run)


def test_tracking_uri_needs_report_to_mlflow():
    with pytest.raises(ConfigError, match="--tracking-uri goes with --report-to mlflow"):
        Training(tracking_uri="sqlite:///x.db", report_to="tensorboard")


@pytest.mark.parametrize(("report_to", "module"), [("mlflow", "mlflow"), ("tensorboard", "torch.utils.tensorboard")])
def test_a_missing_tracking_extra_is_a_clear_error(monkeypatch, tmp_path, notes_csv, tiny_bert_dir, report_to, module):
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without the `tracking` extra imports
    out = tmp_path / "r"
    args = ["fit", "--data", str(notes_csv), "--student", str(tiny_bert_dir), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--report-to", report_to])
    assert result.exit_code == 2
    assert "from the `tracking` extra: pip install -e '.[tracking]'" in " ".join(
        re.sub(r"[│╭╮╰╯─]", " ", result.output).split()
    )
    assert not (out / "history.jsonl").exists()  # refused before training
