"""Which int8 quantization of a run keeps its accuracy, its batch invariance and its speed?

Exports RUN's best checkpoint to fp32 ONNX (the export path of `training.export`), quantizes it several
ways, and prints per way: validation AUROC minus PyTorch's; max and mean |dP| against the fp32 ONNX file
(itself within 1e-4 of PyTorch) on the held-out notes; the batch shift (largest change of a note's P between
scoring it alone and in a batch of 32, as in the manifest); file size; and the median time to classify the
test notes in batches of 1 and of 32, every way timed in turn within each repeat (same process, same inputs).

    python benchmarks/int8_variants.py --run runs/experiment/runs/e5-small__base/seed-0
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers import optimizer
from sklearn.metrics import roc_auc_score

from app.bundle import CPU, TOKENIZER_FILE, create_session, load_tokenizer
from app.inference import NoteClassifier
from app.manifest import Manifest
from training.data.loading import load_parts
from training.export import CALIBRATION_NOTES, export_bundle
from training.onnx_variants import FFN_DOWN, quantize_int8
from training.run_dir import RunDirectory

# (fp32 file, int8 file to write, the fp32 file's classifier, calibration notes); the dynamic ways calibrate nothing.
Quantize = Callable[[Path, Path, NoteClassifier, list[str]], None]


def static(keep_ffn_down: bool, round_outputs: bool) -> Quantize:
    """Static int8 as the export makes it (`quantize_int8`); `round_outputs`: MatMul outputs rounded too."""

    def quantize(fp32: Path, out: Path, fp32_classifier: NoteClassifier, calibration_texts: list[str]) -> None:
        keep = FFN_DOWN if keep_ffn_down else None
        quantize_int8(fp32, out, fp32_classifier, calibration_texts, keep_fp32=keep, round_outputs=round_outputs)

    return quantize


def dynamic(keep_ffn_down: bool, fused: bool = False) -> Quantize:
    """Dynamic int8 (activation scales from each batch at run time); `fused`: ORT's BERT fusions first, so
    that attention is quantized as one QAttention op."""

    def quantize(fp32: Path, out: Path, fp32_classifier: NoteClassifier, calibration_texts: list[str]) -> None:
        source = fp32
        if fused:
            source = out.with_suffix(".fused.onnx")
            optimizer.optimize_model(str(fp32), model_type="bert", opt_level=0).save_model_to_file(str(source))
        matmuls = [n.name for n in onnx.load(str(source), load_external_data=False).graph.node if n.op_type == "MatMul"]
        quantize_dynamic(
            source,
            out,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Gemm", "Gather", *(["Attention"] if fused else [])],
            nodes_to_exclude=[n for n in matmuls if keep_ffn_down and FFN_DOWN.search(n)],
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )

    return quantize


WAYS: dict[str, Quantize] = {
    "export (quantization-aware run): static, every MatMul int8, outputs rounded": static(
        keep_ffn_down=False, round_outputs=True
    ),
    "static, every MatMul int8, inputs only": static(keep_ffn_down=False, round_outputs=False),
    "export (other runs): static, FFN down-projections fp32, outputs rounded": static(
        keep_ffn_down=True, round_outputs=True
    ),
    "static, FFN down-projections fp32, inputs only": static(keep_ffn_down=True, round_outputs=False),
    "dynamic, FFN down-projections fp32": dynamic(keep_ffn_down=True),
    "dynamic, every MatMul int8": dynamic(keep_ffn_down=False),
    "BERT fusions + dynamic, every MatMul int8": dynamic(keep_ffn_down=False, fused=True),
}


def median_seconds(
    classifiers: dict[str, NoteClassifier], texts: list[str], batch_size: int, repeats: int
) -> dict[str, float]:
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    times: dict[str, list[float]] = {name: [] for name in classifiers}
    for classifier in classifiers.values():
        classifier.predict_proba(batches[0], batch_size)  # warm-up
    for _ in range(repeats):
        for name, classifier in classifiers.items():
            start = time.perf_counter()
            for batch in batches:
                classifier.predict_proba(batch, batch_size)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a run directory (training.fit --out)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the test notes per batch size")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.WARNING)  # onnxruntime.quantization logs a line per tensor

    parts = load_parts(RunDirectory(args.run).data_arguments())
    valid, held_out = parts["valid"], [*parts["valid"].texts, *parts["test"].texts]
    with tempfile.TemporaryDirectory() as work:
        bundle = export_bundle(args.run, Path(work) / "bundle", tolerance=1.0)
        manifest = Manifest.model_validate_json((bundle / "manifest.json").read_text())
        fp32 = bundle / manifest.variants["fp32"].file
        torch_auroc = manifest.variants["fp32"].valid_auroc + manifest.variants["fp32"].auroc_drop
        tokenizer = load_tokenizer(bundle / TOKENIZER_FILE)

        def classifier(path: Path) -> NoteClassifier:
            return NoteClassifier(create_session(path, [CPU], args.threads), tokenizer, manifest.max_input_tokens)

        calibration_texts = parts["train"].texts[:CALIBRATION_NOTES]
        files = {"fp32 (reference)": fp32}
        for number, (name, quantize) in enumerate(WAYS.items()):
            files[name] = Path(work) / f"int8-{number}.onnx"
            quantize(fp32, files[name], classifier(fp32), calibration_texts)
        classifiers = {name: classifier(path) for name, path in files.items()}
        reference = classifiers["fp32 (reference)"].predict_proba(held_out)
        test = parts["test"].texts
        seconds = {size: median_seconds(classifiers, test, size, args.repeats) for size in (1, 32)}

        print(
            f"run {args.run}; PyTorch validation AUROC {torch_auroc:.4f} on {len(valid)} notes; {len(held_out)} "
            f"held-out notes; {len(test)} test notes timed; ORT threads {args.threads}; median of {args.repeats}; "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n"
        )
        print("| way | AUROC drop | max abs dP | mean abs dP | batch shift | MB | notes/s @1 | notes/s @32 |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, scorer in classifiers.items():
            probs = scorer.predict_proba(held_out, 32)
            shift = np.abs(scorer.predict_proba(held_out, 1) - probs).max()
            drop = torch_auroc - roc_auc_score(valid.labels, probs[: len(valid)])
            dp = np.abs(probs - reference)
            print(
                f"| {name} | {drop:+.4f} | {dp.max():.4f} | {dp.mean():.4f} | {shift:.4f} | "
                f"{files[name].stat().st_size / 1e6:.0f} | {len(test) / seconds[1][name]:.1f} | "
                f"{len(test) / seconds[32][name]:.1f} |"
            )


if __name__ == "__main__":
    main()
