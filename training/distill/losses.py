"""Word-level multi-level distillation loss: hidden states and attention maps compared on aligned words.

Student and teacher use different tokenizers, so both are pooled onto the words of a
`WordAlignment` before any comparison:

- hidden states: the mean of a word's token states (`pool_words`). The two models' coordinates are
  unrelated even when their widths are equal, so `mse` and `cosine` compare the teacher's word state
  with a learned linear projection of the student's (one per mapped layer), and `relation` compares
  each model's word-by-word cosine similarities, which need no common coordinates;
- attention maps: query rows averaged over a word's tokens, keys summed over a word's tokens
  (`word_attention`), so that both maps are [words x words] over the same words. Heads are averaged
  (`--attention-heads mean`: heads of separately trained models do not correspond), and each row is
  renormalised over the note's aligned words: how much attention goes to other tokens (special
  tokens, punctuation, words left out) depends on each tokenizer, so only its share among the
  aligned words is compared.

The options (weights, loss kinds, layer map) are those of `training.config.DistillArguments`, checked
when it is built.

Layers are numbered from 1 (the output of encoder layer 1) to the depth of the model, as in
`hidden_states[i]` and `attentions[i - 1]` of a Hugging Face encoder. The embeddings
(`hidden_states[0]`) never take part: they are lexical, tied to each model's own vocabulary, and
have no attention map.

Everything is computed in fp32, whatever precision the models ran in (`fit --precision`): autocast is
turned off and the inputs cast to float32 (`_fp32`), because the losses are small differences of
normalised quantities (attention rows renormalised over a few words, KL terms) that bf16's 8-bit
mantissa would round away.

Everything is batched matrix products with one-hot word-membership matrices; the only Python
loops run over mapped layers. (Gathering only the tokens inside words, or `scatter_add` into
per-word buckets, measured no faster on CPU: the dense attention gradient dominates.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from training.config import DistillArguments, LayerMap
from training.errors import ConfigError

_TINY = 1e-12


@dataclass
class TeacherWordFeatures:
    """The teacher's side of the loss on the mapped layers, in exactly the form compared (so a cache can store it).

    `hidden` is [L_map, B, W, D_teacher] word states, or, when `relation`, [L_map, B, W, W] word-by-word
    cosine similarities: its last axis is then a word axis too. `attention` is [L_map, B, H, W, W] with
    rows renormalised over the note's words; H is 1 under `--attention-heads mean`, the teacher's heads
    under `by-index`. Never trained.
    """

    hidden: torch.Tensor
    attention: torch.Tensor
    relation: bool = False


@dataclass
class DistillLossOutput:
    total: torch.Tensor  # alpha * hidden + beta * attention, with its graph
    hidden: torch.Tensor  # detached, for logging
    attention: torch.Tensor  # detached, for logging
    num_words: int  # aligned words in this batch


class EncoderOutputs(Protocol):
    hidden_states: Sequence[torch.Tensor] | None
    attentions: Sequence[torch.Tensor] | None


def uniform_layer_map(student_layers: int, teacher_layers: int) -> LayerMap:
    """One pair per layer of the shallower model, ending on both last layers: 12 vs 6 -> (2,1), (4,2) .. (12,6)."""
    pairs = min(student_layers, teacher_layers)
    return [(k * student_layers // pairs, k * teacher_layers // pairs) for k in range(1, pairs + 1)]


def check_layer_map(layer_map: LayerMap, student_depth: int, teacher_depth: int) -> None:
    """A ConfigError unless every (student layer, teacher layer) pair lies within both models."""
    if not layer_map:
        raise ConfigError("layer_map is empty")
    for student_layer, teacher_layer in layer_map:
        if not (1 <= student_layer <= student_depth and 1 <= teacher_layer <= teacher_depth):
            raise ConfigError(
                f"--layer-map pair {student_layer}:{teacher_layer} is outside 1..{student_depth} (student) "
                f"and 1..{teacher_depth} (teacher); layers count from 1, embeddings are not mapped"
            )


def pool_words(hidden: torch.Tensor, word_index: torch.Tensor, num_words: int) -> torch.Tensor:
    """Mean of each word's token states: [..., B, T, D] -> [..., B, W, D] (leading dims e.g. layers).

    `word_index` [B, T] is the word slot of each token, -1 for none. Empty slots pool to zeros.
    """
    membership = _membership(word_index, num_words, hidden.dtype)  # [B, T, W]
    return _averaging(membership).transpose(-1, -2) @ hidden


def word_attention(attention: torch.Tensor, word_index: torch.Tensor, num_words: int) -> torch.Tensor:
    """Word-to-word attention: [..., B, H, T, T] -> [..., B, H, W, W].

    Entry (v, w) is the attention from word v to word w: query rows averaged over v's tokens,
    keys summed over w's tokens.
    """
    membership = _membership(word_index, num_words, attention.dtype)[:, None]  # [B, 1, T, W]
    return _averaging(membership).transpose(-1, -2) @ (attention @ membership)


def logit_distill_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Hinton KD: KL(teacher || student) of the temperature-softened class distributions, times T^2, per note."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logit shapes differ: student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}"
        )
    with _fp32(student_logits.device):
        return (
            F.kl_div(
                F.log_softmax(student_logits.float() / temperature, dim=-1),
                F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1),
                log_target=True,
                reduction="batchmean",
            )
            * temperature**2
        )


class MultiLevelDistillLoss(nn.Module):
    """alpha * hidden-state loss + beta * attention loss over the aligned words of a batch.

    Holds the one trainable part of distillation, the projections from the student's word states to
    the teacher's (one `nn.Linear` per mapped layer, for `mse` and `cosine`; none for `relation`).
    They train with the student and are not part of the exported student model.

    Each aligned word contributes its loss averaged over mapped layers (and heads); a batch loss is
    the sum over aligned words divided by `normalizer`: by default the number of aligned words in
    the batch, or the count of the whole accumulated batch under gradient accumulation.
    """

    def __init__(
        self,
        student_config: PretrainedConfig,
        teacher_config: PretrainedConfig,
        options: DistillArguments | None = None,
    ) -> None:
        super().__init__()
        self.options = options or DistillArguments()
        self.student_depth = student_config.num_hidden_layers
        self.teacher_depth = teacher_config.num_hidden_layers
        self.layer_map = self.options.layer_pairs or uniform_layer_map(self.student_depth, self.teacher_depth)
        check_layer_map(self.layer_map, self.student_depth, self.teacher_depth)
        self.relation = self.options.hidden_loss == "relation"
        self.teacher_width = teacher_config.hidden_size
        self.projections = nn.ModuleList(
            [] if self.relation else [nn.Linear(student_config.hidden_size, self.teacher_width) for _ in self.layer_map]
        )
        self.average_heads = self.options.attention_heads == "mean"
        if not self.average_heads and student_config.num_attention_heads != teacher_config.num_attention_heads:
            raise ConfigError(
                "--attention-heads by-index compares head i with head i and needs as many heads in both models, "
                f"got {student_config.num_attention_heads} (student) and {teacher_config.num_attention_heads} "
                "(teacher); use --attention-heads mean"
            )
        self.compared_heads = 1 if self.average_heads else teacher_config.num_attention_heads

    @torch.no_grad()
    def teacher_word_features(
        self, teacher_outputs: EncoderOutputs, teacher_word_index: torch.Tensor, num_words: int
    ) -> TeacherWordFeatures:
        """Pools a live teacher's outputs (called with output_hidden_states and output_attentions) onto the words."""
        hidden_states, attentions = _hidden_and_attentions(teacher_outputs, self.teacher_depth, "teacher")
        teacher_layers = [t for _, t in self.layer_map]
        with _fp32(teacher_word_index.device):
            hidden = torch.stack(
                [pool_words(hidden_states[t].float(), teacher_word_index, num_words) for t in teacher_layers]
            )
            attention = torch.stack(
                [
                    word_attention(self._heads(attentions[t - 1].float()), teacher_word_index, num_words)
                    for t in teacher_layers
                ]
            )
            # An aligned word has tokens in both models, so the teacher's own tokens say which slots hold words.
            words = _membership(teacher_word_index, num_words, torch.bool).any(dim=1)  # [B, W]
            return TeacherWordFeatures(
                hidden=_word_relations(hidden) if self.relation else hidden,
                attention=_renormalise(attention, words[:, None, None, :]),
                relation=self.relation,
            )

    def forward(
        self,
        student_hidden_states: Sequence[torch.Tensor],
        student_attentions: Sequence[torch.Tensor],
        student_word_index: torch.Tensor,
        word_mask: torch.Tensor,
        teacher: TeacherWordFeatures,
        normalizer: float | torch.Tensor | None = None,
    ) -> DistillLossOutput:
        """Loss of one batch; `student_*` come from the student called with output_hidden_states/attentions."""
        self._check_inputs(student_hidden_states, student_attentions, student_word_index, word_mask, teacher)
        with _fp32(word_mask.device):
            num_words = word_mask.shape[1]
            student_layers = [s for s, _ in self.layer_map]

            # Pooled one layer at a time (each cast to fp32 alone): stacking the full layers first would copy them all.
            student_hidden = torch.stack(
                [pool_words(student_hidden_states[s].float(), student_word_index, num_words) for s in student_layers]
            )
            student_attention = torch.stack(
                [
                    word_attention(self._heads(student_attentions[s - 1].float()), student_word_index, num_words)
                    for s in student_layers
                ]
            )
            keys = word_mask[:, None, None, :]  # [B, 1, 1, W]: the note's words, broadcast over layers, heads and rows
            hidden_per_word = self._hidden_loss(student_hidden, teacher.hidden.detach().float(), word_mask)
            attention_per_word = self._attention_loss(
                _renormalise(student_attention, keys), teacher.attention.detach().float(), keys
            )

            aligned = int(word_mask.sum())
            denominator = torch.as_tensor(aligned if normalizer is None else normalizer, dtype=torch.float32)
            denominator = denominator.to(hidden_per_word.device).clamp(min=1)
            hidden = torch.where(word_mask, hidden_per_word, 0).sum() / denominator
            attention = torch.where(word_mask, attention_per_word, 0).sum() / denominator
            return DistillLossOutput(
                total=self.options.alpha * hidden + self.options.beta * attention,
                hidden=hidden.detach(),
                attention=attention.detach(),
                num_words=aligned,
            )

    def _heads(self, attention: torch.Tensor) -> torch.Tensor:
        return attention.mean(dim=-3, keepdim=True) if self.average_heads else attention

    def _hidden_loss(self, student: torch.Tensor, teacher: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """Student word states [L, B, W, D_student] vs `teacher.hidden` -> [B, W] loss of each word, mean of layers."""
        if self.relation:
            keys = word_mask[:, None, :]  # [B, 1, W], broadcast over layers and rows
            squared = torch.where(keys, (_word_relations(student) - teacher).pow(2), 0).sum(dim=-1)
            per_layer = squared / word_mask.sum(dim=1, keepdim=True).clamp(min=1)
        else:
            projected = torch.stack([project(layer) for project, layer in zip(self.projections, student, strict=True)])
            if self.options.hidden_loss == "mse":
                per_layer = (projected - teacher).pow(2).mean(dim=-1)
            else:
                per_layer = 1 - (F.normalize(projected, dim=-1) * F.normalize(teacher, dim=-1)).sum(dim=-1)
        return per_layer.mean(dim=0)

    def _attention_loss(self, student: torch.Tensor, teacher: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Renormalised [L, B, H, W, W] word maps -> [B, W] loss of each word's row, mean over layers and heads."""
        if self.options.attention_loss == "mse":
            squared = torch.where(keys, (student - teacher).pow(2), 0).sum(dim=-1)
            per_row = squared / keys.sum(dim=-1).clamp(min=1)
        else:
            kl = torch.xlogy(teacher, teacher) - teacher * student.clamp(min=_TINY).log()
            per_row = torch.where(keys, kl, 0).sum(dim=-1)
        return per_row.mean(dim=(0, 2))

    def _check_inputs(
        self,
        hidden_states: Sequence[torch.Tensor],
        attentions: Sequence[torch.Tensor],
        word_index: torch.Tensor,
        word_mask: torch.Tensor,
        teacher: TeacherWordFeatures,
    ) -> None:
        _check_depth(hidden_states, attentions, self.student_depth, "student")
        if word_index.shape != hidden_states[0].shape[:2]:
            raise ValueError(
                f"student_word_index {tuple(word_index.shape)} does not match the student's [batch, tokens] "
                f"{tuple(hidden_states[0].shape[:2])}"
            )
        if teacher.relation != self.relation:
            raise ValueError(
                f"teacher features with relation={teacher.relation} do not fit --hidden-loss "
                f"{self.options.hidden_loss}: it compares word {'relations' if self.relation else 'states'}"
            )
        layers, batch, words = len(self.layer_map), word_mask.shape[0], word_mask.shape[1]
        size, axis = (words, "words") if self.relation else (self.teacher_width, "features")
        if teacher.hidden.shape != (layers, batch, words, size):
            raise ValueError(
                f"teacher hidden features {tuple(teacher.hidden.shape)} are not "
                f"[{layers} mapped layers, {batch} notes, {words} words, {size} {axis}]"
            )
        if teacher.attention.shape != (layers, batch, self.compared_heads, words, words):
            raise ValueError(
                f"teacher word attention {tuple(teacher.attention.shape)} is not "
                f"[{layers} mapped layers, {batch} notes, {self.compared_heads} heads, {words} words, {words} words]"
            )


def _fp32(device: torch.device) -> torch.autocast:
    """Autocast off on `device`: what runs inside computes in the dtype of its inputs, cast to float32."""
    return torch.autocast(device.type, enabled=False)


def _membership(word_index: torch.Tensor, num_words: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, W] one-hot word of each token; tokens outside words (-1) have an all-zero row."""
    return (word_index[:, :, None] == torch.arange(num_words, device=word_index.device)).to(dtype)


def _averaging(membership: torch.Tensor) -> torch.Tensor:
    """Membership with each word's column divided by its token count: multiplying by it averages."""
    return membership / membership.sum(dim=-2, keepdim=True).clamp(min=1)


def _word_relations(word_states: torch.Tensor) -> torch.Tensor:
    """[..., W, D] word states -> [..., W, W] cosine similarity of every pair of words (0 with an empty slot)."""
    unit = F.normalize(word_states, dim=-1)
    return unit @ unit.transpose(-1, -2)


def _renormalise(word_map: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Each row as a distribution over the note's words (zero on slots beyond them)."""
    masked = torch.where(keys, word_map.clamp(min=_TINY), 0)
    return masked / masked.sum(dim=-1, keepdim=True).clamp(min=_TINY)


def _hidden_and_attentions(
    outputs: EncoderOutputs, depth: int, model: str
) -> tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]:
    if outputs.hidden_states is None or outputs.attentions is None:
        raise ValueError(
            f"the {model} outputs lack hidden states or attentions: call it with output_hidden_states=True and "
            "output_attentions=True (load it with attn_implementation='eager')"
        )
    _check_depth(outputs.hidden_states, outputs.attentions, depth, model)
    return outputs.hidden_states, outputs.attentions


def _check_depth(
    hidden_states: Sequence[torch.Tensor], attentions: Sequence[torch.Tensor], depth: int, model: str
) -> None:
    if len(hidden_states) != depth + 1 or len(attentions) != depth:
        raise ValueError(
            f"expected {depth + 1} {model} hidden states and {depth} attention maps, "
            f"got {len(hidden_states)} and {len(attentions)}"
        )
