"""Loading a model bundle: refusal of damaged bundles, variant choice, predictions (SYNTHETIC notes)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from app.bundle import BundleError, load_bundle

CPU = ["CPUExecutionProvider"]


@pytest.fixture
def bundle_copy(tmp_path, tiny_bundle_dir):
    return shutil.copytree(tiny_bundle_dir, tmp_path / "bundle")


def edit_manifest(bundle, edit) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_predict_proba_gives_one_probability_per_note_in_order(tiny_bundle_dir, notes):
    bundle = load_bundle(tiny_bundle_dir, variant="fp32", providers=CPU)
    texts = [t for t, _ in notes[:50]]
    probs = bundle.predict_proba(texts)
    assert probs.shape == (50,) and probs.dtype == np.float32
    assert ((probs >= 0) & (probs <= 1)).all()
    np.testing.assert_allclose(bundle.predict_proba(texts[::-1]), probs[::-1], atol=1e-6)
    # padding a note with longer neighbours does not change its probability
    np.testing.assert_allclose(bundle.predict_proba(texts, batch_size=1), probs, atol=1e-5)
    assert bundle.predict_proba([]).shape == (0,)


def test_predictions_separate_the_synthetic_classes(tiny_bundle_dir, notes):
    bundle = load_bundle(tiny_bundle_dir, variant="fp32", providers=CPU)
    probs = bundle.predict_proba([t for t, _ in notes])
    labels = np.array([y for _, y in notes])
    assert probs[labels == 1].mean() > probs[labels == 0].mean()


def test_count_tokens_counts_special_tokens_and_truncates(tiny_bundle_dir):
    bundle = load_bundle(tiny_bundle_dir, variant="fp32", providers=CPU)
    limit = bundle.manifest.max_input_tokens
    short, long = bundle.count_tokens(["chest pain", "chest pain " * 200])
    assert short == len(bundle.tokenizer.encode("chest pain").ids) and short >= 3  # [CLS] ... [SEP]
    assert long == limit


@pytest.mark.parametrize("variant", ["fp32", "int8", "fp16"])
def test_each_variant_loads_and_agrees_with_fp32(tiny_bundle_dir, notes, variant):
    texts = [t for t, _ in notes[:40]]
    bundle = load_bundle(tiny_bundle_dir, variant=variant, providers=CPU, intra_op_threads=1)
    assert bundle.variant == variant and bundle.providers == CPU
    reference = load_bundle(tiny_bundle_dir, variant="fp32", providers=CPU).predict_proba(texts)
    recorded = bundle.manifest.variants[variant].max_abs_diff
    assert np.abs(bundle.predict_proba(texts) - reference).max() <= recorded + 1e-4


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
