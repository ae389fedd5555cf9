"""Every kind of FHIR resource the service emits, checked by a validator that shares no code with it: the npm
package `fhir` (FHIR.js, HL7's R4 definitions), run by tools/fhir-validator/validate.js, which `make test`
installs (`make fhir-validator`: npm ci).

All notes are SYNTHETIC."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from app.fhir import CLASSIFY_PATH, FHIR_JSON
from app.fhir_definitions import CODE_SYSTEMS

pytestmark = pytest.mark.anyio

VALIDATOR = Path(__file__).resolve().parents[2] / "tools" / "fhir-validator"
NOTE = "CC: chest pain. BT 38.9, HR 150"
FHIR_HEADERS = {"Content-Type": FHIR_JSON}


def validate(resources: dict[str, dict], directory: Path) -> subprocess.CompletedProcess[str]:
    """Runs the validator on each resource, saved as `directory/NAME.json`."""
    node = shutil.which("node")
    assert node is not None, "Node.js is not on PATH: the FHIR validator needs it (then `make fhir-validator`)"
    assert (VALIDATOR / "node_modules" / "fhir").is_dir(), (
        "the FHIR validator is not installed: run `make fhir-validator` (npm ci in tools/fhir-validator)"
    )
    files = []
    for name, resource in resources.items():
        files.append(directory / f"{name}.json")
        files[-1].write_text(json.dumps(resource), encoding="utf-8")
    return subprocess.run(
        [node, str(VALIDATOR / "validate.js"), *map(str, files)], capture_output=True, text=True, timeout=120
    )


def text_note(*notes: str, explain: bool = False) -> dict:
    return {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "subject", "valueReference": {"reference": "Patient/p-1"}},
            *({"name": "note", "valueString": note} for note in notes),
            {"name": "explain", "valueBoolean": explain},
        ],
    }


async def test_every_resource_the_service_emits_is_valid_fhir_r4(serve, settings, tmp_path):
    document = {
        "resourceType": "DocumentReference",
        "id": "doc-1",
        "status": "current",
        "subject": {"reference": "Patient/p-1"},
        "content": [{"attachment": {"contentType": "text/plain", "data": "Q0M6IGNoZXN0IHBhaW4="}}],
    }
    async with serve(settings(api_keys=["k1"], max_note_tokens=16)) as client:
        auth = {**FHIR_HEADERS, "Authorization": "Bearer k1"}
        emitted = {
            "CapabilityStatement": (await client.get("/fhir/metadata")).json(),
            "OperationDefinition": (await client.get("/fhir/OperationDefinition/classify")).json(),
            **{
                f"CodeSystem-{code_system_id}": (await client.get(f"/fhir/CodeSystem/{code_system_id}")).json()
                for code_system_id in CODE_SYSTEMS
            },
            "RiskAssessment": (await client.post(CLASSIFY_PATH, json=document, headers=auth)).json(),
            "Bundle": (
                await client.post(CLASSIFY_PATH, json=text_note(NOTE, NOTE * 3, explain=True), headers=auth)
            ).json(),
            "OperationOutcome-422": (await client.post(CLASSIFY_PATH, json=text_note(" "), headers=auth)).json(),
            "OperationOutcome-401": (await client.post(CLASSIFY_PATH, json=document, headers=FHIR_HEADERS)).json(),
            "OperationOutcome-404": (await client.get("/fhir/CodeSystem/none")).json(),
        }
    emitted["Device"] = emitted["RiskAssessment"]["contained"][0]
    emitted["Parameters-request"] = text_note(NOTE)  # the documented way to call $classify
    kinds = {resource["resourceType"] for resource in emitted.values()}
    assert kinds == {
        "CapabilityStatement",
        "OperationDefinition",
        "CodeSystem",
        "RiskAssessment",
        "Bundle",
        "OperationOutcome",
        "Device",
        "Parameters",
    }
    assert [entry["resource"]["resourceType"] for entry in emitted["Bundle"]["entry"]] == ["RiskAssessment"] * 2
    assert all(len(entry["resource"]["note"]) == 2 for entry in emitted["Bundle"]["entry"])  # explained
    result = validate(emitted, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == f"{len(emitted)} resources, 0 errors", result.stdout


def test_the_validator_finds_errors(tmp_path):
    """It is not a no-op: a RiskAssessment without its required status and subject, with an element R4 does not
    have and a code outside its value set, is refused."""
    broken = {
        "resourceType": "RiskAssessment",
        "prediction": [{"probabilityDecimal": 0.5, "qualitativeRisk": {"text": "high"}}],
        "basedOn": {"reference": "ServiceRequest/1"},
        "occurrence": "2024-01-01",
        "contained": [{"resourceType": "Device", "id": "model", "deviceName": [{"name": "m", "type": "nonsense"}]}],
    }
    result = validate({"broken": broken}, tmp_path)
    assert result.returncode == 1
    for problem in (
        "RiskAssessment.status: Missing property",
        "RiskAssessment.subject: Missing property",
        "RiskAssessment.occurrence: Unexpected property",
        'Device.deviceName[0].type: Code "nonsense" not found in value set',
    ):
        assert problem in result.stdout, result.stdout
