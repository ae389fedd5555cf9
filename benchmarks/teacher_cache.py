"""The teacher cache at a hospital's scale (run from the repository root: `python -m benchmarks.teacher_cache`).

For 1k, 10k and 100k notes: bytes per note on disk, build time, peak RSS growth during the build, and the
time of a lookup of a batch of 32 notes. Each size runs in a process of its own; its peak RSS growth is the
process's peak resident memory during the build (VmHWM, reset just before through /proc/self/clear_refs)
less its resident memory just before, so the notes, tokenizers and models loaded beforehand do not count.

Notes (not real free text): the 1,267 bundled KTAS records (real triage-time fields) rendered in the `ko` style
(Korean ED-note phrasing with English terms, training/data/render.py) with render seeds 0, 1, 2, ... until the
size is reached. Each seed draws other phrasings, abbreviations and orders for the same records, so the notes
repeat facts but have the real number of English words (about 9 aligned words a note).

Teacher: to keep 100k notes within minutes on 2 CPUs, its forward pass is that of a tiny random BertModel built
here (6 layers, as many as the minilm-l6 teacher, so 6 mapped layers against the e5-small student, but only
`--width` wide), with the real minilm-l6 tokenizer; the student side is the real e5-small tokenizer and config,
with the default options (latin words, at most 32 a note, attention averaged over heads). What is measured is
the cache's I/O and memory. The bytes a note takes with the real teacher's width (384) follow exactly from the
stored word counts and are printed beside the measured ones.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, BertConfig, BertModel

from training.config import DistillArguments, ModelArguments
from training.data.examples import Examples
from training.data.ktas import load_ktas
from training.data.render import render_examples
from training.distill.cache import load_or_build
from training.distill.losses import MultiLevelDistillLoss
from training.distill.objective import DistillCollator
from training.distill.teacher import load_teacher
from training.modeling import load_tokenizer
from training.pretrained import resolve_model

REAL_TEACHER_WIDTH = 384  # minilm-l6
DENSE_FP32_BYTES = 4 * (6 * 32 * 384 + 6 * 12 * 32 * 32)  # the former in-RAM cache: [L, W, D] + [L, H, W, W] a note


def ko_notes(size: int) -> list[str]:
    """`size` notes: the KTAS records rendered in the `ko` style with render seeds 0, 1, 2, ..."""
    records = load_ktas()
    seeds = math.ceil(size / len(records))
    return [text for seed in range(seeds) for text in render_examples(records, "ko", seed).texts][:size]


def memory_kb(field: str) -> int:
    """A field of /proc/self/status in kB: VmRSS (resident now) or VmHWM (peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def tiny_teacher(tokenizer, width: int, directory: Path) -> torch.nn.Module:
    """A random 6-layer BertModel `width` wide over the tokenizer's vocabulary, saved and loaded as a teacher is."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        num_hidden_layers=6,
        num_attention_heads=2,
        intermediate_size=2 * width,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertModel(config).save_pretrained(directory)
    return load_teacher(str(directory))


def measure(size: int, width: int, workdir: Path) -> dict[str, float]:
    """Builds the cache of `size` notes in `workdir` (in this process) and returns its figures."""
    texts = ko_notes(size)
    examples = Examples(texts, np.zeros(size, dtype=np.int64), np.arange(size), "ko renderings")
    student, teacher_name = "e5-small", "minilm-l6"
    teacher_tokenizer = load_tokenizer(teacher_name)
    teacher = tiny_teacher(teacher_tokenizer, width, workdir / "teacher")
    options = DistillArguments()
    loss = MultiLevelDistillLoss(AutoConfig.from_pretrained(resolve_model(student)), teacher.config, options)
    collator = DistillCollator(
        examples,
        load_tokenizer(student),
        teacher_tokenizer,
        ModelArguments().max_length,
        teacher.config.max_position_embeddings,
        options.word_policy,
        options.max_words,
    )

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident memory
    before = memory_kb("VmRSS")
    start = time.perf_counter()
    cache = load_or_build(workdir / "cache", collator, teacher, loss, torch.device("cpu"))
    seconds = time.perf_counter() - start
    growth = memory_kb("VmHWM") - before

    generator = np.random.default_rng(0)
    lookups = []
    for _ in range(50):
        positions = torch.from_numpy(generator.choice(size, 32, replace=False))
        words = int(cache.words[positions.numpy()].max())
        start = time.perf_counter()
        cache.lookup(positions, words, torch.device("cpu"))
        lookups.append(time.perf_counter() - start)

    manifest = cache.manifest
    layers, words = manifest["layers"], int(cache.words.sum())
    # The same notes with the real teacher's width: hidden.bin and sentence.bin scale with it, nothing else does.
    hidden_and_sentence = 2 * (layers * words * width + size * width)
    real_bytes = manifest["bytes"] - hidden_and_sentence + hidden_and_sentence * REAL_TEACHER_WIDTH // width
    return {
        "notes": size,
        "words_per_note": words / size,
        "bytes_per_note": manifest["bytes"] / size,
        "real_width_bytes_per_note": real_bytes / size,
        "build_s": seconds,
        "rss_growth_mb": growth / 1024,
        "lookup_ms": 1000 * statistics.median(lookups),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated numbers of notes")
    parser.add_argument("--width", type=int, default=32, help="width of the tiny teacher")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process: measure this size only
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.one, args.width, args.workdir)))
        return

    print("== teacher cache: build and lookup ==")
    print(
        "notes: KTAS records rendered in the ko style with seeds 0, 1, 2, ... (not real free text); teacher: a tiny "
        f"random 6-layer BertModel {args.width} wide with the minilm-l6 tokenizer; student: e5-small tokenizer"
    )
    print(f"torch threads {args.threads}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"the former in-RAM cache (dense fp32, minilm-l6 shapes): {DENSE_FP32_BYTES / 1024:.0f} KB a note")
    print(
        f"{'notes':>8} {'words/note':>10} {f'KB/note (width {args.width})':>22} {'KB/note (width 384)':>20} "
        f"{'build s':>8} {'notes/s':>8} {'peak RSS growth MB':>19} {'lookup ms/32':>13}"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="teacher-cache-bench-") as workdir:
            child = [sys.executable, "-m", "benchmarks.teacher_cache", "--one", str(size), "--workdir", workdir]
            child += ["--width", str(args.width), "--threads", str(args.threads)]
            result = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
        print(
            f"{result['notes']:>8,} {result['words_per_note']:>10.1f} {result['bytes_per_note'] / 1024:>22.1f} "
            f"{result['real_width_bytes_per_note'] / 1024:>20.1f} {result['build_s']:>8.0f} "
            f"{size / result['build_s']:>8.0f} {result['rss_growth_mb']:>19.0f} {result['lookup_ms']:>13.1f}"
        )


if __name__ == "__main__":
    main()
