"""Loading a model bundle: refusal of damaged bundles, variant choice (SYNTHETIC notes)."""

import json
import subprocess
import sys

import pytest

from app.bundle import BundleError, load_bundle

CPU = ["CPUExecutionProvider"]


def edit_manifest(bundle, edit) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_auto_picks_int8_on_cpu_when_kept_else_fp32(bundle_copy):
    assert load_bundle(bundle_copy, providers=CPU).variant == "int8"
    edit_manifest(bundle_copy, lambda m: m["variants"]["int8"].update(kept=False))
    assert load_bundle(bundle_copy, providers=CPU).variant == "fp32"


def test_a_dropped_or_unknown_variant_is_refused(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m["variants"]["fp16"].update(kept=False))
    with pytest.raises(BundleError, match="'fp16' is not in this bundle"):
        load_bundle(bundle_copy, variant="fp16", providers=CPU)
    with pytest.raises(BundleError, match="unknown variant 'int4'"):
        load_bundle(bundle_copy, variant="int4", providers=CPU)


def test_corrupted_model_file_is_refused(bundle_copy):
    model = bundle_copy / "model.int8.onnx"
    model.write_bytes(model.read_bytes()[:-100] + b"\0" * 100)
    with pytest.raises(BundleError, match=r"model\.int8\.onnx: sha256 .* does not match"):
        load_bundle(bundle_copy, variant="int8", providers=CPU)


def test_unloadable_model_with_matching_checksum_is_refused(bundle_copy):
    from app.bundle import sha256_file

    model = bundle_copy / "model.onnx"
    model.write_bytes(b"not an onnx graph")
    edit_manifest(bundle_copy, lambda m: m["variants"]["fp32"].update(sha256=sha256_file(model)))
    with pytest.raises(BundleError, match=r"model\.onnx: ONNX Runtime cannot load it"):
        load_bundle(bundle_copy, variant="fp32", providers=CPU)


def test_missing_tokenizer_is_refused(bundle_copy):
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json: missing"):
        load_bundle(bundle_copy, providers=CPU)


def test_missing_model_file_is_refused_even_when_not_chosen(bundle_copy):
    (bundle_copy / "model.fp16.onnx").unlink()
    with pytest.raises(BundleError, match=r"model\.fp16\.onnx: missing"):
        load_bundle(bundle_copy, variant="fp32", providers=CPU)


def test_tampered_checksum_is_refused(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m["tokenizer_files"].update({"tokenizer.json": "0" * 64}))
    with pytest.raises(BundleError, match=r"tokenizer\.json: sha256 .* does not match the manifest's 0000"):
        load_bundle(bundle_copy, providers=CPU)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["decision"].update(threshold=1.5), r"manifest\.json: invalid manifest: decision\.threshold: "),
        (lambda m: m.pop("max_input_tokens"), r"invalid manifest: max_input_tokens: Field required"),
        (lambda m: m.update(surprise=1), r"invalid manifest: surprise: Extra inputs are not permitted"),
    ],
)
def test_invalid_manifest_is_refused_with_the_field_named(bundle_copy, edit, message):
    edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy, providers=CPU)


def test_missing_or_unreadable_manifest_is_refused(bundle_copy, tmp_path):
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest\.json: not valid JSON"):
        load_bundle(bundle_copy, providers=CPU)
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"manifest\.json: missing"):
        load_bundle(bundle_copy, providers=CPU)
    with pytest.raises(BundleError, match="no such bundle directory"):
        load_bundle(tmp_path / "nowhere")


def test_bundle_module_needs_neither_torch_nor_training():
    code = (
        "import sys, app.bundle; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'training')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_auto_variant_follows_the_provider_actually_in_use(tiny_bundle_dir, monkeypatch):
    """onnxruntime-gpu on a host without a usable GPU lists CUDA but runs on the CPU: serve int8, not fp16."""
    import onnxruntime

    cpu_only = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *cpu_only])
    bundle = load_bundle(tiny_bundle_dir)
    assert bundle.providers == ["CPUExecutionProvider"]
    assert bundle.variant == "int8"


def test_the_gpu_builds_cuda_libraries_are_loaded_once_before_the_first_cuda_session(tiny_bundle_dir, monkeypatch):
    """onnxruntime-gpu's CUDA and cuDNN come as nvidia-* wheels, on no path the loader searches: without
    `preload_dlls` its CUDA provider fails to start and the model runs on the CPU."""
    import onnxruntime

    from app import bundle as bundle_module

    preloaded = []
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda **options: preloaded.append(options))
    bundle_module._preload_cuda_libraries.cache_clear()
    load_bundle(tiny_bundle_dir, "fp32", providers=["CUDAExecutionProvider", *CPU])
    assert preloaded == []  # this ONNX Runtime build has no CUDA provider
    cpu_only = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *cpu_only])
    load_bundle(tiny_bundle_dir, "fp32", providers=CPU)
    assert preloaded == []  # CUDA not asked for
    for _ in range(2):
        load_bundle(tiny_bundle_dir, "fp32", providers=["CUDAExecutionProvider", *CPU])
    assert preloaded == [{"directory": ""}]
    bundle_module._preload_cuda_libraries.cache_clear()
