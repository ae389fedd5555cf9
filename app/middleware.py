"""ASGI middleware: request id, access log and metrics; request body size and encoding checks."""

from __future__ import annotations

import logging
import re
import time
import traceback
import uuid
from collections.abc import Callable, Collection

from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import Metrics

logger = logging.getLogger("app.access")

REQUEST_ID_HEADER = "x-request-id"
# A caller's request id is kept only if it is short and plain, so that it is safe to log and echo.
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the response


class AccessLogMiddleware:
    """Gives each request an id (`X-Request-ID`, echoed), then logs and counts it once it is answered.

    Routes add counts to the log line through `request.state.log_fields`. An unhandled exception
    becomes a 500 logged by type and place only: its message could quote a note.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, route_paths: Collection[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.route_paths = route_paths  # metric labels: one per route, "other" for any other URL

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = self._request_id(scope)
        state = scope.setdefault("state", {})  # the dict behind `request.state`
        status: int | None = None  # set when the response starts

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as error:
            frame = traceback.extract_tb(error.__traceback__)[-1]
            logger.error(
                "unhandled error",
                extra={
                    "fields": {
                        "request_id": request_id,
                        "error": type(error).__name__,
                        "at": f"{frame.filename}:{frame.lineno}",
                    }
                },
            )
            if status is None:
                await JSONResponse({"detail": "internal error"}, status_code=500)(scope, receive, send_with_id)
            status = 500
        status = status or CLIENT_CLOSED_REQUEST
        seconds = time.perf_counter() - started
        route = scope["path"] if scope["path"] in self.route_paths else "other"
        self.metrics.observe_request(route, status, seconds)
        logger.info(
            "request",
            extra={
                "fields": {
                    "request_id": request_id,
                    "method": scope["method"],
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 2),
                    **state.get("log_fields", {}),
                }
            },
        )

    @staticmethod
    def _request_id(scope: Scope) -> str:
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER.encode():
                candidate: str = value.decode("latin-1")
                if _SAFE_REQUEST_ID.fullmatch(candidate):
                    return candidate
        return uuid.uuid4().hex


# (request path, HTTP status, message) -> the error response in the protocol of that path
ErrorResponse = Callable[[str, int, str], Response]


def json_error(path: str, status: int, message: str) -> Response:
    return JSONResponse({"detail": message}, status_code=status)


class BodyLimitMiddleware:
    """Reads the whole request body before the app does: 413 past `max_body_bytes` (checked while
    reading, with or without Content-Length), 400 when it is not UTF-8 (JSON must be). `error_response`
    words those answers for the path asked (an OperationOutcome for the FHIR endpoint).

    Not FastAPI's own `max_body_size`: that is recent (FastAPI 0.16x), answers some 413s in plain
    text, and leaves the encoding to a generic "error parsing the body".
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, error_response: ErrorResponse = json_error) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.error_response = error_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = self.error_response(scope["path"], 413, f"request body exceeds {self.max_body_bytes} bytes")
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as error:
            await self.error_response(scope["path"], 400, f"request body is not valid UTF-8 (byte {error.start})")(
                scope, receive, send
            )
            return
        await self.app(scope, _replay(body, receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that yields the already read body once, then defers to the server's (disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
