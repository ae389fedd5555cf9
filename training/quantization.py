"""Quantization-aware fine-tuning (`fit --quantization-aware`): the student computes every matrix product on
int8-rounded operands, as the bundle's static int8 graph does (`training.onnx_variants.quantize_int8`), so that
training adapts the weights to that rounding.

Where the ONNX graph has a quantized MatMul, the student rounds ("fake-quantizes": rounds, then maps back to
float, with a straight-through gradient) the same operands the same way:

- weights of every linear layer: int8, symmetric, one scale per output channel (ONNX Runtime: QInt8, per channel);
- inputs of every linear layer, the query, key and value projections (inputs of the attention products) and the
  attention probabilities: uint8, one scale and zero point per tensor, from the tensor's min and max (widened to
  include 0) over the calibration notes, taken on the float model (ONNX Runtime: QUInt8, MinMax calibration);
- embedding tables: uint8, one scale and zero point per table, from the table's own min and max (the bundle
  stores them in int8: `quantize_int8`'s `quantize_embeddings`).

That is all an int8 graph exported with `--no-int8-round-outputs` rounds (tests/training/test_export.py: the
fake-quantized model is over 10x closer to that graph than the float model is); the default graph also rounds
each MatMul's output, which is not faked here.

The ranges are taken on the same notes the export calibrates on (the first `CALIBRATION_NOTES` training notes,
in batches of `CALIBRATION_BATCH_SIZE`) and re-taken at the start of every epoch, as the weights move. They are
buffers left out of the model's state dict, so a checkpoint saves the plain model (same parameter names), which
the export quantizes for real; a resumable run's state keeps them (`ActivationRanges`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.modeling import to_device

CALIBRATION_NOTES = 256  # the first training notes: enough to cover the ranges, few enough to take them in seconds
CALIBRATION_BATCH_SIZE = 16
UINT8 = (0, 255)
WEIGHT_INT8 = (-127, 127)  # symmetric: ONNX Runtime's range for symmetric int8


class ActivationRange(nn.Module):
    """A tensor's uint8 fake quantization from a fixed range; while `observing`, records the range instead."""

    low: torch.Tensor
    high: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("low", torch.zeros(()), persistent=False)
        self.register_buffer("high", torch.zeros(()), persistent=False)
        self.observing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:  # in place: `ActivationRanges` holds these very tensors
            self.low.copy_(torch.minimum(self.low, x.detach().min().float()))
            self.high.copy_(torch.maximum(self.high, x.detach().max().float()))
            return x
        low, high = UINT8
        scale = ((self.high - self.low) / (high - low)).clamp_min(1e-12)
        zero_point = torch.round(-self.low / scale).to(torch.int32)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, low, high)

    def reset(self) -> None:
        """Ranges start at [0, 0], so that they include 0 as ONNX Runtime's do."""
        self.low.zero_()
        self.high.zero_()


class FakeQuantLinear(nn.Linear):
    """A linear layer on int8-rounded weights (per output channel) and uint8-rounded input (and, with
    `quantize_output`, output). It holds the original layer's own parameters, under the same names."""

    def __init__(self, linear: nn.Linear, quantize_output: bool = False) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.input_range = ActivationRange()
        self.output_range = ActivationRange() if quantize_output else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if not self.input_range.observing:  # ranges are taken on the float model, as ONNX Runtime takes them
            low, high = WEIGHT_INT8
            scale = (weight.detach().abs().amax(dim=1) / high).clamp_min(1e-12).float()
            zero_point = torch.zeros_like(scale, dtype=torch.int32)
            weight = torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, low, high)
        y = F.linear(self.input_range(x), weight, self.bias)
        return y if self.output_range is None else self.output_range(y)


class FakeQuantEmbedding(nn.Embedding):
    """An embedding table looked up in uint8 (one scale per table, from its min and max at calibration). It holds
    the original table's own weight, under the same name."""

    def __init__(self, embedding: nn.Embedding) -> None:
        nn.Module.__init__(self)
        for name in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq"):
            setattr(self, name, getattr(embedding, name))
        self.sparse, self.weight = embedding.sparse, embedding.weight
        self.table_range = ActivationRange()
        self.rounding = True  # off while the activation ranges are taken (on the float model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vectors = super().forward(ids)
        return self.table_range(vectors) if self.rounding else vectors

    @torch.no_grad()
    def calibrate(self) -> None:
        self.table_range.reset()
        self.table_range.observing = True
        self.table_range(self.weight)
        self.table_range.observing = False


class ActivationRanges(nn.Module):
    """Every range of a quantization-aware model as one module, for a resumable run's state: the model's own state
    dict leaves them out, so that its checkpoints stay plain models."""

    def __init__(self, ranges: list[ActivationRange]) -> None:
        super().__init__()
        for index, activation in enumerate(ranges):
            self.register_buffer(f"low_{index}", activation.low)
            self.register_buffer(f"high_{index}", activation.high)


class QuantizationAware:
    """Makes `model` quantization-aware in place; `calibrate` (re)takes its ranges, which `ranges` holds."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        calibration_texts: list[str],
        max_length: int,
        device: torch.device | str,
    ) -> None:
        if model.config._attn_implementation != "eager":
            raise ValueError(
                "quantization-aware training rounds the attention probabilities: load with eager attention"
            )
        self.model, self.tokenizer, self.max_length, self.device = model, tokenizer, max_length, device
        self.texts = calibration_texts
        attention_outputs: set[int] = set()  # query, key, value: their outputs are the attention products' inputs
        for module in list(model.modules()):
            if all(isinstance(getattr(module, name, None), nn.Linear) for name in ("query", "key", "value")):
                attention_outputs.update(id(getattr(module, name)) for name in ("query", "key", "value"))
                # the probabilities' dropout is the last step before their product with the values (eager attention)
                module.register_module("dropout", nn.Sequential(module.get_submodule("dropout"), ActivationRange()))
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, FakeQuantLinear(child, quantize_output=id(child) in attention_outputs))
                elif type(child) is nn.Embedding:
                    setattr(parent, name, FakeQuantEmbedding(child))
        to_device(model, device)  # the new ranges too, before `ranges` holds them
        self.tables = [module for module in model.modules() if isinstance(module, FakeQuantEmbedding)]
        tables = {id(table.table_range) for table in self.tables}
        self.activations = [m for m in model.modules() if isinstance(m, ActivationRange) and id(m) not in tables]
        self.ranges = ActivationRanges([m for m in model.modules() if isinstance(m, ActivationRange)])

    @torch.no_grad()
    def calibrate(self) -> None:
        training = self.model.training
        self.model.eval()
        for table in self.tables:
            table.calibrate()
            table.rounding = False
        for activation in self.activations:
            activation.reset()
            activation.observing = True
        try:
            for start in range(0, len(self.texts), CALIBRATION_BATCH_SIZE):
                batch = self.tokenizer(
                    self.texts[start : start + CALIBRATION_BATCH_SIZE],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                self.model(**batch)
        finally:
            for table in self.tables:
                table.rounding = True
            for activation in self.activations:
                activation.observing = False
            self.model.train(training)
