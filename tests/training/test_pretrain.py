"""Masked-LM pretraining on the tiny fixture encoder with the SYNTHETIC notes as the corpus."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict
from itertools import islice
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer
from typer.testing import CliRunner

from training import pretrain as pretrain_module
from training.cli import app
from training.config import PretrainArguments
from training.corpora import CorpusLine
from training.pretrain import (
    evaluate_heldout,
    evaluate_mlm,
    is_heldout,
    make_collator,
    masked_token_logits,
    pretrain,
    shuffled_batches,
    split_heldout,
    tokenize,
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model trains fastest on one thread, and far faster than on two when other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def notes_csv(tmp_path_factory, notes) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "notes.csv"
    pd.DataFrame({"text": [text for text, _ in notes]}).to_csv(path, index=False)
    return path


def tiny_args(model_dir: Path, corpus: Path, out: Path, **options) -> PretrainArguments:
    defaults = {"batch_size": 16, "learning_rate": 2e-3, "warmup_ratio": 0.0, "log_steps": 5, "save_steps": 5}
    return PretrainArguments(model=str(model_dir), corpus=str(corpus), out=out, **{**defaults, **options})


def report(out: Path) -> dict:
    return json.loads((out / "pretrain.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert_dir, notes_csv) -> Path:
    out = tmp_path_factory.mktemp("pretrained")
    return pretrain(tiny_args(tiny_bert_dir, notes_csv, out, max_steps=40, log_steps=10, heldout_fraction=0.2))


def test_loss_decreases_and_heldout_scores_improve(trained, notes):
    written = report(trained)
    heldout = sum(is_heldout(text, 0.2) for text, _ in notes)
    assert written["steps"] == 40
    assert written["final_loss"] < written["first_loss"] - 0.5
    assert written["heldout_after"]["loss"] < written["heldout_before"]["loss"]
    assert written["heldout_after"]["masked_tokens"] == written["heldout_before"]["masked_tokens"] > 0
    assert (written["corpus"]["train_lines"], written["corpus"]["heldout_lines"]) == (200 - heldout, heldout)
    assert 20 < heldout < 60
    assert written["options"]["max_steps"] == 40 and written["train_seconds"] > 0


def test_evaluate_heldout_of_the_output_gives_the_reported_scores(trained, notes_csv):
    scores = evaluate_heldout(trained, str(notes_csv), 0.2)
    assert asdict(scores) == pytest.approx(report(trained)["heldout_after"])
    command = ["mlm-eval", "--model", str(trained), "--corpus", str(notes_csv), "--heldout-fraction", "0.2"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1]) == asdict(scores)


def test_output_is_the_encoder_without_mlm_head_with_the_source_pooler(trained, tiny_bert_dir):
    encoder, loading = AutoModel.from_pretrained(trained, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    assert not any(name.startswith("cls.") for name in load_file(trained / "model.safetensors"))
    source = AutoModel.from_pretrained(tiny_bert_dir)
    assert torch.equal(encoder.pooler.dense.weight, source.pooler.dense.weight)
    assert not torch.equal(encoder.embeddings.word_embeddings.weight, source.embeddings.word_embeddings.weight)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    hidden = encoder(**tokenizer(["CC: chest pain"], return_tensors="pt")).last_hidden_state
    assert hidden.shape[-1] == source.config.hidden_size


def test_fresh_mlm_head_is_logged(tiny_bert_dir, notes_csv, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="training.pretrain"):
        pretrain(tiny_args(tiny_bert_dir, notes_csv, tmp_path, max_steps=1))
    assert "freshly initialised" in caplog.text


def test_resume_after_a_crash_equals_an_uninterrupted_run(tiny_bert_dir, notes_csv, tmp_path, monkeypatch):
    uninterrupted = pretrain(tiny_args(tiny_bert_dir, notes_csv, tmp_path / "whole", max_steps=15))

    save_checkpoint = pretrain_module.save_checkpoint

    def save_then_crash(*args, **kwargs):
        save_checkpoint(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_module, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_args(tiny_bert_dir, notes_csv, tmp_path / "resumed", max_steps=15))
    monkeypatch.undo()
    assert torch.load(tmp_path / "resumed" / "checkpoint" / "trainer_state.pt")["state"]["step"] == 5
    resumed = pretrain(tiny_args(tiny_bert_dir, notes_csv, tmp_path / "resumed", max_steps=15))

    assert report(resumed)["steps"] == 15
    assert report(resumed)["loss_curve"] == report(uninterrupted)["loss_curve"]
    expected, actual = load_file(uninterrupted / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_rerun_with_more_steps_continues_from_the_checkpoint(tiny_bert_dir, notes_csv, tmp_path, caplog):
    pretrain(tiny_args(tiny_bert_dir, notes_csv, tmp_path, max_steps=10))
    with caplog.at_level(logging.INFO, logger="training.pretrain"):
        pretrain(tiny_args(tiny_bert_dir, notes_csv, tmp_path, max_steps=20))
    assert "resuming from step 10 of 20" in caplog.text
    assert report(tmp_path)["steps"] == 20
    assert [step for step, _ in report(tmp_path)["loss_curve"]] == [5, 10, 15, 20]


def test_resume_refuses_other_options(tiny_bert_dir, notes_csv, tmp_path):
    pretrain(tiny_args(tiny_bert_dir, notes_csv, tmp_path, max_steps=5))
    with pytest.raises(ValueError, match="learning_rate"):
        pretrain(tiny_args(tiny_bert_dir, notes_csv, tmp_path, max_steps=10, learning_rate=1e-4))


def test_whole_word_mask_masks_every_piece_of_a_chosen_word(tiny_bert_dir, notes):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    lines = [text for text, _ in notes[:32]]
    batch = make_collator(tokenizer, 0.3, whole_word_mask=True, seed=0)(tokenize(tokenizer, lines, 128, True))
    masked = batch["labels"] != -100
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert (batch["input_ids"][masked] == tokenizer.mask_token_id).all()
    words_with_pieces = 0
    for row, encoding in enumerate(tokenizer(lines).encodings):
        for word in set(encoding.word_ids) - {None}:
            pieces = [i for i, word_id in enumerate(encoding.word_ids) if word_id == word]
            assert masked[row, pieces].all() or not masked[row, pieces].any()
            words_with_pieces += len(pieces) > 1 and bool(masked[row, pieces].all())
    assert words_with_pieces > 0


def test_whole_word_mask_pretraining_runs(tiny_bert_dir, notes_csv, tmp_path):
    written = report(pretrain(tiny_args(tiny_bert_dir, notes_csv, tmp_path, max_steps=10, whole_word_mask=True)))
    assert written["steps"] == 10 and written["final_loss"] < written["first_loss"]


def test_evaluate_mlm_is_deterministic_per_seed(tiny_bert_dir, notes):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    model = AutoModelForMaskedLM.from_pretrained(tiny_bert_dir).train()
    lines = [text for text, _ in notes[:50]]
    first, again = (evaluate_mlm(model, tokenizer, lines, seed=3) for _ in range(2))
    other_seed = evaluate_mlm(model, tokenizer, lines, seed=4)
    assert first == again and first != other_seed
    assert 0 <= first.accuracy <= 1 and first.loss > 0
    assert model.training  # restored to the mode it was in


def test_masked_token_logits_give_the_models_own_loss(tiny_bert_dir, notes):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    model = AutoModelForMaskedLM.from_pretrained(tiny_bert_dir).eval()
    lines = [text for text, _ in notes[:16]]
    batch = make_collator(tokenizer, 0.15, whole_word_mask=False, seed=0)(tokenize(tokenizer, lines, 128, False))
    logits, labels = masked_token_logits(model, batch)
    assert logits.shape == (int((batch["labels"] != -100).sum()), model.config.vocab_size)
    torch.testing.assert_close(F.cross_entropy(logits, labels), model(**batch).loss)


def test_heldout_split_keeps_documents_whole_whatever_the_order_or_the_corpora_joined():
    lines = [CorpusLine(f"line {i} of {document}", str(document)) for document in range(400) for i in range(3)]
    train, heldout = split_heldout(lines, 0.1)
    heldout_documents = {text.split(" of ")[1] for text in heldout}
    assert not heldout_documents & {text.split(" of ")[1] for text in train}
    assert 20 < len(heldout_documents) < 60 and len(heldout) == 3 * len(heldout_documents)
    assert set(split_heldout(random.Random(0).sample(lines, len(lines)), 0.1)[1]) == set(heldout)
    joined = [*lines, CorpusLine("a line of another corpus", "another corpus's code")]
    assert set(heldout) <= set(split_heldout(joined, 0.1)[1])
    assert set(heldout) < set(split_heldout(lines, 0.3)[1])
    assert split_heldout(lines, 0.0) == ([line.text for line in lines], [])
    with pytest.raises(ValueError, match="none of the 1200 lines to train on"):
        split_heldout(lines, 1.0)


def test_shuffled_batches_cover_each_epoch_group_by_length_and_resume_mid_epoch():
    features = [{"id": i, "input_ids": [0] * (1 + i % 97)} for i in range(1000)]

    def batches(group_by_length: bool, start_step: int = 0) -> list[list[dict]]:
        return list(islice(shuffled_batches(features, list, 10, group_by_length, 0, start_step), 100 - start_step))

    for group_by_length in (False, True):
        epoch = batches(group_by_length)
        assert sorted(feature["id"] for batch in epoch for feature in batch) == list(range(1000))
        assert batches(group_by_length, start_step=37) == epoch[37:]

    def padded_tokens(epoch: list[list[dict]]) -> int:
        return sum(len(batch) * max(len(feature["input_ids"]) for feature in batch) for batch in epoch)

    assert padded_tokens(batches(True)) < 0.6 * padded_tokens(batches(False))


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("mlm_probability", 0.0),
        ("mlm_probability", 1.0),
        ("batch_size", 0),
        ("max_steps", 0),
        ("epochs", 0.0),
        ("heldout_fraction", 1.0),
    ],
)
def test_arguments_reject_bad_values(option, value):
    with pytest.raises(ValueError, match=f"--{option.replace('_', '-')}"):
        PretrainArguments(model="m", corpus="icd10cm", out=Path("out"), **{option: value})
