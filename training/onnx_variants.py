"""The ONNX files of a bundle: the fp32 export of a student checkpoint and its int8 and fp16 variants.

fp32 and fp16 hold the plain exported graph (standard ONNX ops, no offline fusions): ONNX Runtime applies
its graph optimizations (level ALL: constant folding, attention/LayerNorm/GELU fusions, layout changes)
when the service loads a file, for the execution provider it actually runs on; a graph optimized offline
at that level is tied to the provider and hardware it was optimized for (ORT's own advice). int8 is a
static QDQ graph (see `quantize_int8`); fusing with ORT's transformers optimizer before quantizing
measured no faster for it on the e5-small student (`benchmarks/int8_variants.py`).
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.transformers.float16 import convert_float_to_float16
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from app.inference import NoteClassifier
from training.quantization import CALIBRATION_BATCH_SIZE

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
            main_export(
                str(checkpoint), exported, task="text-classification", library_name="transformers", do_validation=False
            )
            if any(Path(exported).glob("*.onnx_data")):
                raise ExportError(
                    f"{checkpoint}: the ONNX graph is over 2 GB (external data), which bundles do not support"
                )
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
        torch.onnx.export(
            model,
            (),
            str(out_file),
            kwargs={name: sample[name] for name in names},
            input_names=names,
            output_names=[OUTPUT],
            dynamic_axes=axes,
            opset_version=TORCH_ONNX_OPSET,
            dynamo=False,
        )


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


def quantize_int8(
    fp32_file: Path,
    out_file: Path,
    fp32_classifier: NoteClassifier,
    calibration_texts: Sequence[str],
    quantize_embeddings: bool = True,
    keep_fp32: re.Pattern[str] | None = None,
    round_outputs: bool = True,
) -> None:
    """Static int8 quantization (QDQ): int8 weights with one scale per output channel, and int8 activations
    whose scales are fixed beforehand from the value ranges seen on `calibration_texts` (e.g. training
    notes, batched by `fp32_classifier`, the service's path over the fp32 file; MinMax).

    Static, not dynamic: dynamic quantization picks each activation's scale at run time from the whole
    batch, so a note's P(emergency) depended on the notes it shared a batch with (e5-small KTAS student:
    by up to 0.11 between scoring a note alone and in a batch of 32); with fixed scales a note's result is
    the same in any batch.

    What is rounded to int8: every quantized MatMul's (and Gemm's) weights and input activations, and, with
    `round_outputs` (ONNX Runtime's own placement), its output and the tensors around it (each LayerNorm's
    output, the residual connection reads it rounded too). ONNX Runtime then runs QLinearMatMul, int8 in and
    out: fast at every batch size. Without `round_outputs` only what a MatMul reads is rounded, each rounded
    input gets its own quantize/dequantize pair and other readers (residual additions) the unrounded tensor;
    ONNX Runtime then runs MatMulIntegerToFloat, closer to fp32 and the fastest at batch 32, but slow at batch
    1 (6-layer e5-small student: 39 notes/s at batch 1 against 140 with `round_outputs` and 96 in fp32; 244
    at batch 32 against 223 and 145; docs/results/compression.md). `training.quantization` fakes the rounding
    both placements share (weights and MatMul inputs) for quantization-aware fine-tuning; without
    `round_outputs` that is all the graph rounds. MatMuls whose name matches `keep_fp32` stay fp32 (e.g.
    `FFN_DOWN`, the feed-forward down-projections, whose GELU input has a few large outliers). With
    `quantize_embeddings` the embedding tables (Gather) are stored in int8 too: e5-small's 250k-token
    vocabulary then takes 4x less room.
    """
    graph = onnx.load(str(fp32_file), load_external_data=False).graph
    calibration = (
        fp32_classifier.model_inputs(
            [note.ids for note in fp32_classifier.encode(calibration_texts[start : start + CALIBRATION_BATCH_SIZE])]
        )
        for start in range(0, len(calibration_texts), CALIBRATION_BATCH_SIZE)
    )
    kept_fp32 = [
        node.name for node in graph.node if node.op_type == "MatMul" and keep_fp32 and keep_fp32.search(node.name)
    ]
    if keep_fp32 and not kept_fp32:
        log.warning("%s: no MatMul matches %s; every MatMul is quantized", fp32_file.name, keep_fp32.pattern)
    op_types = ["MatMul", "Gemm", *(["Gather"] if quantize_embeddings else [])]
    with _without_root_info_logs():
        quantize_static(
            fp32_file,
            out_file,
            _Batches(calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=kept_fp32,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={
                "OpTypesToExcludeOutputQuantization": ["Gather"] if round_outputs else ["Gather", "MatMul", "Gemm"]
            },
        )
    if not round_outputs:
        _unround_other_readers(out_file)


def _unround_other_readers(model_file: Path) -> None:
    """Give every reader of a rounded activation other than a MatMul or Gemm (residual additions, the embeddings'
    sum) the unrounded tensor, and drop the quantize/dequantize pairs no one reads any more."""
    model = onnx.load(str(model_file))
    nodes = model.graph.node
    rounded = {node.output[0]: node.input[0] for node in nodes if node.op_type == "QuantizeLinear"}
    unrounded = {
        node.output[0]: rounded[node.input[0]]
        for node in nodes
        if node.op_type == "DequantizeLinear" and node.input[0] in rounded
    }
    for node in nodes:
        if node.op_type not in ("MatMul", "Gemm"):
            for index, name in enumerate(node.input):
                node.input[index] = unrounded.get(name, name)
    read = {name for node in nodes for name in node.input}
    for dequantize in [node for node in nodes if node.output[0] in unrounded and node.output[0] not in read]:
        nodes.remove(dequantize)
    read = {name for node in nodes for name in node.input}
    for quantize in [node for node in nodes if node.op_type == "QuantizeLinear" and node.output[0] not in read]:
        nodes.remove(quantize)
    onnx.save(model, str(model_file))


class _Batches(CalibrationDataReader):
    def __init__(self, batches: Iterator[dict[str, np.ndarray]]) -> None:
        self._batches = batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


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
