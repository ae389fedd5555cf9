"""The frozen domain teacher: loading it, and what it contributes to a batch (stored by `cache.py`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModel, AutoModelForSequenceClassification, PreTrainedModel

from training.distill.losses import MultiLevelDistillLoss, TeacherWordFeatures
from training.errors import ConfigError
from training.pretrained import resolve_model


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
