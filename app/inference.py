"""Tokenize notes once, then classify batches of already tokenized notes with the bundle's ONNX session."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from app.bundle import Bundle, BundleError

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class EncodedNote:
    ids: np.ndarray  # int64 token ids with special tokens, unpadded
    truncated: bool  # whether tokens past max_note_tokens were cut off


class NoteClassifier:
    """The bundle's model and tokenizer, split so that a note is tokenized once, at submission."""

    def __init__(self, bundle: Bundle, max_note_tokens: int) -> None:
        if max_note_tokens > bundle.manifest.max_input_tokens:
            raise ValueError(
                f"max_note_tokens ({max_note_tokens}) exceeds the model's max_input_tokens "
                f"({bundle.manifest.max_input_tokens})"
            )
        self.session = bundle.session
        self.max_note_tokens = max_note_tokens
        self._pad_id = bundle.tokenizer.padding["pad_id"]
        self._input_names = [graph_input.name for graph_input in bundle.session.get_inputs()]
        unknown = set(self._input_names) - set(MODEL_INPUTS)
        if unknown:
            raise BundleError(f"the ONNX model takes inputs this service cannot feed: {sorted(unknown)}")
        # A private copy: no padding (the batcher pads whole batches) and truncation at max_note_tokens,
        # which marks a truncated note by its overflowing part.
        self._tokenizer = Tokenizer.from_str(bundle.tokenizer.to_str())
        self._tokenizer.no_padding()
        truncation = bundle.tokenizer.truncation or {}
        self._tokenizer.enable_truncation(max_note_tokens, direction=truncation.get("direction", "right"))

    def encode(self, texts: list[str]) -> list[EncodedNote]:
        return [
            EncodedNote(np.asarray(encoding.ids, dtype=np.int64), bool(encoding.overflowing))
            for encoding in self._tokenizer.encode_batch(texts)
        ]

    def predict(self, token_ids: list[np.ndarray]) -> np.ndarray:
        """P(emergency) per note, for one batch padded to its longest note."""
        lengths = np.array([len(ids) for ids in token_ids])
        attention_mask = np.arange(lengths.max()) < lengths[:, None]
        input_ids = np.full(attention_mask.shape, self._pad_id, dtype=np.int64)
        input_ids[attention_mask] = np.concatenate(token_ids)  # row-major: fills each row's first tokens in order
        feed = {
            "input_ids": input_ids,
            "attention_mask": attention_mask.astype(np.int64),
            "token_type_ids": np.zeros_like(input_ids),  # a single sequence is all segment 0
        }
        logits = self.session.run(["logits"], {name: feed[name] for name in self._input_names})[0]
        return softmax_emergency(logits)


def softmax_emergency(logits: np.ndarray) -> np.ndarray:
    """P(emergency) from `[N, 2]` logits (index 1 is emergency)."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted[:, 1] / shifted.sum(axis=1)
