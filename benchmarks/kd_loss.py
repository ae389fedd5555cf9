"""Timings of word-level distillation (run from the repository root: `python -m benchmarks.kd_loss`).

Sections:
1. loss: the vectorized `MultiLevelDistillLoss` (MSE losses, heads averaged) against Python loops of
   the original design (for each note, for each word: pool every mapped layer, project, compare),
   forward + backward on random inputs. The loop is timed as originally written (words indexed out
   of the batch outputs) and in its best case (each note split off first). The loop's loss value is
   checked against the vectorized one.
2. step: a whole training step of the e5-small student (forward, backward, AdamW) on the same batch
   of KTAS notes (`ko` rendering): base (sdpa and eager attention), mlkd with the teacher live and with the
   teacher cache on disk; the steps run in turns and each median is compared with base's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from transformers import BertConfig

from training.config import DistillArguments
from training.distill.losses import MultiLevelDistillLoss, TeacherWordFeatures


@dataclass(frozen=True)
class LossShape:
    batch: int = 32
    tokens: int = 256
    words: int = 32
    student_layers: int = 12
    student_width: int = 384
    student_heads: int = 12
    teacher_layers: int = 12
    teacher_width: int = 384
    teacher_heads: int = 12


@dataclass
class LossInputs:
    hidden_states: list[torch.Tensor]
    attentions: list[torch.Tensor]
    word_index: torch.Tensor
    word_mask: torch.Tensor
    teacher: TeacherWordFeatures


def median_seconds(step: Callable[[], None], repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- Section 1: the loss ------------------------------------------------------------------------


def random_word_index(shape: LossShape, generator: torch.Generator) -> torch.Tensor:
    """Each note: `words` words of 1-3 consecutive tokens at random places, the other tokens -1."""
    index = torch.full((shape.batch, shape.tokens), -1)
    for row in index:
        lengths = torch.randint(1, 4, (shape.words,), generator=generator)
        free = shape.tokens - 2 - int(lengths.sum())  # [CLS] and [SEP] are never in a word
        gaps = torch.sort(torch.randint(0, free + 1, (shape.words,), generator=generator)).values
        starts = 1 + gaps + torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
        for word, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True)):
            row[start : start + length] = word
    return index


def random_loss_inputs(shape: LossShape, loss: MultiLevelDistillLoss, seed: int = 0) -> LossInputs:
    generator = torch.Generator().manual_seed(seed)
    b, t, w = shape.batch, shape.tokens, shape.words
    hidden_states = [
        torch.randn(b, t, shape.student_width, generator=generator).requires_grad_()
        for _ in range(shape.student_layers + 1)
    ]
    attentions = [
        torch.randn(b, shape.student_heads, t, t, generator=generator).softmax(-1).requires_grad_()
        for _ in range(shape.student_layers)
    ]
    mapped = len(loss.layer_map)
    teacher_heads = 1 if loss.average_heads else shape.teacher_heads
    attention = torch.rand(mapped, b, teacher_heads, w, w, generator=generator)
    teacher = TeacherWordFeatures(
        hidden=torch.randn(mapped, b, w, shape.teacher_width, generator=generator),
        attention=attention / attention.sum(-1, keepdim=True),  # rows renormalised over the words, as compared
    )
    word_mask = torch.ones(b, w, dtype=torch.bool)
    return LossInputs(hidden_states, attentions, random_word_index(shape, generator), word_mask, teacher)


def vectorized_loss(loss: MultiLevelDistillLoss, inputs: LossInputs) -> torch.Tensor:
    return loss(inputs.hidden_states, inputs.attentions, inputs.word_index, inputs.word_mask, inputs.teacher).total


def looped_loss(loss: MultiLevelDistillLoss, inputs: LossInputs, notes: int, split_notes_first: bool) -> torch.Tensor:
    """The original design: Python loops over the first `notes` notes and their words (MSE losses).

    As originally written, each word is indexed straight out of the batch outputs, so every word
    back-propagates a batch-sized gradient. `split_notes_first` gives the loop its best case: each
    note's states are split off once, up front, and words are indexed out of one note's states.
    """
    student_layers = [s for s, _ in loss.layer_map]
    hidden = [inputs.hidden_states[s] for s in student_layers]
    attention = [inputs.attentions[s - 1] for s in student_layers]
    if split_notes_first:
        hidden, attention = [layer.unbind(0) for layer in hidden], [layer.unbind(0) for layer in attention]
    hidden_total = attention_total = 0.0
    aligned = 0
    for b in range(notes):
        words = int(inputs.word_mask[b].sum())
        aligned += words
        tokens = [(inputs.word_index[b] == w).nonzero().flatten() for w in range(words)]
        for w in range(words):
            student_hidden = torch.stack(
                [project(layer[b][tokens[w]].mean(0)) for project, layer in zip(loss.projections, hidden, strict=True)]
            )
            hidden_total += (student_hidden - inputs.teacher.hidden[:, b, w]).pow(2).mean()
            rows = torch.stack([layer[b][:, tokens[w]].mean(1) for layer in attention])
            if loss.average_heads:
                rows = rows.mean(1, keepdim=True)
            student_row = torch.stack([rows[..., tokens[v]].sum(-1) for v in range(words)], dim=-1)
            student_row = student_row / student_row.sum(-1, keepdim=True)
            attention_total += (student_row - inputs.teacher.attention[:, b, :, w]).pow(2).mean()
    return loss.options.alpha * hidden_total / aligned + loss.options.beta * attention_total / aligned


def loss_section(shape: LossShape, repeats: int, loop_repeats: int, original_loop_notes: int) -> None:
    student = BertConfig(
        num_hidden_layers=shape.student_layers, hidden_size=shape.student_width, num_attention_heads=shape.student_heads
    )
    teacher = BertConfig(
        num_hidden_layers=shape.teacher_layers, hidden_size=shape.teacher_width, num_attention_heads=shape.teacher_heads
    )
    torch.manual_seed(0)
    loss = MultiLevelDistillLoss(student, teacher, DistillArguments(hidden_loss="mse", attention_loss="mse"))
    inputs = random_loss_inputs(shape, loss)
    leaves = [*inputs.hidden_states, *inputs.attentions, *loss.parameters()]

    def step(compute: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for leaf in leaves:
                leaf.grad = None
            compute().backward()

        return run

    with torch.no_grad():
        vectorized_value = vectorized_loss(loss, inputs)
        difference = (vectorized_value - looped_loss(loss, inputs, shape.batch, split_notes_first=True)).abs().item()
    vectorized = median_seconds(step(lambda: vectorized_loss(loss, inputs)), repeats)
    best_loop = median_seconds(
        step(lambda: looped_loss(loss, inputs, shape.batch, split_notes_first=True)), loop_repeats
    )
    original_loop = (
        median_seconds(
            step(lambda: looped_loss(loss, inputs, original_loop_notes, split_notes_first=False)), loop_repeats
        )
        * shape.batch
        / original_loop_notes
    )

    print("== 1. loss: forward + backward ==")
    print(
        f"batch {shape.batch}, {shape.tokens} tokens, {shape.words} words; student {shape.student_layers} layers x "
        f"{shape.student_width} wide x {shape.student_heads} heads; teacher {shape.teacher_layers} x "
        f"{shape.teacher_width} x {shape.teacher_heads}; {len(loss.layer_map)} mapped layers"
    )
    print(f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"loss {vectorized_value.item():.6f}, |vectorized - loop| = {difference:.1e}")
    print(f"vectorized                 median {vectorized * 1000:9.0f} ms  ({repeats} runs)")
    print(f"loop, best case            median {best_loop * 1000:9.0f} ms  ({loop_repeats} runs)")
    print(
        f"loop, original indexing    median {original_loop * 1000:9.0f} ms  "
        f"({loop_repeats} runs on {original_loop_notes} of {shape.batch} notes, scaled to the batch)"
    )
    print(f"speed-up over the best-case loop   {best_loop / vectorized:7.1f}x")
    print(f"speed-up over the original loop    {original_loop / vectorized:7.1f}x")


# --- Section 2: a training step ---------------------------------------------------------------


def interleaved_medians(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each step, run in turns (one of each per round, after a warm-up round), so that a
    shared machine's changing load weighs on every step alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(repeats + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def step_section(student: str, teacher: str, batch_size: int, repeats: int, freeze_embeddings: bool) -> None:
    from training.config import ModelArguments
    from training.data.ktas import load_ktas
    from training.distill.objective import build_distill_objective
    from training.modeling import load_student, load_tokenizer, parameter_groups
    from training.objectives import CrossEntropyObjective

    notes = load_ktas(render="ko").subset(np.arange(batch_size))
    tokenizer = load_tokenizer(student)
    model_args = ModelArguments(student=student, teacher=teacher)

    def training_step(objective, attn_implementation: str) -> Callable[[], None]:
        """One optimizer step of a fresh student on the batch of all `notes`."""
        torch.manual_seed(0)
        model = load_student(student, attn_implementation=attn_implementation)
        model.get_input_embeddings().weight.requires_grad_(not freeze_embeddings)
        model.train()
        params = parameter_groups(model, 3e-5, 1e-3, 0.01)
        params += [{"params": [p for m in objective.extra_modules() for p in m.parameters()], "lr": 1e-3}]
        optimizer = torch.optim.AdamW(params)
        batch = objective.collator(notes)(list(range(len(notes))))

        def run() -> None:
            loss, _ = objective.loss(model, batch, 1, objective.count_words(batch))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    steps = {
        "base (sdpa attention)": training_step(CrossEntropyObjective(tokenizer, model_args.max_length), "sdpa"),
        "base (eager attention)": training_step(CrossEntropyObjective(tokenizer, model_args.max_length), "eager"),
    }
    with tempfile.TemporaryDirectory(prefix="teacher-cache-") as cache_dir:
        for cache in (False, True):
            probe = load_student(student, attn_implementation="eager")
            options = DistillArguments(teacher_cache=cache, teacher_cache_dir=cache_dir)
            objective = build_distill_objective(
                "mlkd", probe, tokenizer, model_args, options, notes, torch.device("cpu")
            )
            steps[f"mlkd, teacher {'cache' if cache else 'live'}"] = training_step(objective, "eager")
        times = interleaved_medians(steps, repeats)

    base = times["base (sdpa attention)"]
    print("\n== 2. training step: forward + backward + AdamW ==")
    print(
        f"student {student}, teacher {teacher}, the same batch of {batch_size} KTAS notes (ko rendering) for every "
        f"step, {repeats} timed steps each, interleaved; word embedding {'frozen' if freeze_embeddings else 'trained'}"
    )
    print(f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for name, seconds in times.items():
        print(f"{name:28s} median {seconds * 1000:8.0f} ms   {seconds / base:5.2f}x base")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs of the vectorized loss")
    parser.add_argument("--loop-repeats", type=int, default=3, help="timed runs of each loop (slow)")
    parser.add_argument(
        "--original-loop-notes",
        type=int,
        default=1,
        help="notes timed with the original loop (its cost per note is constant), scaled to the batch",
    )
    parser.add_argument("--sections", default="loss,step", help="comma-separated: loss, step")
    parser.add_argument("--student", default="e5-small", help="student of the step section")
    parser.add_argument("--teacher", default="minilm-l6", help="teacher of the step section")
    parser.add_argument("--step-batch", type=int, default=16, help="notes per step in the step section")
    parser.add_argument("--step-repeats", type=int, default=10, help="timed steps per configuration")
    parser.add_argument(
        "--train-embeddings",
        action="store_true",
        help="also train the word embedding (the e5 recipe freezes it: --freeze-embeddings)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    if "loss" in sections:
        loss_section(LossShape(), args.repeats, args.loop_repeats, args.original_loop_notes)
    if "step" in sections:
        step_section(args.student, args.teacher, args.step_batch, args.step_repeats, not args.train_embeddings)


if __name__ == "__main__":
    main()
