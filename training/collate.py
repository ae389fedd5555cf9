"""Batches with dynamic padding: each batch is padded to its own longest note, not to max_length."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from training.data.examples import Examples


@dataclass
class NoteCollator:
    """Turns a list of example positions into model inputs; `positions` lets losses look up per-note caches."""

    examples: Examples
    tokenizer: PreTrainedTokenizerBase
    max_length: int

    def __call__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        texts = [self.examples.texts[i] for i in positions]
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        batch["labels"] = torch.as_tensor(self.examples.labels[positions])
        batch["positions"] = torch.as_tensor(positions)
        return batch


def length_sorted_batches(texts: list[str], batch_size: int) -> list[np.ndarray]:
    """Positions grouped so that notes of similar length share a batch (less padding at inference)."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def epoch_batches(size: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The training batches of `epoch`: the positions 0..size-1 in an order seeded by seed + epoch, cut into
    batches. A function of its arguments alone: a resumed run finds its place by counting batches."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [order[start : start + batch_size] for start in range(0, size, batch_size)]


class Positions(torch.utils.data.Dataset[int]):
    """The positions 0..n-1 of a set of examples: what a loader samples and hands to a collator."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index
