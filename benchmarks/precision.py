"""A training step at each `fit --precision` on this machine's CPU (run from the repository root:
`python -m benchmarks.precision`).

One optimizer step (forward under autocast, backward through the loss scaler, AdamW) of the student on the
same batch of KTAS notes, for fp32, bf16 and fp16; the precisions run in turns and each median is compared with
fp32's. What it shows depends on the CPU: bf16 is fast where it has native bf16 arithmetic (the flags it
prints), fp16 is converted operand by operand where it has no native fp16 arithmetic.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.kd_loss import interleaved_medians
from training.config import Precision
from training.data.ktas import load_ktas
from training.modeling import load_student, load_tokenizer, parameter_groups
from training.objectives import CrossEntropyObjective
from training.precision import mixed_precision

PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "fp16")


def training_step(student: str, precision: Precision, objective: CrossEntropyObjective, batch) -> Callable[[], None]:
    torch.manual_seed(0)
    model = load_student(student)
    model.get_input_embeddings().weight.requires_grad_(False)  # as the e5 recipe (--freeze-embeddings)
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 3e-5, 1e-3, 0.01))
    _, autocast, scaler = mixed_precision(precision, torch.device("cpu"))

    def run() -> None:
        with autocast():
            loss, _ = objective.loss(model, batch, 1, 0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return run


def cpu_flags() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.is_file() else set()
    wanted = ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16")
    return ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in wanted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="e5-small")
    parser.add_argument("--batch", type=int, default=16, help="notes per step")
    parser.add_argument("--max-length", type=int, default=128, help="student tokens per note")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per precision")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    notes = load_ktas(render="ko").subset(np.arange(args.batch))
    objective = CrossEntropyObjective(load_tokenizer(args.student), args.max_length)
    batch = objective.collator(notes)(list(range(len(notes))))
    steps = {precision: training_step(args.student, precision, objective, batch) for precision in PRECISIONS}
    times = interleaved_medians(steps, args.repeats)

    print(f"student {args.student}, {args.batch} KTAS notes (ko rendering, up to {args.max_length} tokens) a step")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(f"CPU: {cpu_flags()}")
    for precision, seconds in times.items():
        print(f"{precision:5s} median {seconds * 1000:8.0f} ms   {seconds / times['fp32']:5.2f}x fp32")


if __name__ == "__main__":
    main()
