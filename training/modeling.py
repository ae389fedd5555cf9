"""The student classifier: any Hugging Face encoder plus a two-way classification head."""

from __future__ import annotations

from typing import TypeVar

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from training.data.examples import LABEL_NAMES
from training.errors import ConfigError
from training.pretrained import resolve_model

HEAD_PREFIXES = ("classifier", "pooler", "score")

ModelT = TypeVar("ModelT", bound=torch.nn.Module)


def to_device(model: ModelT, device: torch.device | str) -> ModelT:
    """`model.to(device)`, typed: transformers wraps `PreTrainedModel.to` with `functools.wraps`, which type
    checkers cannot bind to the instance. Modules move in place, and the model's own `to` is what runs."""
    module: torch.nn.Module = model
    module.to(device)
    return model


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerFast:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path), use_fast=True)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(f"{name_or_path}: a fast tokenizer is required (offset mappings align words across models)")
    return tokenizer


def position_limit(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> int:
    """The most tokens per note the model can read: its position embeddings (less the offset RoBERTa-style
    models start their positions at), or the tokenizer's own limit when lower."""
    config = model.config
    pad = config.pad_token_id
    offset = pad + 1 if pad is not None and config.model_type in ("roberta", "xlm-roberta", "camembert") else 0
    return int(min(config.max_position_embeddings - offset, tokenizer.model_max_length))


def load_student(name_or_path: str, attn_implementation: str = "sdpa", layers: int | None = None) -> PreTrainedModel:
    """Load an encoder with a 2-label head; `attn_implementation='eager'` when attention maps are needed;
    `layers`: keep only that many encoder layers (`keep_layers`)."""
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(name_or_path),
        num_labels=len(LABEL_NAMES),
        id2label=dict(enumerate(LABEL_NAMES)),
        label2id={name: i for i, name in enumerate(LABEL_NAMES)},
        attn_implementation=attn_implementation,
    )
    if layers is not None:
        keep_layers(model, layers)
    return model


def kept_layers(depth: int, layers: int) -> list[int]:
    """Which of `depth` layers (counted from 1) a `layers`-deep copy keeps: spread uniformly, ending on the last,
    as `training.distill.uniform_layer_map` pairs them (12 -> 6: 2, 4, .., 12; 12 -> 4: 3, 6, 9, 12)."""
    return [k * depth // layers for k in range(1, layers + 1)]


def keep_layers(model: PreTrainedModel, layers: int) -> None:
    """Drop encoder layers in place, keeping `kept_layers` with their weights; the config follows, so that a saved
    checkpoint loads as the smaller model."""
    encoder = getattr(model.base_model, "encoder", None)
    stack = getattr(encoder, "layer", None)
    if encoder is None or not isinstance(stack, torch.nn.ModuleList):
        raise ConfigError(f"--student-layers: {type(model).__name__} has no encoder.layer stack to take layers from")
    if layers > len(stack):
        raise ConfigError(f"--student-layers {layers}: the student has only {len(stack)} layers")
    encoder.layer = torch.nn.ModuleList([stack[i - 1] for i in kept_layers(len(stack), layers)])
    model.config.num_hidden_layers = layers


def is_head_parameter(model: PreTrainedModel, name: str) -> bool:
    base = model.base_model_prefix + "."
    name = name[len(base) :] if name.startswith(base) else name
    return name.startswith(HEAD_PREFIXES)


def parameter_groups(model: PreTrainedModel, encoder_lr: float, head_lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: encoder vs head learning rate, and no weight decay on biases and LayerNorm weights."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            no_decay = param.ndim < 2
            groups.setdefault((is_head_parameter(model, name), no_decay), []).append(param)
    return [
        {"params": params, "lr": head_lr if is_head else encoder_lr, "weight_decay": 0.0 if no_decay else weight_decay}
        for (is_head, no_decay), params in groups.items()
    ]
