"""NoteClassifier, the one path from note text to P(emergency). All notes are SYNTHETIC."""

import importlib
import sys

import numpy as np
import pytest

from app import inference
from app.bundle import load_bundle
from app.inference import NoteClassifier, calibrated_probability, cuda_device, run_bound
from app.manifest import Calibration

CPU = ["CPUExecutionProvider"]
NOTES = ["CC: seizure", "3세 남아 보호자 동반 내원 CC: chest pain. BT 38.4, HR 140", "CC: wart", "x"]


@pytest.fixture(scope="module")
def bundle(tiny_bundle_dir):
    return load_bundle(tiny_bundle_dir, variant="fp32", providers=CPU)


@pytest.fixture(scope="module")
def classifier(bundle):
    return NoteClassifier.from_bundle(bundle)


def test_predict_proba_gives_one_probability_per_note_in_order(classifier, notes):
    texts = [t for t, _ in notes[:50]]
    probs = classifier.predict_proba(texts)
    assert probs.shape == (50,) and probs.dtype == np.float32
    assert ((probs >= 0) & (probs <= 1)).all()
    np.testing.assert_allclose(classifier.predict_proba(texts[::-1]), probs[::-1], atol=1e-6)
    # padding a note with longer neighbours does not change its probability
    np.testing.assert_allclose(classifier.predict_proba(texts, batch_size=1), probs, atol=1e-5)
    assert classifier.predict_proba([]).shape == (0,)


def test_predict_proba_is_the_batched_predict_of_encoded_notes(classifier):
    encoded = classifier.encode(NOTES)
    assert not any(note.truncated for note in encoded)
    np.testing.assert_allclose(
        classifier.predict([note.ids for note in encoded]), classifier.predict_proba(NOTES), atol=1e-5
    )


def test_predictions_separate_the_synthetic_classes(classifier, notes):
    probs = classifier.predict_proba([t for t, _ in notes])
    labels = np.array([y for _, y in notes])
    assert probs[labels == 1].mean() > probs[labels == 0].mean()


def test_encode_keeps_special_tokens_and_cuts_at_the_models_input_size(bundle, classifier):
    short, long = classifier.encode(["chest pain", "chest pain " * 200])
    assert len(short.ids) == len(bundle.tokenizer.encode("chest pain").ids) >= 3  # [CLS] ... [SEP]
    assert not short.truncated
    assert long.truncated and len(long.ids) == bundle.manifest.max_input_tokens


def test_notes_over_max_note_tokens_keep_their_head_and_tail_and_are_marked(bundle):
    text = "CC: wart. " + " ".join(["chest pain"] * 10) + " BT 39.1"
    full = NoteClassifier.from_bundle(bundle).encode([text])[0].ids.tolist()
    head_tail = NoteClassifier.from_bundle(bundle, max_note_tokens=8)
    short, long = head_tail.encode(["CC: wart", text])
    assert not short.truncated and long.truncated
    assert long.ids.tolist() == full[:2] + full[-6:]  # a quarter from the head ([CLS] included), the rest from the tail
    head = NoteClassifier.from_bundle(bundle, max_note_tokens=8, truncation="head")
    assert head.encode([text])[0].ids.tolist() == full[:7] + full[-1:]  # the head, and the closing [SEP]


def test_calibration_is_applied_to_the_logit_margin(bundle):
    # The bundle's own calibration is fitted at evaluation; the identity is the model's plain softmax.
    plain = NoteClassifier(bundle.session, bundle.tokenizer, bundle.manifest.max_input_tokens, Calibration())
    margins = plain.predict_margins(NOTES)
    np.testing.assert_allclose(plain.predict_proba(NOTES), 1 / (1 + np.exp(-margins)), atol=1e-6)
    platt = Calibration(method="platt", scale=0.5, bias=-1.0)
    calibrated = NoteClassifier(bundle.session, bundle.tokenizer, bundle.manifest.max_input_tokens, platt)
    np.testing.assert_allclose(calibrated.predict_proba(NOTES), 1 / (1 + np.exp(-(0.5 * margins - 1))), atol=1e-6)


def test_calibrated_probability_is_finite_for_extreme_margins():
    extreme = calibrated_probability(np.array([-1e4, -50.0, 0.0, 50.0, 1e4]), Calibration())
    assert np.all(np.isfinite(extreme)) and extreme[2] == 0.5 and extreme[0] == 0 and extreme[-1] == 1


def test_max_note_tokens_cannot_exceed_the_models_input_size(bundle):
    with pytest.raises(ValueError, match="max_input_tokens"):
        NoteClassifier.from_bundle(bundle, bundle.manifest.max_input_tokens + 1)


@pytest.mark.parametrize("variant", ["fp32", "int8", "fp16"])
def test_each_variant_agrees_with_fp32_within_its_recorded_difference(tiny_bundle_dir, notes, classifier, variant):
    texts = [t for t, _ in notes[:40]]
    bundle = load_bundle(tiny_bundle_dir, variant=variant, providers=CPU, intra_op_threads=1)
    assert bundle.variant == variant and bundle.providers == CPU
    recorded = bundle.manifest.variants[variant].max_abs_diff
    difference = NoteClassifier.from_bundle(bundle).predict_proba(texts) - classifier.predict_proba(texts)
    assert np.abs(difference).max() <= recorded + 1e-4


def test_without_onnx_runtime_the_error_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    monkeypatch.delitem(sys.modules, "app.bundle")
    with pytest.raises(ModuleNotFoundError, match=r"dsgkd-triage\[cpu\].*dsgkd-triage\[gpu\]"):
        importlib.import_module("app.bundle")


@pytest.mark.parametrize("variant", ["fp32", "int8", "fp16"])
def test_io_binding_gives_exactly_the_logits_of_a_plain_run(tiny_bundle_dir, classifier, variant):
    session = load_bundle(tiny_bundle_dir, variant=variant, providers=CPU, intra_op_threads=1).session
    feed = classifier.model_inputs([note.ids for note in classifier.encode(NOTES)])
    bound = run_bound(session, feed, "cpu", 0)
    assert bound.shape == (len(NOTES), 2)
    np.testing.assert_array_equal(bound, session.run(["logits"], feed)[0])


class SessionOnCuda:
    """A CPU session that says it runs on CUDA device 2, as onnxruntime-gpu's sessions do."""

    def __init__(self, session):
        self._session = session

    def get_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def get_provider_options(self):
        return {"CUDAExecutionProvider": {"device_id": "2"}, "CPUExecutionProvider": {}}

    def __getattr__(self, name):
        return getattr(self._session, name)


def test_on_cuda_the_model_runs_through_io_binding_on_the_sessions_device(bundle, classifier, monkeypatch):
    assert cuda_device(bundle.session) is None  # on the CPU: the plain session.run
    bound_on = []

    def bound_on_the_cpu(session, feed, device, device_id):
        bound_on.append((device, device_id))
        return run_bound(session, feed, "cpu", 0)

    monkeypatch.setattr(inference, "run_bound", bound_on_the_cpu)
    on_cuda = classifier.with_session(SessionOnCuda(bundle.session))
    assert cuda_device(on_cuda.session) == 2
    np.testing.assert_array_equal(on_cuda.predict_proba(NOTES), classifier.predict_proba(NOTES))
    assert bound_on and set(bound_on) == {("cuda", 2)}
