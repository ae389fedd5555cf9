"""End-to-end base fine-tuning on SYNTHETIC notes with the tiny fixture encoder."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from training.checkpoints import CheckpointKeeper
from training.cli import app
from training.config import DataArguments, DistillArguments, EvalArguments, ModelArguments, TrainingArguments
from training.fit import fit
from training.modeling import load_student, load_tokenizer, parameter_groups
from training.predict import predict_proba
from training.run_dir import RunDirectory


def train_args(out, **overrides):
    base = {
        "out": str(out),
        "epochs": 4,
        "batch_size": 16,
        "encoder_lr": 2e-3,
        "head_lr": 5e-3,
        "patience": 4,
        "seed": 1,
    }
    return TrainingArguments(**{**base, **overrides})


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, notes_csv, tiny_bert_dir):
    out = tmp_path_factory.mktemp("runs") / "base"
    fit(
        DataArguments(data=str(notes_csv)),
        ModelArguments(student=str(tiny_bert_dir), max_length=64),
        train_args(out),
        DistillArguments(),
        EvalArguments(bootstrap=200),
    )
    return out


def test_base_run_learns_and_writes_everything(base_run):
    run = RunDirectory(base_run)
    report = json.loads(run.metrics_file().read_text())
    assert report["threshold_free"]["auroc"]["value"] > 0.9  # learnable fixture: chance is 0.5
    for name in (
        "run_config.json",
        "split.json",
        "history.jsonl",
        "train_summary.json",
        "eval/report.md",
        "eval/roc.png",
        "eval/pr.png",
        "eval/reliability.png",
    ):
        assert (base_run / name).stat().st_size > 0, name
    history = [json.loads(line) for line in (base_run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, len(history) + 1))
    assert {"auroc", "brier", "loss", "f1"} <= set(history[0]["valid"])
    for metric in ("auroc", "brier", "loss", "f1"):
        assert (run.checkpoint(metric) / "model.safetensors").exists()
    predictions = pd.read_csv(run.predictions_file())
    assert list(predictions.columns) == ["row_id", "label", "p_emergency"]  # no text
    assert len(predictions) == report["counts"]["n"] and predictions["p_emergency"].between(0, 1).all()
    assert roc_auc_score(predictions["label"], predictions["p_emergency"]) == pytest.approx(
        report["threshold_free"]["auroc"]["value"]
    )
    decision = run.decision(run.checkpoint("auroc"))
    assert decision == report["decision"]
    assert (decision["policy"], decision["target_sensitivity"]) == ("target-sensitivity", 0.95)  # the default
    assert decision["threshold"] == report["thresholds"]["target-sensitivity"]["threshold"]
    # synthetic notes are half emergencies
    assert report["thresholds"]["prevalence"]["threshold"] == pytest.approx(0.5, abs=0.02)
    assert report["checkpoint"] == {"metric": "auroc", "path": run.relative(run.checkpoint("auroc"))}
    # The decision threshold is stored once: in the test report, not in the checkpoint.
    info = json.loads(run.checkpoint_info_file(run.checkpoint("auroc")).read_text())
    assert set(info) == {"epoch", "valid"} and set(info["valid"]) == {"auroc", "brier", "loss", "f1"}


def test_evaluation_calibrates_on_validation_and_thresholds_the_calibrated_probabilities(base_run):
    from app.inference import calibrated_probability
    from app.manifest import Calibration
    from training.data.loading import load_parts
    from training.evaluate import choose_threshold

    run = RunDirectory(base_run)
    report = json.loads(run.metrics_file().read_text())
    parts = load_parts(run.data_arguments())
    calibration = Calibration.model_validate(report["calibration"])  # exactly the manifest's fields
    assert (
        calibration.method in ("temperature", "platt")
        and report["calibration_selection"]["chosen"] == calibration.method
    )
    assert (calibration.fitted_on, calibration.notes) == ("validation split", len(parts["valid"]))
    checkpoint = run.checkpoint("auroc")
    model, tokenizer = load_student(str(checkpoint)), load_tokenizer(str(checkpoint))
    _, valid_logits = predict_proba(model, tokenizer, parts["valid"].texts, max_length=64)
    _, test_logits = predict_proba(model, tokenizer, parts["test"].texts, max_length=64)
    valid_prob = calibrated_probability(valid_logits[:, 1] - valid_logits[:, 0], calibration)
    assert report["decision"]["threshold"] == pytest.approx(
        choose_threshold("target-sensitivity", valid_labels=parts["valid"].labels, valid_prob=valid_prob), abs=1e-5
    )
    predictions = pd.read_csv(run.predictions_file())
    np.testing.assert_allclose(
        predictions["p_emergency"],
        calibrated_probability(test_logits[:, 1] - test_logits[:, 0], calibration),
        atol=1e-6,
    )
    before, after = report["uncalibrated"]["threshold_free"], report["threshold_free"]
    for name in ("brier", "ece", "calibration_slope", "calibration_in_the_large", "mean_minus_prevalence"):
        assert name in before and name in after
    assert before["auroc"]["value"] == pytest.approx(after["auroc"]["value"], abs=1e-3)  # a monotone map
    assert "ece_if_calibrated" in report["reliability"] and "ece_if_calibrated" in report["uncalibrated"]["reliability"]
    markdown = (base_run / "eval" / "report.md").read_text()
    for expected in ("## Calibration", "before (softmax)", "perfectly calibrated model", "## Threshold policies"):
        assert expected in markdown
    assert "| `target-sensitivity` |" in markdown and "| yes |" in markdown


def test_only_best_epochs_are_kept_on_disk(base_run):
    root = base_run / "checkpoints"
    kept = {p.name for p in root.glob("epoch-*")}
    assert kept == {(root / f"best-{m}").resolve().name for m in ("auroc", "brier", "loss", "f1")}


def test_reloaded_checkpoint_predicts_identically(tmp_path, tiny_bert_dir, notes):
    torch.manual_seed(0)
    model, tokenizer = load_student(str(tiny_bert_dir)), load_tokenizer(str(tiny_bert_dir))
    texts = [t for t, _ in notes[:40]]
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-3, 1e-2, 0.01))
    batch = tokenizer(texts[:8], padding=True, return_tensors="pt")
    model(**batch, labels=torch.tensor([y for _, y in notes[:8]])).loss.backward()
    optimizer.step()
    before, _ = predict_proba(model, tokenizer, texts)
    run = RunDirectory(tmp_path)
    CheckpointKeeper(run).update(1, {"auroc": 1.0, "brier": 0.0, "loss": 0.0, "f1": 1.0}, model, tokenizer)
    path = run.checkpoint("auroc")
    after, _ = predict_proba(load_student(str(path)), load_tokenizer(str(path)), texts)
    np.testing.assert_allclose(before, after, atol=1e-6)


def test_parameter_groups_split_head_from_encoder(tiny_bert_dir):
    model = load_student(str(tiny_bert_dir))
    groups = parameter_groups(model, encoder_lr=1e-5, head_lr=1e-2, weight_decay=0.1)
    head = {id(p) for g in groups if g["lr"] == 1e-2 for p in g["params"]}
    assert head == {id(p) for n, p in model.named_parameters() if n.startswith(("classifier", "bert.pooler"))}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(g["weight_decay"] == 0 for g in groups for p in g["params"] if p.ndim < 2)


def test_same_seed_same_training(tmp_path, notes_csv, tiny_bert_dir):
    histories = []
    for name in ("a", "b"):
        fit(
            DataArguments(data=str(notes_csv)),
            ModelArguments(student=str(tiny_bert_dir), max_length=64),
            train_args(tmp_path / name, epochs=1, max_steps=3),
            DistillArguments(),
            EvalArguments(bootstrap=10),
        )
        histories.append(json.loads((tmp_path / name / "history.jsonl").read_text())["valid"])
    assert histories[0] == histories[1]


def test_cli_config_file_with_flag_override(tmp_path, notes_csv, tiny_bert_dir):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data:\n  data: {notes_csv}\nmodel:\n  student: {tiny_bert_dir}\n  max_length: 48\n"
        f"training:\n  epochs: 5\n  max_steps: 2\n  batch_size: 32\nevaluation:\n  bootstrap: 10\n"
    )
    out = tmp_path / "cli-run"
    result = CliRunner().invoke(app, ["fit", "--config", str(config), "--epochs", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["training"]["epochs"] == 1 and saved["training"]["batch_size"] == 32
    assert saved["model"]["max_length"] == 48

    result = CliRunner().invoke(app, ["evaluate", "--run", str(out), "--bootstrap", "10"])
    assert result.exit_code == 0, result.output
    assert (out / "eval" / "report.md").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "magic"], "'magic' is not one of 'base', 'mlkd', 'ensemble'"),
        (["--method", "mlkd"], "needs --teacher"),
        (["--data", "missing.csv"], "no such file"),
    ],
)
def test_cli_reports_bad_input_clearly(tmp_path, tiny_bert_dir, args, message):
    result = CliRunner().invoke(app, ["fit", "--student", str(tiny_bert_dir), "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2
    assert message in " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())  # without rich's box


def test_cli_rejects_unknown_config_keys(tmp_path):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"epochz": 3}))
    result = CliRunner().invoke(app, ["fit", "--config", str(config)])
    assert result.exit_code != 0
    assert "epochz" in result.output


def test_frozen_embeddings_stay_put(tmp_path, notes_csv, tiny_bert_dir):
    out = tmp_path / "frozen"
    fit(
        DataArguments(data=str(notes_csv)),
        ModelArguments(student=str(tiny_bert_dir), max_length=64),
        train_args(out, epochs=1, max_steps=3, freeze_embeddings=True),
        DistillArguments(),
        EvalArguments(bootstrap=10),
    )
    before = load_student(str(tiny_bert_dir)).get_input_embeddings().weight
    checkpoint = str(RunDirectory(out).checkpoint("loss"))
    after = load_student(checkpoint).get_input_embeddings().weight
    assert torch.equal(before, after)
    assert not torch.equal(
        load_student(str(tiny_bert_dir)).bert.encoder.layer[0].output.dense.weight,
        load_student(checkpoint).bert.encoder.layer[0].output.dense.weight,
    )


def test_cli_pretrain_needs_its_required_options():
    result = CliRunner().invoke(app, ["pretrain", "--corpus", "icd10cm"])
    assert result.exit_code != 0
    assert "--model" in result.output and "--out" in result.output
