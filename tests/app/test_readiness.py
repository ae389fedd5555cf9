"""Readiness at start, over HTTP through the app's lifespan: the accelerator required by `require_accelerator`, and the
served variant against the manifest's probe notes. This machine's ONNX Runtime is the CPU build, so CUDA asked for
is CUDA not in use. All notes are SYNTHETIC."""

import logging

import numpy as np
import onnxruntime
import pytest

from app.bundle import load_bundle
from app.inference import NoteClassifier, calibrated_probability
from app.settings import Settings
from tests.app.test_bundle import edit_manifest

pytestmark = pytest.mark.anyio

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
NOTE = "CC: chest pain. BT 36.8, HR 118"


def records(caplog, message: str, level: int | None = None) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == message and (level is None or r.levelno == level)]


@pytest.fixture
def gpu_build_without_a_gpu(monkeypatch):
    """onnxruntime-gpu whose CUDA provider fails to start (a CUDA library missing): it lists CUDA, runs on the CPU."""
    cpu_only = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CUDA, *cpu_only])


async def assert_not_ready(client, *reason_parts: str) -> None:
    assert (await client.get("/healthz")).status_code == 200  # alive: the process is not restarted in a loop
    readyz = await client.get("/readyz")
    assert readyz.status_code == 503 and "retry-after" not in readyz.headers  # for good, not "starting up"
    for part in reason_parts:
        assert part in readyz.json()["detail"]
    classify = await client.post("/classify", json={"text": NOTE})
    assert classify.status_code == 503 and classify.json() == readyz.json()


@pytest.mark.parametrize("variant", ["auto", "fp32", "fp16"])
async def test_require_accelerator_without_cuda_is_never_ready_and_says_why_once(serve, settings, caplog, variant):
    caplog.set_level(logging.INFO)
    async with serve(settings(require_accelerator=True, variant=variant)) as client:
        await assert_not_ready(
            client, "not ready: require_accelerator is set", CPU, "has no CUDA provider", "`gpu` extra"
        )
        await assert_not_ready(client)
    [error] = records(caplog, "not ready", logging.ERROR)
    assert "has no CUDA provider" in error.fields["reason"] and error.fields["providers"] == [CPU]
    assert not records(caplog, "model ready") and not records(caplog, "warm-up done")


async def test_a_cuda_provider_that_fails_to_load_is_not_ready_when_required(
    serve, settings, caplog, gpu_build_without_a_gpu
):
    async with serve(settings(require_accelerator=True, variant="fp16")) as client:
        await assert_not_ready(client, "runs on CPUExecutionProvider", "could not start its CUDA provider")


async def test_without_require_accelerator_a_failed_cuda_serves_on_the_cpu_with_a_warning(
    serve, settings, caplog, gpu_build_without_a_gpu
):
    async with serve(settings(variant="fp32")) as client:
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        assert (await client.get("/v1/model")).json()["providers"] == [CPU]
    [warning] = records(caplog, "CUDA was asked for but is not in use: running on the CPU", logging.WARNING)
    assert "could not start its CUDA provider" in warning.fields["reason"]


async def test_cuda_runs_on_the_configured_device(serve, settings, monkeypatch):
    asked = []
    session = onnxruntime.InferenceSession

    def recording_session(path, options, providers):
        asked.append(providers)
        return session(path, options, providers=[CPU])

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording_session)
    async with serve(settings(require_accelerator=True, variant="fp16", device_id=3)) as client:
        assert (await client.get("/readyz")).status_code == 503
    assert asked == [[(CUDA, {"device_id": 3}), CPU]]


@pytest.mark.parametrize("variant", ["fp32", "int8", "fp16"])
async def test_each_variant_agrees_with_its_probe_reference_at_start(serve, settings, caplog, tiny_bundle_dir, variant):
    caplog.set_level(logging.INFO)
    async with serve(settings(variant=variant)) as client:
        assert (await client.get("/readyz")).json() == {"status": "ready"}
    [agreed] = records(caplog, "probe notes agree with the fp32 reference")
    manifest = load_bundle(tiny_bundle_dir, variant, providers=[CPU]).manifest
    assert agreed.fields["variant"] == variant and agreed.fields["provider"] == CPU
    assert agreed.fields["probe_atol"] == manifest.variants[variant].probe_atol
    assert 0 <= agreed.fields["max_abs_diff"] <= manifest.variants[variant].probe_atol


async def test_the_probes_are_scored_as_exported_whatever_the_services_note_limit(serve, settings, caplog):
    """The long probe note is cut at the bundle's max_input_tokens at export; a service reading fewer tokens per note
    still checks the variant against the reference as exported."""
    caplog.set_level(logging.INFO)
    async with serve(settings(variant="fp32", max_note_tokens=16, truncation="head")) as client:
        assert (await client.get("/readyz")).json() == {"status": "ready"}
    [agreed] = records(caplog, "probe notes agree with the fp32 reference")
    assert agreed.fields["max_abs_diff"] <= 1e-6


async def test_a_tampered_probe_reference_is_never_ready(serve, settings, bundle_copy, caplog):
    def shift_third_margin(manifest):
        manifest["probes"]["fp32_margins"][2] += 4.0

    edit_manifest(bundle_copy, shift_third_margin)
    async with serve(Settings(bundle=bundle_copy, variant="int8")) as client:
        await assert_not_ready(
            client, "not ready: the int8 variant on CPUExecutionProvider", "probe note 2", "probe_atol"
        )
    [error] = records(caplog, "not ready", logging.ERROR)
    assert "probe note 2" in error.fields["reason"]


async def test_a_variant_whose_answers_drift_is_never_ready(serve, settings, monkeypatch):
    """A broken kernel or library seen from outside: the model answers, but not what it answered at export."""
    margins = NoteClassifier.margins
    monkeypatch.setattr(NoteClassifier, "margins", lambda self, token_ids: margins(self, token_ids) + 1.0)
    async with serve(settings(variant="fp16")) as client:
        await assert_not_ready(client, "the fp16 variant", "more than the manifest's probe_atol")


async def test_a_recalibrated_bundle_keeps_its_probe_reference(serve, settings, bundle_copy, tiny_bundle_dir):
    """The reference is fp32's margins: a site's new calibration applies to them as to the served variant's."""

    def recalibrate(manifest):
        manifest["calibration"] = {"method": "platt", "scale": 2.0, "bias": -1.0}

    edit_manifest(bundle_copy, recalibrate)
    async with serve(Settings(bundle=bundle_copy, variant="fp32")) as client:
        assert (await client.get("/readyz")).json() == {"status": "ready"}
    bundle = load_bundle(bundle_copy, "fp32", providers=[CPU])
    probes = bundle.manifest.probes
    scored = NoteClassifier.from_bundle(bundle).predict_proba(probes.notes, probes.batch_size)
    expected = calibrated_probability(np.asarray(probes.fp32_margins), bundle.manifest.calibration)
    assert np.abs(scored - expected).max() <= 1e-6
    original = load_bundle(tiny_bundle_dir, "fp32", providers=[CPU])
    assert np.abs(NoteClassifier.from_bundle(original).predict_proba(probes.notes, 1) - scored).max() > 0.01


async def test_a_bundle_exported_before_probes_still_serves_and_says_it_is_unchecked(
    serve, settings, bundle_copy, caplog
):
    def as_before_probes(manifest):
        del manifest["probes"]
        for variant in manifest["variants"].values():
            del variant["probe_atol"], variant["checked_on"]

    edit_manifest(bundle_copy, as_before_probes)
    async with serve(Settings(bundle=bundle_copy)) as client:
        assert (await client.get("/readyz")).json() == {"status": "ready"}
    [warning] = [r for r in caplog.records if r.getMessage().startswith("the bundle has no probe notes")]
    assert warning.levelno == logging.WARNING and "export the bundle again" in warning.getMessage()
