"""The service over HTTP, with the real tiny bundle, through the app's lifespan. All notes are SYNTHETIC."""

import asyncio
import json
import logging
import time

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.bundle import load_bundle
from app.inference import NoteClassifier
from app.logs import JsonFormatter

pytestmark = pytest.mark.anyio

NOTES = ["3세 남아 보호자 동반 CC: seizure. BT 39.1, HR 150", "CC: medication refill. BT 36.5", "CC: chest pain"]


@pytest.fixture
def slow_model(monkeypatch):
    """Every model run takes at least 0.3 s longer."""
    run = NoteClassifier.predict

    def slow_predict(self, token_ids):
        time.sleep(0.3)
        return run(self, token_ids)

    monkeypatch.setattr(NoteClassifier, "predict", slow_predict)


def metric_samples(text: str, name: str) -> dict:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == name
        for sample in family.samples
    }


async def test_single_note_gets_the_bundles_probability_and_label(serve, settings, tiny_bundle_dir):
    bundle = load_bundle(tiny_bundle_dir)
    async with serve(settings()) as client:
        response = await client.post("/classify", json={"text": NOTES[0]})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == {"name": bundle.manifest.name, "version": bundle.manifest.version}
    [result] = body["results"]
    threshold = bundle.manifest.decision.threshold
    assert result["id"] == "0" and result["truncated"] is False and result["threshold"] == threshold
    assert result["probability"] == pytest.approx(
        float(NoteClassifier.from_bundle(bundle).predict_proba([NOTES[0]])[0]), abs=1e-5
    )
    assert result["label"] == ("emergency" if result["probability"] >= threshold else "non-emergency")
    assert response.headers["x-request-id"]


async def test_many_notes_keep_their_order_and_ids(serve, settings, tiny_bundle_dir):
    expected = NoteClassifier.from_bundle(load_bundle(tiny_bundle_dir)).predict_proba(NOTES)
    notes = [{"id": "b", "text": NOTES[0]}, {"text": NOTES[1]}, {"id": "a", "text": NOTES[2]}]
    async with serve(settings(model_name="renamed")) as client:
        response = await client.post("/classify", json={"notes": notes}, headers={"X-Request-ID": "req-42"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-42"
    body = response.json()
    assert body["model"]["name"] == "renamed"
    assert [r["id"] for r in body["results"]] == ["b", "1", "a"]
    np.testing.assert_allclose([r["probability"] for r in body["results"]], expected, atol=1e-5)


async def test_concurrent_requests_are_batched_together(serve, settings):
    async with serve(settings(max_wait_ms=200)) as client:
        responses = await asyncio.gather(*(client.post("/classify", json={"text": t}) for t in NOTES * 3))
        assert [r.status_code for r in responses] == [200] * 9
        samples = metric_samples((await client.get("/metrics")).text, "triage_batch_size")
    batches = samples[("triage_batch_size_count", ())]
    assert samples[("triage_batch_size_sum", ())] == 9
    assert batches < 9  # at least one model run held notes of several requests


async def test_a_full_queue_answers_429_at_once(serve, settings, slow_model):
    async with serve(settings(queue_capacity=2, max_notes_per_request=2, explain_max_words=0, max_wait_ms=0)) as client:
        responses = await asyncio.gather(*(client.post("/classify", json={"text": t}) for t in NOTES * 3))
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 429 in statuses and set(statuses) == {200, 429}
    assert all(r.headers["retry-after"] for r in responses if r.status_code == 429)


async def test_a_request_past_its_timeout_gets_503(serve, settings, slow_model):
    async with serve(settings(request_timeout_s=0.05)) as client:
        response = await client.post("/classify", json={"text": NOTES[0]})
    assert response.status_code == 503
    assert "within 0.05 s" in response.json()["detail"]


async def test_bearer_keys_guard_everything_but_the_probes(serve, settings):
    async with serve(settings(api_keys=["k1", "k2"])) as client:
        assert (await client.post("/classify", json={"text": NOTES[0]})).status_code == 401
        wrong = await client.post("/classify", json={"text": NOTES[0]}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        right = await client.post("/classify", json={"text": NOTES[0]}, headers={"Authorization": "Bearer k2"})
        assert right.status_code == 200
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers={"Authorization": "Bearer k1"})).status_code == 200
        assert (await client.get("/v1/model")).status_code == 401
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200


async def test_oversized_bodies_get_413_with_or_without_content_length(serve, settings):
    big = json.dumps({"text": "x" * 500}).encode()

    async def chunks():
        for start in range(0, len(big), 100):
            yield big[start : start + 100]

    async with serve(settings(max_body_bytes=300)) as client:
        declared = await client.post("/classify", content=big, headers={"Content-Type": "application/json"})
        streamed = await client.post("/classify", content=chunks(), headers={"Content-Type": "application/json"})
        small = await client.post("/classify", json={"text": NOTES[1]})
    assert declared.status_code == streamed.status_code == 413
    assert "300 bytes" in streamed.json()["detail"]
    assert "content-length" not in streamed.request.headers
    assert small.status_code == 200


async def test_too_many_notes_or_too_long_notes_get_413(serve, settings):
    long_note = " ".join(["chest pain"] * 20)
    limits = settings(max_notes_per_request=2, max_note_chars=300, max_note_tokens=16, truncation="refuse")
    async with serve(limits) as client:
        too_many = await client.post("/classify", json={"notes": [{"text": t} for t in NOTES]})
        too_many_chars = await client.post("/classify", json={"text": "x " * 151})
        too_many_tokens = await client.post("/classify", json={"notes": [{"text": NOTES[1]}, {"text": long_note}]})
    assert too_many.status_code == too_many_chars.status_code == too_many_tokens.status_code == 413
    assert "at most 2" in too_many.json()["detail"]
    assert "positions [0]" in too_many_chars.json()["detail"]
    assert "positions [1] exceed 16 tokens" in too_many_tokens.json()["detail"]


async def test_long_notes_are_classified_by_default_said_so_and_counted(serve, settings):
    long_note = " ".join(["chest pain"] * 40)
    async with serve(settings(max_note_tokens=16)) as client:
        response = await client.post("/classify", json={"notes": [{"text": NOTES[1]}, {"text": long_note}]})
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 200
    assert [r["truncated"] for r in response.json()["results"]] == [False, True]
    assert metric_samples(metrics, "triage_notes_truncated")[("triage_notes_truncated_total", ())] == 1.0


@pytest.mark.parametrize(
    "body",
    [
        {"notes": []},
        {"text": "   "},
        {"notes": [{"text": ""}]},
        {"notes": [{"id": "same", "text": NOTES[0]}, {"id": "same", "text": NOTES[1]}]},
        {"notes": [{"text": NOTES[0]}, {"id": "0", "text": NOTES[1]}]},
        {"text": NOTES[0], "priority": "high"},
        {"notes": "not a list"},
    ],
)
async def test_invalid_requests_get_422_without_their_input_echoed(serve, settings, body):
    async with serve(settings()) as client:
        response = await client.post("/classify", json=body)
    assert response.status_code == 422
    assert all("input" not in error for error in response.json()["detail"])


async def test_invalid_json_gets_422_and_non_utf8_gets_400(serve, settings):
    async with serve(settings()) as client:
        broken = await client.post("/classify", content=b'{"text": "a', headers={"Content-Type": "application/json"})
        latin1 = await client.post(
            "/classify", content='{"text": "café"}'.encode("latin-1"), headers={"Content-Type": "application/json"}
        )
    assert broken.status_code == 422 and broken.json()["detail"][0]["type"] == "json_invalid"
    assert latin1.status_code == 400 and "not valid UTF-8" in latin1.json()["detail"]


async def test_readyz_is_503_until_the_bundle_is_loaded(serve, settings):
    async with serve(settings(), lifespan=False) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 503
        assert (await client.post("/classify", json={"text": NOTES[0]})).status_code == 503
    async with serve(settings()) as client:
        assert (await client.get("/readyz")).json() == {"status": "ready"}


async def test_model_endpoint_reports_manifest_and_card_summary(serve, settings, tiny_bundle_dir):
    manifest = load_bundle(tiny_bundle_dir).manifest
    async with serve(settings()) as client:
        info = (await client.get("/v1/model")).json()
    assert info["threshold"] == manifest.decision.threshold
    assert info["threshold_policy"] == manifest.decision.policy
    assert info["test_metrics"] == manifest.test_metrics
    assert info["max_note_tokens"] == manifest.max_input_tokens
    assert info["manifest"]["name"] == manifest.name and "emergency" in info["intended_use"]


async def test_metrics_count_requests_by_route_and_status(serve, settings):
    async with serve(settings()) as client:
        await client.post("/classify", json={"text": NOTES[0]})
        await client.post("/classify", json={"notes": []})
        text = (await client.get("/metrics")).text
    requests = metric_samples(text, "triage_http_requests")
    assert requests[("triage_http_requests_total", (("route", "/classify"), ("status", "200")))] == 1
    assert requests[("triage_http_requests_total", (("route", "/classify"), ("status", "422")))] == 1
    assert "triage_inference_duration_seconds_count" in text and "triage_queue_depth" in text


async def test_note_text_and_ids_never_reach_the_logs(serve, settings, caplog, capsys):
    marker = "ZQX-MARKER-7731"
    caplog.set_level(logging.DEBUG)
    async with serve(settings(max_note_tokens=16, truncation="refuse")) as client:
        await client.post("/classify", json={"notes": [{"id": f"id-{marker}", "text": f"CC: seizure {marker}"}]})
        await client.post("/classify", json={"notes": [{"id": marker, "text": marker}, {"id": marker, "text": "b"}]})
        await client.post("/classify", json={"text": f"{marker} " * 50})
        await client.post("/classify", json={"text": marker, "extra": marker})
    access = [record for record in caplog.records if record.name == "app.access"]
    assert [record.fields["status"] for record in access] == [200, 422, 413, 422]
    formatted = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    captured = capsys.readouterr()
    assert marker not in formatted + caplog.text + captured.out + captured.err
    assert all(json.loads(line)["message"] for line in formatted.splitlines())


async def test_an_unexpected_error_is_a_500_logged_by_type_only(serve, settings, monkeypatch, caplog):
    marker = "ZQX-ERROR-4410"

    def broken_encode(self, texts):
        raise RuntimeError(f"cannot encode {texts[0]}")

    async with serve(settings()) as client:
        monkeypatch.setattr(NoteClassifier, "encode", broken_encode)
        response = await client.post("/classify", json={"text": marker})
    assert response.status_code == 500 and response.json() == {"detail": "internal error"}
    [error] = [record for record in caplog.records if record.getMessage() == "unhandled error"]
    assert error.fields["error"] == "RuntimeError"
    assert marker not in caplog.text + "\n".join(JsonFormatter().format(record) for record in caplog.records)
