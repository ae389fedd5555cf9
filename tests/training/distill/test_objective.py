"""The DSG-KD objective on the tiny fixture models (SYNTHETIC notes): live teacher vs cache, frozen teacher."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from training.config import DataArguments, DistillArguments, EvalArguments, ModelArguments, TrainingArguments
from training.data.examples import Examples
from training.distill.objective import build_distill_objective
from training.fit import fit
from training.modeling import load_student, load_tokenizer
from training.run_dir import RunDirectory


@pytest.fixture(scope="module")
def train_examples(notes):
    texts = [t for t, _ in notes[:64]]
    return Examples(texts, np.array([y for _, y in notes[:64]]), np.arange(64), "synthetic")


def objective_for(tiny_bert_dir, tiny_teacher_dir, examples, method="mlkd", **distill):
    torch.manual_seed(0)
    student = load_student(str(tiny_bert_dir), attn_implementation="eager")
    args = DistillArguments(word_policy="all", **distill)
    model_args = ModelArguments(student=str(tiny_bert_dir), teacher=str(tiny_teacher_dir), max_length=64)
    objective = build_distill_objective(
        method, student, load_tokenizer(str(tiny_bert_dir)), model_args, args, examples, torch.device("cpu")
    )
    return student, objective


def test_cached_teacher_gives_the_live_loss(tiny_bert_dir, tiny_teacher_dir, train_examples):
    student, live = objective_for(tiny_bert_dir, tiny_teacher_dir, train_examples, teacher_cache=False)
    _, cached = objective_for(tiny_bert_dir, tiny_teacher_dir, train_examples, teacher_cache=True)
    assert cached.teacher is None and cached.cache is not None
    cached.distill_loss.load_state_dict(live.distill_loss.state_dict())
    student.eval()  # no dropout: both calls see the same student
    batch = live.collator(train_examples)([5, 17, 3, 40])
    words = live.count_words(batch)
    assert words > 0
    live_loss, live_logs = live.loss(student, batch, 1, words)
    cached_loss, cached_logs = cached.loss(student, batch, 1, words)
    torch.testing.assert_close(cached_loss, live_loss, atol=1e-5, rtol=1e-5)
    assert cached_logs["hidden"] == pytest.approx(live_logs["hidden"], abs=1e-5)


def test_gradients_reach_the_student_and_projection_not_the_teacher(tiny_bert_dir, tiny_teacher_dir, train_examples):
    student, objective = objective_for(tiny_bert_dir, tiny_teacher_dir, train_examples, teacher_cache=False)
    batch = objective.collator(train_examples)(list(range(8)))
    loss, logs = objective.loss(student, batch, 1, objective.count_words(batch))
    loss.backward()
    assert logs["hidden"] > 0 and logs["attention"] > 0
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert all(p.weight.grad.abs().sum() > 0 for p in objective.distill_loss.projections)  # 32 -> 48 wide
    assert all(p.grad is None and not p.requires_grad for p in objective.teacher.parameters())


def test_ensemble_distills_towards_the_teacher_probe_student_average(tiny_bert_dir, tiny_teacher_dir, train_examples):
    student, objective = objective_for(
        tiny_bert_dir, tiny_teacher_dir, train_examples, method="ensemble", teacher_cache=True
    )
    student.eval()
    batch = objective.collator(train_examples)(list(range(8)))
    teacher = objective.teacher_outputs(batch)
    student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target, probe_loss = objective.prediction_target(teacher, student_logits, batch["labels"])
    torch.testing.assert_close(target, (student_logits + objective.probe(teacher.sentence)).detach() / 2)
    assert not target.requires_grad and probe_loss.requires_grad

    loss, logs = objective.loss(student, batch, 1, objective.count_words(batch))
    loss.backward()
    assert logs["logit"] > 0
    assert objective.probe.weight.grad.abs().sum() > 0
    assert objective.args.logit_weight == 1.0


@pytest.mark.parametrize("method", ["mlkd", "ensemble"])
def test_distillation_runs_end_to_end(tmp_path, notes, tiny_bert_dir, tiny_teacher_dir, method):
    data = tmp_path / "synthetic.csv"
    pd.DataFrame({"text": [t for t, _ in notes], "label": [y for _, y in notes]}).to_csv(data, index=False)
    out = tmp_path / method
    fit(
        DataArguments(data=str(data)),
        ModelArguments(student=str(tiny_bert_dir), teacher=str(tiny_teacher_dir), max_length=64),
        TrainingArguments(out=str(out), method=method, epochs=3, encoder_lr=2e-3, head_lr=5e-3, seed=1),
        DistillArguments(word_policy="all"),
        EvalArguments(bootstrap=50),
    )
    history = [json.loads(line) for line in RunDirectory(out).history_file.read_text().splitlines()]
    assert history[0]["train"]["words"] > 0
    # The fixture teacher is randomly initialised, so it has no knowledge to pass on: what must show is
    # that the student moves towards it, and that the run ends with the usual checkpoints and report.
    assert history[-1]["train"]["hidden"] < 0.5 * history[0]["train"]["hidden"]
    report = json.loads(RunDirectory(out).metrics_file().read_text())
    assert 0 <= report["threshold_free"]["auroc"]["value"] <= 1
    assert (RunDirectory(out).checkpoint("auroc") / "model.safetensors").exists()
