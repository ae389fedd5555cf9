"""`layer-kd` on the tiny fixture models (SYNTHETIC notes): a shallower student distilled from a fine-tuned
classifier that shares its tokenizer."""

import json

import numpy as np
import pytest
import torch

from training.config import DataArguments, DistillArguments, EvalArguments, ModelArguments, TrainingArguments
from training.data.examples import Examples
from training.distill.layers import attention_kl, build_layer_distill_objective, token_mse
from training.errors import ConfigError
from training.fit import fit
from training.modeling import load_student, load_tokenizer
from training.run_dir import RunDirectory

MAX_TOKENS = 64


def save_classifier(encoder_dir, out):
    """The encoder with a two-label head, saved as a run's checkpoint is (what layer-kd distils from)."""
    torch.manual_seed(3)
    load_student(str(encoder_dir)).save_pretrained(out)
    load_tokenizer(str(encoder_dir)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tiny_bert_dir):
    return save_classifier(tiny_bert_dir, tmp_path_factory.mktemp("classifier"))


@pytest.fixture(scope="module")
def batch(notes, classifier_dir):
    examples = Examples([t for t, _ in notes[:16]], np.array([y for _, y in notes[:16]]), np.arange(16), "synthetic")
    tokenizer = load_tokenizer(str(classifier_dir))
    objective = build_layer_distill_objective(
        load_student(str(classifier_dir), "eager"),
        tokenizer,
        ModelArguments(student=str(classifier_dir), teacher=str(classifier_dir), max_length=MAX_TOKENS),
        DistillArguments(),
        torch.device("cpu"),
    )
    return objective, objective.collator(examples)(list(range(16)))


def test_a_student_identical_to_its_teacher_has_nothing_to_learn_from_it(batch, classifier_dir):
    objective, inputs = batch
    student = load_student(str(classifier_dir), "eager").eval()  # no dropout: the teacher's exact copy
    _, logs = objective.loss(student, inputs, accum_steps=1, accum_words=0)
    assert logs["hidden"] == pytest.approx(0, abs=1e-10)
    assert logs["attention"] == pytest.approx(0, abs=1e-6)
    assert logs["logit"] == pytest.approx(0, abs=1e-6)
    assert logs["ce"] > 0


def test_a_shallower_student_is_compared_on_the_uniform_layer_pairs(batch, classifier_dir):
    objective, inputs = batch
    assert objective.layer_pairs == [(1, 1), (2, 2)]
    student = load_student(str(classifier_dir), "eager", layers=1)
    shallow = build_layer_distill_objective(
        student,
        load_tokenizer(str(classifier_dir)),
        ModelArguments(student=str(classifier_dir), teacher=str(classifier_dir), max_length=MAX_TOKENS),
        DistillArguments(),
        torch.device("cpu"),
    )
    assert shallow.layer_pairs == [(1, 2)]  # its one layer is the teacher's last
    loss, logs = shallow.loss(student, inputs, accum_steps=2, accum_words=0)
    loss.backward()
    assert logs["hidden"] > 0 and logs["attention"] > 0
    assert student.classifier.weight.grad is not None


def test_attention_dropout_is_off_in_the_distilled_student(batch):
    objective, _ = batch
    student = load_student(str(objective.teacher.name_or_path), "eager")
    assert student.config.attention_probs_dropout_prob > 0
    build_layer_distill_objective(
        student,
        objective.tokenizer,
        ModelArguments(student="x", teacher=str(objective.teacher.name_or_path), max_length=MAX_TOKENS),
        DistillArguments(),
        torch.device("cpu"),
    )
    assert student.config.attention_probs_dropout_prob == 0
    assert all(layer.attention.self.dropout.p == 0 for layer in student.bert.encoder.layer)


def test_token_losses_ignore_padding():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    student, teacher = torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)
    student[0, 2] = 5.0  # only on the padding position
    assert token_mse(student, teacher, mask) == 0
    rows = torch.softmax(torch.randn(1, 2, 3, 3), dim=-1)
    assert attention_kl(rows, rows, mask) == pytest.approx(0, abs=1e-7)
    other = rows.clone()
    other[0, :, 2] = torch.tensor([1.0, 0.0, 0.0])  # a padding query row differs
    assert attention_kl(other, rows, mask) == pytest.approx(0, abs=1e-7)


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path, classifier_dir, tiny_teacher_dir):
    other = save_classifier(tiny_teacher_dir, tmp_path / "other")
    with pytest.raises(ConfigError, match="vocabulary"):
        build_layer_distill_objective(
            load_student(str(classifier_dir), "eager"),
            load_tokenizer(str(classifier_dir)),
            ModelArguments(student=str(classifier_dir), teacher=str(other), max_length=MAX_TOKENS),
            DistillArguments(),
            torch.device("cpu"),
        )


def test_fit_distils_a_one_layer_student_and_saves_it_as_one(tmp_path, notes_csv, classifier_dir):
    run = fit(
        DataArguments(data=str(notes_csv)),
        ModelArguments(student=str(classifier_dir), teacher=str(classifier_dir), student_layers=1, max_length=64),
        TrainingArguments(out=str(tmp_path / "run"), method="layer-kd", epochs=2, batch_size=16, seed=1),
        DistillArguments(),
        EvalArguments(bootstrap=20),
    )
    checkpoint = RunDirectory(run).checkpoint("auroc")
    assert json.loads((checkpoint / "config.json").read_text())["num_hidden_layers"] == 1
    assert load_student(str(checkpoint)).config.num_hidden_layers == 1
    history = [json.loads(line) for line in RunDirectory(run).history_file.read_text().splitlines()]
    assert {"ce", "logit", "hidden", "attention"} <= set(history[0]["train"])
