"""CDS Hooks discovery and the triage-note service with the real tiny bundle. All notes are SYNTHETIC.

Which side of the threshold a note falls on is set through the bundle, not the note: copies of the tiny
bundle with threshold 0 (every probability is at or above it: emergency) and 1 (the tiny model's
probabilities stay below 1: non-emergency).
"""

import base64
import json
import logging
import shutil
import uuid
from pathlib import Path

import httpx
import pytest

from app.bundle import MANIFEST_FILE, MODEL_CARD_FILE, load_bundle
from app.cds_hooks import (
    CONTEXT_NOTE_KEY,
    FEEDBACK_PATH,
    OVERRIDE_REASON_SYSTEM,
    PREFETCH_KEY,
    SERVICE_ID,
    code_span,
)
from app.inference import NoteClassifier
from app.logs import JsonFormatter
from app.main import create_app
from app.settings import Settings

pytestmark = pytest.mark.anyio

NOTES = ["3세 남아 보호자 동반 CC: seizure. BT 39.1, HR 150", "CC: medication refill. BT 36.5"]
SERVICE_PATH = f"/cds-services/{SERVICE_ID}"


@pytest.fixture(scope="module")
def bundle_with_threshold(tiny_bundle_dir, tmp_path_factory):
    """A copy of the tiny bundle whose manifest has the given decision threshold."""

    def make(threshold: float) -> Path:
        root = tmp_path_factory.mktemp(f"threshold-{threshold}")
        copy = Path(shutil.copytree(tiny_bundle_dir, root / "bundle"))
        manifest = json.loads((copy / MANIFEST_FILE).read_text())
        manifest["decision"]["threshold"] = threshold
        (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
        return copy

    return make


def hook_request(prefetch: dict | None = None, **context) -> dict:
    request = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/u-1", "patientId": "p-1", **context},
    }
    if prefetch is not None:
        request["prefetch"] = prefetch
    return request


def triage_note(text: str, document_id: str = "doc-1", patient: str = "p-1", encounter: str | None = None) -> dict:
    note = {
        "resourceType": "DocumentReference",
        "id": document_id,
        "status": "current",
        "subject": {"reference": f"Patient/{patient}"},
        "content": [{"attachment": {"contentType": "text/plain", "data": base64.b64encode(text.encode()).decode()}}],
    }
    if encounter is not None:
        note["context"] = {"encounter": [{"reference": f"Encounter/{encounter}"}]}
    return note


def searchset(*resources: dict) -> dict:
    return {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}


async def test_discovery_lists_the_triage_note_service():
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(Settings(bundle=Path("unused")))), base_url="http://test"
    ) as client:
        response = await client.get("/cds-services")
    assert response.status_code == 200
    [service] = response.json()["services"]
    assert service["id"] == SERVICE_ID and service["hook"] == "patient-view" and service["description"]
    assert set(service["prefetch"]) == {PREFETCH_KEY}
    assert service["prefetch"][PREFETCH_KEY].startswith(
        "DocumentReference?patient={{context.patientId}}&encounter={{context.encounterId}}&"
    )
    assert "&status=current&" in service["prefetch"][PREFETCH_KEY]


async def test_a_note_at_or_above_the_threshold_gets_a_critical_card(serve, bundle_with_threshold):
    path = bundle_with_threshold(0.0)
    bundle = load_bundle(path)
    async with serve(Settings(bundle=path)) as client:
        response = await client.post(SERVICE_PATH, json=hook_request({PREFETCH_KEY: triage_note(NOTES[0])}))
    assert response.status_code == 200
    [card] = response.json()["cards"]
    assert card["indicator"] == "critical" and len(card["summary"]) < 140 and "EMERGENCY" in card["summary"]
    probability = float(NoteClassifier.from_bundle(bundle).predict_proba([NOTES[0]])[0])
    detail = card["detail"]
    assert f"{probability:.3f}" in detail and "**Threshold:** 0.000" in detail
    assert f"`{bundle.manifest.decision.policy}`" in detail
    assert f"{bundle.manifest.name} {bundle.manifest.version}" in detail and "not a diagnosis" in detail
    assert "DocumentReference/doc-1" in detail
    model_card = "http://test/model-card"
    assert card["source"] == {
        "label": f"ED triage classifier ({bundle.manifest.name} {bundle.manifest.version})",
        "url": model_card,
    }
    assert card["links"] == [{"label": card["links"][0]["label"], "url": model_card, "type": "absolute"}]
    assert uuid.UUID(card["uuid"]).version == 4
    assert {reason["system"] for reason in card["overrideReasons"]} == {OVERRIDE_REASON_SYSTEM}


async def test_cards_link_to_the_model_card_served_by_the_service(serve, tiny_bundle_dir):
    settings = Settings(bundle=tiny_bundle_dir, public_url="https://triage.example.org/")
    async with serve(settings) as client:
        response = await client.post(SERVICE_PATH, json=hook_request(**{CONTEXT_NOTE_KEY: NOTES[0]}))
        [card] = response.json()["cards"]
        assert card["source"]["url"] == "https://triage.example.org/model-card"
        model_card = await client.get(httpx.URL(card["source"]["url"]).path)
    assert model_card.status_code == 200 and model_card.headers["content-type"].startswith("text/plain")
    assert model_card.text == (tiny_bundle_dir / MODEL_CARD_FILE).read_text(encoding="utf-8")


async def test_every_card_has_its_own_uuid(serve, tiny_bundle_dir):
    async with serve(Settings(bundle=tiny_bundle_dir)) as client:
        prefetched = searchset(*(triage_note(NOTES[i % 2], f"doc-{i}") for i in range(3)))
        responses = [await client.post(SERVICE_PATH, json=hook_request({PREFETCH_KEY: prefetched})) for _ in range(2)]
    uuids = [card["uuid"] for response in responses for card in response.json()["cards"]]
    assert len(uuids) == 6 and len(set(uuids)) == 6


async def test_the_detail_lists_the_words_the_output_is_most_sensitive_to(serve, tiny_bundle_dir):
    body = hook_request(**{CONTEXT_NOTE_KEY: NOTES[0]})
    async with serve(Settings(bundle=tiny_bundle_dir)) as client:
        [card] = (await client.post(SERVICE_PATH, json=body)).json()["cards"]
        classify = await client.post("/classify", json={"text": NOTES[0], "explain": True})
    [result] = classify.json()["results"]
    expected = [f"- ` {item['word']} ` {item['contribution']:+.3f}" for item in result["explanation"]]
    assert "**Words the model's output is most sensitive to**" in card["detail"] and expected
    assert "\n".join(expected) in card["detail"]


async def test_cards_go_without_explanations_when_off_or_over_the_word_cap(serve, tiny_bundle_dir):
    body = hook_request(**{CONTEXT_NOTE_KEY: NOTES[0]})
    async with serve(Settings(bundle=tiny_bundle_dir, cds_explain=False)) as client:
        [off] = (await client.post(SERVICE_PATH, json=body)).json()["cards"]
    async with serve(Settings(bundle=tiny_bundle_dir, explain_max_words=3)) as client:
        over = await client.post(SERVICE_PATH, json=body)
    assert "Words the model" not in off["detail"] and "not computed" not in off["detail"]
    assert over.status_code == 200 and "not computed: more than 3 words" in over.json()["cards"][0]["detail"]


def test_a_word_with_backticks_stays_one_code_span():
    assert code_span("BT") == "` BT `" and code_span("a`b``c") == "``` a`b``c ```"


async def test_a_note_below_the_threshold_gets_an_info_card(serve, bundle_with_threshold):
    async with serve(Settings(bundle=bundle_with_threshold(1.0))) as client:
        in_context = await client.post(SERVICE_PATH, json=hook_request(**{CONTEXT_NOTE_KEY: NOTES[1]}))
        prefetched = await client.post(
            SERVICE_PATH,
            json=hook_request(
                {PREFETCH_KEY: searchset(triage_note(NOTES[0], "doc-1"), triage_note(NOTES[1], "doc-2"))}
            ),
        )
    [card] = in_context.json()["cards"]
    assert card["indicator"] == "info" and "non-emergency" in card["summary"]
    assert "**Threshold:** 1.000" in card["detail"]
    assert [card["indicator"] for card in prefetched.json()["cards"]] == ["info", "info"]
    assert "DocumentReference/doc-2" in prefetched.json()["cards"][1]["detail"]


async def test_no_triage_note_means_no_cards_and_a_missing_prefetch_means_412(serve, tiny_bundle_dir):
    async with serve(Settings(bundle=tiny_bundle_dir)) as client:
        null_prefetch = await client.post(SERVICE_PATH, json=hook_request({PREFETCH_KEY: None}))
        empty_search = await client.post(SERVICE_PATH, json=hook_request({PREFETCH_KEY: searchset()}))
        missing = await client.post(SERVICE_PATH, json=hook_request({"patient": {"resourceType": "Patient"}}))
    assert null_prefetch.json() == empty_search.json() == {"cards": []}
    assert missing.status_code == 412 and PREFETCH_KEY in missing.json()["detail"]
    assert "needs context.encounterId" in missing.json()["detail"]


async def test_a_prefetched_note_must_be_of_the_encounter_in_context(serve, tiny_bundle_dir):
    async with serve(Settings(bundle=tiny_bundle_dir)) as client:
        this_visit = await client.post(
            SERVICE_PATH, json=hook_request({PREFETCH_KEY: triage_note(NOTES[0], encounter="e-1")}, encounterId="e-1")
        )
        other_visit = await client.post(
            SERVICE_PATH, json=hook_request({PREFETCH_KEY: triage_note(NOTES[0], encounter="e-0")}, encounterId="e-1")
        )
        no_encounter = await client.post(
            SERVICE_PATH, json=hook_request({PREFETCH_KEY: triage_note(NOTES[0])}, encounterId="e-1")
        )
    assert this_visit.status_code == 200 and len(this_visit.json()["cards"]) == 1
    assert other_visit.status_code == no_encounter.status_code == 400
    assert "context.encounterId" in other_visit.json()["detail"]


MARKER = "ZQX-CDS-3307"


@pytest.mark.parametrize(
    ("request_body", "status"),
    [
        ({"hook": "patient-view", "context": {"patientId": "p-1", CONTEXT_NOTE_KEY: MARKER}}, 400),
        (hook_request(**{CONTEXT_NOTE_KEY: MARKER}) | {"hook": "order-sign"}, 400),
        ({"hook": "patient-view", "hookInstance": "h-1"}, 400),
        (hook_request(**{CONTEXT_NOTE_KEY: "   "}), 400),
        (hook_request({PREFETCH_KEY: triage_note(MARKER, patient="someone-else")}), 400),
        (hook_request({PREFETCH_KEY: {"resourceType": "Observation", "valueString": MARKER}}), 422),
        (hook_request({PREFETCH_KEY: triage_note(MARKER) | {"status": None, "priority": MARKER}}), 400),
    ],
)
async def test_malformed_requests_are_refused_without_the_note(serve, tiny_bundle_dir, request_body, status):
    async with serve(Settings(bundle=tiny_bundle_dir)) as client:
        response = await client.post(SERVICE_PATH, json=request_body)
    assert response.status_code == status
    assert MARKER not in response.text


def feedback(card: str, outcome: str = "overridden", **fields) -> dict:
    return {"feedback": [{"card": card, "outcome": outcome, "outcomeTimestamp": "2025-01-01T08:00:00Z", **fields}]}


def reason(code: str, system: str = OVERRIDE_REASON_SYSTEM) -> dict:
    return {"reason": {"code": code, "system": system}, "userComment": MARKER}


async def test_feedback_is_counted_by_outcome_and_known_reason(serve, tiny_bundle_dir, caplog):
    caplog.set_level(logging.INFO)
    async with serve(Settings(bundle=tiny_bundle_dir)) as client:
        response = await client.post(SERVICE_PATH, json=hook_request(**{CONTEXT_NOTE_KEY: NOTES[0]}))
        [card] = response.json()["cards"]
        known = card["overrideReasons"][0]["code"]
        answers = [
            await client.post(FEEDBACK_PATH, json=body)
            for body in (
                feedback(card["uuid"], overrideReason=reason(known)),
                feedback(card["uuid"], overrideReason=reason(f"{MARKER}-free-text-code")),
                feedback(card["uuid"], overrideReason=reason(known, system="http://another.example.org/reasons")),
                feedback(card["uuid"], "accepted", acceptedSuggestions=[]),
                feedback(str(uuid.uuid4())),
            )
        ]
        metrics = (await client.get("/metrics")).text
    assert [answer.status_code for answer in answers] == [200] * 5
    labels = f'service="{SERVICE_ID}"'
    assert f'triage_cds_feedback_total{{outcome="overridden",reason="{known}",{labels}}} 1.0' in metrics
    assert f'triage_cds_feedback_total{{outcome="overridden",reason="other",{labels}}} 2.0' in metrics
    assert f'triage_cds_feedback_total{{outcome="accepted",reason="none",{labels}}} 1.0' in metrics
    assert f'triage_cds_feedback_total{{outcome="overridden",reason="none",{labels}}} 1.0' in metrics
    assert f"triage_cds_feedback_unknown_card_total{{{labels}}} 1.0" in metrics
    assert MARKER not in metrics + caplog.text


@pytest.mark.parametrize(
    "body",
    [
        {"feedback": []},
        feedback("c-1", outcome="dismissed"),
        feedback("c-1", "accepted", overrideReason=reason("note-incomplete")),
        {"feedback": [{"card": "c-1", "outcome": "overridden"}]},
        feedback("c-1", outcomeTimestamp=MARKER),
    ],
    ids=["empty", "unknown-outcome", "reason-when-accepted", "no-timestamp", "bad-timestamp"],
)
async def test_malformed_feedback_is_refused_without_echoing_it(serve, body):
    async with serve(Settings(bundle=Path("unused")), lifespan=False) as client:
        response = await client.post(FEEDBACK_PATH, json=body)
    assert response.status_code == 400 and response.json()["detail"][0]["msg"]
    assert MARKER not in response.text


async def test_a_browser_harness_passes_the_cors_preflight(serve, tiny_bundle_dir):
    origin = "https://sandbox.cds-hooks.org"
    async with serve(Settings(bundle=tiny_bundle_dir, api_keys=["k1"], cors_origins=[origin])) as client:
        preflight = await client.options(
            SERVICE_PATH,
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        other_origin = await client.options(
            SERVICE_PATH,
            headers={"Origin": "https://elsewhere.example.org", "Access-Control-Request-Method": "POST"},
        )
        body = hook_request(**{CONTEXT_NOTE_KEY: NOTES[0]})
        refused = await client.post(SERVICE_PATH, json=body, headers={"Origin": origin})
        answered = await client.post(SERVICE_PATH, json=body, headers={"Origin": origin, "Authorization": "Bearer k1"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert other_origin.status_code == 400 and "access-control-allow-origin" not in other_origin.headers
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == origin
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == origin
    assert "x-request-id" in answered.headers["access-control-expose-headers"].lower()


async def test_the_service_needs_the_api_key_but_discovery_does_not(serve, tiny_bundle_dir):
    async with serve(Settings(bundle=tiny_bundle_dir, api_keys=["k1"])) as client:
        assert (await client.get("/cds-services")).status_code == 200
        body = hook_request(**{CONTEXT_NOTE_KEY: NOTES[0]})
        assert (await client.post(SERVICE_PATH, json=body)).status_code == 401
        authorized = await client.post(SERVICE_PATH, json=body, headers={"Authorization": "Bearer k1"})
        assert authorized.status_code == 200
        feedback_body = feedback(authorized.json()["cards"][0]["uuid"])
        assert (await client.post(FEEDBACK_PATH, json=feedback_body)).status_code == 401
        assert (await client.get("/model-card")).status_code == 200


async def test_note_text_and_patient_ids_never_reach_the_logs(serve, tiny_bundle_dir, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    async with serve(Settings(bundle=tiny_bundle_dir, max_note_tokens=16, truncation="refuse")) as client:
        ok = await client.post(
            SERVICE_PATH,
            json=hook_request(
                {PREFETCH_KEY: triage_note(f"CC: seizure {MARKER}", document_id=MARKER, patient=MARKER)},
                patientId=MARKER,
            ),
        )
        in_context = await client.post(SERVICE_PATH, json=hook_request(**{CONTEXT_NOTE_KEY: f"{MARKER} CC: syncope"}))
        too_long = await client.post(SERVICE_PATH, json=hook_request(**{CONTEXT_NOTE_KEY: f"{MARKER} " * 50}))
        malformed = await client.post(SERVICE_PATH, json={"hook": MARKER, "context": {CONTEXT_NOTE_KEY: MARKER}})
    assert [ok.status_code, in_context.status_code, too_long.status_code, malformed.status_code] == [200, 200, 413, 400]
    access = [record for record in caplog.records if record.name == "app.access"]
    assert [record.fields["route"] for record in access] == [SERVICE_PATH] * 4
    formatted = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    captured = capsys.readouterr()
    assert MARKER not in formatted + caplog.text + captured.out + captured.err
