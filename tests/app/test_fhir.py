"""POST /fhir/RiskAssessment/$classify with the real tiny bundle, through the app's lifespan; the definitions
served beside it (CapabilityStatement, OperationDefinition, CodeSystems).

All notes are SYNTHETIC."""

import base64
import logging
import time
from importlib.metadata import version

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.codesystem import CodeSystem
from fhir.resources.R4B.operationdefinition import OperationDefinition
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.riskassessment import RiskAssessment

from app.bundle import load_bundle
from app.fhir import CLASSIFY_PATH, FHIR_JSON, _code_span
from app.fhir_definitions import (
    CODE_SYSTEMS,
    DEVICE_ID,
    METHOD_SYSTEM,
    MODEL_SHA256_SYSTEM,
    OPERATION_URL,
    OUTCOME_SYSTEM,
    RISK_PROBABILITY,
)
from app.fhir_notes import PARAMETER_NAMES
from app.inference import NoteClassifier
from app.logs import JsonFormatter

pytestmark = pytest.mark.anyio

NOTES = ["3세 남아 보호자 동반 CC: seizure. BT 39.1, HR 150", "CC: medication refill. BT 36.5", "CC: chest pain"]
FHIR_HEADERS = {"Content-Type": FHIR_JSON}


@pytest.fixture(scope="module")
def bundle(tiny_bundle_dir):
    return load_bundle(tiny_bundle_dir)


def attachment(text: str, content_type: str = "text/plain; charset=utf-8", encoding: str = "utf-8") -> dict:
    return {"contentType": content_type, "data": base64.b64encode(text.encode(encoding)).decode("ascii")}


def document(text: str, document_id: str | None = "doc-1", **attachment_options) -> dict:
    resource = {
        "resourceType": "DocumentReference",
        "status": "current",
        "subject": {"reference": "Patient/p-1"},
        "context": {"encounter": [{"reference": "Encounter/e-1"}]},
        "content": [{"attachment": attachment(text, **attachment_options)}],
    }
    if document_id is not None:
        resource["id"] = document_id
    return resource


def parameters(*parameter: dict) -> dict:
    return {"resourceType": "Parameters", "parameter": list(parameter)}


SUBJECT = {"name": "subject", "valueReference": {"reference": "Patient/p-1"}}


async def post_fhir(client: httpx.AsyncClient, resource: dict, **options) -> httpx.Response:
    return await client.post(
        CLASSIFY_PATH, json=resource, headers={**FHIR_HEADERS, **options.pop("headers", {})}, **options
    )


def outcome_of(response: httpx.Response) -> OperationOutcome:
    assert response.headers["content-type"] == FHIR_JSON
    outcome = OperationOutcome.model_validate(response.json())
    assert [issue.severity for issue in outcome.issue] == ["error"]
    return outcome


async def test_a_document_reference_gets_a_valid_risk_assessment(serve, settings, bundle):
    async with serve(settings()) as client:
        response = await post_fhir(client, document(NOTES[0]))
    assert response.status_code == 200 and response.headers["content-type"] == FHIR_JSON
    assessment = RiskAssessment.model_validate(response.json())
    assert assessment.status == "final"
    assert assessment.subject.reference == "Patient/p-1" and assessment.encounter.reference == "Encounter/e-1"
    assert [basis.reference for basis in assessment.basis] == ["DocumentReference/doc-1"]
    [prediction] = assessment.prediction
    probability = float(NoteClassifier.from_bundle(bundle).predict_proba([NOTES[0]])[0])
    assert float(prediction.probabilityDecimal) == pytest.approx(probability, abs=1e-5)
    [outcome] = prediction.outcome.coding
    assert (outcome.system, outcome.code) == (OUTCOME_SYSTEM, "emergency")  # the outcome P is the probability of
    threshold = bundle.manifest.decision.threshold
    label = "emergency" if probability >= threshold else "non-emergency"
    [risk] = prediction.qualitativeRisk.coding
    assert (risk.system, risk.code) == (RISK_PROBABILITY, "high" if label == "emergency" else "low")
    assert prediction.qualitativeRisk.text == label
    [method] = assessment.method.coding
    assert (method.system, method.code) == (METHOD_SYSTEM, "note-classifier")
    assert f"{threshold:.4f}" in assessment.note[0].text
    assert assessment.occurrenceDateTime.tzinfo is not None
    [device] = assessment.contained
    assert assessment.performer.reference == f"#{device.id}" == f"#{DEVICE_ID}"
    [sha256] = device.identifier
    served = bundle.manifest.variants[bundle.variant]
    assert (sha256.system, sha256.value) == (MODEL_SHA256_SYSTEM, served.sha256) and served.file in sha256.type.text
    assert [version.value for version in device.version] == [bundle.manifest.version]
    assert device.deviceName[0].name == bundle.manifest.name


async def test_a_bundle_of_three_notes_gets_three_risk_assessments_in_order(serve, settings, bundle):
    entries = [{"resource": document(text, document_id=f"doc-{position}")} for position, text in enumerate(NOTES)]
    async with serve(settings()) as client:
        response = await post_fhir(
            client,
            {"resourceType": "Bundle", "type": "batch", "entry": entries},
            headers={"Content-Type": "application/json"},
        )
    assert response.status_code == 200
    result = Bundle.model_validate(response.json())
    assert result.type == "collection"
    assessments = [entry.resource for entry in result.entry]
    assert all(isinstance(assessment, RiskAssessment) for assessment in assessments)
    assert [a.basis[0].reference for a in assessments] == [
        "DocumentReference/doc-0",
        "DocumentReference/doc-1",
        "DocumentReference/doc-2",
    ]
    assert [float(a.prediction[0].probabilityDecimal) for a in assessments] == pytest.approx(
        NoteClassifier.from_bundle(bundle).predict_proba(NOTES).tolist(), abs=1e-5
    )


async def test_a_note_without_id_is_referenced_by_identifier_or_full_url(serve, settings):
    with_identifier = document(NOTES[1], document_id=None) | {"identifier": [{"system": "urn:ed", "value": "n7"}]}
    entries = [
        {"fullUrl": "urn:uuid:5b0c6f56-86c5-4d5c-9f87-1c3a3c1c1c1c", "resource": document(NOTES[0], None)},
        {"resource": with_identifier},
    ]
    async with serve(settings()) as client:
        response = await post_fhir(client, {"resourceType": "Bundle", "type": "transaction", "entry": entries})
    [by_url, by_identifier] = [entry.resource.basis[0] for entry in Bundle.model_validate(response.json()).entry]
    assert by_url.reference == "urn:uuid:5b0c6f56-86c5-4d5c-9f87-1c3a3c1c1c1c"
    assert by_identifier.type == "DocumentReference" and by_identifier.identifier.value == "n7"


async def test_base64_data_is_decoded_in_the_declared_charset(serve, settings, bundle):
    expected = float(NoteClassifier.from_bundle(bundle).predict_proba([NOTES[0]])[0])
    async with serve(settings()) as client:
        euc_kr = await post_fhir(
            client, document(NOTES[0], content_type="text/plain; charset=EUC-KR", encoding="euc-kr")
        )
        default_utf8 = await post_fhir(client, document(NOTES[0], content_type="text/plain"))
        mislabelled = await post_fhir(
            client, document(NOTES[0], content_type="text/plain; charset=utf-8", encoding="euc-kr")
        )
        unknown = await post_fhir(client, document(NOTES[1], content_type="text/plain; charset=no-such-charset"))
    for response in (euc_kr, default_utf8):
        probability = RiskAssessment.model_validate(response.json()).prediction[0].probabilityDecimal
        assert float(probability) == pytest.approx(expected, abs=1e-5)
    assert mislabelled.status_code == 422 and outcome_of(mislabelled).issue[0].code == "invalid"
    assert "not valid utf-8" in outcome_of(mislabelled).issue[0].diagnostics
    assert (
        unknown.status_code == 422
        and "charset in contentType is not one of" in outcome_of(unknown).issue[0].diagnostics
    )


async def test_a_communication_is_classified_from_its_text_payloads(serve, settings, bundle):
    communication = {
        "resourceType": "Communication",
        "id": "msg-9",
        "status": "completed",
        "subject": {"reference": "Patient/p-2"},
        "encounter": {"reference": "Encounter/e-2"},
        "payload": [
            {"contentString": NOTES[2]},
            {"contentAttachment": attachment("BT 38.9", "text/plain")},
            {"contentAttachment": {"contentType": "image/png", "data": "iVBORw0KGgo="}},
        ],
    }
    async with serve(settings()) as client:
        response = await post_fhir(client, communication)
    assert response.status_code == 200
    assessment = RiskAssessment.model_validate(response.json())
    assert assessment.basis[0].reference == "Communication/msg-9"
    assert (assessment.subject.reference, assessment.encounter.reference) == ("Patient/p-2", "Encounter/e-2")
    expected = float(NoteClassifier.from_bundle(bundle).predict_proba([f"{NOTES[2]}\n\nBT 38.9"])[0])
    assert float(assessment.prediction[0].probabilityDecimal) == pytest.approx(expected, abs=1e-5)


async def test_parameters_give_notes_as_text_and_as_resources_answered_in_order(serve, settings, bundle):
    body = parameters(
        SUBJECT,
        {"name": "note", "valueString": NOTES[0]},
        {"name": "resource", "resource": document(NOTES[1])},
        {
            "name": "resource",
            "resource": {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": document(NOTES[2], "d2")}],
            },
        },
    )
    async with serve(settings()) as client:
        response = await post_fhir(client, body)
    assert response.status_code == 200
    assessments = [entry.resource for entry in Bundle.model_validate(response.json()).entry]
    assert [float(a.prediction[0].probabilityDecimal) for a in assessments] == pytest.approx(
        NoteClassifier.from_bundle(bundle).predict_proba(NOTES).tolist(), abs=1e-5
    )
    assert [a.subject.reference for a in assessments] == ["Patient/p-1"] * 3
    assert [a.basis[0].reference for a in assessments[1:]] == ["DocumentReference/doc-1", "DocumentReference/d2"]
    assert assessments[0].basis[0].display == "Parameters.parameter[1] of the request (note text)"
    assert assessments[0].encounter is None


async def test_one_note_in_parameters_gets_one_risk_assessment_and_the_subject_is_checked(serve, settings):
    async with serve(settings()) as client:
        one = await post_fhir(client, parameters({"name": "resource", "resource": document(NOTES[0])}))
        guarded = await post_fhir(client, parameters(SUBJECT, {"name": "resource", "resource": document(NOTES[0])}))
        other_patient = await post_fhir(
            client,
            parameters(
                {"name": "subject", "valueReference": {"reference": "Patient/p-2"}},
                {"name": "resource", "resource": document(NOTES[0])},
            ),
        )
        twice = await client.post(
            f"{CLASSIFY_PATH}?subject=Patient/p-1", json=parameters(SUBJECT), headers=FHIR_HEADERS
        )
    assert one.status_code == guarded.status_code == 200
    assert RiskAssessment.model_validate(one.json()).basis[0].reference == "DocumentReference/doc-1"
    assert other_patient.status_code == 422 and outcome_of(other_patient).issue[0].code == "business-rule"
    assert twice.status_code == 400 and "subject is given more than once" in outcome_of(twice).issue[0].diagnostics


MARKER = "ZQX-FHIR-5521"
SECRET_NOTE = f"CC: seizure {MARKER}"


@pytest.mark.parametrize(
    ("body", "status", "issue_code"),
    [
        (b'{"resourceType": "DocumentReference", "status": ', 400, "structure"),
        (b'["not", "a", "resource"]', 400, "structure"),
        ({"resourceType": "Patient", "id": "p-1"}, 422, "not-supported"),
        (
            {"resourceType": "Bundle", "type": "document", "entry": [{"resource": document(SECRET_NOTE)}]},
            422,
            "not-supported",
        ),
        (
            {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "Patient"}}]},
            422,
            "not-supported",
        ),
        ({"resourceType": "Bundle", "type": "collection"}, 422, "required"),
        ({key: value for key, value in document(SECRET_NOTE).items() if key != "status"}, 400, "structure"),
        (document(SECRET_NOTE) | {"priority": MARKER}, 400, "structure"),
        (
            document(SECRET_NOTE) | {"content": [{"attachment": {"contentType": "text/plain", "data": f"{MARKER}!"}}]},
            400,
            "structure",
        ),
        (document(SECRET_NOTE, content_type="application/pdf"), 422, "not-supported"),
        (
            document(SECRET_NOTE) | {"content": [{"attachment": {"contentType": "text/plain", "url": "http://x/n"}}]},
            422,
            "not-supported",
        ),
        (document(SECRET_NOTE) | {"content": [{"attachment": attachment(" \n\t ")}]}, 422, "required"),
        ({key: value for key, value in document(SECRET_NOTE).items() if key != "subject"}, 422, "required"),
        (
            {
                "resourceType": "Communication",
                "status": "completed",
                "subject": {"reference": "Patient/p"},
                "payload": [{"contentReference": {"reference": "Binary/b"}}],
            },
            422,
            "required",
        ),
        (
            {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": MARKER}}]},
            400,
            "structure",
        ),
        ({"resourceType": "Bundle", "type": "batch", "entry": [{"resource": {"resourceType": 5}}]}, 400, "structure"),
        ({"resourceType": "Parameters"}, 422, "required"),
        (parameters(SUBJECT, {"name": MARKER, "valueString": SECRET_NOTE}), 400, "not-supported"),
        (parameters({"name": "note", "valueString": SECRET_NOTE}), 422, "required"),
        (parameters(SUBJECT, {"name": "note", "valueString": "\u200b"}), 422, "required"),
        (parameters(SUBJECT, {"name": "note", "valueInteger": 5}), 400, "invalid"),
        (parameters(SUBJECT, SUBJECT, {"name": "note", "valueString": SECRET_NOTE}), 400, "invalid"),
        (
            parameters(
                {"name": "subject", "valueReference": {"reference": f"https://x.org/Patient/{MARKER}"}},
                {"name": "note", "valueString": SECRET_NOTE},
            ),
            400,
            "invalid",
        ),
        (parameters({"name": "resource", "resource": {"resourceType": "Patient", "id": MARKER}}), 422, "not-supported"),
        (parameters({"name": "resource", "resource": document(SECRET_NOTE) | {"priority": MARKER}}), 400, "structure"),
        (parameters(SUBJECT, {"name": "note", "valueString": SECRET_NOTE}, {"name": "explain"}), 400, "invalid"),
    ],
)
async def test_invalid_input_gets_an_operation_outcome_without_the_note(serve, settings, body, status, issue_code):
    content = body if isinstance(body, bytes) else None
    async with serve(settings()) as client:
        response = await client.post(
            CLASSIFY_PATH, content=content, json=None if content else body, headers=FHIR_HEADERS
        )
    assert response.status_code == status
    assert outcome_of(response).issue[0].code == issue_code
    assert MARKER not in response.text and base64.b64encode(SECRET_NOTE.encode()).decode() not in response.text


async def test_bodies_refused_before_routing_get_operation_outcomes_too(serve, settings):
    async with serve(settings(max_body_bytes=2_000)) as client:
        not_utf8 = await client.post(CLASSIFY_PATH, content=b'{"resourceType": "\xff"}', headers=FHIR_HEADERS)
        too_large = await client.post(CLASSIFY_PATH, content=b" " * 2_001, headers=FHIR_HEADERS)
        plain = await client.post(
            "/classify", content=b'{"text": "\xff"}', headers={"Content-Type": "application/json"}
        )
    assert not_utf8.status_code == 400 and outcome_of(not_utf8).issue[0].code == "structure"
    assert too_large.status_code == 413 and outcome_of(too_large).issue[0].code == "too-long"
    assert plain.status_code == 400 and "UTF-8" in plain.json()["detail"]


async def test_other_content_types_get_415(serve, settings):
    async with serve(settings()) as client:
        response = await client.post(CLASSIFY_PATH, content=NOTES[0].encode(), headers={"Content-Type": "text/plain"})
    assert response.status_code == 415 and outcome_of(response).issue[0].code == "not-supported"


async def test_auth_limits_and_timeouts_answer_as_operation_outcomes(serve, settings, monkeypatch):
    long_note = " ".join(["chest pain"] * 20)
    async with serve(settings(api_keys=["k1"], max_note_tokens=16, truncation="refuse")) as client:
        unauthorized = await post_fhir(client, document(NOTES[0]))
        too_long = await post_fhir(client, document(long_note), headers={"Authorization": "Bearer k1"})
    assert unauthorized.status_code == 401 and unauthorized.headers["www-authenticate"] == "Bearer"
    assert outcome_of(unauthorized).issue[0].code == "login"
    assert too_long.status_code == 413 and outcome_of(too_long).issue[0].code == "too-long"
    assert "exceed 16 tokens" in outcome_of(too_long).issue[0].diagnostics

    run = NoteClassifier.predict

    def slow_predict(self, token_ids):
        time.sleep(0.3)
        return run(self, token_ids)

    monkeypatch.setattr(NoteClassifier, "predict", slow_predict)
    async with serve(settings(request_timeout_s=0.05)) as client:
        timed_out = await post_fhir(client, document(NOTES[0]))
    assert timed_out.status_code == 503 and timed_out.headers["retry-after"]
    assert outcome_of(timed_out).issue[0].code == "transient"


async def test_truncated_notes_say_so_in_the_assessment(serve, settings):
    async with serve(settings(max_note_tokens=16)) as client:
        response = await post_fhir(client, document(" ".join(["chest pain"] * 40)))
    assert response.status_code == 200
    assert "first and last tokens, 16 in all" in RiskAssessment.model_validate(response.json()).note[0].text


async def test_note_text_ids_and_patients_never_reach_the_logs(serve, settings, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    resource = document(SECRET_NOTE, document_id=f"doc-{MARKER}")
    resource["subject"] = {"reference": f"Patient/{MARKER}"}
    async with serve(settings(max_note_tokens=16, truncation="refuse")) as client:
        ok = await post_fhir(client, resource, params={"explain": "true"})
        too_long = await post_fhir(client, document(f"{MARKER} " * 50, document_id=MARKER))
        invalid = await post_fhir(client, resource | {"date": MARKER})
        metrics = (await client.get("/metrics")).text
    assert [ok.status_code, too_long.status_code, invalid.status_code] == [200, 413, 400]
    access = [record for record in caplog.records if record.name == "app.access"]
    assert [record.fields["route"] for record in access[:3]] == [CLASSIFY_PATH] * 3
    assert access[0].fields["notes"] == 1 and access[2].fields["fhir_issue"] == "structure"
    formatted = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    captured = capsys.readouterr()
    assert MARKER not in formatted + caplog.text + captured.out + captured.err
    assert f'route="{CLASSIFY_PATH}",status="200"' in metrics


async def test_explanations_are_a_markdown_note_when_asked_for(serve, settings):
    async with serve(settings()) as client:
        by_parameter = await post_fhir(
            client,
            parameters(SUBJECT, {"name": "note", "valueString": NOTES[0]}, {"name": "explain", "valueBoolean": True}),
        )
        in_url = await post_fhir(client, document(NOTES[0]), params={"explain": "true"})
        plain = await post_fhir(client, document(NOTES[0]))
        twice = await post_fhir(
            client, parameters({"name": "explain", "valueBoolean": False}), params={"explain": "true"}
        )
        classify = await client.post("/classify", json={"text": NOTES[0], "explain": True})
    expected = [
        f"- `{word['word']}` (characters {word['start']}-{word['end']}): {word['contribution']:+.3f}"
        for word in classify.json()["results"][0]["explanation"]
    ]
    for response in (by_parameter, in_url):
        explanation = RiskAssessment.model_validate(response.json()).note[1]
        assert explanation.text.startswith("Explanation: the words whose deletion moves P(emergency) most")
        assert explanation.text.split("\n\n")[1].splitlines() == expected
    assert len(RiskAssessment.model_validate(plain.json()).note) == 1
    assert twice.status_code == 400 and "explain is given more than once" in outcome_of(twice).issue[0].diagnostics


def test_a_word_with_backticks_stays_one_code_span():
    assert _code_span("a`b``c") == "```a`b``c```" and _code_span("BT") == "`BT`"


async def test_the_statement_tells_cors_and_the_public_url(serve, settings):
    origins = ["https://ehr.example.org"]
    async with serve(settings(cors_origins=origins, public_url="https://triage.example.org/")) as client:
        metadata = await client.get("/fhir/metadata")
    statement = CapabilityStatement.model_validate(metadata.json())
    assert statement.implementation.url == "https://triage.example.org/fhir"
    [rest] = statement.rest
    assert rest.security.cors is True and "origins (CORS): https://ehr.example.org" in rest.security.description
    assert "open to anyone who can reach the service" in rest.security.description


async def test_the_definitions_are_served_without_a_token_and_match_the_operation(serve, settings):
    async with serve(settings(api_keys=["k1"])) as client:
        metadata = await client.get("/fhir/metadata")
        definition = await client.get("/fhir/OperationDefinition/classify")
        code_systems = [await client.get(f"/fhir/CodeSystem/{code_system_id}") for code_system_id in CODE_SYSTEMS]
        missing = await client.get("/fhir/CodeSystem/no-such-code-system")
    assert all(r.headers["content-type"] == FHIR_JSON for r in (metadata, definition, *code_systems))
    statement = CapabilityStatement.model_validate(metadata.json())
    assert (statement.kind, statement.fhirVersion, statement.format) == ("instance", "4.0.1", ["json"])
    assert (statement.software.name, statement.software.version) == ("dsgkd-triage", version("dsgkd-triage"))
    assert statement.implementation.url == "http://test/fhir"
    [rest] = statement.rest
    assert rest.security.cors is False and "needs `Authorization: Bearer <key>`" in rest.security.description
    assert [(r.type, [(o.name, o.definition) for o in r.operation or []]) for r in rest.resource] == [
        ("RiskAssessment", [("classify", OPERATION_URL)]),
        ("OperationDefinition", []),
        ("CodeSystem", []),
    ]
    operation = OperationDefinition.model_validate(definition.json())
    assert (operation.url, operation.code, operation.resource) == (OPERATION_URL, "classify", ["RiskAssessment"])
    assert operation.type and not operation.system and not operation.instance and not operation.affectsState
    assert [p.name for p in operation.parameter if p.use == "in"] == list(PARAMETER_NAMES)
    assert [(p.name, p.type, p.min, p.max) for p in operation.parameter if p.use == "out"] == [
        ("return", "Resource", 1, "1")
    ]
    served = [CodeSystem.model_validate(response.json()) for response in code_systems]
    assert [(c.url, [concept.code for concept in c.concept]) for c in served] == [
        (OUTCOME_SYSTEM, ["emergency"]),
        (METHOD_SYSTEM, ["note-classifier"]),
    ]
    assert missing.status_code == 404 and outcome_of(missing).issue[0].code == "not-found"
