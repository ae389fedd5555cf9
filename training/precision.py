"""Mixed-precision training steps (`--precision`): autocast on the training device, and a loss scaler for fp16.

Under autocast the matrix products run in bf16 or fp16 while the weights, the optimizer and the gradients
stay fp32. bf16 has fp32's exponent range, so its gradients need no scaling; fp16's range is narrow, so its
loss is scaled (`torch.amp.GradScaler`) to keep small gradients from flushing to zero, and a step whose
gradients overflow is skipped. The distillation losses turn autocast off and compute in fp32
(training/distill/losses.py), and validation runs in fp32.

On a CPU, autocast does the same thing: bf16 is fast where the CPU has native bf16 arithmetic (AVX512-BF16
or AMX); fp16 runs too, but a CPU without native fp16 arithmetic converts every operand, so it is slower
than fp32 (`benchmarks/precision.py` measures both).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from training.config import Precision
from training.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def training_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    """The dtype of the training steps' matrix products for `--precision` on `device`."""
    cuda = device.type == "cuda"
    if precision == "auto":
        if not cuda:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16: this GPU has no bfloat16 arithmetic; use fp16")
    return DTYPES[precision]


def mixed_precision(
    precision: Precision, device: torch.device
) -> tuple[torch.dtype, Callable[[], AbstractContextManager[None]], torch.amp.GradScaler]:
    """The dtype, a context of a training step's forward pass (autocast, or nothing for fp32), and the scaler
    its loss goes through (enabled for fp16 only)."""
    dtype = training_dtype(precision, device)

    def autocast() -> AbstractContextManager[None]:
        return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

    return dtype, autocast, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
