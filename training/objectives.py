"""What a training step minimises. `base` is cross-entropy; the DSG-KD objectives live in training.distill."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.collate import NoteCollator
from training.data.examples import Examples


@dataclass
class CrossEntropyObjective:
    tokenizer: PreTrainedTokenizerBase
    max_length: int

    def collator(self, examples: Examples) -> NoteCollator:
        return NoteCollator(examples, self.tokenizer, self.max_length)

    def extra_modules(self) -> list[nn.Module]:
        return []

    def count_words(self, batch: dict[str, torch.Tensor]) -> int:
        return 0

    def loss(
        self, model: PreTrainedModel, batch: dict[str, torch.Tensor], accum_steps: int, accum_words: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(**model_inputs(batch)).logits
        ce = F.cross_entropy(logits.float(), batch["labels"])
        return ce / accum_steps, {"ce": ce.item()}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
