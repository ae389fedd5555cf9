"""Smaller and quantization-aware students against today's default (issue #19): test AUROC per rendering, notes/s
on the CPU, and model FLOP utilisation (MFU).

    python -m experiments.compression --bundle l12=models/compression/l12 --bundle l6=models/compression/l6-qat \
        --bundle l4=models/compression/l4-qat --reference l12:fp32 --baseline l12:int8 \
        [--repeats 5 --threads 2] [--docs docs/results]

Engines: every kept CPU variant (fp32, int8) of every bundle, as the service runs it: a NoteClassifier on the CPU
provider with the bundle's calibration and max_input_tokens. Accuracy: the test split of each bundle's source run,
rendered in every style (every bundle must give the same notes: the comparison is paired), AUROC with a 95%
bootstrap CI and the AUROC difference to --reference on the same resamples; the batch shift (largest |P alone -
P in a batch of 32|) on the mixed test notes. Speed: notes/s on the mixed test notes at batch 1 and 32
(tokenization, ONNX run and calibration: NoteClassifier.predict_proba), the engines timed in turn within each
repeat, median over repeats. MFU: fp32-equivalent FLOPs of the padded batches run, per second, over the numpy
fp32 matmul peak (benchmarks/matmul_peak.py).

--run scores every bundle on that run's test split instead of its source run's; --limit keeps the first N test
notes (smoke runs only).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from sklearn.metrics import roc_auc_score

from app.batching import plan_batches
from app.bundle import CPU, create_session, load_bundle
from app.inference import NoteClassifier
from app.manifest import LABELS, Manifest
from benchmarks.matmul_peak import MatmulPeak, measure
from benchmarks.onnx_vs_torch import Predict, notes_per_second
from benchmarks.options import named_bundle
from training.config import RENDER_STYLES
from training.data.examples import Examples
from training.data.loading import load_parts
from training.evaluate import resample_indices, resampled_metrics
from training.run_dir import RunDirectory

N_RESAMPLES = 1000
BATCH_SIZES = (1, 32)
GOAL_SPEEDUP, GOAL_AUROC_DROP, GOAL_BATCH = 2.0, 0.005, 32
CPU_VARIANTS = ("fp32", "int8")  # fp16 is for GPUs: slow on the CPU provider
TIMED_STYLE = "mixed"


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int

    def flops(self, batch: int, tokens: int) -> int:
        """fp32-equivalent FLOPs of one padded batch: per layer the Q, K, V, output and feed-forward matmuls and
        the two attention products; then the pooler and the classifier on the first token."""
        d, ff = self.hidden, self.intermediate
        per_layer = 2 * batch * tokens * (4 * d * d + 2 * d * ff) + 4 * batch * tokens**2 * d
        return self.layers * per_layer + 2 * batch * (d * d + d * len(LABELS))


@dataclass
class Engine:
    bundle: str
    variant: str
    manifest: Manifest
    classifier: NoteClassifier
    shape: Shape
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.bundle}:{self.variant}"


def model_shape(onnx_file: Path) -> Shape:
    """Layers (distinct `/layer.N/` node prefixes), hidden and feed-forward sizes (the encoder's MatMul weights:
    d x d for attention, d x ff for the feed-forward up-projection) of an fp32 ONNX graph."""
    graph = onnx.load(str(onnx_file)).graph
    weights = {tensor.name: tuple(tensor.dims) for tensor in graph.initializer if len(tensor.dims) == 2}
    layers = {match.group(1) for node in graph.node if (match := re.search(r"/layer\.(\d+)/", node.name))}
    shapes = Counter(
        weights[name]
        for node in graph.node
        if node.op_type == "MatMul" and "/layer." in node.name
        for name in node.input
        if name in weights
    )
    hidden = next(rows for rows, columns in shapes if rows == columns)
    intermediate = next(columns for rows, columns in shapes if rows == hidden and columns != hidden)
    return Shape(len(layers), hidden, intermediate)


def load_engines(bundles: dict[str, Path], threads: int) -> list[Engine]:
    engines = []
    for name, path in bundles.items():
        bundle = load_bundle(path, "fp32", threads, [CPU])
        fp32 = NoteClassifier.from_bundle(bundle)
        shape = model_shape(path / bundle.manifest.variants["fp32"].file)
        for variant, listed in bundle.manifest.variants.items():
            if listed.kept and variant in CPU_VARIANTS:
                classifier = (
                    fp32 if variant == "fp32" else fp32.with_session(create_session(path / listed.file, [CPU], threads))
                )
                engines.append(Engine(name, variant, bundle.manifest, classifier, shape))
    return engines


def held_out_notes(engines: list[Engine], run: Path | None, limit: int | None, split: str) -> dict[str, Examples]:
    """The test (or validation) split rendered in each style; every bundle's source run must give the same notes
    and labels."""
    notes: dict[str, Examples] = {}
    first = ""
    by_source: dict[Path, Engine] = {}  # each run's notes are loaded once (with --run, once in all)
    for engine in engines:
        by_source.setdefault(run or Path(engine.manifest.source_run), engine)
    for root, engine in by_source.items():
        source = RunDirectory(root)
        if not source.config_file.is_file():
            sys.exit(
                f"bundle {engine.bundle}: its source run {source.root} is missing (no {source.config_file.name}); "
                "pass --run RUN, the run directory the bundle was exported from"
            )
        for style in RENDER_STYLES:
            test = load_parts(source.data_arguments(render=style))[split]
            if limit:
                test = test.subset(np.arange(min(limit, len(test))))
            if style not in notes:
                notes[style], first = test, engine.bundle
            elif test.texts != notes[style].texts or not np.array_equal(test.labels, notes[style].labels):
                sys.exit(
                    f"bundles {first} and {engine.bundle} give different {style} test notes (from {source.root}): "
                    "the AUROC comparison is paired: every bundle must come from runs sharing one test split"
                )
    return notes


def interval(point: float, resampled: np.ndarray) -> dict[str, float]:
    low, high = np.percentile(resampled, [2.5, 97.5])
    return {"value": float(point), "low": float(low), "high": float(high)}


def score_accuracy(engines: list[Engine], notes: dict[str, Examples], reference: Engine) -> None:
    for style, test in notes.items():
        indices = resample_indices(test.labels, N_RESAMPLES, seed=0)
        probabilities = {engine.name: engine.classifier.predict_proba(test.texts, GOAL_BATCH) for engine in engines}
        resampled = {
            engine.name: resampled_metrics(
                test.labels, probabilities[engine.name], engine.manifest.decision.threshold, indices
            )["auroc"]
            for engine in engines
        }
        aurocs = {name: roc_auc_score(test.labels, p) for name, p in probabilities.items()}
        for engine in engines:
            name = engine.name
            engine.results.setdefault("auroc", {})[style] = interval(aurocs[name], resampled[name])
            engine.results.setdefault("auroc_difference", {})[style] = interval(
                aurocs[name] - aurocs[reference.name], resampled[name] - resampled[reference.name]
            )
            if style == TIMED_STYLE:
                alone = engine.classifier.predict_proba(test.texts, batch_size=1)
                engine.results["batch_shift"] = {
                    "manifest": engine.manifest.variants[engine.variant].batch_shift,
                    "measured": float(np.abs(alone - probabilities[name]).max()),
                }


def time_engines(engines: list[Engine], texts: list[str], repeats: int) -> dict[int, dict[str, float]]:
    """notes/s per batch size and engine; notes_per_second gets the whole list as one 'batch', so each timing is
    one predict_proba over every note, batched by the classifier as the service batches."""
    timings = {}
    for size in BATCH_SIZES:
        predictors: dict[str, Predict] = {e.name: partial(e.classifier.predict_proba, batch_size=size) for e in engines}
        timings[size] = notes_per_second(predictors, texts, len(texts), repeats)
    return timings


def score_speed(
    engines: list[Engine], texts: list[str], timings: dict[int, dict[str, float]], peak: MatmulPeak
) -> None:
    """notes/s, and the fp32-equivalent GFLOP/s of the padded batches run at that rate over the peak (MFU)."""
    for engine in engines:
        lengths = [len(note.ids) for note in engine.classifier.encode(texts)]
        for size, throughput in timings.items():
            batches = plan_batches(lengths, size, sys.maxsize)
            flops = sum(engine.shape.flops(len(batch), max(lengths[i] for i in batch)) for batch in batches)
            achieved = flops * throughput[engine.name] / len(texts) / 1e9
            engine.results.setdefault("notes_per_s", {})[size] = throughput[engine.name]
            engine.results.setdefault("gflops_fp32_equivalent", {})[size] = achieved
            engine.results.setdefault("mfu", {})[size] = achieved / peak.gflops


def goals(engine: Engine, baseline: Engine) -> dict[str, Any]:
    speedup = engine.results["notes_per_s"][GOAL_BATCH] / baseline.results["notes_per_s"][GOAL_BATCH]
    worst = min(engine.results["auroc_difference"].items(), key=lambda item: item[1]["value"])
    shift = engine.results["batch_shift"]["measured"]
    return {
        "speedup": {"value": speedup, "met": speedup >= GOAL_SPEEDUP},
        "auroc": {
            "worst_rendering": worst[0],
            "difference": worst[1]["value"],
            "met": worst[1]["value"] >= -GOAL_AUROC_DROP,
        },
        "batch_shift": {"value": shift, "met": shift == 0},
    }


def figure(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.2g}"


def tables(engines: list[Engine], baseline: Engine, reference: Engine) -> list[str]:
    lines = [
        f"| bundle | layers | variant | MB | notes/s @1 | notes/s @32 | x {baseline.name} @32 | MFU @1 | MFU @32 | "
        "batch shift (manifest) | batch shift (measured) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e in engines:
        r = e.results
        lines.append(
            f"| {e.bundle} | {e.shape.layers} | {e.variant} | {e.manifest.variants[e.variant].size_bytes / 1e6:.1f} "
            f"| {r['notes_per_s'][1]:.1f} | {r['notes_per_s'][32]:.1f} | {r['goals']['speedup']['value']:.2f}x "
            f"| {r['mfu'][1]:.1%} | {r['mfu'][32]:.1%} | {figure(r['batch_shift']['manifest'])} "
            f"| {r['batch_shift']['measured']:.2g} |"
        )
    lines += ["", *accuracy_table(engines, reference, "Test")]
    lines += ["", f"Goals (batch {GOAL_BATCH}, against {baseline.name} and {reference.name}):", ""]
    for e in engines:
        g = e.results["goals"]
        met = {key: "met" if g[key]["met"] else "NOT met" for key in g}
        lines.append(
            f"- {e.name}: >= {GOAL_SPEEDUP:g}x baseline at batch {GOAL_BATCH}: {met['speedup']} "
            f"({g['speedup']['value']:.2f}x); Δ AUROC at most {GOAL_AUROC_DROP} below the reference on every "
            f"rendering (point estimate): {met['auroc']} (worst {g['auroc']['difference']:+.4f}, "
            f"{g['auroc']['worst_rendering']}); batch shift 0: {met['batch_shift']} ({g['batch_shift']['value']:.2g})"
        )
    return lines


def accuracy_table(engines: list[Engine], reference: Engine, split: str) -> list[str]:
    def cell(metric: dict[str, float], sign: str = "") -> str:
        return f"{metric['value']:{sign}.4f} [{metric['low']:{sign}.4f}, {metric['high']:{sign}.4f}]"

    lines = [
        f"{split} AUROC [95% CI] and its paired difference to {reference.name} [95% CI] (same notes, same "
        f"{N_RESAMPLES} resamples):",
        "",
        "| engine | " + " | ".join(f"{style} AUROC | {style} Δ" for style in RENDER_STYLES) + " |",
        "| --- | " + " | ".join("---: | ---:" for _ in RENDER_STYLES) + " |",
    ]
    for e in engines:
        cells = [
            f"{cell(e.results['auroc'][s])} | {cell(e.results['auroc_difference'][s], '+')}" for s in RENDER_STYLES
        ]
        lines.append(f"| {e.name} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bundle", action="append", required=True, type=named_bundle, metavar="NAME=PATH", help="A bundle to compare."
    )
    parser.add_argument("--reference", required=True, metavar="NAME:VARIANT", help="AUROC differences are to it.")
    parser.add_argument("--baseline", required=True, metavar="NAME:VARIANT", help="Speed-ups are over it.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op and BLAS threads.")
    parser.add_argument(
        "--run", type=Path, help="Score every bundle on this run's test split (default: its source run's)."
    )
    parser.add_argument("--limit", type=int, help="Keep the first N test notes (smoke runs only).")
    parser.add_argument(
        "--split",
        choices=("test", "valid"),
        default="test",
        help="valid: only the AUROC table, on the validation split (to choose a variant without the test set).",
    )
    parser.add_argument("--docs", type=Path, help="Write compression.md and compression.json there.")
    args = parser.parse_args()

    engines = load_engines(dict(args.bundle), args.threads)
    by_name = {engine.name: engine for engine in engines}
    for option in ("reference", "baseline"):
        if getattr(args, option) not in by_name:
            sys.exit(f"--{option} {getattr(args, option)}: not an engine; engines are {', '.join(by_name)}")
    reference, baseline = by_name[args.reference], by_name[args.baseline]
    notes = held_out_notes(engines, args.run, args.limit, args.split)
    score_accuracy(engines, notes, reference)
    if args.split == "valid":
        print("\n".join(accuracy_table(engines, reference, "Validation")))
        return
    # The peak is measured just before and just after the timings, and the higher one taken: on a shared CPU
    # other jobs lower either figure.
    before = measure(args.threads)
    timings = time_engines(engines, notes[TIMED_STYLE].texts, args.repeats)
    peak_after = measure(args.threads)
    peak = max(before, peak_after, key=lambda measured: measured.gflops)
    score_speed(engines, notes[TIMED_STYLE].texts, timings, peak)
    for engine in engines:
        engine.results["goals"] = goals(engine, baseline)

    command = "python -m experiments.compression " + shlex.join(sys.argv[1:])
    counts = ", ".join(f"{style} {len(test)}" for style, test in notes.items())
    about = [
        f"Test notes per rendering: {counts}. Speed on the {TIMED_STYLE} notes, {args.threads} threads, median of "
        f"{args.repeats} repeats, engines interleaved within each repeat; one run on a shared {os.cpu_count()}-core "
        "CPU, so the figures are indicative.",
        "MFU: fp32-equivalent FLOPs of the padded batches run, per second, over the higher of two measurements of "
        f"the fp32 matmul peak, {before.gflops:.1f} GFLOP/s just before the timings and {peak_after.gflops:.1f} "
        f"just after ({peak.describe()}). "
        "int8 runs integer kernels, so its MFU is fp32-equivalent FLOP/s over the fp32 peak, not a utilisation of "
        "int8 units. Other jobs on the CPU during the peak's measurement but not the model's can push MFU past 100%.",
    ]
    body = tables(engines, baseline, reference)
    print("\n\n".join(about) + "\n\n" + "\n".join(body))
    if args.docs:
        args.docs.mkdir(parents=True, exist_ok=True)
        title = "# Compression: smaller and quantization-aware students (generated by experiments/compression.py)"
        (args.docs / "compression.md").write_text(
            "\n\n".join([title, __doc__.split("\n\n")[2], f"`{command}`", *about, "\n".join(body)]) + "\n"
        )
        figures = {
            "command": command,
            "threads": args.threads,
            "repeats": args.repeats,
            "test_notes": {style: len(test) for style, test in notes.items()},
            "matmul_peak": {
                "gflops": peak.gflops,
                "before_timings": before.gflops_by_size,
                "after_timings": peak_after.gflops_by_size,
                "about": peak.describe(),
            },
            "reference": reference.name,
            "baseline": baseline.name,
            "engines": {
                e.name: {"size_bytes": e.manifest.variants[e.variant].size_bytes, "shape": vars(e.shape), **e.results}
                for e in engines
            },
        }
        (args.docs / "compression.json").write_text(json.dumps(figures, indent=1) + "\n")
        print(f"\nwritten to {args.docs / 'compression.md'} and {args.docs / 'compression.json'}")


if __name__ == "__main__":
    main()
