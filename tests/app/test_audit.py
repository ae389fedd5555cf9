"""The audit trail, over HTTP with the real tiny bundle: every answer can be rebuilt from its audit record alone,
and no record holds note text or identifiers. All notes are SYNTHETIC."""

import hashlib
import json
import logging
import os
import stat
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from app.audit import AUDIT_SCHEMA
from app.cds_hooks import CONTEXT_NOTE_KEY, PREFETCH_KEY, SERVICE_ID
from app.fhir import CLASSIFY_PATH, FHIR_JSON
from app.settings import Settings
from tests.app.test_cds_hooks import hook_request, searchset, triage_note
from tests.app.test_fhir import document

pytestmark = pytest.mark.anyio

MARKER = "ZQX-AUDIT-6120"  # in every note text, note id, patient, encounter and user reference sent
NOTES = [f"CC: seizure {MARKER}. BT 39.1, HR 150", f"CC: medication refill {MARKER}. BT 36.5"]
CDS_PATH = f"/cds-services/{SERVICE_ID}"


def audit_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def classify_answer(record: dict, ids: list[str], texts: list[str]) -> dict:
    """The /classify body (explain: true) a record stands for, given the note ids and texts the caller keeps."""
    return {
        "model": {"name": record["model"]["name"], "version": record["model"]["version"]},
        "results": [
            {
                "id": note_id,
                "label": note["label"],
                "probability": note["probability"],
                "threshold": record["decision"]["threshold"],
                "truncated": note["truncated"],
                "explanation": [{"word": text[item["start"] : item["end"]]} | item for item in note["explanation"]],
            }
            for note_id, text, note in zip(ids, texts, record["notes"], strict=True)
        ],
    }


def fhir_prediction(record: dict, note: dict) -> dict:
    """What a RiskAssessment says of one note: probability, model, and the annotation comparing P with the threshold
    (which says the label)."""
    threshold, policy = record["decision"]["threshold"], record["decision"]["policy"]
    comparison = ">=" if note["label"] == "emergency" else "<"
    return {
        "probability": note["probability"],
        "method": f"Triage note classifier {record['model']['name']} {record['model']['version']}",
        "note": f"Emergency when P(emergency) >= threshold {threshold:.4f} (policy: {policy}); "
        f"here {note['probability']:.4f} {comparison} {threshold:.4f}.",
    }


def cds_card(record: dict, note: dict) -> dict:
    """A card's uuid, indicator, summary and source label, as the CDS Hooks service words them."""
    threshold, model = record["decision"]["threshold"], record["model"]
    emergency = note["label"] == "emergency"
    return {
        "uuid": note["card_uuid"],
        "indicator": "critical" if emergency else "info",
        "summary": f"Triage note suggests {'EMERGENCY' if emergency else 'non-emergency'}: "
        f"P = {note['probability']:.3f} {'≥' if emergency else '<'} threshold {threshold:.3f}",
        "source": f"ED triage classifier ({model['name']} {model['version']})",
    }


async def test_every_answer_can_be_rebuilt_from_its_audit_record_alone(serve, settings, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    audit_file = tmp_path / "audit.jsonl"
    fhir_bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"resource": document(text, document_id=f"doc-{MARKER}-{position}")}
            | {"fullUrl": f"urn:uuid:{MARKER}-{position}"}
            for position, text in enumerate(NOTES)
        ],
    }
    for entry in fhir_bundle["entry"]:
        entry["resource"]["subject"] = {"reference": f"Patient/{MARKER}"}
        entry["resource"]["context"] = {"encounter": [{"reference": f"Encounter/{MARKER}"}]}
    cds_prefetch = searchset(*(triage_note(text, f"doc-{MARKER}-{i}", MARKER) for i, text in enumerate(NOTES)))
    cds_body = hook_request({PREFETCH_KEY: cds_prefetch}, patientId=MARKER, userId=f"Practitioner/{MARKER}")
    texts, ids = [*NOTES, NOTES[0] * 9], [f"{MARKER}-{i}" for i in range(3)]
    async with serve(settings(audit_file=audit_file, max_note_tokens=64)) as client:
        classified = await client.post(
            "/classify",
            json={"notes": [{"id": i, "text": text} for i, text in zip(ids, texts, strict=True)], "explain": True},
            headers={"X-Request-ID": "req-classify"},
        )
        fhir = await client.post(CLASSIFY_PATH, json=fhir_bundle, headers={"Content-Type": FHIR_JSON})
        cds = await client.post(CDS_PATH, json=cds_body)
        no_note = await client.post(CDS_PATH, json=hook_request({PREFETCH_KEY: None}, patientId=MARKER))
        refused = await client.post(CDS_PATH, json=hook_request(patientId=MARKER))  # 412: nothing recommended
    assert [r.status_code for r in (classified, fhir, cds, no_note, refused)] == [200, 200, 200, 200, 412]

    lines = audit_lines(audit_file)
    records = {record["request_id"]: record for record in map(json.loads, lines)}
    assert len(records) == len(lines) == 4  # one per answered request; none for the refused one
    for response in (classified, fhir, cds, no_note):
        record = records[response.headers["x-request-id"]]
        assert record["audit_schema"] == AUDIT_SCHEMA and record["time"].endswith("+00:00")
        assert record["route"] == response.request.url.path
        assert record["model"]["variant"] in ("fp32", "int8", "fp16") and len(record["model"]["onnx_sha256"]) == 64
        assert record["calibration"]["method"] in ("none", "temperature", "platt")
    assert classified.headers["x-request-id"] == "req-classify"

    record = records["req-classify"]
    assert classified.json() == classify_answer(record, ids, texts)
    assert all(note["explanation"] for note in record["notes"])
    assert [note["truncated"] for note in record["notes"]] == [False, False, True]
    assert record["notes"][2]["tokens"] == record["truncation"]["max_note_tokens"] == 64
    assert [note["chars"] for note in record["notes"]] == [len(text) for text in texts]

    record = records[fhir.headers["x-request-id"]]
    assessments = [entry.resource for entry in Bundle.model_validate(fhir.json()).entry]
    for assessment, note in zip(assessments, record["notes"], strict=True):
        [prediction] = assessment.prediction
        assert fhir_prediction(record, note) == {
            "probability": float(prediction.probabilityDecimal),
            "method": assessment.method.text,
            "note": assessment.note[0].text,
        }

    record = records[cds.headers["x-request-id"]]
    assert record["hook_instance_sha256"] == hashlib.sha256(cds_body["hookInstance"].encode()).hexdigest()
    keys = ("uuid", "indicator", "summary")
    assert [{key: card[key] for key in keys} | {"source": card["source"]["label"]} for card in cds.json()["cards"]] == [
        cds_card(record, note) for note in record["notes"]
    ]
    assert records[no_note.headers["x-request-id"]]["notes"] == [] and no_note.json() == {"cards": []}

    stream = [record.fields for record in caplog.records if record.name == "triage.audit"]
    assert [json.loads(json.dumps(fields)) for fields in stream] == list(map(json.loads, lines))
    written = audit_file.read_text(encoding="utf-8") + json.dumps(stream, ensure_ascii=False)
    assert MARKER not in written and cds_body["hookInstance"] not in written


async def test_the_audit_file_is_private_and_rotates(serve, settings, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    audit_file = tmp_path / "audit.jsonl"
    old_umask = os.umask(0o022)
    try:
        async with serve(
            settings(audit_file=audit_file, audit_max_bytes=2000, audit_backups=2, audit_log_stream=False)
        ) as client:
            for request_number in range(12):
                response = await client.post(
                    "/classify", json={"text": NOTES[0]}, headers={"X-Request-ID": f"r{request_number}"}
                )
                assert response.status_code == 200
    finally:
        os.umask(old_umask)
    files = sorted(tmp_path.iterdir())
    assert [path.name for path in files] == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert {stat.S_IMODE(path.stat().st_mode) for path in files} == {0o600}
    assert all(path.stat().st_size <= 2000 for path in files)
    kept = [json.loads(line)["request_id"] for path in reversed(files) for line in audit_lines(path)]
    assert kept == [f"r{n}" for n in range(12 - len(kept), 12)] and len(kept) < 12  # the oldest rotated out
    assert not [record for record in caplog.records if record.name == "triage.audit"]


async def test_a_record_that_cannot_be_written_refuses_the_answer_counts_and_logs(serve, settings, caplog):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (every write fails: disk full)")
    caplog.set_level(logging.INFO)
    async with serve(settings(audit_file=Path("/dev/full"))) as client:
        classified = await client.post("/classify", json={"text": NOTES[0]}, headers={"X-Request-ID": "full-1"})
        fhir = await client.post(
            CLASSIFY_PATH, json=document(NOTES[0]), headers={"Content-Type": FHIR_JSON, "X-Request-ID": "full-2"}
        )
        cds = await client.post(
            CDS_PATH, json=hook_request(**{CONTEXT_NOTE_KEY: NOTES[1]}), headers={"X-Request-ID": "full-3"}
        )
        metrics = (await client.get("/metrics")).text
    assert [r.status_code for r in (classified, fhir, cds)] == [503, 503, 503]
    assert "audit record" in classified.json()["detail"] and "audit record" in cds.json()["detail"]
    assert fhir.json()["resourceType"] == "OperationOutcome" and fhir.json()["issue"][0]["code"] == "transient"
    [errors] = [f for f in text_string_to_metric_families(metrics) if f.name == "triage_audit_errors"]
    assert [sample.value for sample in errors.samples if sample.name == "triage_audit_errors_total"] == [3]
    logged = [record.fields for record in caplog.records if record.getMessage().startswith("audit record not written")]
    assert [fields["request_id"] for fields in logged] == ["full-1", "full-2", "full-3"]
    assert {fields["error"] for fields in logged} == {"OSError"}
    assert not [record for record in caplog.records if record.name == "triage.audit"]  # nothing shown as given


def test_the_audit_trail_must_go_somewhere(tiny_bundle_dir, tmp_path):
    with pytest.raises(ValidationError, match="audit trail would go nowhere"):
        Settings(bundle=tiny_bundle_dir, audit_log_stream=False)
    assert Settings(bundle=tiny_bundle_dir, audit_log_stream=False, audit_file=tmp_path / "a.jsonl").audit_file
