"""The run directory's layout, and the decision threshold stored once (in the test report)."""

import json
import os

import pytest

from training.config import DataArguments, DistillArguments, EvalArguments, ModelArguments, TrainingArguments
from training.errors import RunDirectoryError
from training.run_dir import RunDirectory


def test_layout(tmp_path):
    run = RunDirectory(tmp_path)
    assert run.config_file == tmp_path / "run_config.json"
    assert run.split_file == tmp_path / "split.json"
    assert run.history_file == tmp_path / "history.jsonl"
    assert run.summary_file == tmp_path / "train_summary.json"
    assert run.epoch_checkpoint(3) == tmp_path / "checkpoints" / "epoch-3"
    assert run.best_link("brier") == tmp_path / "checkpoints" / "best-brier"
    assert run.checkpoint_info_file(run.epoch_checkpoint(3)) == tmp_path / "checkpoints" / "epoch-3" / "checkpoint.json"
    assert run.metrics_file() == tmp_path / "eval" / "metrics.json"
    assert run.predictions_file(external=True) == tmp_path / "eval-external" / "predictions.csv"
    assert RunDirectory(str(tmp_path)).root == tmp_path


def test_config_round_trips(tmp_path):
    run = RunDirectory(tmp_path / "run")
    data = DataArguments(data="notes.csv", valid_fraction=0.2)
    run.write_config(
        data,
        ModelArguments(max_length=64),
        TrainingArguments(method="mlkd"),
        DistillArguments(layer_map="2:1"),
        EvalArguments(threshold_policy="fixed-0.5"),
    )
    config = run.read_config()
    assert set(config) == {"data", "model", "training", "distill", "evaluation"}
    assert config["distill"]["layer_map"] == "2:1" and config["training"]["method"] == "mlkd"
    assert run.data_arguments() == DataArguments(data="notes.csv", valid_fraction=0.2, split_file=str(run.split_file))
    assert run.model_arguments().max_length == 64
    assert run.eval_arguments().threshold_policy == "fixed-0.5"


def test_missing_parts_are_named(tmp_path):
    run = RunDirectory(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        run.read_config()
    with pytest.raises(FileNotFoundError, match=r"best-auroc: no checkpoint; metrics kept are auroc, brier, loss, f1"):
        run.checkpoint("auroc")
    with pytest.raises(RunDirectoryError, match=r"eval/metrics\.json: missing; run `python -m training evaluate"):
        run.decision()


def test_the_decision_is_read_from_the_report_of_the_same_checkpoint(tmp_path):
    run = RunDirectory(tmp_path)
    for epoch in (1, 2):
        run.epoch_checkpoint(epoch).mkdir(parents=True)
    os.symlink("epoch-1", run.best_link("auroc"))
    os.symlink("epoch-2", run.best_link("loss"))
    decision = {"policy": "prevalence", "threshold": 0.42, "target_sensitivity": 0.95}
    run.eval_dir().mkdir()
    run.metrics_file().write_text(
        json.dumps({"checkpoint": {"metric": "auroc", "path": "checkpoints/epoch-1"}, "decision": decision})
    )
    assert run.checkpoint("auroc") == run.epoch_checkpoint(1).resolve()
    assert run.relative(run.checkpoint("auroc")) == "checkpoints/epoch-1"
    assert run.decision(run.checkpoint("auroc")) == decision
    with pytest.raises(RunDirectoryError, match="describes epoch-1, not epoch-2"):
        run.decision(run.checkpoint("loss"))

    run.metrics_file().write_text(json.dumps({"checkpoint": {"metric": "auroc", "path": "checkpoints/epoch-1"}}))
    with pytest.raises(RunDirectoryError, match="no decision threshold"):
        run.decision()
