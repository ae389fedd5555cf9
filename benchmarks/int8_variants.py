"""Which dynamic int8 quantization keeps a run's validation AUROC within the export tolerance?

Exports RUN's best checkpoint to fp32 ONNX (the export path of `training.export`), quantizes it several
ways, and prints per way: validation AUROC minus PyTorch's, max |dP| against the fp32 ONNX file (itself
within 1e-4 of PyTorch) on the held-out notes, file size, and the median latency of a batch of 1 and of 32 real notes.

    python benchmarks/int8_variants.py --run runs/experiment/runs/e5-small__base/seed-0
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from sklearn.metrics import roc_auc_score

from app.bundle import TOKENIZER_FILE, create_session, load_tokenizer, predict_proba
from app.manifest import Manifest
from training.config import DataArguments
from training.data.loading import load_parts
from training.export import export_bundle
from training.onnx_variants import FFN_DOWN, quantize_int8
from training.run_report import load_run_config

# name -> (quantize_dynamic options, regex of node names kept in fp32; {last} is the last layer's index).
# None: what the export does (training.onnx_variants.quantize_int8).
WAYS: dict[str, tuple[dict, str | None] | None] = {
    "export: FFN down-projections fp32, embeddings int8": None,
    "every MatMul int8, embeddings int8 (before)": ({"per_channel": True, "gather": True}, None),
    "every MatMul int8, embeddings fp32": ({"per_channel": True, "gather": False}, None),
    "every MatMul int8, per-tensor, embeddings fp32": ({"per_channel": False, "gather": False}, None),
    "every MatMul int8, reduce_range, embeddings fp32": (
        {"per_channel": True, "gather": False, "reduce_range": True}, None),
    "FFN down-projections fp32, embeddings fp32": ({"per_channel": True, "gather": False}, FFN_DOWN.pattern),
    "last 2 layers + pooler/classifier fp32, embeddings fp32": (
        {"per_channel": True, "gather": False}, r"/layer\.({last}|{second_last})/|pooler|classifier"),
}


def matmul_names(fp32_file: Path) -> list[str]:
    return [n.name for n in onnx.load(str(fp32_file), load_external_data=False).graph.node
            if n.op_type in ("MatMul", "Gemm")]


def quantize(fp32_file: Path, out_file: Path, way: tuple[dict, str | None] | None) -> int:
    """Quantizes one way; returns how many MatMul/Gemm nodes were left in fp32."""
    if way is None:
        quantize_int8(fp32_file, out_file)
        return sum(bool(FFN_DOWN.search(n)) for n in matmul_names(fp32_file))
    options, keep_fp32 = way
    nodes = matmul_names(fp32_file)
    last = max(int(m) for n in nodes for m in re.findall(r"/layer\.(\d+)/", n))
    pattern = keep_fp32.format(last=last, second_last=last - 1) if keep_fp32 else None
    excluded = [n for n in nodes if pattern and re.search(pattern, n)]
    quantize_dynamic(fp32_file, out_file, weight_type=QuantType.QInt8, per_channel=options["per_channel"],
                     reduce_range=options.get("reduce_range", False), nodes_to_exclude=excluded,
                     op_types_to_quantize=["MatMul", "Gemm", *(["Gather"] if options["gather"] else [])])
    return len(excluded)


def median_latency(session, tokenizer, texts: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict_proba(session, tokenizer, texts, len(texts))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a run directory (training.fit --out)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per batch size")
    args = parser.parse_args()

    config = load_run_config(args.run)
    parts = load_parts(DataArguments(**{**config["data"], "split_file": str(args.run / "split.json")}))
    valid, held_out = parts["valid"], [*parts["valid"].texts, *parts["test"].texts]
    with tempfile.TemporaryDirectory() as work:
        bundle = export_bundle(args.run, Path(work) / "bundle", tolerance=1.0)
        manifest = Manifest.model_validate_json((bundle / "manifest.json").read_text())
        fp32 = manifest.variants["fp32"]
        torch_auroc = fp32.valid_auroc + fp32.auroc_drop
        tokenizer = load_tokenizer(bundle / TOKENIZER_FILE, manifest.max_input_tokens)
        reference = predict_proba(create_session(bundle / fp32.file, ["CPUExecutionProvider"], args.threads),
                                  tokenizer, held_out)

        print(f"run {args.run}; PyTorch validation AUROC {torch_auroc:.4f} on {len(valid)} notes; "
              f"ORT threads {args.threads}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"{'way':52s} {'fp32 nodes':>10s} {'AUROC drop':>10s} {'max|dP|':>8s} {'MB':>6s} "
              f"{'b1 ms':>7s} {'b32 ms':>7s}")
        files = {"fp32 (reference)": (bundle / fp32.file, 0)}
        for number, (name, way) in enumerate(WAYS.items()):
            model_file = Path(work) / f"int8-{number}.onnx"
            files[name] = model_file, quantize(bundle / fp32.file, model_file, way)
        for name, (model_file, kept) in files.items():
            session = create_session(model_file, ["CPUExecutionProvider"], args.threads)
            probs = predict_proba(session, tokenizer, held_out)
            drop = torch_auroc - roc_auc_score(valid.labels, probs[:len(valid)])
            b1 = median_latency(session, tokenizer, held_out[:1], args.repeats)
            b32 = median_latency(session, tokenizer, held_out[:32], args.repeats)
            print(f"{name:52s} {kept:10d} {drop:+10.4f} {np.abs(probs - reference).max():8.4f} "
                  f"{model_file.stat().st_size / 1e6:6.0f} {b1 * 1000:7.1f} {b32 * 1000:7.1f}")


if __name__ == "__main__":
    main()
