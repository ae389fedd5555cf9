"""Warm-up at start: the model runs the batch shapes the batcher will form before the service says it is ready.

The first run of a shape pays for what later runs reuse: ONNX Runtime's memory arena grows to hold it, and on a GPU
the CUDA kernels for its sizes are loaded. So that no first request pays for it, the service runs, at each length
from 16 tokens doubling up to `max_note_tokens` (and that limit itself), a lone note and the fullest batch
`plan_batches` forms of notes that long — the largest padded sizes first, so that the arena grows to its peak at
once — within a time budget.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.inference import NoteClassifier

logger = logging.getLogger(__name__)

SHORTEST = 16  # tokens: about the shortest triage note with its special tokens
FILLER_TEXT = "warm-up"

Shape = tuple[int, int]  # (notes, tokens of the longest)


def warm_up_shapes(max_batch_size: int, max_batch_tokens: int, max_note_tokens: int) -> list[Shape]:
    """(notes, length) of the batches to warm up, the most padded tokens first."""
    lengths = [max_note_tokens]
    length = SHORTEST
    while length < max_note_tokens:
        lengths.append(length)
        length *= 2
    shapes = {
        (notes, length) for length in lengths for notes in (1, fullest_batch(length, max_batch_size, max_batch_tokens))
    }
    return sorted(shapes, key=lambda shape: (shape[0] * shape[1], shape[1]), reverse=True)


def fullest_batch(length: int, max_batch_size: int, max_batch_tokens: int) -> int:
    """Most notes of `length` tokens in one batch: within both limits, and at least one (a lone note too long for
    the token budget still runs)."""
    return max(1, min(max_batch_size, max_batch_tokens // length))


@dataclass(frozen=True)
class WarmUp:
    ran: list[Shape]
    skipped: list[Shape]
    seconds: float


def warm_up(classifier: NoteClassifier, shapes: Sequence[Shape], budget_s: float) -> WarmUp:
    """Run the model on each shape once, in order, until `budget_s` is spent; log what ran and how long it took."""
    started = time.perf_counter()
    # A note as long as the classifier reads (its last, special token kept when cut), cut again to each length.
    [filler] = classifier.encode([" ".join([FILLER_TEXT] * classifier.max_note_tokens)])
    ran: list[Shape] = []
    for notes, length in shapes:
        if time.perf_counter() - started >= budget_s:
            break
        note = np.concatenate([filler.ids[: length - 1], filler.ids[-1:]])
        classifier.margins([note] * notes)
        ran.append((notes, length))
    result = WarmUp(ran, list(shapes[len(ran) :]), time.perf_counter() - started)
    logger.info(
        "warm-up done",
        extra={
            "fields": {
                "shapes": [list(shape) for shape in result.ran],
                "skipped": [list(shape) for shape in result.skipped],
                "warm_up_s": round(result.seconds, 3),
            }
        },
    )
    return result
