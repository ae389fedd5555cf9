"""$classify driven by fhirpy, a FHIR client library written elsewhere, against the real server (uvicorn) on a
loopback port: the way a hospital's integration code would call it.

All notes are SYNTHETIC."""

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.riskassessment import RiskAssessment
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import AuthorizationError, OperationOutcome

from app.fhir_definitions import OPERATION_URL, OUTCOME_SYSTEM

NOTES = ["CC: seizure. BT 39.1, HR 150", "CC: medication refill. BT 36.5"]
KEY = "test-key"


def test_fhirpy_discovers_the_operation_and_calls_it_with_parameters(running_server, settings):
    with running_server(settings(api_keys=[KEY])) as (host, port):
        base = f"http://{host}:{port}/fhir"
        client = SyncFHIRClient(base, authorization=f"Bearer {KEY}")
        statement = client.execute("metadata", method="get")
        definition = client.get("OperationDefinition", "classify")
        parameters = client.resource(
            "Parameters",
            parameter=[
                {"name": "subject", "valueReference": {"reference": "Patient/p-1"}},
                *({"name": "note", "valueString": note} for note in NOTES),
            ],
        )
        answer = client.execute("RiskAssessment/$classify", data=parameters.serialize())
        with pytest.raises(OperationOutcome) as refused:
            client.execute("RiskAssessment/$classify", data={"resourceType": "Parameters"})
        with pytest.raises(AuthorizationError):
            SyncFHIRClient(base).execute("RiskAssessment/$classify", data=parameters.serialize())

    [rest] = statement["rest"]
    [operation] = [o for r in rest["resource"] if r["type"] == "RiskAssessment" for o in r["operation"]]
    assert operation["definition"] == definition["url"] == OPERATION_URL
    assert statement["implementation"]["url"] == base
    assessments = [entry.resource for entry in Bundle.model_validate(answer).entry]
    assert all(isinstance(assessment, RiskAssessment) for assessment in assessments) and len(assessments) == 2
    for assessment in assessments:
        assert assessment.subject.reference == "Patient/p-1"
        assert assessment.prediction[0].outcome.coding[0].system == OUTCOME_SYSTEM
        assert 0 <= assessment.prediction[0].probabilityDecimal <= 1
    assert refused.value.resource["issue"][0]["code"] == "required"
