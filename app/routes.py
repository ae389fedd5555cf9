"""HTTP routes of the service's own API: /classify, /v1/model, /metrics, /healthz, /readyz, /model-card."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from app import audit
from app.auth import require_api_key
from app.bundle import MODEL_CARD_FILE
from app.dependencies import log_fields, ready_service
from app.explain import WordContribution
from app.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    ExplainedWord,
    ModelInfo,
    NoteResult,
    notes_of,
    result_ids,
)
from app.service import INTENDED_USE, Service, classify_texts

router = APIRouter()
MODEL_CARD_PATH = "/model-card"


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    response_model_exclude_none=True,  # no explanation field unless asked for
    dependencies=[Depends(require_api_key)],
    summary="Classify triage notes as emergency or non-emergency",
    responses={
        400: _error("Body not valid UTF-8, JSON or gzip; JSON nested too deep or a number too long."),
        401: _error("Missing or invalid bearer token (when api_keys are set)."),
        408: _error("Body not received within body_timeout_s."),
        413: _error(
            "Body, note count or note length over the limit; note tokens over it with truncation refuse; "
            "more than explain_max_words words with explain."
        ),
        415: _error("Content-Type not application/json, or Content-Encoding other than gzip."),
        429: _error("Queue full; retry after Retry-After seconds."),
        500: _error("The model failed."),
        503: _error("Model not loaded, shutting down, or timed out waiting for the model."),
    },
)
async def classify(
    body: Annotated[ClassifyRequest, Body()], request: Request, service: Annotated[Service, Depends(ready_service)]
) -> ClassifyResponse:
    notes = notes_of(body)
    classified = await classify_texts(service, [note.text for note in notes], log_fields(request), explain=body.explain)
    await audit.record(request, service, classified)
    return ClassifyResponse(
        model=service.model,
        results=[
            NoteResult(
                id=note_id,
                label=result.label,
                probability=result.probability,
                threshold=result.threshold,
                truncated=result.truncated,
                explanation=None if result.explanation is None else _explained_words(result.explanation),
            )
            for note_id, result in zip(result_ids(notes), classified, strict=True)
        ],
    )


def _explained_words(explanation: tuple[WordContribution, ...]) -> list[ExplainedWord]:
    return [
        ExplainedWord(word=item.word.text, start=item.word.start, end=item.word.end, contribution=item.contribution)
        for item in explanation
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
        truncation=service.settings.truncation,
        calibration=manifest.calibration.model_dump(mode="json"),
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
    summary="Readiness: the model is loaded, checked and warmed up",
    responses={
        503: _error(
            "Model not loaded yet, or shutting down; or, for good, a start-up check failed (the detail says which: "
            "require_accelerator without CUDA in use, or the variant's answers on the probe notes)."
        )
    },
)
async def readyz(request: Request) -> dict[str, str]:
    ready_service(request)
    return {"status": "ready"}


@router.get(
    MODEL_CARD_PATH,
    response_class=PlainTextResponse,
    summary="The bundle's model card (markdown): intended use, data, metrics, calibration, threshold, limitations",
    responses={200: {"content": {"text/plain": {}}}, 404: _error(f"The bundle has no {MODEL_CARD_FILE}.")},
)
async def model_card(request: Request) -> PlainTextResponse:
    """Open like discovery: CDS Hooks cards link here, and a clinician's browser carries no token. Sent as text/plain,
    which every browser shows (some download text/markdown)."""
    path = request.app.state.settings.bundle / MODEL_CARD_FILE
    try:
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    except FileNotFoundError:
        raise HTTPException(404, f"the bundle has no {MODEL_CARD_FILE}") from None
    return PlainTextResponse(text)
