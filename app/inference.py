"""The one path from note text to P(emergency): tokenize, cut a long note to `max_note_tokens` (keeping its head
and tail by default), pad a batch to its longest note, run the ONNX session, calibrate.

The service tokenizes a note once, when its request arrives (`encode`), and its batcher runs batches of
tokenized notes (`predict`). Batch scoring (`python -m app score`) tokenizes a chunk of notes and runs
them with `predict_encoded`. Everything else that scores notes — the export's parity, AUROC and batch-shift checks,
recalibration, the benchmarks and the tests — calls `predict_proba`, which batches through the same two methods.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from tokenizers import Tokenizer

from app.batching import plan_batches
from app.bundle import CUDA, Bundle, BundleError, InferenceSession, OrtValue
from app.manifest import Calibration

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
LOGITS = "logits"
DEFAULT_BATCH_SIZE = 32
Truncation = Literal["head-tail", "head"]
# head-tail keeps a quarter of the budget from the start of the note and the rest from its end: the best of
# the ways to cut long documents for BERT classifiers in Sun et al., "How to fine-tune BERT for text
# classification" (2019: 128 + 382 of 512 tokens); a triage note opens with the complaint and ends with the
# latest findings.
HEAD_SHARE = 0.25


@dataclass(frozen=True)
class EncodedNote:
    ids: np.ndarray  # int64 token ids with special tokens, unpadded
    truncated: bool  # whether tokens past max_note_tokens were cut out


class NoteClassifier:
    """An ONNX session, its tokenizer and its calibration, split so that a note is tokenized once and batched
    later."""

    def __init__(
        self,
        session: InferenceSession,
        tokenizer: Tokenizer,
        max_note_tokens: int,
        calibration: Calibration | None = None,
        truncation: Truncation = "head-tail",
    ) -> None:
        if tokenizer.padding is None:
            raise BundleError("the tokenizer has no padding settings (pad token); re-export the bundle")
        self.session = session
        self.max_note_tokens = max_note_tokens
        self.calibration = calibration or Calibration()
        self.truncation = truncation
        self._source_tokenizer = tokenizer
        self._pad_id: int = tokenizer.padding["pad_id"]
        self._input_names = [graph_input.name for graph_input in session.get_inputs()]
        self._cuda_device = cuda_device(session)
        unknown = set(self._input_names) - set(MODEL_INPUTS)
        if unknown:
            raise BundleError(f"the ONNX model takes inputs this service cannot feed: {sorted(unknown)}")
        # A private copy without padding (batches are padded as a whole) or truncation (done here, so that the
        # tail of a long note can be kept).
        self._tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()

    @classmethod
    def from_bundle(
        cls, bundle: Bundle, max_note_tokens: int | None = None, truncation: Truncation = "head-tail"
    ) -> NoteClassifier:
        """The bundle's classifier, cutting notes at `max_note_tokens` (default: the model's max_input_tokens)."""
        manifest = bundle.manifest
        limit = manifest.max_input_tokens
        if max_note_tokens is not None and max_note_tokens > limit:
            raise ValueError(f"max_note_tokens ({max_note_tokens}) exceeds the model's max_input_tokens ({limit})")
        return cls(bundle.session, bundle.tokenizer, max_note_tokens or limit, manifest.calibration, truncation)

    def with_session(self, session: InferenceSession) -> NoteClassifier:
        """The same tokenization, limit, truncation and calibration over another ONNX file's session."""
        return NoteClassifier(session, self._source_tokenizer, self.max_note_tokens, self.calibration, self.truncation)

    def encode(self, texts: Sequence[str]) -> list[EncodedNote]:
        return [self._cut(encoding.ids) for encoding in self._tokenizer.encode_batch(list(texts))]

    def _cut(self, ids: list[int]) -> EncodedNote:
        """A note's ids within max_note_tokens, its first and last (special) tokens always kept."""
        limit = self.max_note_tokens
        if len(ids) <= limit:
            return EncodedNote(np.asarray(ids, dtype=np.int64), truncated=False)
        head = max(1, round(limit * HEAD_SHARE)) if self.truncation == "head-tail" else limit - 1
        return EncodedNote(np.asarray(ids[:head] + ids[len(ids) - (limit - head) :], dtype=np.int64), truncated=True)

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

    def margins(self, token_ids: Sequence[np.ndarray]) -> np.ndarray:
        """logit[emergency] - logit[non-emergency] per note of one batch, before calibration."""
        feed = self.model_inputs(token_ids)
        if self._cuda_device is None:
            logits = np.asarray(self.session.run([LOGITS], feed)[0], dtype=np.float32)
        else:
            logits = np.asarray(run_bound(self.session, feed, "cuda", self._cuda_device), dtype=np.float32)
        margin: np.ndarray = logits[:, 1] - logits[:, 0]
        return margin

    def predict(self, token_ids: Sequence[np.ndarray]) -> np.ndarray:
        """Calibrated P(emergency) per note of one batch."""
        return calibrated_probability(self.margins(token_ids), self.calibration)

    def predict_proba(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """`predict` of every note, in the order of `texts`; notes of similar length share a batch, as in the
        service's batcher."""
        return self.predict_encoded(self.encode(texts), batch_size)

    def predict_encoded(
        self,
        notes: Sequence[EncodedNote],
        max_batch_size: int = DEFAULT_BATCH_SIZE,
        max_batch_tokens: int = sys.maxsize,
    ) -> np.ndarray:
        """`predict` of encoded notes, in their order, in the batches `plan_batches` makes of them (the service's
        batcher plans its pools of notes the same way)."""
        return self._batched(self.predict, notes, max_batch_size, max_batch_tokens)

    def predict_margins(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """`margins` of every note, in the order of `texts` (what recalibration fits on)."""
        return self._batched(self.margins, self.encode(texts), batch_size, sys.maxsize)

    def _batched(
        self,
        run: Callable[[Sequence[np.ndarray]], np.ndarray],
        notes: Sequence[EncodedNote],
        max_batch_size: int,
        max_batch_tokens: int,
    ) -> np.ndarray:
        results = np.zeros(len(notes), dtype=np.float32)
        for positions in plan_batches([len(note.ids) for note in notes], max_batch_size, max_batch_tokens):
            results[positions] = run([notes[position].ids for position in positions])
        return results


def cuda_device(session: InferenceSession) -> int | None:
    """The GPU a session runs on, when CUDA is its first provider; None on the CPU."""
    if session.get_providers()[0] != CUDA:
        return None
    return int(session.get_provider_options()[CUDA]["device_id"])


def run_bound(session: InferenceSession, feed: dict[str, np.ndarray], device: str, device_id: int) -> np.ndarray:
    """`session.run(["logits"], feed)` through an IOBinding, with the same numbers: the inputs are copied to `device`
    (cuda on a GPU) before the run, the run leaves the logits there, and they are copied back once after it."""
    binding = session.io_binding()
    for name, array in feed.items():
        binding.bind_ortvalue_input(name, OrtValue.ortvalue_from_numpy(array, device, device_id))
    binding.bind_output(LOGITS, device, device_id)
    session.run_with_iobinding(binding)
    logits: np.ndarray = binding.copy_outputs_to_cpu()[0]
    return logits


def calibrated_probability(margins: np.ndarray, calibration: Calibration) -> np.ndarray:
    """P(emergency) = sigmoid(scale * margin + bias); with scale 1 and bias 0 it is softmax(logits)[:, 1]."""
    z = calibration.scale * np.asarray(margins, dtype=np.float64) + calibration.bias
    # Written so that exp never overflows: 1 / (1 + e^-z) for z >= 0, e^z / (1 + e^z) below.
    e = np.exp(-np.abs(z))
    probability: np.ndarray = np.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(np.float32)
    return probability
