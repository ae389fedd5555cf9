"""/metrics beyond requests and batches: the predictions of every route that classifies (P(emergency) histogram and
label counters, to watch drift), the served model's info, and the process's own metrics."""

from __future__ import annotations

import base64
import platform

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.bundle import load_bundle
from app.cds_hooks import PREFETCH_KEY, SERVICE_ID
from app.fhir import CLASSIFY_PATH, FHIR_JSON
from app.inference import NoteClassifier
from app.metrics import PROBABILITY_BUCKETS

pytestmark = pytest.mark.anyio

NOTES = ["3세 남아 보호자 동반 CC: seizure. BT 39.1, HR 150", "CC: medication refill. BT 36.5", "CC: chest pain"]


def samples(text: str, family: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in text_string_to_metric_families(text)
        if metric.name == family
        for sample in metric.samples
    }


def document_reference(text: str) -> dict:
    return {
        "resourceType": "DocumentReference",
        "id": "doc-1",
        "status": "current",
        "subject": {"reference": "Patient/p-1"},
        "content": [{"attachment": {"contentType": "text/plain", "data": base64.b64encode(text.encode()).decode()}}],
    }


async def test_every_route_that_classifies_records_each_note_once(serve, settings, tiny_bundle_dir):
    bundle = load_bundle(tiny_bundle_dir)
    expected = NoteClassifier.from_bundle(bundle).predict_proba(NOTES)
    async with serve(settings()) as client:
        # /classify with explanations (their word-deleted variants are model runs, not predictions), FHIR $classify
        # and CDS Hooks (whose cards are explained too), then a refused request: nothing classified.
        classify = await client.post("/classify", json={"notes": [{"text": t} for t in NOTES], "explain": True})
        fhir = await client.post(CLASSIFY_PATH, json=document_reference(NOTES[0]), headers={"Content-Type": FHIR_JSON})
        hook = {
            "hook": "patient-view",
            "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
            "context": {"userId": "Practitioner/u-1", "patientId": "p-1"},
            "prefetch": {PREFETCH_KEY: document_reference(NOTES[1])},
        }
        cds = await client.post(f"/cds-services/{SERVICE_ID}", json=hook)
        refused = await client.post("/classify", json={"text": "x" * 20_001})
        text = (await client.get("/metrics")).text
    assert [classify.status_code, fhir.status_code, cds.status_code, refused.status_code] == [200, 200, 200, 413]

    probabilities = np.array([*expected, expected[0], expected[1]])
    histogram = samples(text, "triage_prediction_probability")
    assert histogram[("triage_prediction_probability_count", ())] == 5
    assert np.isclose(histogram[("triage_prediction_probability_sum", ())], probabilities.sum(), atol=1e-5)
    for bound in PROBABILITY_BUCKETS:
        bucket = histogram[("triage_prediction_probability_bucket", (("le", str(bound)),))]
        assert bucket == (probabilities <= bound).sum(), bound
    assert histogram[("triage_prediction_probability_bucket", (("le", "+Inf"),))] == 5

    emergencies = int((probabilities >= bundle.manifest.decision.threshold).sum())
    assert samples(text, "triage_predictions") == {
        ("triage_predictions_total", (("label", "emergency"),)): emergencies,
        ("triage_predictions_total", (("label", "non-emergency"),)): 5 - emergencies,
    }


async def test_both_label_counters_exist_before_any_note(serve, settings):
    async with serve(settings()) as client:
        text = (await client.get("/metrics")).text
    assert samples(text, "triage_predictions") == {
        ("triage_predictions_total", (("label", "emergency"),)): 0,
        ("triage_predictions_total", (("label", "non-emergency"),)): 0,
    }


async def test_the_model_info_names_the_served_bundle(serve, settings, tiny_bundle_dir):
    manifest = load_bundle(tiny_bundle_dir).manifest
    async with serve(settings(model_name="renamed", variant="fp32")) as client:
        text = (await client.get("/metrics")).text
    labels = {
        "name": "renamed",
        "version": manifest.version,
        "variant": "fp32",
        "provider": "CPUExecutionProvider",
        "threshold": str(manifest.decision.threshold),
        "threshold_policy": manifest.decision.policy,
        "calibration": manifest.calibration.method,
        "method": manifest.encoders.method,
    }
    assert samples(text, "triage_model_info") == {("triage_model_info", tuple(sorted(labels.items()))): 1}


async def test_process_metrics_are_served(serve, settings):
    async with serve(settings()) as client:
        text = (await client.get("/metrics")).text
    assert samples(text, "process_resident_memory_bytes")[("process_resident_memory_bytes", ())] > 10 * 2**20
    assert samples(text, "process_cpu_seconds")[("process_cpu_seconds_total", ())] > 0
    assert samples(text, "process_open_fds")[("process_open_fds", ())] > 0
    [python] = samples(text, "python_info")
    assert dict(python[1])["implementation"] == platform.python_implementation()
    collections = samples(text, "python_gc_collections")
    assert {dict(labels)["generation"] for _, labels in collections} == {"0", "1", "2"}
