"""CDS Hooks 2.0 service `triage-note` on the `patient-view` hook: a card with the triage-note classification.

`patient-view` is a hook every CDS Hooks client implements; it fires when a chart is opened, which in
an emergency department follows triage. The note comes prefetched as the patient's latest triage note
(LOINC 54094-8 "Emergency department Triage note"), or, for callers without a FHIR server, as plain
text in `context.triageNoteText` (a field of this service, not of the hook).

Status codes follow the specification: 400 for a malformed request, 412 when the note is neither
prefetched nor in the context (this service does not query the client's FHIR server itself).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fhir.resources.R4B.reference import Reference
from pydantic import BaseModel, ConfigDict, Field

from app.auth import require_api_key
from app.dependencies import log_fields, ready_service
from app.fhir_notes import FhirNote, notes_in, refers_to, validate_resource
from app.schemas import ErrorResponse
from app.service import INTENDED_USE, Classification, LogFields, Service, classify_texts, describe_cut
from app.text import NoteText

SERVICE_ID = "triage-note"
HOOK = "patient-view"
PREFETCH_KEY = "triageNote"
TRIAGE_NOTE_LOINC = "54094-8"
CONTEXT_NOTE_KEY = "triageNoteText"


class CdsRoute(APIRoute):
    """A malformed CDS Hooks request gets 400, as the specification has it (FastAPI answers 422)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_malformed_as_400(request: Request) -> Response:
            try:
                return await handle(request)
            except RequestValidationError as error:
                # Type, location and message only: the `input` of an error could be the note.
                errors = [{key: entry[key] for key in ("type", "loc", "msg")} for entry in error.errors()]
                log_fields(request)["validation_errors"] = sorted({entry["type"] for entry in errors})
                return JSONResponse({"detail": errors}, status_code=HTTPStatus.BAD_REQUEST)

        return handle_malformed_as_400


router = APIRouter(route_class=CdsRoute, tags=["CDS Hooks 2.0"])


class CdsService(BaseModel):
    hook: str
    title: str
    description: str
    id: str
    prefetch: dict[str, str]


class Discovery(BaseModel):
    services: list[CdsService]


class Context(BaseModel):
    model_config = ConfigDict(extra="allow")  # other context fields of the hook are accepted and unused

    userId: str | None = None
    patientId: str = Field(min_length=1, description="FHIR id of the patient whose chart is open.")
    encounterId: str | None = None
    triageNoteText: NoteText | None = Field(
        None,
        description="This service's own field: the triage note as plain text, for callers that cannot prefetch. "
        "Used instead of the prefetched note when both are given.",
    )


class CdsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # fhirAuthorization, extension: accepted, unused

    hook: Literal["patient-view"]
    hookInstance: str = Field(min_length=1)
    fhirServer: str | None = Field(
        None,
        pattern=r"^https?://\S+$",
        description="Base URL of the EHR's FHIR server: a prefetched note's subject may be an absolute reference "
        "on it (`{fhirServer}/Patient/{patientId}`).",
    )
    context: Context
    prefetch: dict[str, Any] | None = Field(
        None,
        description=f"`{PREFETCH_KEY}`: a DocumentReference or a Bundle of them; null when the patient has "
        f"no triage note.",
    )


class Source(BaseModel):
    label: str


class Card(BaseModel):
    summary: str = Field(max_length=139)
    detail: str = Field(description="GitHub-flavoured markdown.")
    indicator: Literal["info", "warning", "critical"]
    source: Source


class CdsResponse(BaseModel):
    cards: list[Card]


DISCOVERY = Discovery(
    services=[
        CdsService(
            hook=HOOK,
            id=SERVICE_ID,
            title="ED triage note classifier",
            description="Estimates from the patient's latest emergency-department triage note the probability that the "
            "patient needs emergency care, and shows it as a card: critical at or above the model's decision "
            "threshold, info below it. Decision support for triage staff, not a diagnosis.",
            prefetch={
                PREFETCH_KEY: f"DocumentReference?patient={{{{context.patientId}}}}"
                f"&type=http://loinc.org|{TRIAGE_NOTE_LOINC}&_sort=-date&_count=1"
            },
        )
    ]
)


@router.get("/cds-services", response_model=Discovery, summary="CDS Hooks discovery")
async def discovery() -> Discovery:
    return DISCOVERY


@router.post(
    f"/cds-services/{SERVICE_ID}",
    response_model=CdsResponse,
    dependencies=[Depends(require_api_key)],
    summary="CDS Hooks service: a card with the classification of the patient's triage note",
    responses={
        400: {"model": ErrorResponse, "description": "Malformed request, or a prefetched note for another patient."},
        401: {"model": ErrorResponse, "description": "Missing or invalid bearer token (when api_keys are set)."},
        412: {
            "model": ErrorResponse,
            "description": f"No `{PREFETCH_KEY}` prefetch and no `context.{CONTEXT_NOTE_KEY}`.",
        },
        408: {"model": ErrorResponse, "description": "Body not received within body_timeout_s."},
        413: {"model": ErrorResponse, "description": "Body, note count, note length or note tokens over the limit."},
        415: {"model": ErrorResponse, "description": "Content-Type not JSON, or Content-Encoding other than gzip."},
        422: {"model": ErrorResponse, "description": "The prefetched note cannot be read (type, encoding, no text)."},
        429: {"model": ErrorResponse, "description": "Queue full; retry after Retry-After seconds."},
        503: {"model": ErrorResponse, "description": "Model not loaded, shutting down, or timed out."},
    },
)
async def triage_note(
    body: Annotated[CdsRequest, Body()], request: Request, service: Annotated[Service, Depends(ready_service)]
) -> CdsResponse:
    notes = notes_of(body, log_fields(request))
    if not notes:
        return CdsResponse(cards=[])  # the patient has no triage note: nothing to say
    classified = await classify_texts(service, [note.text for note in notes], log_fields(request))
    return CdsResponse(cards=[card(note, result, service) for note, result in zip(notes, classified, strict=True)])


def notes_of(body: CdsRequest, fields: LogFields) -> list[FhirNote]:
    """The note in the context, else the prefetched notes; none when the prefetch is null (the client found
    no triage note) or an empty search result.

    A prefetched note is scored only when its subject provably is the context patient (`refers_to`): a note
    whose subject is missing, given by identifier or display only, or on another server is refused (400), as
    its card would be shown in this patient's chart."""
    if body.context.triageNoteText is not None:
        source = Reference(display=f"context.{CONTEXT_NOTE_KEY}")
        return [FhirNote(body.context.triageNoteText, source, subject=None, encounter=None)]
    prefetch = body.prefetch or {}
    if PREFETCH_KEY not in prefetch:
        raise HTTPException(
            HTTPStatus.PRECONDITION_FAILED,
            f"prefetch '{PREFETCH_KEY}' is missing and context.{CONTEXT_NOTE_KEY} is not given; "
            f"this service does not query the FHIR server itself",
        )
    if prefetch[PREFETCH_KEY] is None:
        return []
    notes = notes_in(validate_resource(prefetch[PREFETCH_KEY], f"prefetch.{PREFETCH_KEY}"))
    patient = f"Patient/{body.context.patientId}"
    unproven = [
        position for position, note in enumerate(notes) if not refers_to(note.subject, patient, body.fhirServer)
    ]
    if unproven:
        fields.update(refused="subject-not-context-patient", refused_notes=len(unproven))
        raise HTTPException(
            HTTPStatus.BAD_REQUEST,
            f"prefetched notes at positions {unproven} are not provably about context.patientId: "
            f"DocumentReference.subject must reference Patient/{{patientId}}, relative or on fhirServer",
        )
    return notes


def card(note: FhirNote, result: Classification, service: Service) -> Card:
    model = service.model
    emergency = result.label == "emergency"
    comparison = "≥" if emergency else "<"
    summary = (
        f"Triage note suggests {'EMERGENCY' if emergency else 'non-emergency'}: "
        f"P = {result.probability:.3f} {comparison} threshold {result.threshold:.3f}"
    )
    lines = [
        f"**Probability of emergency:** {result.probability:.3f} (model estimate)",
        (
            f"**Threshold:** {result.threshold:.3f}, chosen by policy `{service.bundle.manifest.decision.policy}`; "
            f"at or above it the note is flagged as emergency."
        ),
        f"**Model:** {model.name} {model.version}",
    ]
    if note.source.reference is not None:
        lines.append(f"**Note:** {note.source.reference}")
    if result.truncated:
        lines.append(f"**Truncated:** the note was longer than the model reads; {describe_cut(service)} were read.")
    lines.append(f"*Decision support for triage staff, not a diagnosis.* {INTENDED_USE}")
    return Card(
        summary=summary,
        detail="\n\n".join(lines),
        indicator="critical" if emergency else "info",
        source=Source(label=f"ED triage classifier ({model.name} {model.version})"),
    )
