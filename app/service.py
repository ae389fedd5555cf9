"""The service core, free of HTTP: the loaded model with its batcher (`Service`) and `classify_texts`, the path
from note texts to labels (and, on request, explanations: app/explain.py) that /classify, FHIR and CDS Hooks
share.

Its errors are `ServiceError`s carrying the HTTP status they stand for; each router words them in its own
protocol (the service's JSON error, an OperationOutcome, a CDS Hooks error).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Literal

import numpy as np
from opentelemetry.trace import Tracer

from app.batching import DynamicBatcher, InferenceFailed, QueueFull, ShuttingDown
from app.bundle import Bundle
from app.explain import Word, WordContribution, explanations, note_words, variants
from app.inference import EncodedNote, NoteClassifier
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
    tracer: Tracer  # makes no spans unless tracing is on (app/tracing.py)

    @property
    def model(self) -> ModelRef:
        return ModelRef(
            name=self.settings.model_name or self.bundle.manifest.name, version=self.bundle.manifest.version
        )

    @property
    def description(self) -> dict[str, str]:
        """The served model in a few words: the labels of the triage_model_info metric."""
        manifest = self.bundle.manifest
        return {
            "name": self.model.name,
            "version": manifest.version,
            "variant": self.bundle.variant,
            "provider": self.bundle.providers[0],  # the one ONNX Runtime tries first; CPU is always a fallback
            "threshold": str(manifest.decision.threshold),
            "threshold_policy": manifest.decision.policy,
            "calibration": manifest.calibration.method,
            "method": manifest.encoders.method,
        }


@dataclass(frozen=True)
class Classification:
    label: Literal["emergency", "non-emergency"]
    probability: float  # P(emergency)
    threshold: float  # P(emergency) at or above which the label is emergency
    truncated: bool  # whether the note was cut to max_note_tokens (settings.truncation says how)
    chars: int  # the note's length in characters
    tokens: int  # tokens the model read (after any truncation)
    # With explain: the words that moved P(emergency) most, largest |contribution| first (app/explain.py).
    explanation: tuple[WordContribution, ...] | None = None


async def classify_texts(
    service: Service, texts: list[str], log_fields: LogFields, *, explain: bool = False
) -> list[Classification]:
    """Labels of `texts`, in order: the note limits (413), tokenization, the dynamic batcher (429, 503, 500)
    and the bundle's threshold; with `explain`, each with its explanation. Adds counts to `log_fields`, records
    each label and P(emergency) in the metrics, and traces the inference (counts only) when tracing is on."""
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

    words: list[list[Word]] = [[] for _ in texts]
    if explain:
        words = _words_to_explain(texts, settings.explain_max_words)
        log_fields.update(explained_words=sum(len(its_words) for its_words in words))
    # A note's variants (one per word deleted) are queued with the notes as one request: they run in batches
    # planned by the batcher's token budget, count against its queue and timeout like any notes, and the note's
    # own probability comes from the same run as theirs.
    encoded_all = await asyncio.to_thread(service.classifier.encode, [*texts, *variants(texts, words)])
    encoded = encoded_all[: len(texts)]
    truncated = [position for position, note in enumerate(encoded) if note.truncated]
    log_fields.update(tokens_total=sum(len(note.ids) for note in encoded), truncated=len(truncated))
    if truncated and settings.truncation == "refuse":
        raise ServiceError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"notes at positions {truncated} exceed {service.classifier.max_note_tokens} tokens",
        )

    scored = await _score(service, encoded_all)
    service.metrics.notes_truncated.inc(len(truncated))
    probabilities = scored[: len(texts)]
    explained: Sequence[tuple[WordContribution, ...] | None] = (
        explanations(words, probabilities, scored[len(texts) :], settings.explain_top_k)
        if explain
        else [None] * len(texts)
    )
    decision = service.bundle.manifest.decision
    classified = [
        Classification(
            decision.label(probability),
            float(probability),
            decision.threshold,
            note.truncated,
            chars=length,
            tokens=len(note.ids),
            explanation=explanation,
        )
        for note, probability, length, explanation in zip(encoded, probabilities, lengths, explained, strict=True)
    ]
    for result in classified:
        service.metrics.observe_prediction(result.label, result.probability)
    return classified


async def _score(service: Service, encoded: list[EncodedNote]) -> np.ndarray:
    """P(emergency) of each encoded note (or explanation variant) from the dynamic batcher, in one span: its queue
    wait and its share of the batched model runs."""
    timeout_s = service.settings.request_timeout_s
    attributes: dict[str, int | str] = {
        "triage.batch.size": len(encoded),
        "triage.batch.tokens": sum(len(note.ids) for note in encoded),
        "triage.model.version": service.bundle.manifest.version,
    }
    # Not the exceptions' stack traces: the span's status says which ServiceError (its message names no note).
    with service.tracer.start_as_current_span("triage.inference", attributes=attributes, record_exception=False):
        try:
            return await service.batcher.classify([note.ids for note in encoded], timeout_s)
        except QueueFull:
            raise ServiceError(HTTPStatus.TOO_MANY_REQUESTS, "queue full, retry later", retry=True) from None
        except ShuttingDown:
            raise ServiceError(HTTPStatus.SERVICE_UNAVAILABLE, "shutting down", retry=True) from None
        except TimeoutError:
            raise ServiceError(
                HTTPStatus.SERVICE_UNAVAILABLE, f"no answer from the model within {timeout_s} s", retry=True
            ) from None
        except InferenceFailed:
            raise ServiceError(HTTPStatus.INTERNAL_SERVER_ERROR, "the model failed on this request") from None


def _words_to_explain(texts: list[str], max_words: int) -> list[list[Word]]:
    """Each note's words, to be deleted one at a time; 413 when the notes hold more than `max_words` in all
    (found without reading past that many)."""
    words: list[list[Word]] = []
    left = max_words
    for text in texts:
        words.append(note_words(text, at_most=left + 1))
        left -= len(words[-1])
        if left < 0:
            raise ServiceError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"explain: the notes hold more than {max_words} words (explain_max_words); explain fewer or "
                "shorter notes, or classify them without explain",
            )
    return words


def describe_cut(service: Service) -> str:
    """Which tokens of a truncated note the model read, for clinicians reading the answer."""
    classifier = service.classifier
    if classifier.truncation == "head":
        return f"its first {classifier.max_note_tokens} tokens"
    return f"its first and last tokens, {classifier.max_note_tokens} in all"
