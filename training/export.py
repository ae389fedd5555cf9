"""Export a run's best checkpoint as a self-describing model bundle for the service (`app.bundle`).

`out_dir/` receives model.onnx (fp32), model.int8.onnx, model.fp16.onnx, the tokenizer files,
manifest.json and MODEL_CARD.md. Every variant is checked against PyTorch on the run's held-out notes
(validation + test) through the service's own code path (`app.inference.NoteClassifier`: tokenizers + ONNX
Runtime; the CPU provider, except fp16 on CUDA where this ONNX Runtime build has it): fp32 must match within
`parity_atol`, or the export fails; int8 and fp16 are kept only when their validation AUROC is within `tolerance`
of PyTorch's and a note's P(emergency) scored alone is within `batch_shift_atol` of the same note scored in a
batch (the service batches notes of unrelated requests together), and their figures are recorded either way.
The manifest also carries the probe notes (`training.probe_notes`) with fp32's margins on them and, per variant,
the tolerance the service holds it to when it re-scores them at start (`app.readiness`).
The bundle is built in a temporary sibling directory and renamed into place, so a failed export
leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tokenizers import Tokenizer
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from app.bundle import (
    CPU,
    MANIFEST_FILE,
    TOKENIZER_FILE,
    BundleError,
    create_session,
    default_providers,
    load_tokenizer,
    sha256_file,
)
from app.inference import NoteClassifier, calibrated_probability
from app.manifest import Calibration, Decision, Encoders, Manifest, Probes, Variant
from training.config import Int8MatMuls, SelectMetric
from training.data.examples import Examples
from training.data.loading import load_parts
from training.model_card import write_model_card
from training.modeling import load_student, position_limit
from training.modeling import load_tokenizer as load_hf_tokenizer
from training.onnx_variants import FFN_DOWN, ExportError, convert_fp16, export_fp32, quantize_int8
from training.probe_notes import PROBE_BATCH_SIZE, PROBE_NOTES
from training.quantization import CALIBRATION_NOTES  # held-out notes stay unseen, as they judge the variants
from training.run_dir import RunDirectory

log = logging.getLogger(__name__)

MODEL_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
EXTRA_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json")
LIBRARIES = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "tokenizers")
PARITY_BATCH_SIZE = 32
# A variant's tolerance on the probe notes at start is the largest difference the export saw (on the held-out and
# the probe notes) plus this room for another provider's arithmetic: fp16 on CUDA computes in fp16 where the CPU
# provider computes in fp32, and a GPU's kernels sum in another order. A broken run (NaN, a wrong library, a
# tampered file) misses it by far.
PROBE_ROOM = 0.01


def export_bundle(
    run_dir: str | Path,
    out_dir: str | Path,
    metric: SelectMetric = "auroc",
    name: str | None = None,
    version: str | None = None,
    tolerance: float = 0.005,
    parity_atol: float = 1e-4,
    batch_shift_atol: float = 1e-3,
    quantize_embeddings: bool = True,
    int8_matmuls: Int8MatMuls = "auto",
    int8_round_outputs: bool = True,
    overwrite: bool = False,
) -> Path:
    """Build the bundle of `run_dir`'s `best-<metric>` checkpoint in `out_dir`; returns `out_dir`.

    `name` defaults to the name of `out_dir`, `version` to the UTC date plus the start of model.onnx's sha256.
    `int8_matmuls`: which MatMuls the int8 variant quantizes (see `quantize_int8`): all, or all except the
    feed-forward down-projections; `auto`: all for a run fine-tuned quantization-aware, else all but those
    (a 12-layer e5-small student fine-tuned without it lost 0.005-0.012 AUROC with them in int8;
    docs/results/compression.md); `int8_round_outputs`: their outputs rounded too (`quantize_int8`).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ExportError(f"{out_dir}: already exists; remove it, choose another --out, or pass --overwrite")
    source = _load_source(Path(run_dir), metric)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        limits = Limits(tolerance, parity_atol, batch_shift_atol)
        if int8_matmuls == "auto":
            int8_matmuls = "all" if source.config["training"].get("quantization_aware") else "except-ffn-down"
        int8 = Int8Options(quantize_embeddings, int8_matmuls, int8_round_outputs)
        manifest = _build(staging, source, name or out_dir.name, version, limits, int8)
        staging.chmod(0o755)  # mkdtemp makes it private; the service may run as another user
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "bundle %s %s written to %s (variants kept: %s)",
        manifest.name,
        manifest.version,
        out_dir,
        ", ".join(k for k, v in manifest.variants.items() if v.kept),
    )
    return out_dir


@dataclass(frozen=True)
class Source:
    """The run being exported: its options, the chosen checkpoint, its data and its test report."""

    run_dir: Path
    config: dict
    checkpoint: Path
    parts: dict[str, Examples]
    report: dict
    decision: Decision
    calibration: Calibration

    @property
    def max_tokens(self) -> int:
        return self.config["model"]["max_length"]


def _load_source(run_dir: Path, metric: SelectMetric) -> Source:
    run = RunDirectory(run_dir)
    config = run.read_config()
    checkpoint = run.checkpoint(metric)
    report = run.test_report(checkpoint)  # eval/metrics.json, which must describe the exported checkpoint
    decision = _decision(run.decision(checkpoint))
    # Fitted on the validation split by the evaluation; a run evaluated before calibration existed has none.
    calibration = Calibration.model_validate(report.get("calibration", {}))
    parts = load_parts(run.data_arguments())
    return Source(run_dir, config, checkpoint, parts, report, decision, calibration)


@dataclass(frozen=True)
class Limits:
    """What a variant must meet: fp32 `parity_atol` against PyTorch (or the export fails); int8 and fp16
    `tolerance` in validation AUROC and `batch_shift_atol` (or they are dropped)."""

    tolerance: float
    parity_atol: float
    batch_shift_atol: float


@dataclass(frozen=True)
class Int8Options:
    quantize_embeddings: bool
    matmuls: Literal["all", "except-ffn-down"]
    round_outputs: bool


def _build(
    staging: Path, source: Source, name: str, version: str | None, limits: Limits, int8: Int8Options
) -> Manifest:
    held_out = [*source.parts["valid"].texts, *source.parts["test"].texts]
    model, hf_tokenizer = load_student(str(source.checkpoint)), load_hf_tokenizer(str(source.checkpoint))
    # The bundle reads notes up to the model's position limit, whatever length it was trained at.
    limit = position_limit(model, hf_tokenizer)
    tokenizer_files = _write_tokenizer(hf_tokenizer, source.checkpoint, staging)
    tokenizer = load_tokenizer(staging / TOKENIZER_FILE)
    fp32_file = staging / MODEL_FILES["fp32"]
    export_method = export_fp32(source.checkpoint, fp32_file)
    fp32_classifier = NoteClassifier(create_session(fp32_file, [CPU]), tokenizer, limit, source.calibration)
    torch_probs = calibrated_probability(torch_margins(model, fp32_classifier, held_out), source.calibration)
    probes = Probes(
        notes=list(PROBE_NOTES),
        fp32_margins=fp32_classifier.predict_margins(PROBE_NOTES, PROBE_BATCH_SIZE).tolist(),
        batch_size=PROBE_BATCH_SIZE,
    )
    reference = Reference(
        held_out,
        torch_probs,
        source.parts["valid"].labels,
        source.decision.threshold,
        calibrated_probability(np.asarray(probes.fp32_margins), source.calibration),
    )
    log.info("PyTorch: validation AUROC %.4f; %d held-out notes for parity", reference.torch_valid_auroc, len(held_out))
    quantize_int8(
        fp32_file,
        staging / MODEL_FILES["int8"],
        fp32_classifier,
        source.parts["train"].texts[:CALIBRATION_NOTES],
        int8.quantize_embeddings,
        keep_fp32=None if int8.matmuls == "all" else FFN_DOWN,
        round_outputs=int8.round_outputs,
    )
    convert_fp16(fp32_file, staging / MODEL_FILES["fp16"])

    # fp32 is held to parity with PyTorch instead.
    unlimited = Limits(math.inf, math.inf, math.inf)
    variants = {
        variant: _measure(
            staging / file_name,
            fp32_classifier,
            reference,
            unlimited if variant == "fp32" else limits,
            default_providers() if variant == "fp16" else [CPU],  # where each is served
        )
        for variant, file_name in MODEL_FILES.items()
    }
    fp32 = variants["fp32"]
    if fp32.max_abs_diff is None or fp32.max_abs_diff > limits.parity_atol:
        raise ExportError(
            f"{MODEL_FILES['fp32']}: ONNX fp32 differs from PyTorch by up to {fp32.max_abs_diff} "
            f"in P(emergency) on the held-out notes, more than --parity-atol {limits.parity_atol}; "
            "the export is not faithful, no bundle written"
        )
    for variant in variants.values():
        if not variant.kept:
            (staging / variant.file).unlink()

    config = source.config
    manifest = Manifest(
        name=name,
        version=version or f"{datetime.now(UTC):%Y.%m.%d}+{fp32.sha256[:8]}",
        created_at=datetime.now(UTC),
        source_run=str(source.run_dir),
        encoders=Encoders(
            student=config["model"]["student"],
            teacher=config["model"]["teacher"],
            method=config["training"]["method"],
            layers=model.config.num_hidden_layers,
            student_layers=config["model"].get("student_layers"),
            quantization_aware=config["training"].get("quantization_aware", False),
        ),
        decision=source.decision,
        calibration=source.calibration,
        max_input_tokens=limit,
        trained_max_tokens=source.max_tokens,
        preprocessing=_preprocessing(tokenizer, limit),
        test_metrics=_test_metrics(source.report, source.decision.policy),
        variants=variants,
        tokenizer_files=tokenizer_files,
        int8_matmuls=int8.matmuls,
        int8_rounds_outputs=int8.round_outputs,
        export_method=export_method,
        library_versions=_library_versions(),
        probes=probes,
    )
    (staging / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    write_model_card(staging / "MODEL_CARD.md", manifest, config["data"], source.parts, source.report, len(held_out))
    return manifest


@dataclass(frozen=True)
class Reference:
    """What every ONNX variant is compared with: PyTorch's P(emergency) on the held-out notes."""

    texts: list[str]  # validation notes, then test notes
    torch_probs: np.ndarray
    valid_labels: np.ndarray
    threshold: float
    probe_probs: np.ndarray  # fp32 ONNX's P(emergency) on the probe notes

    @property
    def torch_valid_auroc(self) -> float:
        return float(roc_auc_score(self.valid_labels, self.torch_probs[: len(self.valid_labels)]))


def torch_margins(model: PreTrainedModel, classifier: NoteClassifier, texts: list[str]) -> np.ndarray:
    """PyTorch's logit margins (emergency - non-emergency) on exactly the token ids `classifier` (the service's
    path) makes of `texts`, so that parity compares the models and nothing else."""
    encoded = classifier.encode(texts)
    margins = np.zeros(len(texts), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), PARITY_BATCH_SIZE):
            batch = classifier.model_inputs([note.ids for note in encoded[start : start + PARITY_BATCH_SIZE]])
            logits = model.eval()(**{name: torch.from_numpy(array) for name, array in batch.items()}).logits
            margins[start : start + PARITY_BATCH_SIZE] = (logits[:, 1] - logits[:, 0]).float().numpy()
    return margins


def _measure(
    model_file: Path, fp32_classifier: NoteClassifier, reference: Reference, limits: Limits, providers: list[str]
) -> Variant:
    """Parity figures of one ONNX file against PyTorch, scored by the service's own `NoteClassifier` (with the
    fp32 classifier's tokenizer, limit and calibration) on `providers`; kept when it meets `limits`."""
    figures = {"file": model_file.name, "sha256": sha256_file(model_file), "size_bytes": model_file.stat().st_size}
    try:
        classifier = fp32_classifier.with_session(create_session(model_file, providers))
    except BundleError as error:  # e.g. an fp16 kernel the CPU provider lacks: recorded, and the variant dropped
        log.warning("%s", error)
        return Variant(
            **figures,
            kept=False,
            max_abs_diff=None,
            label_agreement=None,
            valid_auroc=None,
            auroc_drop=None,
            note=f"not evaluated: {providers[0]} cannot run it ({error})",
        )
    provider = classifier.session.get_providers()[0]
    probs = classifier.predict_proba(reference.texts, PARITY_BATCH_SIZE)
    batch_shift = float(np.abs(classifier.predict_proba(reference.texts, batch_size=1) - probs).max())
    valid_auroc = float(roc_auc_score(reference.valid_labels, probs[: len(reference.valid_labels)]))
    drop = reference.torch_valid_auroc - valid_auroc
    faults = []
    if drop > limits.tolerance:
        faults.append(f"validation AUROC {drop:.4f} below PyTorch's, more than the tolerance {limits.tolerance}")
    if batch_shift > limits.batch_shift_atol:
        faults.append(
            f"a note's P(emergency) moves by up to {batch_shift:.2g} with the notes batched with it, "
            f"more than --batch-shift-atol {limits.batch_shift_atol}"
        )
    threshold = reference.threshold
    label_agreement = float(np.mean((probs >= threshold) == (reference.torch_probs >= threshold)))
    max_abs_diff = float(np.abs(probs - reference.torch_probs).max())
    probe_diff = float(np.abs(classifier.predict_proba(PROBE_NOTES, PROBE_BATCH_SIZE) - reference.probe_probs).max())
    variant = Variant(
        **figures,
        kept=not faults,
        max_abs_diff=max_abs_diff,
        label_agreement=label_agreement,
        valid_auroc=valid_auroc,
        auroc_drop=drop,
        batch_shift=batch_shift,
        note="; ".join(faults) or None,
        checked_on=provider,
        probe_atol=max(max_abs_diff, probe_diff) + PROBE_ROOM,
    )
    log.info(
        "%s on %s: max |dP| %.2e, label agreement %.2f%%, validation AUROC drop %+.4f, batch shift %.2e%s",
        model_file.name,
        provider,
        variant.max_abs_diff,
        100 * label_agreement,
        drop,
        batch_shift,
        "" if variant.kept else " -> dropped",
    )
    return variant


def _write_tokenizer(hf_tokenizer: PreTrainedTokenizerFast, checkpoint: Path, out_dir: Path) -> dict[str, str]:
    """tokenizer.json with the tokenizer's padding built in (a note is cut to the model's limit by
    `app.inference`, which keeps its head and tail); the other files are copied for reference. Returns the
    sha256 of each file written."""
    if hf_tokenizer.pad_token is None:
        raise ExportError(f"{checkpoint}: the tokenizer has no pad token, so batches cannot be padded")
    backend = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.enable_padding(
        direction=hf_tokenizer.padding_side,
        pad_id=hf_tokenizer.pad_token_id,
        pad_type_id=hf_tokenizer.pad_token_type_id,
        pad_token=hf_tokenizer.pad_token,
    )
    backend.save(str(out_dir / TOKENIZER_FILE))
    for file_name in EXTRA_TOKENIZER_FILES:
        if (checkpoint / file_name).is_file():
            shutil.copy2(checkpoint / file_name, out_dir / file_name)
    written = [TOKENIZER_FILE, *(f for f in EXTRA_TOKENIZER_FILES if (out_dir / f).is_file())]
    return {file_name: sha256_file(out_dir / file_name) for file_name in written}


def _decision(decision: dict) -> Decision:
    target = decision["target_sensitivity"] if decision["policy"] == "target-sensitivity" else None
    return Decision(threshold=decision["threshold"], policy=decision["policy"], target_sensitivity=target)


def _test_metrics(report: dict, policy: str) -> dict:
    at_threshold = report["thresholds"][policy]
    return {
        "counts": report["counts"],
        "threshold_free": report["threshold_free"],
        "at_decision_threshold": {
            "policy": policy,
            "threshold": at_threshold["threshold"],
            "metrics": at_threshold["metrics"],
            "confusion_matrix": at_threshold["confusion_matrix"],
        },
        "bootstrap": report["bootstrap"],
    }


def _preprocessing(tokenizer: Tokenizer, max_tokens: int) -> list[str]:
    return [
        "Pass the note text to tokenizer.json unchanged: no cleaning, lowercasing or other rewriting beyond "
        f"the tokenizer's own normalizer ({_describe_normalizer(json.loads(tokenizer.to_str())['normalizer'])}).",
        f"A note of more than {max_tokens} tokens (special tokens included) is cut to {max_tokens}: its first "
        f"quarter and its last three quarters of that budget are kept (app.inference.HEAD_SHARE), so that both the "
        "complaint at its head and the latest findings at its tail are read.",
        "Pad each batch to its longest note; feed input_ids and attention_mask (and token_type_ids when the "
        "graph has that input) as int64.",
        "P(emergency) = sigmoid(calibration.scale * (logits[:, 1] - logits[:, 0]) + calibration.bias) (with no "
        "calibration, softmax(logits)[:, 1]); the label is emergency when P(emergency) >= decision.threshold.",
    ]


def _describe_normalizer(normalizer: dict | None) -> str:
    """`BertNormalizer`, or `Precompiled, Replace` for a sequence of normalizers."""
    if normalizer is None:
        return "none"
    if normalizer["type"] == "Sequence":
        return ", ".join(_describe_normalizer(step) for step in normalizer["normalizers"])
    return normalizer["type"]


def _library_versions() -> dict[str, str]:
    versions = {}
    for library in LIBRARIES:
        try:
            versions[library] = metadata.version(library)
        except metadata.PackageNotFoundError:
            versions[library] = "not installed"
    return versions
