"""CDS Hooks 2.0 service `triage-note` on the `patient-view` hook: a card with the triage-note classification,
and its feedback endpoint.

`patient-view` is a hook every CDS Hooks client implements; it fires when a chart is opened, which in
an emergency department follows triage. The note comes prefetched as the latest current triage note of the
encounter in context (LOINC 54094-8 "Emergency department Triage note"), or, for callers without a FHIR server, as
plain text in `context.triageNoteText` (a field of this service, not of the hook).

Each card has a uuid, its source and a link pointing at the model card (/model-card), and override reasons; the
client reports what the clinician did with it to the feedback endpoint, counted in /metrics.

Callers authenticate with an api key or a JWT signed by a trusted EHR (app.auth, app.cds_auth). Status codes
follow the specification: 400 for a malformed request, 412 when the note is neither prefetched nor in the context
(this service does not query the client's FHIR server itself).
"""

from __future__ import annotations

import re
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from datetime import datetime
from http import HTTPStatus
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fhir.resources.R4B.reference import Reference
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app import audit
from app.auth import require_cds_client
from app.cds_auth import EhrTokens
from app.dependencies import log_fields, ready_service
from app.explain import note_words
from app.fhir_notes import FhirNote, notes_in, refers_to, validate_resource
from app.routes import MODEL_CARD_PATH
from app.schemas import ErrorResponse
from app.service import INTENDED_USE, Classification, LogFields, Service, classify_texts, describe_cut
from app.settings import Settings
from app.text import NoteText

SERVICE_ID = "triage-note"
SERVICE_PATH = f"/cds-services/{SERVICE_ID}"
FEEDBACK_PATH = f"{SERVICE_PATH}/feedback"
HOOK = "patient-view"
PREFETCH_KEY = "triageNote"
TRIAGE_NOTE_LOINC = "54094-8"
CONTEXT_NOTE_KEY = "triageNoteText"
ISSUED_CARDS_KEPT = 10_000  # card uuids remembered, so that feedback on other cards is counted as unknown
MAX_FEEDBACK = 100  # feedback entries in one request
OVERRIDE_REASON_SYSTEM = "urn:dsgkd-triage:cds-override-reason"
# Offered on every card, and the only reasons counted by code in /metrics (any other is counted as "other").
OVERRIDE_REASONS = {
    "clinical-assessment-differs": "My clinical assessment differs",
    "note-incomplete": "Triage note incomplete or outdated",
    "already-acted-on": "Already acted on",
}


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


class Coding(BaseModel):
    code: str = Field(min_length=1, max_length=256)
    system: str | None = Field(None, max_length=1024)
    display: str | None = Field(None, max_length=1024)


class Source(BaseModel):
    label: str
    url: str = Field(description="Absolute URL of the model card.")


class Link(BaseModel):
    label: str
    url: str
    type: Literal["absolute", "smart"]


class Card(BaseModel):
    uuid: str = Field(description="Unique per card; the feedback endpoint takes it back.")
    summary: str = Field(max_length=139)
    detail: str = Field(description="GitHub-flavoured markdown.")
    indicator: Literal["info", "warning", "critical"]
    source: Source
    links: list[Link]
    overrideReasons: list[Coding]


class CdsResponse(BaseModel):
    cards: list[Card]


class AcceptedSuggestion(BaseModel):
    id: str = Field(max_length=256)


class OverrideReason(BaseModel):
    reason: Coding | None = None
    userComment: str | None = Field(None, description="Free text: accepted, never stored, logged or counted.")


class Feedback(BaseModel):
    model_config = ConfigDict(extra="allow")  # extension: accepted, unused

    card: str = Field(min_length=1, max_length=256, description="The uuid of a card this service returned.")
    outcome: Literal["accepted", "overridden"]
    acceptedSuggestions: list[AcceptedSuggestion] | None = Field(None, max_length=MAX_FEEDBACK)
    overrideReason: OverrideReason | None = None
    outcomeTimestamp: datetime

    @model_validator(mode="after")
    def _reason_only_when_overridden(self) -> Feedback:
        if self.overrideReason is not None and self.outcome != "overridden":
            raise ValueError("overrideReason is only for outcome 'overridden'")
        return self


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # extension: accepted, unused

    feedback: list[Feedback] = Field(min_length=1, max_length=MAX_FEEDBACK)


class IssuedCards:
    """The uuids of the last ISSUED_CARDS_KEPT cards this process returned (in memory: a restart forgets them)."""

    def __init__(self, size: int = ISSUED_CARDS_KEPT) -> None:
        self.size = size
        self.uuids: OrderedDict[str, None] = OrderedDict()

    def add(self, uuids: list[str]) -> None:
        for card_uuid in uuids:
            self.uuids[card_uuid] = None
        while len(self.uuids) > self.size:
            self.uuids.popitem(last=False)

    def __contains__(self, card_uuid: str) -> bool:
        return card_uuid in self.uuids


def ehr_tokens(settings: Settings) -> EhrTokens | None:
    """The verifier of EHR-signed JWTs, whose audience is this service's endpoint (or its feedback endpoint)."""
    if not settings.jwt_issuers or settings.public_url is None:  # the settings require public_url with issuers
        return None
    audiences = [f"{settings.public_url}{SERVICE_PATH}", f"{settings.public_url}{FEEDBACK_PATH}"]
    return EhrTokens(settings.jwt_issuers, settings.jwt_algorithms, audiences, settings.jwt_leeway_s)


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
                PREFETCH_KEY: "DocumentReference?patient={{context.patientId}}&encounter={{context.encounterId}}"
                f"&type=http://loinc.org|{TRIAGE_NOTE_LOINC}&status=current&_sort=-date&_count=1"
            },
        )
    ]
)


@router.get("/cds-services", response_model=Discovery, summary="CDS Hooks discovery")
async def discovery() -> Discovery:
    return DISCOVERY


UNAUTHORIZED_HELP = {
    "model": ErrorResponse,
    "description": "Missing or invalid bearer token: an api key or an EHR-signed JWT (when either is configured); "
    "the detail names the failed check.",
}


@router.post(
    SERVICE_PATH,
    response_model=CdsResponse,
    dependencies=[Depends(require_cds_client)],
    summary="CDS Hooks service: a card with the classification of the triage note of the encounter",
    responses={
        400: {
            "model": ErrorResponse,
            "description": "Malformed request, or a prefetched note for another patient or encounter.",
        },
        401: UNAUTHORIZED_HELP,
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
    if not notes:  # the patient has no triage note: nothing to say, and the audit trail says so
        await audit.record(request, service, [], card_uuids=[], hook_instance=body.hookInstance)
        return CdsResponse(cards=[])
    texts = [note.text for note in notes]
    explain = service.settings.cds_explain and explainable(texts, service.settings.explain_max_words)
    classified = await classify_texts(service, texts, log_fields(request), explain=explain)
    model_card_url = f"{service.settings.public_url or str(request.base_url).rstrip('/')}{MODEL_CARD_PATH}"
    cards = [card(note, result, service, model_card_url) for note, result in zip(notes, classified, strict=True)]
    await audit.record(request, service, classified, [issued.uuid for issued in cards], body.hookInstance)
    issued_cards(request).add([issued.uuid for issued in cards])
    return CdsResponse(cards=cards)


@router.post(
    FEEDBACK_PATH,
    dependencies=[Depends(require_cds_client)],
    response_class=Response,
    summary="CDS Hooks feedback: what the clinician did with a card (accepted, or overridden with a reason)",
    responses={
        200: {"description": "Feedback counted (`triage_cds_feedback_total` in /metrics)."},
        400: {"model": ErrorResponse, "description": "Malformed feedback."},
        401: UNAUTHORIZED_HELP,
        408: {"model": ErrorResponse, "description": "Body not received within body_timeout_s."},
        413: {"model": ErrorResponse, "description": "Body over max_body_bytes."},
        415: {"model": ErrorResponse, "description": "Content-Type not JSON, or Content-Encoding other than gzip."},
    },
)
async def feedback(body: Annotated[FeedbackRequest, Body()], request: Request) -> Response:
    """Counted by outcome and override reason code (a code of OVERRIDE_REASONS, else "other"; "none" without one).
    Feedback on a card this process did not issue (before a restart, by another replica) is counted too, and also in
    triage_cds_feedback_unknown_card_total. Nothing else is kept: no comment, no card uuid."""
    metrics = request.app.state.metrics
    unknown = [entry for entry in body.feedback if entry.card not in issued_cards(request)]
    for entry in body.feedback:
        metrics.cds_feedback.labels(service=SERVICE_ID, outcome=entry.outcome, reason=reason_label(entry)).inc()
    metrics.cds_feedback_unknown_cards.labels(service=SERVICE_ID).inc(len(unknown))
    log_fields(request).update(feedback=len(body.feedback), unknown_cards=len(unknown))
    return Response(status_code=HTTPStatus.OK)


def reason_label(entry: Feedback) -> str:
    reason = entry.overrideReason.reason if entry.overrideReason is not None else None
    if reason is None:
        return "none"
    if reason.code in OVERRIDE_REASONS and reason.system in (None, OVERRIDE_REASON_SYSTEM):
        return reason.code
    return "other"


def explainable(texts: list[str], max_words: int) -> bool:
    """Whether the notes hold at most `max_words` words in all: `classify_texts` explains no more (413), and a card
    is worth more without its explanation than no card."""
    return sum(len(note_words(text, at_most=max_words + 1)) for text in texts) <= max_words


def issued_cards(request: Request) -> IssuedCards:
    cards: IssuedCards = request.app.state.issued_cards
    return cards


def notes_of(body: CdsRequest, fields: LogFields) -> list[FhirNote]:
    """The note in the context, else the prefetched notes; none when the prefetch is null (the client found
    no triage note) or an empty search result.

    A prefetched note is scored only when its subject provably is the context patient, and its encounter the context
    encounter when there is one (`refers_to`): a note whose subject or encounter is missing, given by identifier or
    display only, or on another server is refused (400), as its card would be shown in this patient's chart as
    this visit's."""
    if body.context.triageNoteText is not None:
        source = Reference(display=f"context.{CONTEXT_NOTE_KEY}")
        return [FhirNote(body.context.triageNoteText, source, subject=None, encounter=None)]
    prefetch = body.prefetch or {}
    if PREFETCH_KEY not in prefetch:
        needs_encounter = " (its template needs context.encounterId)" if body.context.encounterId is None else ""
        raise HTTPException(
            HTTPStatus.PRECONDITION_FAILED,
            f"prefetch '{PREFETCH_KEY}' is missing{needs_encounter} and context.{CONTEXT_NOTE_KEY} is not given; "
            f"this service does not query the FHIR server itself",
        )
    if prefetch[PREFETCH_KEY] is None:
        return []
    notes = notes_in(validate_resource(prefetch[PREFETCH_KEY], f"prefetch.{PREFETCH_KEY}"))
    _refuse_unproven(
        [note.subject for note in notes],
        f"Patient/{body.context.patientId}",
        body.fhirServer,
        fields,
        "subject-not-context-patient",
        "about context.patientId: DocumentReference.subject must reference Patient/{patientId}",
    )
    if body.context.encounterId is not None:
        _refuse_unproven(
            [note.encounter for note in notes],
            f"Encounter/{body.context.encounterId}",
            body.fhirServer,
            fields,
            "encounter-not-context-encounter",
            "of context.encounterId: DocumentReference.context.encounter must reference Encounter/{encounterId}",
        )
    return notes


def _refuse_unproven(
    references: list[Reference | None],
    expected: str,
    fhir_server: str | None,
    fields: LogFields,
    reason: str,
    requirement: str,
) -> None:
    """400 when any note's reference is not provably `expected` (`refers_to`); `requirement` says what is needed."""
    unproven = [
        position for position, reference in enumerate(references) if not refers_to(reference, expected, fhir_server)
    ]
    if unproven:
        fields.update(refused=reason, refused_notes=len(unproven))
        raise HTTPException(
            HTTPStatus.BAD_REQUEST,
            f"prefetched notes at positions {unproven} are not provably {requirement}, relative or on fhirServer",
        )


def card(note: FhirNote, result: Classification, service: Service, model_card_url: str) -> Card:
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
    lines.extend(explanation_lines(result, service))
    lines.append(f"*Decision support for triage staff, not a diagnosis.* {INTENDED_USE}")
    return Card(
        uuid=str(uuid.uuid4()),
        summary=summary,
        detail="\n\n".join(lines),
        indicator="critical" if emergency else "info",
        source=Source(label=f"ED triage classifier ({model.name} {model.version})", url=model_card_url),
        links=[
            Link(label="Model card: intended use, data, performance, limitations", url=model_card_url, type="absolute")
        ],
        overrideReasons=[
            Coding(system=OVERRIDE_REASON_SYSTEM, code=code, display=display)
            for code, display in OVERRIDE_REASONS.items()
        ],
    )


def explanation_lines(result: Classification, service: Service) -> list[str]:
    """The words of the note that the model's output is most sensitive to, with their signed contributions
    (app/explain.py), when `cds_explain` is on."""
    if not service.settings.cds_explain:
        return []
    if result.explanation is None:
        return [
            f"*Word sensitivities not computed: more than {service.settings.explain_max_words} words to explain "
            "(explain_max_words).*"
        ]
    if not result.explanation:
        return []
    words = "\n".join(f"- {code_span(item.word.text)} {item.contribution:+.3f}" for item in result.explanation)
    return [
        "**Words the model's output is most sensitive to** (change in P(emergency) when the word is deleted; how "
        f"this model reads the note, not a clinical reason):\n{words}"
    ]


def code_span(text: str) -> str:
    """`text` as a markdown code span, whatever backticks it holds."""
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"
