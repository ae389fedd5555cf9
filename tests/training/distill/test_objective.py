"""The DSG-KD objective on the tiny fixture models (SYNTHETIC notes): live teacher vs cache, frozen teacher."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from training.config import DataArguments, DistillArguments, EvalArguments, ModelArguments, TrainingArguments
from training.data.examples import Examples
from training.data.loading import load_parts
from training.distill.objective import DistillCollator, build_distill_objective
from training.errors import ConfigError
from training.fit import fit
from training.modeling import load_student, load_tokenizer
from training.run_dir import RunDirectory


@pytest.fixture(scope="module")
def train_examples(notes):
    texts = [t for t, _ in notes[:64]]
    return Examples(texts, np.array([y for _, y in notes[:64]]), np.arange(64), "synthetic")


@pytest.fixture(scope="module")
def teacher_with_head_dir(tmp_path_factory, tiny_teacher_dir):
    """The fixture teacher saved with a two-label classification head, as a teacher fine-tuned on the task is."""
    torch.manual_seed(2)
    out = tmp_path_factory.mktemp("teacher-with-head")
    AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir, num_labels=2).save_pretrained(out)
    load_tokenizer(str(tiny_teacher_dir)).save_pretrained(out)
    return out


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
    # The cache stores fp16: equal to fp16 precision.
    torch.testing.assert_close(cached_loss, live_loss, atol=1e-5, rtol=1e-3)
    assert cached_logs["hidden"] == pytest.approx(live_logs["hidden"], rel=1e-3)


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
    assert objective.logit_weight == 1.0


def test_logit_weight_0_turns_the_ensemble_term_off(tiny_bert_dir, tiny_teacher_dir, train_examples):
    student, default = objective_for(
        tiny_bert_dir, tiny_teacher_dir, train_examples, method="ensemble", teacher_cache=False
    )
    _, off = objective_for(
        tiny_bert_dir, tiny_teacher_dir, train_examples, method="ensemble", teacher_cache=False, logit_weight=0.0
    )
    assert (default.logit_weight, off.logit_weight) == (1.0, 0.0)
    off.distill_loss.load_state_dict(default.distill_loss.state_dict())
    off.probe.load_state_dict(default.probe.state_dict())
    student.eval()
    batch = default.collator(train_examples)(list(range(8)))
    words = default.count_words(batch)
    default_loss, default_logs = default.loss(student, batch, 1, words)
    off_loss, off_logs = off.loss(student, batch, 1, words)
    assert off_logs["logit"] == pytest.approx(default_logs["logit"])  # still logged
    assert default_logs["logit"] > 0
    torch.testing.assert_close(default_loss - off_loss, torch.tensor(default_logs["logit"]), atol=1e-5, rtol=1e-5)


def test_mlkd_logit_distillation_needs_a_teacher_with_a_trained_head(
    tiny_bert_dir, tiny_teacher_dir, teacher_with_head_dir, train_examples
):
    # The fixture teacher is a bare encoder, like an MLM-pretrained one: a head loaded onto it would be random.
    with pytest.raises(ConfigError, match=r"no trained classification head.*--method ensemble"):
        objective_for(tiny_bert_dir, tiny_teacher_dir, train_examples, logit_weight=1.0, teacher_cache=False)

    student, objective = objective_for(
        tiny_bert_dir, teacher_with_head_dir, train_examples, logit_weight=1.0, teacher_cache=False
    )
    batch = objective.collator(train_examples)(list(range(8)))
    _, logs = objective.loss(student, batch, 1, objective.count_words(batch))
    assert logs["logit"] > 0

    _, without = objective_for(tiny_bert_dir, tiny_teacher_dir, train_examples, teacher_cache=False)
    assert without.logit_weight == 0.0  # mlkd's default: no logit term, no head needed
    assert "logit" not in without.loss(student, batch, 1, without.count_words(batch))[1]


def test_the_teacher_reads_up_to_its_own_limit(tiny_bert_dir, tiny_teacher_dir, train_examples):
    _, objective = objective_for(tiny_bert_dir, tiny_teacher_dir, train_examples, teacher_cache=False)
    assert (objective.max_length, objective.teacher_max_length) == (64, 128)  # 128: the teacher's positions
    _, shorter = objective_for(
        tiny_bert_dir, tiny_teacher_dir, train_examples, teacher_cache=False, teacher_max_length=32
    )
    assert shorter.collator(train_examples).teacher_max_length == 32
    with pytest.raises(ConfigError, match=r"--teacher-max-length 129 is more than the teacher can read \(128 tokens\)"):
        objective_for(tiny_bert_dir, tiny_teacher_dir, train_examples, teacher_cache=False, teacher_max_length=129)


def test_words_cut_by_either_models_truncation_are_counted(tiny_bert_dir, tiny_teacher_dir):
    text = "3세 남아 보호자 동반 내원 어제부터 구토 2회 CC: seizure"  # SYNTHETIC; "seizure" is the late term
    examples = Examples([text], np.array([1]), np.arange(1), "synthetic")
    student_tokenizer, teacher_tokenizer = load_tokenizer(str(tiny_bert_dir)), load_tokenizer(str(tiny_teacher_dir))

    def cut_before_seizure(tokenizer):
        """A max_length that keeps every token before "seizure" and the special tokens, but none of "seizure"."""
        offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        return next(i for i, (_, end) in enumerate(offsets) if end > text.index("seizure")) + 1

    def counts(max_length, teacher_max_length):
        batch = DistillCollator(
            examples, student_tokenizer, teacher_tokenizer, max_length, teacher_max_length, "latin", 32
        )([0])
        return [int(batch[k]) for k in ("words_lost_student", "words_lost_teacher", "words_over_max")]

    assert counts(64, 128) == [0, 0, 0]
    assert counts(cut_before_seizure(student_tokenizer), 128) == [1, 0, 0]
    assert counts(64, cut_before_seizure(teacher_tokenizer)) == [0, 1, 0]


@pytest.mark.parametrize("method", ["mlkd", "ensemble"])
def test_distillation_runs_end_to_end(tmp_path, notes_csv, tiny_bert_dir, tiny_teacher_dir, method):
    out = tmp_path / method
    fit(
        DataArguments(data=str(notes_csv)),
        ModelArguments(student=str(tiny_bert_dir), teacher=str(tiny_teacher_dir), max_length=64),
        TrainingArguments(out=str(out), method=method, epochs=3, encoder_lr=2e-3, head_lr=5e-3, seed=1),
        DistillArguments(word_policy="all", teacher_max_length=16),
        EvalArguments(bootstrap=50),
    )
    history = [json.loads(line) for line in RunDirectory(out).history_file.read_text().splitlines()]
    # Word counts are per-epoch sums: every training note once, each aligned as if alone.
    train = load_parts(RunDirectory(out).data_arguments())["train"]
    collator = DistillCollator(
        train, load_tokenizer(str(tiny_bert_dir)), load_tokenizer(str(tiny_teacher_dir)), 64, 16, "all", 32
    )
    batch = collator(list(range(len(train))))
    assert history[0]["train"]["words"] == int(batch["word_mask"].sum()) > 0
    assert history[0]["train"]["words_lost_teacher"] == int(batch["words_lost_teacher"]) > 0
    assert history[0]["train"]["words_lost_student"] == int(batch["words_lost_student"])
    assert history[0]["train"]["words_over_max"] == int(batch["words_over_max"])
    # The fixture teacher is randomly initialised, so it has no knowledge to pass on: what must show is
    # that the student moves towards it, and that the run ends with the usual checkpoints and report.
    assert history[-1]["train"]["hidden"] < 0.5 * history[0]["train"]["hidden"]
    report = json.loads(RunDirectory(out).metrics_file().read_text())
    assert 0 <= report["threshold_free"]["auroc"]["value"] <= 1
    assert (RunDirectory(out).checkpoint("auroc") / "model.safetensors").exists()
