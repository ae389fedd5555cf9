"""Options are checked when they are parsed, before anything is trained: closed choices, ranges, combinations."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from training.cli import app
from training.config import (
    THRESHOLD_POLICIES,
    ConfigError,
    DataArguments,
    DistillArguments,
    EvalArguments,
    ModelArguments,
    TrainingArguments,
    check_fit_options,
    parse_layer_map,
)

REPO = Path(__file__).resolve().parents[2]


def plain(output: str) -> str:
    """CLI output without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TrainingArguments(method="magic"), "--method: 'magic' is not one of 'base', 'mlkd', 'ensemble'"),
        (lambda: TrainingArguments(select_metric="acc"), "--select-metric: 'acc' is not one of 'auroc', 'brier'"),
        (lambda: EvalArguments(threshold_policy="typo"), "'prevalence', 'fixed-0.5', 'target-sensitivity'"),
        (lambda: DataArguments(data_format="xls"), "--data-format: 'xls' is not one of 'auto', 'ktas', 'table'"),
        (lambda: DistillArguments(word_policy="greek"), "--word-policy: 'greek' is not one of 'latin', 'all'"),
        (lambda: DistillArguments(hidden_loss="l1"), "--hidden-loss: 'l1' is not one of 'mse', 'cosine', 'relation'"),
        (lambda: DistillArguments(attention_loss="js"), "--attention-loss: 'js' is not one of 'mse', 'kl'"),
        (lambda: DistillArguments(attention_heads="all"), "--attention-heads: 'all' is not one of 'mean', 'by-index'"),
        (lambda: TrainingArguments(device="gpu"), "--device: 'gpu' is not one of"),
    ],
)
def test_a_closed_choice_names_the_option_and_the_allowed_values(make, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: DataArguments(valid_fraction=0.0), "--valid-fraction must be in (0, 1), got 0.0"),
        (lambda: DataArguments(test_fraction=1.5), "--test-fraction must be in (0, 1)"),
        (lambda: DataArguments(valid_fraction=0.5, test_fraction=0.5), "leave no training data"),
        (lambda: DataArguments(valid_file="v.csv"), "--valid-file and --test-file go together"),
        (lambda: DataArguments(text_columns=[]), "--text-columns"),
        (lambda: ModelArguments(max_length=0), "--max-length must be at least 2"),
        (lambda: TrainingArguments(epochs=0), "--epochs must be at least 1, got 0"),
        (lambda: TrainingArguments(max_steps=0), "--max-steps must be at least 1"),
        (lambda: TrainingArguments(batch_size=0), "--batch-size must be at least 1"),
        (lambda: TrainingArguments(grad_accum=0), "--grad-accum must be at least 1"),
        (lambda: TrainingArguments(patience=0), "--patience must be at least 1"),
        (lambda: TrainingArguments(threads=0), "--threads must be at least 1"),
        (lambda: TrainingArguments(encoder_lr=0.0), "--encoder-lr must be positive, got 0.0"),
        (lambda: TrainingArguments(head_lr=-1e-3), "--head-lr must be positive"),
        (lambda: TrainingArguments(warmup_ratio=1.0), "--warmup-ratio must be in [0, 1)"),
        (lambda: TrainingArguments(weight_decay=-0.1), "--weight-decay must be at least 0"),
        (lambda: DistillArguments(alpha=-1.0), "--alpha must be at least 0"),
        (lambda: DistillArguments(max_words=0), "--max-words must be at least 1"),
        (lambda: DistillArguments(teacher_max_length=1), "--teacher-max-length must be at least 2"),
        (lambda: DistillArguments(logit_weight=-0.5), "--logit-weight must be at least 0"),
        (lambda: DistillArguments(temperature=0.0), "--temperature must be positive"),
        (lambda: DistillArguments(layer_map="2-1"), "--layer-map '2-1': expected pairs like '2:1,4:2'"),
        (lambda: DistillArguments(layer_map="0:1"), "layers count from 1"),
        (lambda: EvalArguments(target_sensitivity=0.0), "--target-sensitivity must be in (0, 1]"),
        (lambda: EvalArguments(bootstrap=1), "--bootstrap must be at least 2"),
    ],
)
def test_a_value_out_of_range_names_the_option(make, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make()


def test_edges_of_the_ranges_are_accepted():
    TrainingArguments(device="cuda:1", warmup_ratio=0.0, weight_decay=0.0, max_steps=1, threads=1)
    TrainingArguments(device="cpu")
    EvalArguments(target_sensitivity=1.0, bootstrap=2)
    DistillArguments(alpha=0.0, beta=0.0, logit_weight=0.0)


def test_the_logit_weight_defaults_to_the_methods_and_0_is_kept():
    assert DistillArguments().logit_weight_for("mlkd") == 0.0
    assert DistillArguments().logit_weight_for("ensemble") == 1.0
    assert DistillArguments(logit_weight=0.0).logit_weight_for("ensemble") == 0.0
    assert DistillArguments(logit_weight=0.5).logit_weight_for("mlkd") == 0.5


def test_the_layer_map_is_parsed_once_by_the_options():
    assert parse_layer_map("2:1, 4:3") == [(2, 1), (4, 3)]
    assert parse_layer_map(None) is None and parse_layer_map("") is None
    assert DistillArguments(layer_map="2:1,4:3").layer_pairs == [(2, 1), (4, 3)]
    assert DistillArguments().layer_pairs is None


def test_distillation_needs_a_teacher():
    groups = [DataArguments(), ModelArguments(), TrainingArguments(method="mlkd"), DistillArguments(), EvalArguments()]
    with pytest.raises(ConfigError, match="--method mlkd needs --teacher"):
        check_fit_options(*groups)
    check_fit_options(DataArguments(), ModelArguments(teacher="t"), *groups[2:])


def test_cli_typo_in_a_choice_fails_at_parse_time_listing_the_allowed_values(tmp_path, monkeypatch):
    import training.fit

    def never(*args, **kwargs):
        raise AssertionError("fit must not run")

    monkeypatch.setattr(training.fit, "fit", never)
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["fit", "--threshold-policy", "typo", "--out", str(tmp_path / "run")])
    assert time.perf_counter() - start < 2
    assert result.exit_code == 2
    output = plain(result.output)
    assert "--threshold-policy" in output and "'typo'" in output
    assert ", ".join(f"'{p}'" for p in THRESHOLD_POLICIES) in output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--select-metric", "acc"], "'acc' is not one of 'auroc', 'brier', 'loss', 'f1'"),
        (["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--layer-map", "2-1"], "--layer-map '2-1': expected pairs"),
        (["--method", "ensemble"], "--method ensemble needs --teacher"),
    ],
)
def test_cli_bad_values_fail_before_training(tmp_path, args, message):
    result = CliRunner().invoke(app, ["fit", "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 2
    assert message in plain(result.output)
    assert not (tmp_path / "run").exists()


def test_cli_checks_values_from_a_config_file(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"evaluation": {"threshold_policy": "youden"}}))
    result = CliRunner().invoke(app, ["fit", "--config", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "--threshold-policy: 'youden' is not one of 'prevalence', 'fixed-0.5'" in plain(result.output)


def test_cli_evaluate_and_export_check_the_metric(tmp_path):
    for command in (["evaluate", "--run", str(tmp_path)], ["export", "--run", str(tmp_path), "--out", str(tmp_path)]):
        result = CliRunner().invoke(app, [*command, "--metric", "accuracy"])
        assert result.exit_code == 2
        assert "'accuracy' is not one of 'auroc', 'brier', 'loss', 'f1'" in plain(result.output)


def test_python_m_training_fails_on_a_typo_in_under_2_seconds(tmp_path):
    """The whole process, imports included: nothing heavy is imported before the options are checked."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "training", "fit", "--threshold-policy", "typo", "--out", str(tmp_path / "run")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr
    assert "'prevalence', 'fixed-0.5', 'target-sensitivity'" in plain(result.stderr)
    assert elapsed < 2, f"took {elapsed:.1f} s"


def test_the_cli_module_imports_no_heavy_library():
    code = "import sys, training.cli; print(sorted({'torch', 'transformers', 'pandas', 'sklearn'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr
