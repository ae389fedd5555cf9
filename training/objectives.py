"""What a training step minimises. `base` is cross-entropy; the DSG-KD objectives live in training.distill."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.collate import NoteCollator
from training.data.examples import Examples


class Objective(Protocol):
    """What a training step minimises, and how its batches are made."""

    def collator(self, examples: Examples) -> Callable[[list[int]], dict[str, torch.Tensor]]: ...

    def extra_modules(self) -> list[nn.Module]:
        """Modules trained with the student but not part of it (distillation projections, the ensemble probe)."""
        ...

    def count_words(self, batch: dict[str, torch.Tensor]) -> int: ...

    def loss(
        self, model: PreTrainedModel, batch: dict[str, torch.Tensor], accum_steps: int, accum_words: float
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


class TrainingStep(nn.Module):
    """The student and the objective's extra modules as one module whose forward is the objective's loss: one
    state_dict to save and resume from, and one module whose gradients data-parallel training averages.
    `state` holds more of what a resumed run needs (e.g. quantization-aware training's activation ranges)."""

    def __init__(self, model: PreTrainedModel, objective: Objective, state: list[nn.Module] | None = None):
        super().__init__()
        self.model = model
        self.extra = nn.ModuleList(objective.extra_modules())
        self.state = nn.ModuleList(state or [])
        self.objective = objective

    def forward(
        self, batch: dict[str, torch.Tensor], accum_steps: int, accum_words: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return self.objective.loss(self.model, batch, accum_steps, accum_words)


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
        self, model: PreTrainedModel, batch: dict[str, torch.Tensor], accum_steps: int, accum_words: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(**model_inputs(batch)).logits
        ce = F.cross_entropy(logits.float(), batch["labels"])
        return ce / accum_steps, {"ce": ce.item()}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
