"""Data-parallel training with PyTorch DDP: one process per device, started by `torchrun`.

    torchrun --nproc-per-node 2 -m training fit ...     (gloo between CPU processes, nccl between GPUs)

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them `fit` is one process and every method here
returns at once. With them:

- the epoch's batches of --batch-size notes are dealt round the processes, and each optimizer step takes
  --grad-accum of them on every process; DDP averages the processes' gradients, so all take the same step,
  the step one process takes accumulating the same batches (--grad-accum x processes): to the bit, for two
  processes (a halved sum is exact in floating point);
- rank 0 alone writes: the run directory (options, split, history, checkpoints, resumable state, test
  report) and the tracker;
- validation: each process predicts its share of the validation notes, the shares are gathered, and every
  process computes the same metrics from all of them, so all take the same early-stopping decision;
- the teacher cache is built by rank 0 while the others wait, then opened by every process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training.errors import ConfigError

# How long a process waits for the others: rank 0 may build the teacher cache of a hospital's notes meanwhile.
TIMEOUT = timedelta(hours=2)

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes."""

    rank: int = 0
    local_rank: int = 0  # its rank on this machine: the GPU it uses
    size: int = 1

    @classmethod
    def from_environment(cls) -> Processes:
        """As torchrun describes them; one process when it did not start this one."""
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The device of `--device name`: under torchrun, `cuda` is this process's own GPU."""
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if self.size > 1 and name.startswith("cuda"):
            if name != "cuda":
                raise ConfigError(f"--device {name}: under torchrun each process uses its own GPU; pass --device cuda")
            return torch.device("cuda", self.local_rank)
        return torch.device(name)

    def start(self, device: torch.device) -> None:
        if self.size == 1:
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)

    def stop(self) -> None:
        if self.size > 1:
            dist.destroy_process_group()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first, the others once it is done (to reuse what it wrote, e.g. a cache)."""
        if not self.is_main:
            self._barrier()
        yield
        if self.is_main:
            self._barrier()

    def from_main(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` run by rank 0 alone (it writes), its result handed to every process."""
        result = [fn(*args) if self.is_main else None]
        if self.size > 1:
            dist.broadcast_object_list(result, src=0)
        return result[0]  # type: ignore[return-value]

    def mean(self, value: float) -> float:
        """The mean of `value` over the processes."""
        if self.size == 1:
            return value
        total = torch.tensor(float(value), dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(total)
        return total.item() / self.size

    def gather(self, items: list[T]) -> list[T]:
        """Every process's `items`, concatenated in rank order."""
        if self.size == 1:
            return items
        parts: list[list[T] | None] = [None] * self.size
        dist.all_gather_object(parts, items)
        return [item for part in parts for item in part or []]

    def deal(self, batches: list[T]) -> list[T]:
        """This process's batches: every `size`-th, from its rank on. The last few are left out when they cannot
        go round: every process must take as many steps."""
        return batches[self.rank : len(batches) - len(batches) % self.size : self.size]

    def own_share(self, items: list[T]) -> list[T]:
        """This process's share of `items` (for `gather_shares`)."""
        return items[self.rank :: self.size]

    def gather_shares(self, part: np.ndarray) -> np.ndarray:
        """The rows of every process's share, in the order of the items they were computed from."""
        if self.size == 1:
            return part
        parts: list[np.ndarray | None] = [None] * self.size
        dist.all_gather_object(parts, part)
        rows = np.empty((sum(len(p) for p in parts if p is not None), *part.shape[1:]), part.dtype)
        for rank, rank_part in enumerate(parts):
            rows[rank :: self.size] = rank_part
        return rows

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """`module` as DDP trains it: its gradients averaged over the processes during backward."""
        if self.size == 1:
            return module
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    def synchronizing(self, module: nn.Module, last: bool) -> Any:
        """The context of one forward and backward pass of an accumulated step: DDP averages the gradients on
        the `last` pass only (the earlier passes' gradients are in them by then)."""
        if isinstance(module, DistributedDataParallel) and not last:
            return module.no_sync()
        return nullcontext()

    def _barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
