"""The ONNX files of a bundle: the fp32 export of a student checkpoint and its int8 and fp16 variants.

All three files hold the plain exported graph (standard ONNX ops, no offline fusions). ONNX Runtime
applies its graph optimizations (level ALL: constant folding, attention/LayerNorm/GELU fusions, layout
changes) when the service loads a file, for the execution provider it actually runs on. A graph
optimized offline at that level is tied to the provider and hardware it was optimized for (ORT's own
advice), so one file could not serve both CPU and CUDA hosts; fusing before quantizing (ORT's
transformers optimizer) measured no faster for the int8 MiniLM on CPU either.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.float16 import convert_float_to_float16
from transformers import AutoModelForSequenceClassification, AutoTokenizer

log = logging.getLogger(__name__)

REQUIRED_INPUTS = ("input_ids", "attention_mask")
OPTIONAL_INPUTS = ("token_type_ids",)
OUTPUT = "logits"
DYNAMIC_AXES = ("batch_size", "sequence_length")
TORCH_ONNX_OPSET = 17
# Node names of the exported BERT-style graph (optimum and torch.onnx alike): `.../layer.3/output/dense/MatMul`
# is layer 3's feed-forward down-projection; `.../layer.3/attention/output/dense/MatMul` does not match.
FFN_DOWN = re.compile(r"/layer\.\d+/output/dense/")


class ExportError(RuntimeError):
    """A checkpoint that cannot be turned into a bundle, or a bundle that fails its checks."""


def export_fp32(checkpoint: Path, out_file: Path) -> str:
    """Export the classifier (encoder + head) with dynamic batch and sequence axes; returns the method used:
    `optimum`, or `torch.onnx` when optimum cannot export the architecture."""
    from optimum.exporters.onnx import main_export

    try:
        with tempfile.TemporaryDirectory() as exported:
            # Parity with PyTorch is checked by the caller on real notes, so optimum's own check is skipped.
            main_export(str(checkpoint), exported, task="text-classification", library_name="transformers",
                        do_validation=False)
            if any(Path(exported).glob("*.onnx_data")):
                raise ExportError(f"{checkpoint}: the ONNX graph is over 2 GB (external data), which bundles do not support")
            shutil.move(Path(exported) / "model.onnx", out_file)
        method = "optimum"
    except (ValueError, KeyError) as error:  # what optimum raises for an architecture it does not know
        log.warning("optimum cannot export %s (%s); falling back to torch.onnx.export", checkpoint, error)
        _torch_onnx_export(checkpoint, out_file)
        method = "torch.onnx"
    check_graph(out_file)
    return method


def _torch_onnx_export(checkpoint: Path, out_file: Path) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    sample = tokenizer(["a short note", "a somewhat longer note to trace"], padding=True, return_tensors="pt")
    names = [name for name in (*REQUIRED_INPUTS, *OPTIONAL_INPUTS) if name in sample]
    axes = {name: dict(enumerate(DYNAMIC_AXES)) for name in names} | {OUTPUT: {0: DYNAMIC_AXES[0]}}
    with torch.inference_mode():
        torch.onnx.export(model, (), str(out_file), kwargs={name: sample[name] for name in names},
                          input_names=names, output_names=[OUTPUT], dynamic_axes=axes,
                          opset_version=TORCH_ONNX_OPSET, dynamo=False)


def check_graph(path: Path) -> None:
    """A valid ONNX graph taking input_ids, attention_mask (and maybe token_type_ids) with dynamic batch and
    sequence axes, and giving `logits` of shape [batch, 2]."""
    onnx.checker.check_model(str(path))
    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = {tensor.name: tensor for tensor in graph.input}
    problems = [f"missing input {name!r}" for name in REQUIRED_INPUTS if name not in inputs]
    problems += [f"unexpected input {name!r}" for name in inputs if name not in (*REQUIRED_INPUTS, *OPTIONAL_INPUTS)]
    for name, tensor in inputs.items():
        dims = tensor.type.tensor_type.shape.dim
        if len(dims) != 2 or any(not dim.dim_param for dim in dims):
            problems.append(f"input {name!r} is not [batch, sequence] with dynamic axes")
    outputs = {tensor.name: tensor for tensor in graph.output}
    if OUTPUT not in outputs:
        problems.append(f"missing output {OUTPUT!r} (outputs: {sorted(outputs)})")
    else:
        dims = outputs[OUTPUT].type.tensor_type.shape.dim
        if len(dims) != 2 or not dims[0].dim_param or dims[1].dim_value != 2:
            problems.append(f"output {OUTPUT!r} is not [batch, 2]")
    if problems:
        raise ExportError(f"{path}: {'; '.join(problems)}")


def quantize_int8(fp32_file: Path, out_file: Path, quantize_embeddings: bool = True) -> None:
    """Dynamic int8 quantization: int8 weights for the MatMul/Gemm layers, activations quantized at run time.

    Weights get one scale per output channel. The feed-forward down-projections (`layer.N/output/dense`)
    stay fp32: their input is the GELU output, whose few large outliers make a per-tensor activation scale
    too coarse for the rest. On the e5-small KTAS student, quantizing them too cost 0.0069 validation AUROC
    (max |dP| 0.136); keeping them fp32 cost none (-0.0002, max |dP| 0.084): `benchmarks/int8_variants.py`.
    With `quantize_embeddings` the embedding tables (Gather) are stored in int8 too: e5-small's 250k-token
    vocabulary then takes 4x less room.
    """
    graph = onnx.load(str(fp32_file), load_external_data=False).graph
    kept_fp32 = [node.name for node in graph.node if node.op_type == "MatMul" and FFN_DOWN.search(node.name)]
    if not kept_fp32:
        log.warning("%s: no feed-forward down-projection found by name; every MatMul is quantized", fp32_file.name)
    op_types = ["MatMul", "Gemm", *(["Gather"] if quantize_embeddings else [])]
    with _without_root_info_logs():
        quantize_dynamic(fp32_file, out_file, op_types_to_quantize=op_types, per_channel=True,
                         weight_type=QuantType.QInt8, nodes_to_exclude=kept_fp32)


@contextmanager
def _without_root_info_logs() -> Iterator[None]:
    """onnxruntime.quantization logs a line per tensor on the root logger itself; a filter on the root logger
    drops those and leaves the records of named loggers, which only propagate to it, untouched."""
    root = logging.getLogger()

    def warnings_and_above(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING

    root.addFilter(warnings_and_above)
    try:
        yield
    finally:
        root.removeFilter(warnings_and_above)


def convert_fp16(fp32_file: Path, out_file: Path) -> None:
    """fp16 weights and compute, for GPUs; inputs (int64) and `logits` (fp32) keep their types."""
    onnx.save(convert_float_to_float16(onnx.load(str(fp32_file)), keep_io_types=True), str(out_file))
