"""`layer-kd`: distillation from a fine-tuned classifier that shares the student's tokenizer, e.g. into a
shallower copy of it (`fit --student-layers`).

The easy case of DSG-KD's losses: both models read the same tokens, so every token is its own "word" (no
alignment, no pooling), and a student made of the teacher's own layers shares its coordinates and heads (no
projection, heads compared one by one). Per step:

    CE + logit_weight * KD(logits, temperature) + alpha * hidden + beta * attention

- hidden: the mean squared difference of the student's and the teacher's token states on each (student layer,
  teacher layer) pair of --layer-map (default `uniform_layer_map`), over the note's tokens, averaged over pairs;
- attention: KL(teacher || student) of each head's attention row, over the note's query tokens, averaged over
  heads and pairs. The student's attention dropout is turned off: the rows it zeroes would dominate the KL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.config import DistillArguments, LayerMap, ModelArguments
from training.distill.losses import check_layer_map, logit_distill_loss, uniform_layer_map
from training.distill.teacher import load_teacher
from training.errors import ConfigError
from training.modeling import load_tokenizer, to_device
from training.objectives import CrossEntropyObjective, model_inputs


@dataclass
class LayerDistillObjective(CrossEntropyObjective):
    """Batches as plain fine-tuning makes them (the teacher reads the same tokens); the loss adds the teacher's."""

    teacher: PreTrainedModel
    layer_pairs: LayerMap
    args: DistillArguments
    logit_weight: float

    def loss(
        self, model: PreTrainedModel, batch: dict[str, torch.Tensor], accum_steps: int, accum_words: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = model_inputs(batch)
        student = model(**inputs, output_hidden_states=True, output_attentions=True)
        with torch.no_grad():
            teacher = self.teacher(**inputs, output_hidden_states=True, output_attentions=True)
        mask = batch["attention_mask"].float()  # [B, T]
        hidden = torch.stack(
            [
                token_mse(student.hidden_states[s].float(), teacher.hidden_states[t].float(), mask)
                for s, t in self.layer_pairs
            ]
        ).mean()
        attention = torch.stack(
            [
                attention_kl(student.attentions[s - 1].float(), teacher.attentions[t - 1].float(), mask)
                for s, t in self.layer_pairs
            ]
        ).mean()
        ce = F.cross_entropy(student.logits.float(), batch["labels"])
        logit = logit_distill_loss(student.logits.float(), teacher.logits.float(), self.args.temperature)
        total = ce + self.logit_weight * logit + self.args.alpha * hidden + self.args.beta * attention
        logs = {"ce": ce.item(), "logit": logit.item(), "hidden": hidden.item(), "attention": attention.item()}
        return total / accum_steps, logs


def token_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the note's tokens (mask [B, T]) and features of the squared difference of [B, T, D] states."""
    squared = (student - teacher).pow(2).mean(-1)
    return (squared * mask).sum() / mask.sum()


def attention_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each [B, H, T, T] attention row, averaged over heads and the note's query
    tokens. Padding keys get no attention in either model (their terms are 0, the clamp keeps log finite)."""
    kl = (teacher * (teacher.clamp_min(1e-12).log() - student.clamp_min(1e-12).log())).sum(-1)  # [B, H, T]
    rows = mask[:, None, :].expand_as(kl)
    return (kl * rows).sum() / rows.sum()


def without_attention_dropout(model: PreTrainedModel) -> None:
    """No dropout on the attention probabilities (BERT-style self-attention's `dropout`), here and in the saved
    config."""
    for module in model.modules():
        if all(hasattr(module, name) for name in ("query", "key", "value", "dropout")):
            for dropout in module.get_submodule("dropout").modules():
                if isinstance(dropout, nn.Dropout):
                    dropout.p = 0.0
    model.config.attention_probs_dropout_prob = 0.0


def build_layer_distill_objective(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    model_args: ModelArguments,
    args: DistillArguments,
    device: torch.device,
) -> LayerDistillObjective:
    if not model_args.teacher:
        raise ConfigError("--method layer-kd needs --teacher (a fine-tuned classifier with the student's tokenizer)")
    if load_tokenizer(model_args.teacher).get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"--method layer-kd: --teacher {model_args.teacher} does not share the student's vocabulary; "
            "distil a teacher with another tokenizer with --method mlkd"
        )
    teacher = to_device(load_teacher(model_args.teacher, with_head=True), device)
    if teacher.config.num_labels != model.config.num_labels:
        raise ConfigError("--method layer-kd needs a teacher with a two-label classification head")
    student_depth, teacher_depth = model.config.num_hidden_layers, teacher.config.num_hidden_layers
    pairs = args.layer_pairs or uniform_layer_map(student_depth, teacher_depth)
    check_layer_map(pairs, student_depth, teacher_depth)
    widths = ("hidden_size", "num_attention_heads")
    if any(getattr(model.config, name) != getattr(teacher.config, name) for name in widths):
        raise ConfigError(
            "--method layer-kd compares token states and attention heads one to one: the teacher needs the "
            "student's hidden size and heads (a student made of its layers, --student-layers)"
        )
    without_attention_dropout(model)
    return LayerDistillObjective(
        tokenizer=tokenizer,
        max_length=model_args.max_length,
        teacher=teacher,
        layer_pairs=pairs,
        args=args,
        logit_weight=args.logit_weight_for("layer-kd"),
    )
