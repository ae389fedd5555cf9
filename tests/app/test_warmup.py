"""Warm-up at start: the batch shapes the batcher will form, run within a time budget. All notes are SYNTHETIC."""

import logging
import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app import warmup
from app.batching import plan_batches
from app.bundle import load_bundle
from app.inference import NoteClassifier
from app.warmup import SHORTEST, warm_up, warm_up_shapes

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def classifier(tiny_bundle_dir):
    return NoteClassifier.from_bundle(load_bundle(tiny_bundle_dir, "fp32", providers=CPU))


@pytest.fixture
def model_runs(classifier, monkeypatch):
    """(notes, longest) of each model run of `classifier`, and the runs' token ids."""
    runs: list[tuple[int, int]] = []
    notes: list[list[np.ndarray]] = []
    margins = classifier.margins

    def recorded(token_ids):
        runs.append((len(token_ids), max(len(ids) for ids in token_ids)))
        notes.append(token_ids)
        return margins(token_ids)

    monkeypatch.setattr(classifier, "margins", recorded)
    return types.SimpleNamespace(shapes=runs, notes=notes)


def test_the_default_shapes_are_a_lone_note_and_the_fullest_batch_at_each_doubled_length():
    assert warm_up_shapes(max_batch_size=32, max_batch_tokens=8192, max_note_tokens=512) == [
        (16, 512),
        (32, 256),
        (32, 128),
        (32, 64),
        (32, 32),
        (1, 512),
        (32, 16),
        (1, 256),
        (1, 128),
        (1, 64),
        (1, 32),
        (1, 16),
    ]


@given(
    max_batch_size=st.integers(1, 64),
    max_batch_tokens=st.integers(1, 20_000),
    max_note_tokens=st.integers(1, 1024),
)
def test_every_shape_is_a_batch_the_batcher_forms(max_batch_size, max_batch_tokens, max_note_tokens):
    shapes = warm_up_shapes(max_batch_size, max_batch_tokens, max_note_tokens)
    lengths = {length for _, length in shapes}
    assert max_note_tokens in lengths and min(lengths) == min(SHORTEST, max_note_tokens)
    for notes, length in shapes:
        # `notes` notes of this length, queued with more of them, form a batch of exactly that many (or it is 1).
        first_batch = plan_batches([length] * (max_batch_size + 1), max_batch_size, max_batch_tokens)[0]
        assert notes in (1, len(first_batch))
        assert {(1, length), (len(first_batch), length)} <= set(shapes)
    padded = [notes * length for notes, length in shapes]
    assert padded == sorted(padded, reverse=True)  # the arena grows to its peak on the first run


def test_warm_up_runs_every_shape_with_notes_of_that_length(classifier, model_runs):
    shapes = warm_up_shapes(8, 256, classifier.max_note_tokens)
    result = warm_up(classifier, shapes, budget_s=60)
    assert model_runs.shapes == shapes and result.ran == shapes and result.skipped == []
    sep = classifier.encode(["x"])[0].ids[-1]
    for batch, (_, length) in zip(model_runs.notes, shapes, strict=True):
        assert all(len(ids) == length and ids[-1] == sep for ids in batch)


def test_warm_up_stops_when_its_budget_is_spent(classifier, model_runs, monkeypatch):
    clock = iter(range(100))  # each reading of the clock is one second later
    monkeypatch.setattr(warmup, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    shapes = warm_up_shapes(8, 256, classifier.max_note_tokens)
    result = warm_up(classifier, shapes, budget_s=2.5)
    # read at 0 (start), 1 and 2 (before the first two shapes: both run), 3 (spent), 4 (the total)
    assert result.ran == shapes[:2] == model_runs.shapes and result.skipped == shapes[2:] and result.seconds == 4
    assert warm_up(classifier, shapes, budget_s=0).ran == []


@pytest.mark.anyio
async def test_the_service_warms_up_the_shapes_of_its_settings_before_it_is_ready(serve, settings, caplog):
    caplog.set_level(logging.INFO)
    async with serve(settings(variant="fp32", max_batch_size=16, max_batch_tokens=1024)) as client:
        assert (await client.get("/readyz")).status_code == 200
    [done] = [record for record in caplog.records if record.getMessage() == "warm-up done"]
    expected = warm_up_shapes(16, 1024, 128)  # the tiny bundle reads 128 tokens
    assert done.fields["shapes"] == [list(shape) for shape in expected] and done.fields["skipped"] == []
    assert 0 < done.fields["warm_up_s"] < 60
    messages = [record.getMessage() for record in caplog.records]
    assert messages.index("warm-up done") < messages.index("model ready")
