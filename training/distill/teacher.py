"""The frozen domain teacher: loading it, and what it contributes to a batch, live or from a cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import AutoModel, AutoModelForSequenceClassification, PreTrainedModel

from training.distill.losses import MultiLevelDistillLoss, TeacherWordFeatures
from training.errors import ConfigError
from training.pretrained import resolve_model

log = logging.getLogger(__name__)


def load_teacher(name_or_path: str, with_head: bool = False) -> PreTrainedModel:
    """Eager attention (the maps are compared), eval mode, no gradients. `with_head`: with the checkpoint's
    trained classification head, whose logits are distilled; a checkpoint without one is a ConfigError."""
    path = resolve_model(name_or_path)
    if not with_head:
        teacher = AutoModel.from_pretrained(path, attn_implementation="eager")
    else:
        teacher, info = AutoModelForSequenceClassification.from_pretrained(
            path, attn_implementation="eager", output_loading_info=True
        )
        # The loading info names the weights the checkpoint lacked, i.e. those just randomly initialised: the fact
        # itself, where the config's `architectures` only names the class that saved it, and it needs no list of
        # head-layer names (classifier, pooler, pre_classifier, score differ between model families).
        if info["missing_keys"]:
            raise ConfigError(
                f"--teacher {name_or_path} has no trained classification head (randomly initialised: "
                f"{', '.join(sorted(info['missing_keys']))}), so mlkd's --logit-weight would distil random logits: "
                "use --method ensemble (its probe on the teacher learns the task), a teacher fine-tuned with a "
                "two-label classification head, or --logit-weight 0"
            )
    teacher.eval().requires_grad_(False)
    return teacher


@dataclass
class TeacherOutputs:
    words: TeacherWordFeatures  # word-pooled hidden states and attention maps on the mapped layers
    sentence: torch.Tensor  # [B, D] mean of the last layer over the note's tokens
    logits: torch.Tensor | None  # [B, C] for a teacher with a classification head


@torch.no_grad()
def run_teacher(
    teacher: PreTrainedModel, loss: MultiLevelDistillLoss, batch: dict[str, torch.Tensor]
) -> TeacherOutputs:
    mask = batch["teacher_attention_mask"]
    outputs = teacher(
        input_ids=batch["teacher_input_ids"], attention_mask=mask, output_hidden_states=True, output_attentions=True
    )
    words = loss.teacher_word_features(outputs, batch["teacher_word_index"], batch["word_mask"].shape[1])
    weights = mask[:, :, None].float()
    sentence = (outputs.hidden_states[-1].float() * weights).sum(1) / weights.sum(1).clamp(min=1)
    logits = getattr(outputs, "logits", None)
    return TeacherOutputs(words, sentence, None if logits is None else logits.float())


@dataclass
class TeacherCache:
    """Everything the teacher contributes for each note of one dataset, looked up by position.

    The teacher is frozen and the notes are fixed, so its outputs never change: computing them once
    makes a distillation step cost about a plain fine-tuning step. Word features are padded to the
    collator's `max_words`.
    """

    hidden: torch.Tensor  # [N, L, W, D]
    attention: torch.Tensor  # [N, L, H, W, W]
    sentence: torch.Tensor  # [N, D]
    logits: torch.Tensor | None  # [N, C]

    @classmethod
    def build(
        cls, teacher: PreTrainedModel, loss: MultiLevelDistillLoss, loader, size: int, device: torch.device
    ) -> TeacherCache:
        cache = None
        for batch in tqdm(loader, desc="teacher cache", unit="batch", leave=False):
            batch = {k: v.to(device) for k, v in batch.items()}
            out = run_teacher(teacher, loss, batch)
            if cache is None:
                layers, _, _, width = out.words.hidden.shape
                heads, words = out.words.attention.shape[2], loader.collate_fn.max_words
                cache = cls(
                    torch.zeros(size, layers, words, width),
                    torch.zeros(size, layers, heads, words, words),
                    torch.zeros(size, out.sentence.shape[-1]),
                    None if out.logits is None else torch.zeros(size, out.logits.shape[-1]),
                )
            rows, w = batch["positions"].cpu(), out.words.hidden.shape[2]
            cache.hidden[rows, :, :w] = out.words.hidden.transpose(0, 1).cpu()
            cache.attention[rows, :, :, :w, :w] = out.words.attention.transpose(0, 1).cpu()
            cache.sentence[rows] = out.sentence.cpu()
            if cache.logits is not None and out.logits is not None:
                cache.logits[rows] = out.logits.cpu()
        if cache is None:
            raise ValueError("the teacher cache needs at least one note")
        log.info("teacher cache: %d notes, %.0f MB", size, (cache.hidden.numel() + cache.attention.numel()) * 4 / 2**20)
        return cache

    def lookup(self, positions: torch.Tensor, num_words: int, device: torch.device) -> TeacherOutputs:
        rows = positions.cpu()
        words = TeacherWordFeatures(
            hidden=self.hidden[rows, :, :num_words].transpose(0, 1).to(device),
            attention=self.attention[rows, :, :, :num_words, :num_words].transpose(0, 1).to(device),
        )
        logits = None if self.logits is None else self.logits[rows].to(device)
        return TeacherOutputs(words, self.sentence[rows].to(device), logits)
