"""FHIR R4 endpoint `POST /fhir/RiskAssessment/$classify`: triage notes in, RiskAssessments out; and the
definitions that describe it: `GET /fhir/metadata`, `/fhir/OperationDefinition/classify`, `/fhir/CodeSystem/{id}`.

A type-level operation on RiskAssessment, the type it produces (its inputs come as DocumentReference or
Communication, so neither of those types would name it well). Nothing is stored: the RiskAssessments are
returned, not created on a server. Every error, authentication and readiness included, is an
OperationOutcome.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fhir.resources.R4B.annotation import Annotation
from fhir.resources.R4B.bundle import Bundle, BundleEntry
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.operationoutcome import OperationOutcome, OperationOutcomeIssue
from fhir.resources.R4B.reference import Reference
from fhir.resources.R4B.resource import Resource
from fhir.resources.R4B.riskassessment import RiskAssessment, RiskAssessmentPrediction

from app import audit
from app.auth import require_api_key
from app.dependencies import log_fields, ready_service
from app.explain import WordContribution
from app.fhir_definitions import (
    CODE_SYSTEMS,
    EMERGENCY,
    HIGH_RISK,
    LOW_RISK,
    NOTE_CLASSIFIER,
    OPERATION_DEFINITION,
    capability_statement,
    model_device,
)
from app.fhir_notes import (
    OPERATION_BODIES,
    REFERENCE,
    FhirInputError,
    FhirNote,
    classify_input,
    parse_resource,
    refers_to,
)
from app.middleware import json_error
from app.service import Classification, Service, ServiceError, classify_texts, describe_cut
from app.settings import Settings

FHIR_JSON = "application/fhir+json"
ACCEPTED_CONTENT_TYPES = (FHIR_JSON, "application/json")
FHIR_BASE = "/fhir"
CLASSIFY_PATH = f"{FHIR_BASE}/RiskAssessment/$classify"
SUBJECT_HELP = (
    "Optional, e.g. `Patient/123`: the patient the caller is acting for. Every note's subject must then be that "
    "relative reference (or it is refused with 422, business-rule), so that no other patient's note is scored."
)
ENCOUNTER_HELP = "Optional, e.g. `Encounter/456`: likewise, every note's encounter must be that reference."
EXPLAIN_HELP = (
    "Optional: true adds to each RiskAssessment, as note[1] (markdown), the words whose deletion moves P(emergency) "
    "most (a body that is a Parameters resource says so with its `explain` parameter instead)."
)
# OperationOutcome issue type of an HTTP error raised outside this module (auth, limits, the batcher, the body limit).
ISSUE_CODES: dict[int, str] = {
    HTTPStatus.BAD_REQUEST: "structure",
    HTTPStatus.UNAUTHORIZED: "login",
    HTTPStatus.REQUEST_TIMEOUT: "timeout",
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE: "not-supported",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "too-long",
    HTTPStatus.TOO_MANY_REQUESTS: "throttled",
    HTTPStatus.SERVICE_UNAVAILABLE: "transient",
}


class FhirRoute(APIRoute):
    """Answers an error raised anywhere in the route, dependencies included, with an OperationOutcome."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_with_outcome(request: Request) -> Response:
            try:
                return await handle(request)
            except HTTPException as error:
                issue_code: str = getattr(error, "issue_code", ISSUE_CODES.get(error.status_code, "exception"))
                status, message, headers = error.status_code, str(error.detail), error.headers
            except ServiceError as error:
                issue_code = ISSUE_CODES.get(error.status, "exception")
                status, message, headers = error.status, error.message, error.headers
            except RequestValidationError as error:  # a query parameter (the body is parsed by the route itself)
                issue_code, status, headers = "invalid", HTTPStatus.BAD_REQUEST, None
                message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
            log_fields(request)["fhir_issue"] = issue_code
            return fhir_response(operation_outcome(issue_code, message), status, headers)

        return handle_with_outcome


router = APIRouter(route_class=FhirRoute, tags=["FHIR R4"])

# Only the outline: the resources themselves are validated by fhir.resources, whose schemas run to megabytes.
_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["resourceType"],
    "properties": {"resourceType": {"enum": list(OPERATION_BODIES)}},
}
_EXAMPLE_NOTE = {
    "resourceType": "DocumentReference",
    "id": "triage-1",
    "status": "current",
    "subject": {"reference": "Patient/123"},
    "context": {"encounter": [{"reference": "Encounter/456"}]},
    "content": [
        {
            "attachment": {
                "contentType": "text/plain; charset=utf-8",
                "data": "Q0M6IGNoZXN0IHBhaW4uIEJUIDM4LjksIEhSIDE1MA==",
            }
        }
    ],
}


@router.post(
    CLASSIFY_PATH,
    dependencies=[Depends(require_api_key)],
    response_class=Response,
    summary="Classify FHIR triage notes; answer with RiskAssessments",
    description=(
        "Body (`application/fhir+json` or `application/json`): a **Parameters** resource (parameters `resource`, "
        "`note`, `subject`, `encounter`, as `GET /fhir/OperationDefinition/classify` defines them), or the note "
        "resource itself: a **DocumentReference** (the note as a `text/plain` `content[].attachment.data`, base64, "
        "in the contentType's `charset`, default UTF-8), a **Communication** (`payload[].contentString` or a "
        "`text/plain` `contentAttachment`), or a **Bundle** (type collection, batch, transaction or searchset) of "
        "them.\n\n"
        "Answer: one **RiskAssessment** per note (`prediction[0]`: outcome `emergency`, `probabilityDecimal` = "
        "P(emergency), `qualitativeRisk` high at or above the model's threshold, else low; `basis` = the note's "
        "resource, `subject` and `encounter` copied from it, `performer` = the model as a contained Device); for a "
        "Bundle or several notes, a Bundle of type `collection` holding them in request order.\n\n"
        "This is a type-level operation on RiskAssessment, the type it produces. Nothing is stored. Errors are "
        "OperationOutcomes, which never quote the note."
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                media_type: {"schema": _REQUEST_SCHEMA, "example": _EXAMPLE_NOTE}
                for media_type in ACCEPTED_CONTENT_TYPES
            },
        }
    },
    responses={
        200: {
            "description": "A RiskAssessment, or a Bundle (type collection) of them.",
            "content": {FHIR_JSON: {"schema": {"type": "object"}}},
        },
        **{
            status: {"description": description, "content": {FHIR_JSON: {"schema": {"type": "object"}}}}
            for status, description in [
                (
                    400,
                    "OperationOutcome: body not JSON (or nested too deep, a number too long, bad gzip), not a valid "
                    "FHIR resource (incl. bad base64), a subject/encounter parameter that is not a relative "
                    "reference or is given twice, or a parameter $classify does not define.",
                ),
                (401, "OperationOutcome: missing or invalid bearer token (when api_keys are set)."),
                (408, "OperationOutcome: body not received within body_timeout_s."),
                (413, "OperationOutcome: body, note count, note length or note tokens over the limit."),
                (415, "OperationOutcome: request Content-Type is not FHIR JSON, or Content-Encoding not gzip."),
                (
                    422,
                    "OperationOutcome: unsupported resource or attachment type or charset, no note text, blank text, "
                    "no subject, undecodable text, or a note not about the requested subject/encounter.",
                ),
                (429, "OperationOutcome: queue full; retry after Retry-After seconds."),
                (503, "OperationOutcome: model not loaded, shutting down, or timed out."),
            ]
        },
    },
)
async def classify_fhir(
    request: Request,
    service: Annotated[Service, Depends(ready_service)],
    subject: Annotated[str | None, Query(pattern=REFERENCE, description=SUBJECT_HELP)] = None,
    encounter: Annotated[str | None, Query(pattern=REFERENCE, description=ENCOUNTER_HELP)] = None,
    explain: Annotated[bool | None, Query(description=EXPLAIN_HELP)] = None,
) -> Response:
    body = parse_resource(await request.body())
    log_fields(request)["fhir_resource"] = body.get_resource_type()
    asked = classify_input(body, subject, encounter, explain)
    subject, encounter, notes = asked.subject, asked.encounter, asked.notes
    if not notes:
        raise FhirInputError(HTTPStatus.UNPROCESSABLE_ENTITY, "required", "the request holds no note to classify")
    missing_subject = [position for position, note in enumerate(notes) if note.subject is None]
    if missing_subject:
        raise FhirInputError(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            "required",
            f"notes at positions {missing_subject} have no subject: RiskAssessment.subject is "
            f"required and copied from DocumentReference.subject / Communication.subject",
        )
    unproven = [
        position
        for position, note in enumerate(notes)
        if (subject is not None and not refers_to(note.subject, subject))
        or (encounter is not None and not refers_to(note.encounter, encounter))
    ]
    if unproven:
        log_fields(request).update(refused="subject-or-encounter-not-requested", refused_notes=len(unproven))
        raise FhirInputError(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            "business-rule",
            f"notes at positions {unproven} are not provably about the requested subject/encounter (their "
            f"subject/encounter must be that relative reference)",
        )
    texts = [note.text for note in notes]
    classified = await classify_texts(service, texts, log_fields(request), explain=asked.explain)
    now = datetime.now(UTC)
    device = model_device(service)
    assessments = [
        risk_assessment(note, result, service, device, now) for note, result in zip(notes, classified, strict=True)
    ]
    await audit.record(request, service, classified)
    if asked.bundled:
        return fhir_response(
            Bundle(
                type="collection", timestamp=now, entry=[BundleEntry(resource=assessment) for assessment in assessments]
            )
        )
    return fhir_response(assessments[0])


_DEFINITION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The resource.", "content": {FHIR_JSON: {"schema": {"type": "object"}}}},
    404: {"description": "OperationOutcome: no such resource.", "content": {FHIR_JSON: {"schema": {"type": "object"}}}},
}


@router.get(
    f"{FHIR_BASE}/metadata",
    response_class=Response,
    summary="The server's CapabilityStatement (open: no token needed)",
    responses={200: _DEFINITION_RESPONSES[200]},
)
async def metadata(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    fhir_base_url = (settings.public_url or str(request.base_url).rstrip("/")) + FHIR_BASE
    return fhir_response(capability_statement(settings, fhir_base_url, datetime.now(UTC)))


@router.get(
    f"{FHIR_BASE}/OperationDefinition/{{definition_id}}",
    response_class=Response,
    summary="The OperationDefinition of $classify (id `classify`; open)",
    responses=_DEFINITION_RESPONSES,
)
async def operation_definition(definition_id: str) -> Response:
    return _read("OperationDefinition", {"classify": OPERATION_DEFINITION}, definition_id)


@router.get(
    f"{FHIR_BASE}/CodeSystem/{{code_system_id}}",
    response_class=Response,
    summary="A CodeSystem of the service's RiskAssessments (`triage-outcome`, `triage-method`; open)",
    responses=_DEFINITION_RESPONSES,
)
async def code_system(code_system_id: str) -> Response:
    return _read("CodeSystem", CODE_SYSTEMS, code_system_id)


def _read(resource_type: str, resources: Mapping[str, Resource], resource_id: str) -> Response:
    if resource_id not in resources:
        raise FhirInputError(
            HTTPStatus.NOT_FOUND, "not-found", f"no such {resource_type}; this server has {', '.join(resources)}"
        )
    return fhir_response(resources[resource_id])


def risk_assessment(
    note: FhirNote, result: Classification, service: Service, device: Device, now: datetime
) -> RiskAssessment:
    """The assessment of one note: P(emergency), high or low against the threshold, by the model `device`."""
    model = service.model
    manifest = service.bundle.manifest
    emergency = result.label == "emergency"
    comparison = ">=" if emergency else "<"
    note_text = (
        f"Emergency when P(emergency) >= threshold {result.threshold:.4f} (policy: "
        f"{manifest.decision.policy}); here {result.probability:.4f} {comparison} {result.threshold:.4f}."
    )
    if result.truncated:
        note_text += f" The note was longer than the model reads; {describe_cut(service)} were read."
    notes = [Annotation(text=note_text)]
    if result.explanation is not None:
        notes.append(Annotation(text=explanation_markdown(result.explanation)))
    return RiskAssessment(
        contained=[device],
        status="final",
        subject=note.subject,
        encounter=note.encounter,
        basis=[note.source],
        occurrenceDateTime=now,
        performer=Reference(reference=f"#{device.id}"),
        code=CodeableConcept(text="Emergency-department triage: needs emergency care"),
        method=CodeableConcept(coding=[NOTE_CLASSIFIER], text=f"Triage note classifier {model.name} {model.version}"),
        prediction=[
            RiskAssessmentPrediction(
                outcome=CodeableConcept(coding=[EMERGENCY], text="Needs emergency care"),
                probabilityDecimal=result.probability,
                qualitativeRisk=CodeableConcept(coding=[HIGH_RISK if emergency else LOW_RISK], text=result.label),
            )
        ],
        note=notes,
    )


def explanation_markdown(explanation: tuple[WordContribution, ...]) -> str:
    """An explanation as markdown (Annotation.text): one line per word, with its character offsets in the note."""
    if not explanation:
        return "Explanation: the note has no words to explain."
    lines = [
        f"- {_code_span(item.word.text)} (characters {item.word.start}-{item.word.end}): {item.contribution:+.3f}"
        for item in explanation
    ]
    return (
        "Explanation: the words whose deletion moves P(emergency) most, with P(emergency) of the note minus that of "
        "the note without the word (positive: towards emergency). How sensitive this model is to each word, not a "
        "clinical cause.\n\n" + "\n".join(lines)
    )


def _code_span(text: str) -> str:
    """`text` as a markdown code span, its fence longer than any run of backticks in it."""
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return f"{fence}{text}{fence}"


def body_error(path: str, status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """The errors answered before routing (token, body type, size, encoding, time, shape): an OperationOutcome
    on the FHIR endpoints, the service's own JSON error elsewhere."""
    if path.startswith(f"{FHIR_BASE}/"):
        return fhir_response(operation_outcome(ISSUE_CODES.get(status, "exception"), message), status, headers)
    return json_error(path, status, message, headers)


def operation_outcome(issue_code: str, diagnostics: str) -> OperationOutcome:
    return OperationOutcome(issue=[OperationOutcomeIssue(severity="error", code=issue_code, diagnostics=diagnostics)])


def fhir_response(
    resource: Resource, status_code: int = HTTPStatus.OK, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(resource.model_dump_json(), status_code=status_code, headers=headers, media_type=FHIR_JSON)
