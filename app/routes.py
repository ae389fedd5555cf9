"""HTTP routes: /classify, /v1/model, /metrics, /healthz, /readyz; `classify_texts`, the path every route
that classifies notes shares."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from http import HTTPStatus
from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.auth import require_api_key
from app.batching import DynamicBatcher, InferenceFailed, QueueFull, ShuttingDown
from app.bundle import Bundle
from app.inference import NoteClassifier
from app.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    ModelInfo,
    ModelRef,
    NoteResult,
    notes_of,
    result_ids,
)
from app.settings import Settings

INTENDED_USE = (
    "Decision support at emergency-department triage: estimates the probability that a triage note "
    "describes a patient who needs emergency care, for review by a clinician. Not a diagnosis, not a "
    "replacement for triage by trained staff, and not validated outside the population in its test metrics."
)
RETRY_AFTER_S = "1"

router = APIRouter()


@dataclass(frozen=True)
class Service:
    """What the routes need once the bundle is loaded and warmed up."""

    settings: Settings
    bundle: Bundle
    classifier: NoteClassifier
    batcher: DynamicBatcher

    @property
    def model(self) -> ModelRef:
        return ModelRef(
            name=self.settings.model_name or self.bundle.manifest.name, version=self.bundle.manifest.version
        )


def ready_service(request: Request) -> Service:
    service: Service | None = request.app.state.service
    if service is None:
        raise HTTPException(
            HTTPStatus.SERVICE_UNAVAILABLE,
            "model not loaded (starting up or shutting down)",
            headers={"Retry-After": RETRY_AFTER_S},
        )
    return service


def _error(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    dependencies=[Depends(require_api_key)],
    summary="Classify triage notes as emergency or non-emergency",
    responses={
        400: _error("Body is not valid UTF-8."),
        401: _error("Missing or invalid bearer token (when api_keys are set)."),
        413: _error("Body, note count, note length or note tokens over the limit."),
        429: _error("Queue full; retry after Retry-After seconds."),
        500: _error("The model failed."),
        503: _error("Model not loaded, shutting down, or timed out waiting for the model."),
    },
)
async def classify(
    body: Annotated[ClassifyRequest, Body()], request: Request, service: Annotated[Service, Depends(ready_service)]
) -> ClassifyResponse:
    notes = notes_of(body)
    classified = await classify_texts(service, [note.text for note in notes], request)
    return ClassifyResponse(
        model=service.model,
        results=[
            NoteResult(
                id=note_id,
                label=result.label,
                probability=result.probability,
                threshold=result.threshold,
                truncated=result.truncated,
            )
            for note_id, result in zip(result_ids(notes), classified)
        ],
    )


@dataclass(frozen=True)
class Classification:
    label: str  # "emergency" or "non-emergency"
    probability: float  # P(emergency)
    threshold: float  # P(emergency) at or above which the label is emergency
    truncated: bool  # whether the note was cut to max_note_tokens


def add_log_fields(request: Request, **fields: object) -> None:
    """Adds counts (never note text or ids) to the request's access log line."""
    request.state.log_fields = {**getattr(request.state, "log_fields", {}), **fields}


async def classify_texts(service: Service, texts: list[str], request: Request) -> list[Classification]:
    """The one path from note texts to labels, shared by /classify, FHIR and CDS Hooks: the note limits
    (413), tokenization, the dynamic batcher (429, 503, 500) and the bundle's threshold.

    Errors are `HTTPException`s, whose messages name notes by position only.
    """
    settings = service.settings
    lengths = [len(text) for text in texts]
    add_log_fields(request, notes=len(texts), text_chars_total=sum(lengths), text_chars_max=max(lengths))
    if len(texts) > settings.max_notes_per_request:
        raise HTTPException(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"{len(texts)} notes; at most {settings.max_notes_per_request} per request",
        )
    too_long = [position for position, length in enumerate(lengths) if length > settings.max_note_chars]
    if too_long:
        raise HTTPException(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"notes at positions {too_long} exceed {settings.max_note_chars} characters",
        )

    encoded = await asyncio.to_thread(service.classifier.encode, texts)
    truncated = [position for position, note in enumerate(encoded) if note.truncated]
    add_log_fields(request, tokens_total=sum(len(note.ids) for note in encoded), truncated=len(truncated))
    if truncated and not settings.truncate:
        raise HTTPException(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"notes at positions {truncated} exceed {service.classifier.max_note_tokens} tokens",
        )

    try:
        probabilities = await service.batcher.classify([note.ids for note in encoded], settings.request_timeout_s)
    except QueueFull:
        raise HTTPException(
            HTTPStatus.TOO_MANY_REQUESTS, "queue full, retry later", headers={"Retry-After": RETRY_AFTER_S}
        ) from None
    except ShuttingDown:
        raise HTTPException(
            HTTPStatus.SERVICE_UNAVAILABLE, "shutting down", headers={"Retry-After": RETRY_AFTER_S}
        ) from None
    except TimeoutError:
        raise HTTPException(
            HTTPStatus.SERVICE_UNAVAILABLE,
            f"no answer from the model within {settings.request_timeout_s} s",
            headers={"Retry-After": RETRY_AFTER_S},
        ) from None
    except InferenceFailed:
        raise HTTPException(HTTPStatus.INTERNAL_SERVER_ERROR, "the model failed on this request") from None

    threshold = service.bundle.manifest.decision.threshold
    labels = service.bundle.manifest.labels
    return [
        Classification(labels[int(probability >= threshold)], float(probability), threshold, note.truncated)
        for note, probability in zip(encoded, probabilities)
    ]


@router.get(
    "/v1/model",
    response_model=ModelInfo,
    dependencies=[Depends(require_api_key)],
    summary="The served model: manifest and model-card summary",
    responses={401: _error("Missing or invalid bearer token."), 503: _error("Model not loaded yet.")},
)
async def model_info(service: Annotated[Service, Depends(ready_service)]) -> ModelInfo:
    manifest = service.bundle.manifest
    return ModelInfo(
        name=service.model.name,
        version=manifest.version,
        variant=service.bundle.variant,
        providers=service.bundle.providers,
        intended_use=INTENDED_USE,
        threshold=manifest.decision.threshold,
        threshold_policy=manifest.decision.policy,
        max_note_tokens=service.classifier.max_note_tokens,
        truncate=service.settings.truncate,
        test_metrics=manifest.test_metrics,
        manifest=manifest.model_dump(mode="json"),
    )


@router.get(
    "/metrics",
    dependencies=[Depends(require_api_key)],
    response_class=Response,
    summary="Prometheus metrics (bearer token required when api_keys are set)",
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, 401: _error("Missing or invalid bearer token.")},
)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/healthz", summary="Liveness: the process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: the model is loaded and warmed up",
    responses={503: _error("Model not loaded yet, or shutting down.")},
)
async def readyz(request: Request) -> dict[str, str]:
    ready_service(request)
    return {"status": "ready"}
