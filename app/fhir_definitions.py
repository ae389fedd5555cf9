"""The FHIR R4 definitions the service publishes, and the Device that its RiskAssessments name as performer.

- the CapabilityStatement (`GET /fhir/metadata`), a statement of kind `instance`: what this server does;
- the OperationDefinition of `$classify` (`GET /fhir/OperationDefinition/classify`);
- two CodeSystems (`GET /fhir/CodeSystem/{id}`): `triage-outcome`, the outcome a RiskAssessment predicts, and
  `triage-method`, how it was assessed.

A definition's canonical URL is CANONICAL_BASE followed by the path it is served at. Canonical URLs identify
definitions; no client needs to fetch them. The project has no domain of its own yet, so CANONICAL_BASE is
under `.invalid`, a domain reserved never to exist (RFC 2606). Change it once, before RiskAssessments are
stored anywhere: stored codings keep the system they were written with.
"""

from __future__ import annotations

from datetime import datetime
from importlib.metadata import version

from fhir.resources.R4B.capabilitystatement import (
    CapabilityStatement,
    CapabilityStatementImplementation,
    CapabilityStatementRest,
    CapabilityStatementRestResource,
    CapabilityStatementRestResourceInteraction,
    CapabilityStatementRestResourceOperation,
    CapabilityStatementRestSecurity,
    CapabilityStatementSoftware,
)
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.codesystem import CodeSystem, CodeSystemConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.device import Device, DeviceDeviceName, DeviceVersion
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.operationdefinition import OperationDefinition, OperationDefinitionParameter

from app.fhir_notes import BUNDLE_TYPES
from app.service import Service
from app.settings import Settings

SOFTWARE = "dsgkd-triage"
SOFTWARE_VERSION = version(SOFTWARE)
FHIR_VERSION = "4.0.1"
CANONICAL_BASE = "https://dsgkd-triage.invalid/fhir"
OPERATION_URL = f"{CANONICAL_BASE}/OperationDefinition/classify"
OUTCOME_SYSTEM = f"{CANONICAL_BASE}/CodeSystem/triage-outcome"
METHOD_SYSTEM = f"{CANONICAL_BASE}/CodeSystem/triage-method"
# Device.identifier system: the sha256 (hex) of the ONNX file the service runs, as listed in the bundle's manifest.
MODEL_SHA256_SYSTEM = f"{CANONICAL_BASE}/sid/onnx-sha256"
RISK_PROBABILITY = "http://terminology.hl7.org/CodeSystem/risk-probability"  # HL7's qualitative risk codes

EMERGENCY = Coding(system=OUTCOME_SYSTEM, code="emergency", display="Needs emergency care")
NOTE_CLASSIFIER = Coding(system=METHOD_SYSTEM, code="note-classifier", display="Triage note classifier")
# RiskAssessment.prediction.qualitativeRisk: high when P(emergency) is at or above the bundle's decision threshold
# (the note is labelled emergency), low below it.
HIGH_RISK = Coding(system=RISK_PROBABILITY, code="high", display="High likelihood")
LOW_RISK = Coding(system=RISK_PROBABILITY, code="low", display="Low likelihood")
DEVICE_ID = "model"  # the id of the Device contained in each RiskAssessment


def _code_system(url: str, coding: Coding, name: str, title: str, description: str, definition: str) -> CodeSystem:
    """The complete CodeSystem `url`, of one concept, `coding`."""
    return CodeSystem(
        id=url.rsplit("/", 1)[1],
        url=url,
        name=name,
        title=title,
        status="active",
        experimental=False,
        publisher=SOFTWARE,
        description=description,
        caseSensitive=True,
        content="complete",
        concept=[CodeSystemConcept(code=coding.code, display=coding.display, definition=definition)],
    )


CODE_SYSTEMS: dict[str, CodeSystem] = {
    str(code_system.id): code_system
    for code_system in [
        _code_system(
            OUTCOME_SYSTEM,
            EMERGENCY,
            "TriageOutcome",
            "Emergency-department triage outcome",
            "The outcome whose probability the triage classifier estimates (RiskAssessment.prediction.outcome).",
            "The patient needs emergency care, as judged at emergency-department triage.",
        ),
        _code_system(
            METHOD_SYSTEM,
            NOTE_CLASSIFIER,
            "TriageMethod",
            "Emergency-department triage assessment method",
            "How the service assesses the risk (RiskAssessment.method).",
            "The probability that the patient needs emergency care, estimated from the text of the triage note by a "
            "fine-tuned transformer encoder run with ONNX Runtime, calibrated as its model bundle's manifest says. "
            "The model is the RiskAssessment's performer (a Device).",
        ),
    ]
}


def _in(name: str, type_: str, max_: str, documentation: str) -> OperationDefinitionParameter:
    return OperationDefinitionParameter(name=name, use="in", min=0, max=max_, type=type_, documentation=documentation)


OPERATION_DEFINITION = OperationDefinition(
    id="classify",
    url=OPERATION_URL,
    version=SOFTWARE_VERSION,
    name="Classify",
    title="Classify emergency-department triage notes",
    status="active",
    kind="operation",
    publisher=SOFTWARE,
    description=(
        "Estimates for each triage note the probability that the patient needs emergency care and answers with "
        "RiskAssessments. Nothing is stored. Decision support for triage staff, not a diagnosis. The body is a "
        "Parameters resource, or one DocumentReference, Communication or Bundle itself (as the `resource` "
        "parameter). Errors are OperationOutcomes, which never quote a note."
    ),
    affectsState=False,
    code="classify",
    resource=["RiskAssessment"],
    system=False,
    type=True,
    instance=False,
    parameter=[
        _in(
            "resource",
            "Resource",
            "*",
            "A DocumentReference (the note is its first `text/plain` `content[].attachment`, inline base64 `data` "
            "in the contentType's charset, default UTF-8), a Communication (its `payload[].contentString` and "
            f"`text/plain` `contentAttachment`s), or a Bundle of them (type {', '.join(BUNDLE_TYPES)}). Each note "
            "needs a `subject`.",
        ),
        _in("note", "string", "*", "A triage note as plain text. Needs the `subject` parameter."),
        _in(
            "subject",
            "Reference",
            "1",
            "The patient the notes are about, a relative reference (`Patient/123`). Every resource's note must "
            "have this subject (422 business-rule otherwise); it is the subject of every `note`. May instead be "
            "the URL query parameter `subject=Patient/123`, not both.",
        ),
        _in(
            "encounter",
            "Reference",
            "1",
            "The encounter the notes belong to, a relative reference (`Encounter/456`), checked like `subject`. "
            "May instead be the URL query parameter `encounter`, not both.",
        ),
        _in(
            "explain",
            "boolean",
            "1",
            "true: each RiskAssessment also has, as `note[1]` (markdown), the words whose deletion moves "
            "P(emergency) most, with their contributions and character offsets: how sensitive this model is to "
            "each word, not a clinical cause. Each word costs one more model run; a request holding more words "
            "than the service's `explain_max_words` is refused (413). May instead be the URL query parameter "
            "`explain=true`, not both.",
        ),
        OperationDefinitionParameter(
            name="return",
            use="out",
            min=1,
            max="1",
            type="Resource",
            documentation=(
                "A RiskAssessment when the request holds one note and no Bundle; otherwise a Bundle of type "
                "`collection` holding one RiskAssessment per note, in request order (a Bundle's notes in entry "
                "order)."
            ),
        ),
    ],
)


def capability_statement(settings: Settings, fhir_base_url: str, now: datetime) -> CapabilityStatement:
    """This server's CapabilityStatement; `fhir_base_url` is its address, up to `/fhir`."""
    authentication = (
        "the operator set keys, so `$classify` needs `Authorization: Bearer <key>`"
        if settings.api_keys
        else "the operator set none, so `$classify` is open to anyone who can reach the service"
    )
    cors = (
        f"Browsers may call it from these origins (CORS): {', '.join(settings.cors_origins)}"
        if settings.cors_origins
        else "CORS is not enabled"
    )
    read = [CapabilityStatementRestResourceInteraction(code="read")]
    return CapabilityStatement(
        status="active",
        date=now,
        publisher=SOFTWARE,
        kind="instance",
        software=CapabilityStatementSoftware(name=SOFTWARE, version=SOFTWARE_VERSION),
        implementation=CapabilityStatementImplementation(
            description="Emergency-department triage note classifier (decision support, not a diagnosis)",
            url=fhir_base_url,
        ),
        fhirVersion=FHIR_VERSION,
        format=["json"],
        rest=[
            CapabilityStatementRest(
                mode="server",
                documentation=(
                    "Classifies triage notes with `RiskAssessment/$classify`. Nothing is stored: the only "
                    "resources that can be read are this server's definitions; nothing can be searched."
                ),
                security=CapabilityStatementRestSecurity(
                    cors=bool(settings.cors_origins),
                    description=(
                        "Authentication: static bearer keys configured by the operator (`api_keys`), not OAuth 2.0 "
                        f"or SMART on FHIR; {authentication}. This statement, the OperationDefinition and the "
                        f"CodeSystems are open. {cors}. The service speaks plain HTTP: TLS is for a reverse proxy "
                        "in front of it."
                    ),
                ),
                resource=[
                    CapabilityStatementRestResource(
                        type="RiskAssessment",
                        documentation="Produced by `$classify` and returned, never stored.",
                        operation=[CapabilityStatementRestResourceOperation(name="classify", definition=OPERATION_URL)],
                    ),
                    CapabilityStatementRestResource(type="OperationDefinition", interaction=read),
                    CapabilityStatementRestResource(type="CodeSystem", interaction=read),
                ],
            )
        ],
    )


def model_device(service: Service) -> Device:
    """The served model as a Device: its name, the bundle's version, and the sha256 of the ONNX file it runs."""
    manifest = service.bundle.manifest
    served = manifest.variants[service.bundle.variant]
    return Device(
        id=DEVICE_ID,
        identifier=[
            Identifier(
                system=MODEL_SHA256_SYSTEM,
                value=served.sha256,
                type=CodeableConcept(text=f"sha256 of the ONNX file run ({served.file})"),
            )
        ],
        status="active",
        manufacturer=SOFTWARE,
        deviceName=[DeviceDeviceName(name=service.model.name, type="model-name")],
        type=CodeableConcept(text="Triage note classifier (software)"),
        version=[DeviceVersion(value=manifest.version)],
    )
