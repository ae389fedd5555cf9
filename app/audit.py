"""The audit trail: one JSON record per answered request of /classify, FHIR $classify and the CDS Hooks service,
saying what was recommended and by which model, so that a clinical safety officer can reconstruct every answer.

A record holds the request id (X-Request-ID: a caller that logs it next to its own patient context can find the
record), the time, the route, the model (name, version, ONNX variant and that file's sha256), the threshold and
its policy, the calibration, the truncation, and per note its position, P(emergency), label, whether it was
truncated, its length in characters and tokens, and, when asked for, its explanation as character offsets and
contributions (never the words); a CDS Hooks record adds each card's uuid and a sha256 of the hookInstance. Never
note text, note ids, patient or encounter references.

Sinks: the logger `triage.audit` on the log stream (unless `audit_log_stream` is off), and, with `audit_file`, an
append-only JSON-lines file, created 0600 and rotated by size. A record that cannot be written to the file fails
its request with 503 (counted in `triage_audit_errors_total` and logged): no recommendation leaves the service
without its audit record.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
from datetime import UTC, datetime
from http import HTTPStatus
from io import TextIOWrapper
from logging.handlers import RotatingFileHandler
from pathlib import Path

from starlette.requests import Request

from app.metrics import Metrics
from app.service import Classification, Service, ServiceError
from app.settings import Settings

logger = logging.getLogger(__name__)
audit_logger = logging.getLogger("triage.audit")

AUDIT_SCHEMA = 1  # raised whenever a field changes meaning or goes away
AuditRecord = dict[str, object]


class AuditTrail:
    """Writes audit records to the log stream and, when `audit_file` is set, to the audit file (opened at once, so
    that an unwritable one stops the service at start; closed on leaving `async with`)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.log_stream = settings.audit_log_stream
        self.metrics = metrics
        self.file = (
            None
            if settings.audit_file is None
            else AuditFile(settings.audit_file, settings.audit_max_bytes, settings.audit_backups)
        )
        audit_logger.setLevel(logging.INFO)  # recorded whatever the service's log_level

    async def write(self, record: AuditRecord) -> None:
        """The file first (off the event loop), then the log stream: the stream never shows a recommendation
        whose record the file lacks. A file error is a 503 (ServiceError)."""
        if self.file is not None:
            try:
                await asyncio.to_thread(self.file.write, json.dumps(record, ensure_ascii=False))
            except Exception as error:
                self.metrics.audit_errors.inc()
                logger.error(
                    "audit record not written; the request is refused",
                    extra={"fields": {"request_id": record["request_id"], "error": type(error).__name__}},
                )
                raise ServiceError(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    "the audit trail cannot be written; no recommendation is given without its audit record",
                ) from None
        if self.log_stream:
            audit_logger.info("recommendation", extra={"fields": record})

    async def __aenter__(self) -> AuditTrail:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.file is not None:
            self.file.close()


class AuditFile(RotatingFileHandler):
    """An append-only JSON-lines file, created 0600 (an existing file keeps its mode) and rotated before it would
    exceed `max_bytes` (renamed FILE.1, FILE.2, ..., the oldest beyond `backups` deleted; 0: never rotated). One
    process per file: rotation is not shared between processes."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")

    def write(self, line: str) -> None:
        self.handle(logging.makeLogRecord({"msg": line}))

    def emit(self, record: logging.LogRecord) -> None:
        """One write(2) per record, so that no buffer holds it: a record not written raises (logging's handlers
        print the error and carry on) and leaves nothing to be written later."""
        if self.stream is None:  # closed at shutdown: a late record opens it again
            self.stream = self._open()
        if self.shouldRollover(record):
            self.doRollover()
        descriptor = self.stream.fileno()
        size = os.fstat(descriptor).st_size
        data = (self.format(record) + self.terminator).encode()
        if os.write(descriptor, data) < len(data):
            os.ftruncate(descriptor, size)  # a line cut short would run into the next record
            raise OSError(errno.ENOSPC, "audit record written in part (disk full?), and cut off again")

    def _open(self) -> TextIOWrapper:
        return open(
            self.baseFilename,
            "a",
            encoding=self.encoding,
            opener=lambda path, flags: os.open(path, flags, 0o600),
        )


async def record(
    request: Request,
    service: Service,
    classified: list[Classification],
    card_uuids: list[str] | None = None,
    hook_instance: str | None = None,
) -> None:
    """Write the audit record of one answered request (`card_uuids[i]`: the card of note i, for CDS Hooks)."""
    trail: AuditTrail = request.app.state.audit
    await trail.write(
        audit_record(request.state.request_id, request.url.path, service, classified, card_uuids, hook_instance)
    )


def audit_record(
    request_id: str,
    route: str,
    service: Service,
    classified: list[Classification],
    card_uuids: list[str] | None = None,
    hook_instance: str | None = None,
) -> AuditRecord:
    manifest = service.bundle.manifest
    notes = [_note_entry(position, result) for position, result in enumerate(classified)]
    if card_uuids is not None:
        for note, card_uuid in zip(notes, card_uuids, strict=True):
            note["card_uuid"] = card_uuid
    record: AuditRecord = {
        "audit_schema": AUDIT_SCHEMA,
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "request_id": request_id,
        "route": route,
        "model": {
            "name": service.model.name,
            "version": manifest.version,
            "variant": service.bundle.variant,
            "onnx_sha256": manifest.variants[service.bundle.variant].sha256,
        },
        "decision": {"threshold": manifest.decision.threshold, "policy": manifest.decision.policy},
        "calibration": manifest.calibration.model_dump(include={"method", "scale", "bias"}),
        "truncation": {"mode": service.settings.truncation, "max_note_tokens": service.classifier.max_note_tokens},
        "notes": notes,
    }
    if hook_instance is not None:
        record["hook_instance_sha256"] = hashlib.sha256(hook_instance.encode()).hexdigest()
    return record


def _note_entry(position: int, result: Classification) -> dict[str, object]:
    entry: dict[str, object] = {
        "position": position,
        "probability": result.probability,
        "label": result.label,
        "truncated": result.truncated,
        "chars": result.chars,
        "tokens": result.tokens,
    }
    if result.explanation is not None:  # where the words shown are in the note (which the caller keeps), not the words
        entry["explanation"] = [
            {"start": item.word.start, "end": item.word.end, "contribution": item.contribution}
            for item in result.explanation
        ]
    return entry
