"""The one path from note text to P(emergency): tokenize (cut at `max_note_tokens`), pad a batch to its longest
note, run the ONNX session, softmax.

The service tokenizes a note once, when its request arrives (`encode`), and its batcher runs batches of
tokenized notes (`predict`). Everything else that scores notes — the export's parity, AUROC and batch-shift
checks, the benchmarks and the tests — calls `predict_proba`, which batches through the same two methods.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from app.batching import plan_batches
from app.bundle import Bundle, BundleError, InferenceSession

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class EncodedNote:
    ids: np.ndarray  # int64 token ids with special tokens, unpadded
    truncated: bool  # whether tokens past max_note_tokens were cut off


class NoteClassifier:
    """An ONNX session and its tokenizer, split so that a note is tokenized once and batched later."""

    def __init__(self, session: InferenceSession, tokenizer: Tokenizer, max_note_tokens: int) -> None:
        if tokenizer.padding is None:
            raise BundleError("the tokenizer has no padding settings (pad token); re-export the bundle")
        self.session = session
        self.max_note_tokens = max_note_tokens
        self._pad_id: int = tokenizer.padding["pad_id"]
        self._input_names = [graph_input.name for graph_input in session.get_inputs()]
        unknown = set(self._input_names) - set(MODEL_INPUTS)
        if unknown:
            raise BundleError(f"the ONNX model takes inputs this service cannot feed: {sorted(unknown)}")
        # A private copy: no padding (batches are padded as a whole) and truncation at max_note_tokens,
        # which marks a truncated note by its overflowing part.
        self._tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self._tokenizer.no_padding()
        direction = (tokenizer.truncation or {}).get("direction", "right")
        self._tokenizer.enable_truncation(max_note_tokens, direction=direction)

    @classmethod
    def from_bundle(cls, bundle: Bundle, max_note_tokens: int | None = None) -> NoteClassifier:
        """The bundle's classifier, cutting notes at `max_note_tokens` (default: the model's max_input_tokens)."""
        limit = bundle.manifest.max_input_tokens
        if max_note_tokens is not None and max_note_tokens > limit:
            raise ValueError(f"max_note_tokens ({max_note_tokens}) exceeds the model's max_input_tokens ({limit})")
        return cls(bundle.session, bundle.tokenizer, max_note_tokens or limit)

    def encode(self, texts: Sequence[str]) -> list[EncodedNote]:
        return [
            EncodedNote(np.asarray(encoding.ids, dtype=np.int64), bool(encoding.overflowing))
            for encoding in self._tokenizer.encode_batch(list(texts))
        ]

    def model_inputs(self, token_ids: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """The graph's inputs for one batch, padded to its longest note: int64 [notes, longest]."""
        lengths = np.array([len(ids) for ids in token_ids])
        attention_mask = np.arange(lengths.max()) < lengths[:, None]
        input_ids = np.full(attention_mask.shape, self._pad_id, dtype=np.int64)
        input_ids[attention_mask] = np.concatenate(token_ids)  # row-major: fills each row's first tokens in order
        feed = {
            "input_ids": input_ids,
            "attention_mask": attention_mask.astype(np.int64),
            "token_type_ids": np.zeros_like(input_ids),  # a single sequence is all segment 0
        }
        return {name: feed[name] for name in self._input_names}

    def predict(self, token_ids: Sequence[np.ndarray]) -> np.ndarray:
        """P(emergency) per note of one batch."""
        logits = self.session.run(["logits"], self.model_inputs(token_ids))[0]
        return softmax_emergency(np.asarray(logits, dtype=np.float32))

    def predict_proba(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """P(emergency) per note, in the order of `texts`; notes of similar length share a batch, as in the
        service's batcher."""
        encoded = self.encode(texts)
        probabilities = np.zeros(len(encoded), dtype=np.float32)
        for positions in plan_batches([len(note.ids) for note in encoded], batch_size, max_batch_tokens=sys.maxsize):
            probabilities[positions] = self.predict([encoded[position].ids for position in positions])
        return probabilities


def softmax_emergency(logits: np.ndarray) -> np.ndarray:
    """P(emergency) from `[N, 2]` logits (index 1 is emergency)."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    result: np.ndarray = shifted[:, 1] / shifted.sum(axis=1)
    return result
