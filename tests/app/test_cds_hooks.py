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

from app.bundle import MANIFEST_FILE, load_bundle
from app.cds_hooks import CONTEXT_NOTE_KEY, PREFETCH_KEY, SERVICE_ID
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


def triage_note(text: str, document_id: str = "doc-1", patient: str = "p-1") -> dict:
    return {
        "resourceType": "DocumentReference",
        "id": document_id,
        "status": "current",
        "subject": {"reference": f"Patient/{patient}"},
        "content": [{"attachment": {"contentType": "text/plain", "data": base64.b64encode(text.encode()).decode()}}],
    }


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
    assert service["prefetch"][PREFETCH_KEY].startswith("DocumentReference?patient={{context.patientId}}&")


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
    assert card["source"] == {"label": f"ED triage classifier ({bundle.manifest.name} {bundle.manifest.version})"}


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


async def test_the_service_needs_the_api_key_but_discovery_does_not(serve, tiny_bundle_dir):
    async with serve(Settings(bundle=tiny_bundle_dir, api_keys=["k1"])) as client:
        assert (await client.get("/cds-services")).status_code == 200
        body = hook_request(**{CONTEXT_NOTE_KEY: NOTES[0]})
        assert (await client.post(SERVICE_PATH, json=body)).status_code == 401
        authorized = await client.post(SERVICE_PATH, json=body, headers={"Authorization": "Bearer k1"})
        assert authorized.status_code == 200


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
