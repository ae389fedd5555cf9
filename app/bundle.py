"""Load a model bundle (`models/NAME/`, written by `python -m training export`) for inference.

A bundle is refused, with a `BundleError` naming the file and the fault, when its manifest is missing
or invalid, when a file the manifest lists is missing, or when any listed file (every kept ONNX variant, not
only the one served, and the tokenizer files) does not match its sha256 in the manifest.

Imports only onnxruntime, tokenizers, pydantic and the standard library: the service never
needs torch, transformers or the `training` package.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from tokenizers import Tokenizer

from app.manifest import Manifest

try:
    import onnxruntime as ort
except ModuleNotFoundError as error:  # the service's own package does not pull either ONNX Runtime build
    raise ModuleNotFoundError(
        "ONNX Runtime is not installed: install the service with its `cpu` extra "
        "(pip install 'dsgkd-triage[cpu]') or, on a CUDA host, its `gpu` extra (pip install 'dsgkd-triage[gpu]')",
        name="onnxruntime",
    ) from error

InferenceSession = ort.InferenceSession
OrtValue = ort.OrtValue

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MODEL_CARD_FILE = "MODEL_CARD.md"  # written by the export, not in the manifest: documentation, not served model
TOKENIZER_FILE = "tokenizer.json"
VARIANTS = ("fp32", "int8", "fp16")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


class BundleError(RuntimeError):
    """A model bundle that cannot be served; the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class Bundle:
    manifest: Manifest
    tokenizer: Tokenizer
    session: ort.InferenceSession
    variant: str
    providers: list[str]


def load_bundle(
    path: str | Path,
    variant: str = "auto",
    intra_op_threads: int | None = None,
    providers: list[str] | None = None,
    device_id: int = 0,
) -> Bundle:
    """Verify and load a bundle.

    `variant`: fp32, int8, fp16, or auto (fp16 on CUDA if kept, else int8 on CPU if kept, else fp32).
    `providers`: ONNX Runtime execution providers; default CUDA when onnxruntime-gpu offers it, else CPU.
    `device_id`: the GPU the CUDA provider runs on.
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle directory")
    manifest = read_manifest(root)
    _require_listed_files(root, manifest)
    providers = providers or default_providers()
    on_cuda = CUDA in providers and CUDA in ort.get_available_providers()
    # Every file the manifest lists, not only the variant chosen now: a damaged variant is found at start,
    # not on the day a restart on other hardware picks it.
    listed = {**manifest.tokenizer_files, **{v.file: v.sha256 for v in manifest.variants.values() if v.kept}}
    for name, digest in listed.items():
        _verify_sha256(root / name, digest)
    tokenizer = load_tokenizer(root / TOKENIZER_FILE)
    chosen = _choose_variant(manifest, variant, on_cuda)
    session = _open_variant(root, manifest, chosen, providers, intra_op_threads, device_id)
    if CUDA in providers and CUDA not in session.get_providers():
        logger.warning(
            "CUDA was asked for but is not in use: running on the CPU", extra={"fields": {"reason": cuda_unused()}}
        )
        if on_cuda and variant == "auto":
            # onnxruntime-gpu lists CUDA even on a host without a usable GPU, then runs on the CPU:
            # serve the CPU's preferred variant rather than fp16 on the CPU.
            chosen = _choose_variant(manifest, variant, on_cuda=False)
            session = _open_variant(root, manifest, chosen, [CPU], intra_op_threads, device_id)
    return Bundle(manifest, tokenizer, session, chosen, session.get_providers())


def cuda_unused() -> str:
    """Why an ONNX Runtime session asked for CUDA runs without it."""
    if CUDA not in ort.get_available_providers():
        return (
            f"this ONNX Runtime build ({ort.__version__}) has no CUDA provider: install the `gpu` extra "
            "(onnxruntime-gpu) instead of the `cpu` extra (onnxruntime)"
        )
    return (
        "onnxruntime-gpu could not start its CUDA provider: a CUDA or cuDNN library failed to load, or no GPU is "
        "visible (ONNX Runtime's own error precedes this line)"
    )


def _open_variant(
    root: Path, manifest: Manifest, variant: str, providers: list[str], intra_op_threads: int | None, device_id: int
) -> ort.InferenceSession:
    return create_session(root / manifest.variants[variant].file, providers, intra_op_threads, device_id)


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{path}: missing; a bundle is made by `python -m training export`")
    try:
        return Manifest.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as error:
        raise BundleError(f"{path}: not valid JSON ({error})") from None
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in error.errors())
        raise BundleError(f"{path}: invalid manifest: {problems}") from None


def load_tokenizer(path: Path) -> Tokenizer:
    """The bundle's tokenizer; it must know its pad token, as batches are padded."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for unreadable files
        raise BundleError(f"{path}: not a readable tokenizers file ({error})") from None
    if tokenizer.padding is None:
        raise BundleError(f"{path}: has no padding settings (pad token); re-export the bundle")
    return tokenizer


def create_session(
    model_path: Path, providers: list[str], intra_op_threads: int | None = None, device_id: int = 0
) -> ort.InferenceSession:
    """An ONNX Runtime session with every graph optimization applied at load time, for the provider in use;
    CUDA on GPU `device_id`."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    if CUDA in providers and CUDA in ort.get_available_providers():
        _preload_cuda_libraries()
    with_options = [(name, {"device_id": device_id}) if name == CUDA else name for name in providers]
    try:
        return ort.InferenceSession(str(model_path), options, providers=with_options)
    except Exception as error:  # onnxruntime raises its own exception types for unreadable or invalid models
        raise BundleError(f"{model_path}: ONNX Runtime cannot load it ({type(error).__name__}: {error})") from None


@functools.cache
def _preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries of the nvidia-* wheels that the `gpu` extra installs (onnxruntime-gpu
    1.21+; found in site-packages, else on the loader's path): outside the container image, which registers them
    with ldconfig, they are on no path the loader searches, and the CUDA provider would fail to start."""
    ort.preload_dlls(directory="")


def default_providers() -> list[str]:
    return [CUDA, CPU] if CUDA in ort.get_available_providers() else [CPU]


def _choose_variant(manifest: Manifest, variant: str, on_cuda: bool) -> str:
    kept = [name for name, v in manifest.variants.items() if v.kept]
    if variant == "auto":
        preferred = "fp16" if on_cuda else "int8"
        return preferred if preferred in kept else "fp32"
    if variant not in VARIANTS:
        raise BundleError(f"unknown variant {variant!r}; choose auto, {', '.join(VARIANTS)}")
    if variant not in kept:
        raise BundleError(f"{MANIFEST_FILE}: variant {variant!r} is not in this bundle (kept: {', '.join(kept)})")
    return variant


def _require_listed_files(root: Path, manifest: Manifest) -> None:
    listed = [v.file for v in manifest.variants.values() if v.kept] + list(manifest.tokenizer_files)
    if TOKENIZER_FILE not in manifest.tokenizer_files:
        raise BundleError(f"{root / MANIFEST_FILE}: lists no {TOKENIZER_FILE}")
    if "fp32" not in manifest.variants or not manifest.variants["fp32"].kept:
        raise BundleError(f"{root / MANIFEST_FILE}: has no kept fp32 variant")
    for name in listed:
        if not (root / name).is_file():
            raise BundleError(f"{root / name}: missing (listed in {MANIFEST_FILE})")


def _verify_sha256(path: Path, expected: str) -> None:
    digest = sha256_file(path)
    if digest != expected:
        raise BundleError(
            f"{path}: sha256 {digest} does not match the manifest's {expected} (file changed or corrupted)"
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
