"""The service core, free of HTTP: the loaded model with its batcher (`Service`) and `classify_texts`, the path
from note texts to labels that /classify, FHIR and CDS Hooks share.

Its errors are `ServiceError`s carrying the HTTP status they stand for; each router words them in its own
protocol (the service's JSON error, an OperationOutcome, a CDS Hooks error).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from http import HTTPStatus
from typing import Literal

from app.batching import DynamicBatcher, InferenceFailed, QueueFull, ShuttingDown
from app.bundle import Bundle
from app.inference import NoteClassifier
from app.metrics import Metrics
from app.schemas import ModelRef
from app.settings import Settings

INTENDED_USE = (
    "Decision support at emergency-department triage: estimates the probability that a triage note "
    "describes a patient who needs emergency care, for review by a clinician. Not a diagnosis, not a "
    "replacement for triage by trained staff, and not validated outside the population in its test metrics."
)
RETRY_AFTER_S = 1

LogFields = dict[str, object]
"""Counts (never note text or ids) that the core adds to the caller's access-log line."""


class ServiceError(Exception):
    """A request the service cannot answer; `status` is the HTTP status it stands for. The message names
    notes by position only."""

    def __init__(self, status: HTTPStatus, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry = retry  # whether the same request may succeed later (sent as Retry-After)

    @property
    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(RETRY_AFTER_S)} if self.retry else None


@dataclass(frozen=True)
class Service:
    """What the routes need once the bundle is loaded and warmed up."""

    settings: Settings
    bundle: Bundle
    classifier: NoteClassifier
    batcher: DynamicBatcher
    metrics: Metrics

    @property
    def model(self) -> ModelRef:
        return ModelRef(
            name=self.settings.model_name or self.bundle.manifest.name, version=self.bundle.manifest.version
        )


@dataclass(frozen=True)
class Classification:
    label: Literal["emergency", "non-emergency"]
    probability: float  # P(emergency)
    threshold: float  # P(emergency) at or above which the label is emergency
    truncated: bool  # whether the note was cut to max_note_tokens (settings.truncation says how)
    chars: int  # the note's length in characters
    tokens: int  # tokens the model read (after any truncation)


async def classify_texts(service: Service, texts: list[str], log_fields: LogFields) -> list[Classification]:
    """Labels of `texts`, in order: the note limits (413), tokenization, the dynamic batcher (429, 503, 500)
    and the bundle's threshold. Adds counts to `log_fields`."""
    settings = service.settings
    lengths = [len(text) for text in texts]
    log_fields.update(notes=len(texts), text_chars_total=sum(lengths), text_chars_max=max(lengths))
    if len(texts) > settings.max_notes_per_request:
        raise ServiceError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"{len(texts)} notes; at most {settings.max_notes_per_request} per request",
        )
    too_long = [position for position, length in enumerate(lengths) if length > settings.max_note_chars]
    if too_long:
        raise ServiceError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"notes at positions {too_long} exceed {settings.max_note_chars} characters",
        )

    encoded = await asyncio.to_thread(service.classifier.encode, texts)
    truncated = [position for position, note in enumerate(encoded) if note.truncated]
    log_fields.update(tokens_total=sum(len(note.ids) for note in encoded), truncated=len(truncated))
    if truncated and settings.truncation == "refuse":
        raise ServiceError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"notes at positions {truncated} exceed {service.classifier.max_note_tokens} tokens",
        )

    try:
        probabilities = await service.batcher.classify([note.ids for note in encoded], settings.request_timeout_s)
    except QueueFull:
        raise ServiceError(HTTPStatus.TOO_MANY_REQUESTS, "queue full, retry later", retry=True) from None
    except ShuttingDown:
        raise ServiceError(HTTPStatus.SERVICE_UNAVAILABLE, "shutting down", retry=True) from None
    except TimeoutError:
        raise ServiceError(
            HTTPStatus.SERVICE_UNAVAILABLE,
            f"no answer from the model within {settings.request_timeout_s} s",
            retry=True,
        ) from None
    except InferenceFailed:
        raise ServiceError(HTTPStatus.INTERNAL_SERVER_ERROR, "the model failed on this request") from None

    service.metrics.notes_truncated.inc(len(truncated))
    threshold = service.bundle.manifest.decision.threshold
    return [
        Classification(
            "emergency" if probability >= threshold else "non-emergency",
            float(probability),
            threshold,
            note.truncated,
            chars=length,
            tokens=len(note.ids),
        )
        for note, probability, length in zip(encoded, probabilities, lengths, strict=True)
    ]


def describe_cut(service: Service) -> str:
    """Which tokens of a truncated note the model read, for clinicians reading the answer."""
    classifier = service.classifier
    if classifier.truncation == "head":
        return f"its first {classifier.max_note_tokens} tokens"
    return f"its first and last tokens, {classifier.max_note_tokens} in all"
