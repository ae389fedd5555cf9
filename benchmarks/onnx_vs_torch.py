"""Throughput and test AUROC of a run's PyTorch student against its exported ONNX bundle, on CPU.

Run from the repository root:

    python -m benchmarks.onnx_vs_torch --run runs/NAME --bundle models/NAME [--threads 2 --repeats 5]
        [--compare l6=models/l6 --compare qat=models/qat]

Every engine classifies the run's own test notes, in their stored order, in batches of 1, 8 and 32;
a timing covers tokenization, the forward pass and the softmax (what the service does per request).
Engines: PyTorch eager (the best checkpoint, as trained) and the bundle's ONNX variants, all in
this process, with the same thread count and inputs; each repeat times every engine in turn, and the
median over repeats is reported. On a shared machine the figures are indicative only.

Each `--compare NAME=BUNDLE` adds that bundle's kept CPU variants (those of --variants) as engines named
"NAME fp32", "NAME int8", timed in the same repeats on the same notes; each is compared with the main bundle's
int8 engine at batch 32 and with the run's PyTorch model (issue #19: a smaller or quantization-aware student
against today's default). Their AUROC means something only if they were trained on the same split as --run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from app.bundle import CPU, create_session, load_tokenizer, read_manifest
from app.inference import NoteClassifier
from benchmarks.options import add_compare_option
from training.config import SELECT_METRICS
from training.data.loading import load_parts
from training.modeling import load_student
from training.modeling import load_tokenizer as load_hf_tokenizer
from training.predict import predict_proba as torch_predict_proba
from training.run_dir import RunDirectory

Predict = Callable[[list[str]], np.ndarray]
GOAL_SPEEDUP, GOAL_AUROC_DROP, GOAL_BATCH = 2.5, 0.005, 32
COMPARE_GOAL_SPEEDUP = 2.0  # issue #19: a compared bundle against the main bundle's int8


def torch_engine(checkpoint: Path, max_tokens: int) -> tuple[Predict, Predict]:
    """(batch predictor, whole-test-set predictor) of the PyTorch student."""
    model, tokenizer = load_student(str(checkpoint)).eval(), load_hf_tokenizer(str(checkpoint))

    @torch.inference_mode()
    def predict_batch(texts: list[str]) -> np.ndarray:
        inputs = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        return torch.softmax(model(**inputs).logits, dim=-1)[:, 1].numpy()

    return predict_batch, lambda texts: torch_predict_proba(model, tokenizer, texts, GOAL_BATCH, max_tokens)[0]


def onnx_engine(bundle: Path, model_file: str, max_tokens: int, threads: int) -> tuple[Predict, Predict]:
    session = create_session(bundle / model_file, [CPU], intra_op_threads=threads)
    classifier = NoteClassifier(session, load_tokenizer(bundle / "tokenizer.json"), max_tokens)
    return (
        lambda texts: classifier.predict_proba(texts, batch_size=len(texts)),
        lambda texts: classifier.predict_proba(texts, batch_size=GOAL_BATCH),
    )


def notes_per_second(engines: dict[str, Predict], texts: list[str], batch_size: int, repeats: int) -> dict[str, float]:
    """Median over `repeats` of the throughput on all `texts`; engines take turns within each repeat."""
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    for predict in engines.values():
        predict(batches[0])  # warm-up
    for _ in range(repeats):
        for name, predict in engines.items():
            start = time.perf_counter()
            for batch in batches:
                predict(batch)
            seconds[name].append(time.perf_counter() - start)
    return {name: len(texts) / statistics.median(times) for name, times in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="Run directory (its test split and best checkpoint).")
    parser.add_argument("--bundle", type=Path, required=True, help="Bundle exported from that run.")
    parser.add_argument(
        "--metric", default="auroc", choices=SELECT_METRICS, help="Best checkpoint of the run (as exported)."
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="Threads of PyTorch and of ONNX Runtime.")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["fp32", "int8"],
        help="ONNX variants to time (fp16 is meant for GPUs and is slow on the CPU provider).",
    )
    add_compare_option(
        parser, "Another bundle whose --variants are timed too, as engines 'NAME fp32', 'NAME int8' (repeatable)."
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    manifest = read_manifest(args.bundle)
    run = RunDirectory(args.run)
    test = load_parts(run.data_arguments())["test"]
    checkpoint = run.checkpoint(args.metric)
    max_tokens = manifest.max_input_tokens

    torch_name, main_int8 = "PyTorch eager fp32", "ONNX int8"
    engines = {torch_name: torch_engine(checkpoint, max_tokens)}
    sizes = {torch_name: (checkpoint / "model.safetensors").stat().st_size}
    compared: list[str] = []
    for prefix, bundle in [("ONNX", args.bundle), *args.compare]:
        bundle_manifest = read_manifest(bundle)
        test_notes = bundle_manifest.test_metrics.get("counts", {}).get("n")
        if test_notes != len(test):
            print(f"Caution: {bundle} was tested on {test_notes} notes, not these {len(test)}: another split?")
        for variant_name, variant in bundle_manifest.variants.items():
            name = f"{prefix} {variant_name}"
            if variant_name not in args.variants or not variant.kept:
                continue
            if name in engines:
                parser.error(f"two engines named {name!r}: give each --compare its own NAME")
            engines[name] = onnx_engine(bundle, variant.file, bundle_manifest.max_input_tokens, args.threads)
            sizes[name] = variant.size_bytes
            if prefix != "ONNX":
                compared.append(name)

    aurocs = {name: roc_auc_score(test.labels, predict_all(test.texts)) for name, (_, predict_all) in engines.items()}
    throughput = {
        size: notes_per_second({n: e[0] for n, e in engines.items()}, test.texts, size, args.repeats)
        for size in args.batch_sizes
    }
    at_goal_batch = throughput.get(GOAL_BATCH, {})

    classifier = NoteClassifier(
        create_session(args.bundle / "model.onnx", [CPU]), load_tokenizer(args.bundle / "tokenizer.json"), max_tokens
    )
    tokens = [len(note.ids) for note in classifier.encode(test.texts)]
    print(
        f"{len(test)} test notes of {args.run} ({np.median(tokens):.0f} tokens median, {max(tokens)} max), "
        f"{args.threads} threads, median of {args.repeats} repeats; torch {torch.__version__}.\n"
    )
    print(
        "| engine | file (MB) | test AUROC | AUROC drop | "
        + " | ".join(f"notes/s @{b}" for b in args.batch_sizes)
        + f" | speed-up @{args.batch_sizes[-1]} | vs {main_int8} @{GOAL_BATCH} |"
    )
    print("| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in args.batch_sizes) + " | ---: | ---: |")
    last = args.batch_sizes[-1]
    for name in engines:
        speeds = " | ".join(f"{throughput[b][name]:.1f}" for b in args.batch_sizes)
        versus_int8 = f"{at_goal_batch[name] / at_goal_batch[main_int8]:.2f}x" if main_int8 in at_goal_batch else "-"
        print(
            f"| {name} | {sizes[name] / 1e6:.1f} | {aurocs[name]:.4f} | {aurocs[torch_name] - aurocs[name]:+.4f} | "
            f"{speeds} | {throughput[last][name] / throughput[last][torch_name]:.2f}x | {versus_int8} |"
        )

    if main_int8 in at_goal_batch:
        # (engine, the engine it must outrun at GOAL_BATCH, by how much, in words)
        goals = [(main_int8, torch_name, GOAL_SPEEDUP, f"int8 >= {GOAL_SPEEDUP}x PyTorch")]
        goals += [
            (name, main_int8, COMPARE_GOAL_SPEEDUP, f"{name} >= {COMPARE_GOAL_SPEEDUP:g}x {main_int8}")
            for name in compared
        ]
        print()
        for name, baseline, least_speedup, goal in goals:
            speedup = at_goal_batch[name] / at_goal_batch[baseline]
            drop = aurocs[torch_name] - aurocs[name]
            met = speedup >= least_speedup and drop <= GOAL_AUROC_DROP
            print(
                f"Goal ({goal} at batch {GOAL_BATCH}, AUROC drop <= {GOAL_AUROC_DROP} from the run's PyTorch model): "
                f"{'met' if met else 'NOT met'} ({speedup:.2f}x, drop {drop:+.4f})."
            )
    elif compared:
        print(f"\n(No goal for the compared engines: {main_int8} was not timed at batch {GOAL_BATCH}.)")
    print(
        "\nManifest parity (held-out notes):",
        json.dumps({name: {"max_abs_diff": v.max_abs_diff, "kept": v.kept} for name, v in manifest.variants.items()}),
    )


if __name__ == "__main__":
    main()
