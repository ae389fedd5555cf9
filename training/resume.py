"""The resumable state of `fit`: what a stopped run continues from (`fit --resume`).

`checkpoints/resume.pt` holds everything the next optimizer step depends on: the trainable weights (the
student, and the distillation projections and ensemble probe), the optimizer, learning-rate schedule and
loss-scaler states, the progress (the epoch and the optimizer steps taken in it: epoch e's batches are a
permutation seeded by seed + e, so that position is the whole data-order state; the history, the best
checkpoints and the early-stopping count), and of each training process its RNG states (python, numpy,
torch, CUDA) and the step logs of the epoch in progress. `fit` writes it at the end of each epoch and every
--checkpoint-steps steps, to a temporary file renamed over the previous one (a stop while writing leaves the
previous state whole), and removes it when the run is complete.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.config import DataArguments, DistillArguments, EvalArguments, ModelArguments, TrainingArguments
from training.errors import ConfigError, RunDirectoryError
from training.run_dir import RunDirectory, run_config

# Options that may differ when a run is resumed: none of them changes what the run computes.
RESUMABLE_OPTIONS = {"resume", "checkpoint_steps", "threads"}


@dataclass
class Progress:
    """Where training stands, as plain values."""

    epoch: int = 1  # the epoch in progress
    epoch_steps: int = 0  # optimizer steps taken in it
    step: int = 0  # optimizer steps taken in all
    stale: int = 0  # epochs since --select-metric last improved
    elapsed_s: float = 0.0  # time since training started, over every session
    epoch_logs: list[dict[str, float]] = field(default_factory=list)  # this process's step logs of the epoch
    history: list[dict[str, Any]] = field(default_factory=list)  # the lines of history.jsonl
    best: dict[str, list[float]] = field(default_factory=dict)  # CheckpointKeeper.state_dict()


def start_or_resume(
    run: RunDirectory,
    data: DataArguments,
    model: ModelArguments,
    training: TrainingArguments,
    distill: DistillArguments,
    evaluation: EvalArguments,
    write: bool = True,
) -> dict[str, Any] | None:
    """A new run writes its options (if `write`: one process of several does) and returns None; with --resume
    the options are checked against the saved ones and the saved state is returned (see `load_state`)."""
    config = run_config(data, model, training, distill, evaluation)
    if training.resume:
        check_same_options(run, config)
        return load_state(run.resume_file)
    if run.resume_file.is_file():
        raise RunDirectoryError(
            f"{run.root} holds a stopped run ({run.relative(run.resume_file)}): pass --resume to continue it, or "
            "choose another --out (delete the directory to start it over)"
        )
    if write:
        run.write_config(data, model, training, distill, evaluation)
    return None


def check_same_options(run: RunDirectory, config: dict[str, Any]) -> None:
    """`config` (the option groups, as RunDirectory.write_config writes them) must be the saved run's, but for
    RESUMABLE_OPTIONS: a ConfigError names every option that differs."""
    saved = run.read_config()
    given = json.loads(json.dumps(config))  # tuples as lists, as in the saved file
    changed = [
        f"--{name.replace('_', '-')} {saved.get(group, {}).get(name, '(not set)')!r} -> {value!r}"
        for group, options in given.items()
        for name, value in options.items()
        if name not in RESUMABLE_OPTIONS and saved.get(group, {}).get(name, "(not set)") != value
    ]
    if changed:
        raise ConfigError(
            f"--resume: {run.root} was started with other options ({'; '.join(changed)}): resume it with the "
            f"options of its {run.config_file.name}, or start a new run in another --out"
        )


def save_state(
    path: Path,
    modules: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    progress: Progress,
    processes: list[dict[str, Any]],
) -> None:
    """Write the state to `path` atomically: a temporary file, flushed to disk, then renamed over `path`.
    `processes`: `process_state()` of every training process, in rank order."""
    state = {
        "modules": modules.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "progress": {k: v for k, v in asdict(progress).items() if k != "epoch_logs"},
        "processes": processes,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    with staging.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, path)


def load_state(path: Path) -> dict[str, Any]:
    """The state saved at `path` (on the CPU); a RunDirectoryError when there is none or it cannot be read."""
    if not path.is_file():
        raise RunDirectoryError(
            f"--resume: no resumable state at {path} (fit writes one at the end of each epoch and every "
            "--checkpoint-steps steps, and removes it when the run is complete)"
        )
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        Progress(**state["progress"])
        state["processes"][0]["rng"]
    except Exception as error:  # a torn or foreign file fails in pickle, zip or torch code alike
        raise RunDirectoryError(
            f"--resume: {path} is not a readable resumable state ({type(error).__name__}: {error}); "
            "delete it and start the run again"
        ) from error
    return state


def restore(
    state: dict[str, Any],
    modules: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    rank: int = 0,
    processes: int = 1,
) -> Progress:
    """Load `state` (from `load_state`) into the freshly built training objects; returns the progress of
    process `rank` of `processes`."""
    saved = state["processes"]
    if len(saved) != processes:
        raise ConfigError(
            f"--resume: the run was trained by {len(saved)} process(es), not {processes}: resume it with as many "
            f"(torchrun --nproc-per-node {len(saved)}, or no torchrun for one)"
        )
    modules.load_state_dict(state["modules"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(saved[rank]["rng"])
    return Progress(**state["progress"], epoch_logs=saved[rank]["epoch_logs"])


def process_state(progress: Progress) -> dict[str, Any]:
    """What differs between the training processes: the RNG states and the step logs of the epoch."""
    return {"rng": rng_state(), "epoch_logs": progress.epoch_logs}


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from. numpy's key is stored as a tensor: `torch.load(weights_only=True)`
    reads tensors and plain values, not numpy arrays."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    return {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
