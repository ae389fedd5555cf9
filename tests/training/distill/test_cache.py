"""The teacher cache on disk, on the tiny fixture models (SYNTHETIC notes): same targets as the live teacher,
reuse without the teacher, a key that follows the notes, teacher and options, no half cache after a failure."""

import json
import logging
import os

import numpy as np
import pytest
import torch

from training.config import DistillArguments, ModelArguments
from training.data.examples import Examples
from training.distill import cache
from training.distill.cache import build_batches, cache_key, fingerprint, load_or_build
from training.distill.objective import build_distill_objective
from training.distill.teacher import run_teacher
from training.modeling import load_student, load_tokenizer

CPU = torch.device("cpu")
# Under --word-policy latin these have no aligned word: only Hangul and numbers.
NO_WORD_NOTES = ["3세 남아 어제부터 발열 39.2도", "보호자 동반 내원, 구토 2회"]


@pytest.fixture(scope="module")
def examples(notes):
    """Synthetic notes with 0 to a few English words each, including notes without any."""
    texts = [t for t, _ in notes[:21]] + NO_WORD_NOTES
    texts.insert(7, NO_WORD_NOTES[0] + " 재내원")
    return Examples(texts, np.arange(len(texts)) % 2, np.arange(len(texts)), "synthetic")


def objective_for(tiny_bert_dir, tiny_teacher_dir, examples=None, **distill):
    """By default a live-teacher objective: its teacher, loss and collator are what a cache is built from."""
    torch.manual_seed(0)
    student = load_student(str(tiny_bert_dir), attn_implementation="eager")
    args = DistillArguments(**{"teacher_cache": False, **distill})
    model_args = ModelArguments(student=str(tiny_bert_dir), teacher=str(tiny_teacher_dir), max_length=64)
    tokenizer = load_tokenizer(str(tiny_bert_dir))
    return build_distill_objective("mlkd", student, tokenizer, model_args, args, examples, CPU)


def build(root, objective, examples, teacher=None):
    collator = objective.collator(examples)
    return load_or_build(root, collator, teacher or objective.teacher, objective.distill_loss, CPU, batch_size=4)


def raising_teacher(objective, monkeypatch, after_calls=0):
    """The objective's teacher, made to fail once it has run `after_calls` batches."""
    calls = []
    forward = objective.teacher.forward

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > after_calls:
            raise RuntimeError("the teacher ran")
        return forward(*args, **kwargs)

    monkeypatch.setattr(objective.teacher, "forward", failing)
    return objective.teacher


@pytest.mark.parametrize("hidden_loss", ["mse", "relation"])
def test_cache_returns_what_the_live_teacher_computes(tmp_path, tiny_bert_dir, tiny_teacher_dir, examples, hidden_loss):
    objective = objective_for(tiny_bert_dir, tiny_teacher_dir, hidden_loss=hidden_loss)
    cache = build(tmp_path, objective, examples)
    assert cache.manifest["notes"] == len(examples) and cache.manifest["relation"] == (hidden_loss == "relation")
    collate = objective.collator(examples)
    for positions in ([5, 7, 17, 3], [22, 23], [7]):  # with notes of no word, and a batch of none
        batch = collate(positions)
        live = run_teacher(objective.teacher, objective.distill_loss, batch)
        cached = cache.lookup(batch["positions"], batch["word_mask"].shape[1], CPU)
        assert cached.words.hidden.shape == live.words.hidden.shape and cached.words.hidden.dtype == torch.float32
        assert cached.words.attention.shape == live.words.attention.shape
        assert cached.words.relation == live.words.relation
        torch.testing.assert_close(cached.sentence, live.sentence, rtol=1e-3, atol=1e-4)
        for note, words in enumerate(batch["word_mask"].sum(dim=1).tolist()):
            size = words if cached.words.relation else cached.words.hidden.shape[-1]
            got, want = cached.words.hidden[:, note], live.words.hidden[:, note]
            torch.testing.assert_close(got[:, :words, :size], want[:, :words, :size], rtol=1e-3, atol=1e-4)
            got, want = cached.words.attention[:, note], live.words.attention[:, note]
            torch.testing.assert_close(got[..., :words, :words], want[..., :words, :words], rtol=1e-3, atol=1e-4)
            # Slots beyond the note's words are padding, stored nowhere: zeros.
            assert cached.words.hidden[:, note, words:].abs().sum() == 0
            assert cached.words.attention[:, note, :, words:].abs().sum() == 0
    assert batch["word_mask"].shape[1] == 0


def test_cache_keeps_the_logits_of_a_teacher_with_a_head(tmp_path, tiny_bert_dir, tiny_teacher_dir, examples):
    from transformers import AutoModelForSequenceClassification

    objective = objective_for(tiny_bert_dir, tiny_teacher_dir)
    teacher = AutoModelForSequenceClassification.from_pretrained(str(tiny_teacher_dir), attn_implementation="eager")
    teacher.eval()
    cache = build(tmp_path, objective, examples, teacher=teacher)
    batch = objective.collator(examples)([2, 9, 4])
    live = run_teacher(teacher, objective.distill_loss, batch)
    cached = cache.lookup(batch["positions"], batch["word_mask"].shape[1], CPU)
    assert cache.manifest["classes"] == 2
    torch.testing.assert_close(cached.logits, live.logits, rtol=1e-3, atol=1e-4)


def test_a_second_build_reuses_the_cache_without_running_the_teacher(
    tmp_path, tiny_bert_dir, tiny_teacher_dir, examples, monkeypatch, caplog
):
    objective = objective_for(tiny_bert_dir, tiny_teacher_dir)
    first = build(tmp_path, objective, examples)
    teacher = raising_teacher(objective, monkeypatch)
    with caplog.at_level(logging.INFO, logger="training.distill.cache"):
        second = build(tmp_path, objective, examples, teacher=teacher)
    assert f"reusing teacher cache {first.manifest['fingerprint'][:12]}" in caplog.text
    assert second.manifest == first.manifest
    assert [p.name for p in tmp_path.iterdir()] == [first.manifest["fingerprint"]]
    manifest = json.loads((tmp_path / first.manifest["fingerprint"] / "manifest.json").read_text())
    assert manifest["bytes"] > 0 and manifest["key"]["targets"]["word_policy"] == "latin"
    assert not any(text in json.dumps(manifest) for text in examples.texts)  # the notes enter as a digest only


def test_the_key_follows_the_notes_the_teacher_and_the_options(tiny_bert_dir, tiny_teacher_dir, examples):
    def key(notes=examples, **distill):
        objective = objective_for(tiny_bert_dir, tiny_teacher_dir, **distill)
        return fingerprint(cache_key(objective.collator(notes), objective.teacher, objective.distill_loss))

    base = key()
    # What only weighs or compares the targets leaves them as they are: runs with it reuse the cache.
    assert key(alpha=2.0, beta=0.0, hidden_loss="cosine", attention_loss="mse", temperature=4.0) == base
    changed = Examples([*examples.texts[:-1], "CC: cough"], examples.labels, examples.row_ids, "synthetic")
    options = [
        {"max_words": 4},
        {"word_policy": "all"},
        {"layer_map": "2:1"},
        {"hidden_loss": "relation"},
        {"teacher_max_length": 16},
    ]
    keys = {key(notes=changed), *(key(**option) for option in options)}
    assert base not in keys and len(keys) == 1 + len(options)

    weights = tiny_teacher_dir / "model.safetensors"
    stat = weights.stat()
    try:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the teacher saved again
        assert key() != base
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_an_interrupted_build_leaves_no_cache(tmp_path, tiny_bert_dir, tiny_teacher_dir, examples, monkeypatch, caplog):
    objective = objective_for(tiny_bert_dir, tiny_teacher_dir)
    teacher = raising_teacher(objective, monkeypatch, after_calls=2)
    with pytest.raises(RuntimeError, match="the teacher ran"):
        build(tmp_path, objective, examples, teacher=teacher)
    assert list(tmp_path.iterdir()) == []  # neither a cache nor its temporary directory

    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="training.distill.cache"):
        cache = build(tmp_path, objective, examples)
    assert "building teacher cache" in caplog.text and cache.manifest["notes"] == len(examples)


def test_runs_share_a_cache_in_the_models_dir_or_in_teacher_cache_dir(
    tmp_path, models_dir, tiny_bert_dir, tiny_teacher_dir, examples, caplog
):
    first = objective_for(tiny_bert_dir, tiny_teacher_dir, examples, teacher_cache=True)
    assert first.teacher is None and first.cache is not None
    assert [p.parent.name for p in models_dir.glob("teacher-cache/*/manifest.json")] == [
        first.cache.manifest["fingerprint"]
    ]
    with caplog.at_level(logging.INFO, logger="training.distill.cache"):
        objective_for(tiny_bert_dir, tiny_teacher_dir, examples, teacher_cache=True, alpha=1.0)  # another run
    assert f"reusing teacher cache {first.cache.manifest['fingerprint'][:12]}" in caplog.text

    elsewhere = tmp_path / "elsewhere"
    objective_for(tiny_bert_dir, tiny_teacher_dir, examples, teacher_cache=True, teacher_cache_dir=str(elsewhere))
    assert [p.name for p in elsewhere.iterdir()] == [first.cache.manifest["fingerprint"]]


def test_build_batches_are_consecutive_and_bound_the_attention_memory(
    tmp_path, tiny_bert_dir, tiny_teacher_dir, examples, monkeypatch
):
    objective = objective_for(tiny_bert_dir, tiny_teacher_dir)
    collator = objective.collator(examples)
    config = objective.teacher.config
    lengths = [
        len(ids)
        for ids in collator.teacher_tokenizer(examples.texts, truncation=True, max_length=collator.teacher_max_length)[
            "input_ids"
        ]
    ]
    bytes_per_token_pair = 4 * config.num_hidden_layers * config.num_attention_heads
    # Room for four of the longest notes: batches of up to 4 long notes, more of short ones (up to 6).
    budget = 4 * max(lengths) ** 2 * bytes_per_token_pair
    monkeypatch.setattr(cache, "ATTENTION_BYTES_PER_BATCH", budget)

    batches = build_batches(collator, config, max_batch_size=6)

    assert [p for batch in batches for p in batch] == list(range(len(examples.texts)))
    assert all(len(batch) <= 6 for batch in batches)
    for batch in batches:
        assert len(batch) * max(lengths[p] for p in batch) ** 2 * bytes_per_token_pair <= budget or len(batch) == 1
    assert len(batches) > -(-len(examples.texts) // 6)  # the budget, not only the batch size, cut some batches

    # The features do not depend on how the notes were batched.
    small = load_or_build(tmp_path / "small", collator, objective.teacher, objective.distill_loss, CPU, batch_size=6)
    monkeypatch.setattr(cache, "ATTENTION_BYTES_PER_BATCH", 2**40)
    large = load_or_build(tmp_path / "large", collator, objective.teacher, objective.distill_loss, CPU, batch_size=32)
    np.testing.assert_array_equal(small.words, large.words)
    np.testing.assert_allclose(small.hidden, large.hidden, atol=2e-3)
    np.testing.assert_allclose(small.attention, large.attention, atol=2e-3)
