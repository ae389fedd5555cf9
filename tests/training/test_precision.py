"""Mixed-precision training (`fit --precision`) on the CPU, with the tiny fixture models and SYNTHETIC notes."""

import json
import math

import pytest
import torch

from training.config import DataArguments, DistillArguments, EvalArguments, ModelArguments, TrainingArguments
from training.fit import fit
from training.precision import mixed_precision
from training.run_dir import RunDirectory


@pytest.mark.parametrize(
    ("precision", "dtype", "scaled"),
    [
        ("auto", torch.float32, False),
        ("fp32", torch.float32, False),
        ("bf16", torch.bfloat16, False),
        ("fp16", torch.float16, True),
    ],
)
def test_precision_on_cpu(precision, dtype, scaled):
    chosen, autocast, scaler = mixed_precision(precision, torch.device("cpu"))
    assert chosen == dtype and scaler.is_enabled() == scaled  # only fp16 needs its loss scaled
    with autocast():
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == dtype


@pytest.mark.parametrize("method", ["base", "mlkd"])
def test_bf16_training_on_cpu_has_finite_losses_close_to_fp32(
    tmp_path, notes_csv, tiny_bert_dir, tiny_teacher_dir, method
):
    def fit_in(precision):
        out = tmp_path / precision
        fit(
            DataArguments(data=str(notes_csv)),
            ModelArguments(student=str(tiny_bert_dir), teacher=str(tiny_teacher_dir), max_length=64),
            TrainingArguments(
                out=str(out), method=method, epochs=1, max_steps=4, seed=1, threads=1, precision=precision
            ),
            DistillArguments(word_policy="all", teacher_max_length=16, teacher_cache_dir=str(tmp_path / "cache")),
            EvalArguments(bootstrap=10),
        )
        summary = json.loads(RunDirectory(out).summary_file.read_text())
        (record,) = [json.loads(line) for line in RunDirectory(out).history_file.read_text().splitlines()]
        return summary["precision"], record["train"], record["valid"]

    precision, train, valid = fit_in("bf16")
    assert precision == "bfloat16"
    losses = {name: value for name, value in train.items() if isinstance(value, float)}
    assert set(losses) == ({"ce"} if method == "base" else {"ce", "hidden", "attention"})
    assert all(math.isfinite(value) for value in [*losses.values(), *valid.values()])
    _, fp32_train, _ = fit_in("fp32")
    for name, value in losses.items():  # the same steps, rounded differently: close, but not the same numbers
        assert value != fp32_train[name]
        assert value == pytest.approx(fp32_train[name], rel=0.05)
