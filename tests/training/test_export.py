"""Exporting a tiny run (SYNTHETIC notes) as a model bundle, and checking it against PyTorch."""

import json

import numpy as np
import onnx
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from app.bundle import create_session, load_bundle, sha256_file
from app.bundle import load_tokenizer as load_bundle_tokenizer
from app.inference import NoteClassifier, calibrated_probability
from app.manifest import Calibration, Manifest
from training.cli import app
from training.config import DataArguments, DistillArguments, EvalArguments, ModelArguments, TrainingArguments
from training.data.loading import load_parts
from training.export import PROBE_ROOM, ExportError, export_bundle, torch_margins
from training.fit import fit
from training.modeling import load_student, load_tokenizer
from training.onnx_variants import FFN_DOWN, quantize_int8
from training.predict import predict_proba
from training.probe_notes import PROBE_NOTES
from training.quantization import CALIBRATION_NOTES, QuantizationAware
from training.run_dir import RunDirectory

CPU = ["CPUExecutionProvider"]
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, notes_csv, tiny_bert_dir):
    root = tmp_path_factory.mktemp("export-run")
    return fit(
        DataArguments(data=str(notes_csv)),
        ModelArguments(student=str(tiny_bert_dir), max_length=MAX_TOKENS),
        TrainingArguments(out=str(root / "run"), epochs=3, batch_size=16, encoder_lr=2e-3, head_lr=5e-3, seed=1),
        DistillArguments(),
        EvalArguments(bootstrap=20),
    )


@pytest.fixture(scope="module")
def bundle(tiny_run, tmp_path_factory):
    return export_bundle(tiny_run, tmp_path_factory.mktemp("bundles") / "tiny", version="1.0.0")


@pytest.fixture(scope="module")
def parts(tiny_run):
    return load_parts(RunDirectory(tiny_run).data_arguments())


@pytest.fixture(scope="module")
def held_out(parts):
    return [*parts["valid"].texts, *parts["test"].texts]


def test_bundle_predicts_like_pytorch(bundle, tiny_run, held_out):
    checkpoint = RunDirectory(tiny_run).checkpoint("auroc")
    expected, logits = predict_proba(
        load_student(str(checkpoint)), load_tokenizer(str(checkpoint)), held_out, max_length=MAX_TOKENS
    )
    loaded = load_bundle(bundle, variant="fp32", providers=CPU)
    classifier = NoteClassifier.from_bundle(loaded)
    # The raw margins match PyTorch's softmax; the served probabilities are PyTorch's margins calibrated.
    np.testing.assert_allclose(
        calibrated_probability(classifier.predict_margins(held_out), Calibration()), expected, atol=1e-4
    )
    np.testing.assert_allclose(
        classifier.predict_proba(held_out),
        calibrated_probability(logits[:, 1] - logits[:, 0], loaded.manifest.calibration),
        atol=1e-4,
    )


def test_the_evaluated_calibration_is_in_the_manifest(bundle, tiny_run):
    report = json.loads(RunDirectory(tiny_run).metrics_file().read_text())
    manifest = Manifest.model_validate_json((bundle / "manifest.json").read_text())
    assert manifest.calibration == Calibration.model_validate(report["calibration"])
    assert manifest.calibration.method in ("temperature", "platt") and manifest.calibration.fitted_on
    card = (bundle / "MODEL_CARD.md").read_text()
    assert f"{manifest.calibration.scale:.4f}" in card and "before (softmax)" in card


def test_every_variant_has_its_figures_and_is_kept_only_within_tolerance(bundle, tiny_run, parts):
    checkpoint = RunDirectory(tiny_run).checkpoint("auroc")
    torch_probs, _ = predict_proba(
        load_student(str(checkpoint)), load_tokenizer(str(checkpoint)), parts["valid"].texts, max_length=MAX_TOKENS
    )
    torch_auroc = roc_auc_score(parts["valid"].labels, torch_probs)
    manifest = Manifest.model_validate_json((bundle / "manifest.json").read_text())
    assert set(manifest.variants) == {"fp32", "int8", "fp16"}
    assert manifest.variants["fp32"].kept and manifest.variants["fp32"].max_abs_diff <= 1e-4
    for name, variant in manifest.variants.items():
        assert 0 <= variant.label_agreement <= 1 and variant.max_abs_diff >= 0
        # The drop is measured against PyTorch, not fp32: on a tiny model with near-tied scores even fp32's
        # 1e-6 differences can reorder notes and move its AUROC a little.
        assert variant.auroc_drop == pytest.approx(torch_auroc - variant.valid_auroc, abs=1e-6)
        assert (bundle / variant.file).exists() == variant.kept
        assert variant.batch_shift is not None and variant.batch_shift >= 0
        if name != "fp32":
            assert variant.kept == (variant.auroc_drop <= 0.005 and variant.batch_shift <= 1e-3)
        if variant.kept:
            assert sha256_file(bundle / variant.file) == variant.sha256
            assert (bundle / variant.file).stat().st_size == variant.size_bytes


@pytest.fixture(scope="module")
def int8_file(bundle, parts, tmp_path_factory):
    """The bundle's fp32 graph quantized as the export does, calibrated on the training notes."""
    fp32_file = bundle / Manifest.model_validate_json((bundle / "manifest.json").read_text()).variants["fp32"].file
    fp32_classifier = NoteClassifier(
        create_session(fp32_file, CPU), load_bundle_tokenizer(bundle / "tokenizer.json"), MAX_TOKENS
    )
    out_file = tmp_path_factory.mktemp("int8") / "int8.onnx"
    quantize_int8(fp32_file, out_file, fp32_classifier, parts["train"].texts, keep_fp32=FFN_DOWN)
    return out_file


def test_int8_can_keep_the_feed_forward_down_projections_in_fp32(int8_file):
    graph = onnx.load(str(int8_file)).graph
    dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    int8_inputs = {
        node.name: all(name in dequantized for name in node.input) for node in graph.node if node.op_type == "MatMul"
    }
    assert sorted(name for name, int8 in int8_inputs.items() if not int8) == [
        f"/bert/encoder/layer.{i}/output/dense/MatMul" for i in range(2)
    ]  # the tiny BERT has 2 layers
    assert sum(int8_inputs.values()) >= 8  # per layer: Q, K, V, QK^T, AV, attention output, FFN up
    assert all(FFN_DOWN.search(name) for name, int8 in int8_inputs.items() if not int8)


def test_int8_scores_a_note_the_same_alone_and_in_any_batch(int8_file, bundle, held_out):
    # Static activation scales: nothing in a note's computation depends on the notes batched with it
    # (dynamic quantization took each scale from the whole batch).
    classifier = NoteClassifier(
        create_session(int8_file, CPU), load_bundle_tokenizer(bundle / "tokenizer.json"), MAX_TOKENS
    )
    alone = classifier.predict_proba(held_out, batch_size=1)
    np.testing.assert_allclose(classifier.predict_proba(held_out, batch_size=32), alone, atol=1e-5)
    np.testing.assert_allclose(classifier.predict_proba(held_out[::-1], batch_size=7), alone[::-1], atol=1e-5)


def test_manifest_describes_the_run_and_round_trips(bundle, tiny_run):
    text = (bundle / "manifest.json").read_text()
    manifest = Manifest.model_validate_json(text)
    assert Manifest.model_validate_json(manifest.model_dump_json()) == manifest
    assert (manifest.name, manifest.version, manifest.export_method) == ("tiny", "1.0.0", "optimum")
    assert manifest.max_input_tokens == 128 and manifest.trained_max_tokens == MAX_TOKENS  # the tiny BERT has 128
    assert manifest.encoders.method == "base" and manifest.encoders.teacher is None
    report = json.loads(RunDirectory(tiny_run).metrics_file().read_text())
    decision = report["decision"]
    assert (manifest.decision.policy, manifest.decision.threshold) == (decision["policy"], decision["threshold"])
    assert manifest.test_metrics["threshold_free"] == report["threshold_free"]
    assert {"torch", "transformers", "optimum-onnx", "onnx", "onnxruntime"} <= set(manifest.library_versions)
    for file_name, digest in manifest.tokenizer_files.items():
        assert sha256_file(bundle / file_name) == digest
    assert "tokenizer.json" in manifest.tokenizer_files and any("unchanged" in r for r in manifest.preprocessing)


def test_the_manifest_carries_the_probe_notes_their_fp32_margins_and_each_variants_tolerance(bundle):
    manifest = Manifest.model_validate_json((bundle / "manifest.json").read_text())
    assert manifest.probes.notes == list(PROBE_NOTES)
    fp32 = NoteClassifier.from_bundle(load_bundle(bundle, "fp32", providers=CPU))
    assert fp32.encode(PROBE_NOTES)[-1].truncated  # the long probe checks the cut and the longest shape too
    margins = fp32.predict_margins(PROBE_NOTES, batch_size=1)
    assert manifest.probes.batch_size == 1  # one at a time: the long note pads no batch of short ones
    np.testing.assert_array_equal(np.float32(manifest.probes.fp32_margins), margins)
    expected = calibrated_probability(margins, manifest.calibration)
    for name, variant in manifest.variants.items():
        assert variant.checked_on == "CPUExecutionProvider"
        if variant.kept:
            classifier = NoteClassifier.from_bundle(load_bundle(bundle, name, providers=CPU))
            scored = classifier.predict_proba(PROBE_NOTES, batch_size=1)
            probe_diff = float(np.abs(scored - expected).max())
            assert variant.probe_atol == pytest.approx(max(variant.max_abs_diff, probe_diff) + PROBE_ROOM)


def test_fp16_is_checked_on_cuda_where_onnx_runtime_has_it_the_others_on_the_cpu(tiny_run, tmp_path, monkeypatch):
    """Each variant is checked on the provider that serves it. This machine's ONNX Runtime has no CUDA provider, so
    the session asked for CUDA runs on the CPU, and the manifest says so."""
    import training.export

    asked = {}
    create_session = training.export.create_session

    def recorded(model_file, providers, *args):
        asked[model_file.name] = providers
        return create_session(model_file, providers, *args)

    monkeypatch.setattr(training.export, "create_session", recorded)
    monkeypatch.setattr(training.export, "default_providers", lambda: ["CUDAExecutionProvider", *CPU])
    bundle = export_bundle(tiny_run, tmp_path / "on-a-gpu-host", tolerance=1.0)
    assert asked == {"model.onnx": CPU, "model.int8.onnx": CPU, "model.fp16.onnx": ["CUDAExecutionProvider", *CPU]}
    manifest = Manifest.model_validate_json((bundle / "manifest.json").read_text())
    assert {variant.checked_on for variant in manifest.variants.values()} == {"CPUExecutionProvider"}


def test_model_card_is_written(bundle):
    manifest = Manifest.model_validate_json((bundle / "manifest.json").read_text())
    card = (bundle / "MODEL_CARD.md").read_text()
    for section in (
        "## Intended use",
        "## Training data",
        "## Test metrics",
        "## Calibration",
        "## Decision threshold",
        "## Known limitations",
    ):
        assert section in card
    assert "not a diagnosis" in card and "synthetic_notes.csv" in card
    assert f"{manifest.test_metrics['threshold_free']['auroc']['value']:.3f}" in card
    assert f">= {manifest.decision.threshold:.4f}" in card


@pytest.mark.parametrize(
    ("limit", "reason"),
    [
        ({"tolerance": -1.0}, "tolerance"),  # asks every variant to beat PyTorch's AUROC
        ({"batch_shift_atol": -1.0}, "batched with it"),  # asks for a negative change
    ],
)
def test_variants_failing_a_limit_are_dropped_with_figures_kept(tiny_run, tmp_path, limit, reason):
    bundle = export_bundle(tiny_run, tmp_path / "strict", **limit)
    manifest = Manifest.model_validate_json((bundle / "manifest.json").read_text())
    for name in ("int8", "fp16"):
        variant = manifest.variants[name]
        assert not variant.kept and reason in variant.note and variant.max_abs_diff is not None
        assert not (bundle / variant.file).exists()
    assert load_bundle(bundle, providers=CPU).variant == "fp32"


def test_optimum_failure_falls_back_to_torch_onnx(tiny_run, tmp_path, monkeypatch, held_out):
    import optimum.exporters.onnx

    def unsupported(*args, **kwargs):
        raise ValueError("Trying to export a tiny model, that is a custom or unsupported architecture")

    monkeypatch.setattr(optimum.exporters.onnx, "main_export", unsupported)
    bundle = export_bundle(tiny_run, tmp_path / "fallback")
    manifest = Manifest.model_validate_json((bundle / "manifest.json").read_text())
    assert manifest.export_method == "torch.onnx" and manifest.variants["fp32"].max_abs_diff <= 1e-4


def test_the_export_checks_each_variant_through_the_services_predict(tiny_run, tmp_path, monkeypatch):
    """The export scores every variant with `NoteClassifier.predict`, the function the service's batcher runs:
    a fault planted there (int8 answering 0.5 for every note) is what the export measures and drops."""
    scored_files = set()
    service_predict = NoteClassifier.predict

    def planted(self, token_ids):
        model_file = self.session._model_path.rsplit("/", 1)[-1]
        scored_files.add(model_file)
        probabilities = service_predict(self, token_ids)
        return np.full_like(probabilities, 0.5) if model_file == "model.int8.onnx" else probabilities

    monkeypatch.setattr(NoteClassifier, "predict", planted)
    bundle = export_bundle(tiny_run, tmp_path / "planted")
    assert scored_files == {"model.onnx", "model.int8.onnx", "model.fp16.onnx"}
    manifest = Manifest.model_validate_json((bundle / "manifest.json").read_text())
    int8 = manifest.variants["int8"]
    assert int8.valid_auroc == 0.5 and not int8.kept and "validation AUROC" in int8.note
    assert manifest.variants["fp32"].kept and manifest.variants["fp32"].max_abs_diff <= 1e-4


def test_failed_parity_leaves_no_bundle(tiny_run, tmp_path, monkeypatch):
    import training.export

    torch_margins = training.export.torch_margins
    monkeypatch.setattr(training.export, "torch_margins", lambda *args: torch_margins(*args) + 0.5)
    with pytest.raises(ExportError, match=r"model\.onnx: ONNX fp32 differs from PyTorch by up to 0\.\d+"):
        export_bundle(tiny_run, tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its staging directory


def test_cli_export_of_a_run_without_checkpoints_fails_clearly(tmp_path, tiny_run):
    run = tmp_path / "untrained"
    run.mkdir()
    RunDirectory(run).config_file.write_text(RunDirectory(tiny_run).config_file.read_text())
    result = CliRunner().invoke(app, ["export", "--run", str(run), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "no checkpoint" in result.output and "best-auroc" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_export_refuses_to_overwrite_a_bundle(tmp_path, tiny_run, bundle):
    result = CliRunner().invoke(app, ["export", "--run", str(tiny_run), "--out", str(bundle)])
    assert result.exit_code == 2
    assert "already exists" in result.output


@pytest.fixture(scope="module")
def quantization_aware_run(tiny_run, tmp_path_factory):
    """A short quantization-aware fine-tuning of the tiny run's best checkpoint (SYNTHETIC notes)."""
    run = RunDirectory(tiny_run)
    return fit(
        run.data_arguments(),
        ModelArguments(student=str(run.checkpoint("auroc")), max_length=MAX_TOKENS),
        TrainingArguments(
            out=str(tmp_path_factory.mktemp("qat") / "run"),
            epochs=1,
            batch_size=16,
            encoder_lr=1e-4,
            seed=1,
            quantization_aware=True,
        ),
        DistillArguments(),
        EvalArguments(bootstrap=20),
    )


@pytest.fixture(scope="module")
def quantization_aware_bundle(quantization_aware_run, tmp_path_factory):
    # the tolerance keeps int8 whatever its AUROC on the tiny model, so that it can be compared below
    out = tmp_path_factory.mktemp("bundles") / "qat"
    return export_bundle(quantization_aware_run, out, tolerance=1.0, int8_round_outputs=False)


def test_int8_rounds_what_every_matmul_reads_and_nothing_else(bundle, quantization_aware_bundle):
    """Weights and input activations of every MatMul and Gemm in int8; their outputs, and the residual stream
    that reads the same LayerNorm outputs, in fp32."""
    default = load_bundle(bundle).manifest  # not quantization-aware: the down-projections stay fp32
    assert default.int8_matmuls == "except-ffn-down" and default.int8_rounds_outputs
    manifest = load_bundle(quantization_aware_bundle).manifest  # its int8 is kept whatever its AUROC
    graph = onnx.load(str(quantization_aware_bundle / manifest.variants["int8"].file)).graph
    dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    matmuls = [node for node in graph.node if node.op_type in ("MatMul", "Gemm")]
    assert len(matmuls) >= 2 * 8 and all(all(name in dequantized for name in node.input[:2]) for node in matmuls)
    readers = {node.op_type for node in graph.node if dequantized & set(node.input)}
    assert readers == {"MatMul", "Gemm", "Gather"}  # Gather: the int8 embedding tables
    quantized = {node.input[0] for node in graph.node if node.op_type == "QuantizeLinear"}
    producers = {node.op_type for node in graph.node if quantized & set(node.output)}
    assert not producers & {"MatMul", "Gemm"}  # no output is rounded


def test_a_quantization_aware_run_is_described_as_such(quantization_aware_bundle, bundle):
    manifest = load_bundle(quantization_aware_bundle).manifest
    assert manifest.int8_matmuls == "all" and manifest.variants["int8"].kept
    assert manifest.encoders.quantization_aware and manifest.encoders.layers == 2
    card = (quantization_aware_bundle / "MODEL_CARD.md").read_text()
    assert "Fine-tuned quantization-aware" in card and "every MatMul in int8. Only their inputs are rounded." in card
    assert not load_bundle(bundle).manifest.encoders.quantization_aware


def test_the_quantization_aware_student_computes_what_its_int8_graph_computes(tiny_run, bundle, parts, tmp_path):
    """The fake quantization of quantization-aware training rounds what the int8 graph rounds, as it does: the
    fake-quantized PyTorch model is far closer to the int8 graph than the same model in float is."""
    calibration = parts["train"].texts[:CALIBRATION_NOTES]
    fp32 = NoteClassifier(
        create_session(bundle / "model.onnx", CPU), load_bundle_tokenizer(bundle / "tokenizer.json"), 512
    )
    quantize_int8(bundle / "model.onnx", tmp_path / "int8.onnx", fp32, calibration, round_outputs=False)
    int8 = fp32.with_session(create_session(tmp_path / "int8.onnx", CPU))
    checkpoint = RunDirectory(tiny_run).checkpoint("auroc")
    texts = parts["valid"].texts
    float_margins = torch_margins(load_student(str(checkpoint), "eager"), int8, texts)
    student = load_student(str(checkpoint), "eager")
    QuantizationAware(student, load_tokenizer(str(checkpoint)), calibration, MAX_TOKENS, "cpu").calibrate()
    rounded_margins = torch_margins(student, int8, texts)
    int8_margins = int8.predict_margins(texts, 32)
    print(
        np.abs(float_margins).mean(),
        np.abs(rounded_margins - int8_margins).mean(),
        np.abs(float_margins - int8_margins).mean(),
    )
    assert np.abs(rounded_margins - int8_margins).mean() < np.abs(float_margins - int8_margins).mean() / 10
