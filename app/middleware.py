"""ASGI middleware: request id, access log and metrics; bearer-token check before the body is read (CORS, when set,
goes around it in app.main); request body checks (type, encoding, size, time, JSON shape)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import traceback
import uuid
import zlib
from collections.abc import Callable, Collection, Mapping

import numpy as np
from fastapi.routing import APIRoute
from opentelemetry import trace
from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import AUTHENTICATED, Authenticator, Unauthorized, accepts_ehr_jwt, bearer_token
from app.metrics import Metrics

logger = logging.getLogger("app.access")

REQUEST_ID_HEADER = "x-request-id"
# A caller's request id is kept only if it is short and plain, so that it is safe to log and echo.
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the response
# Where the HTTP server (app.server) records a status it sent itself, e.g. 400 for a malformed chunked body.
SERVER_STATUS = "server_status"
JSON_MEDIA_TYPES = ("application/json", "application/fhir+json")
MAX_JSON_DEPTH = 64  # FHIR resources here nest about 8 deep
MAX_NUMBER_DIGITS = 64


class AccessLogMiddleware:
    """Gives each request an id (`X-Request-ID`, echoed), then logs and counts it once it is answered.

    Routes add counts to the log line through `request.state.log_fields`. An unhandled exception
    becomes a 500 logged by type and place only: its message could quote a note. With tracing on, the line
    holds the request's trace id (app/tracing.py), the caller's when it sent a traceparent.
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
        state["request_id"] = request_id  # for the audit record
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
        status = status or state.get(SERVER_STATUS, CLIENT_CLOSED_REQUEST)
        seconds = time.perf_counter() - started
        route = self._route(scope)
        self.metrics.observe_request(route, status, seconds)
        span = trace.get_current_span().get_span_context()  # FastAPI's server span, around this middleware
        trace_fields = {"trace_id": trace.format_trace_id(span.trace_id)} if span.is_valid else {}
        logger.info(
            "request",
            extra={
                "fields": {
                    "request_id": request_id,
                    "method": scope["method"],
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 2),
                    **trace_fields,
                    **state.get("log_fields", {}),
                }
            },
        )

    def _route(self, scope: Scope) -> str:
        """The request's metric label: the path of the route it reached (`/v2/models/{model_name}/infer`), or
        "other" for a URL no route serves."""
        reached = scope.get("route")  # set by the router
        path = reached.path if isinstance(reached, APIRoute) else scope["path"]
        return path if path in self.route_paths else "other"

    @staticmethod
    def _request_id(scope: Scope) -> str:
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER.encode():
                candidate: str = value.decode("latin-1")
                if _SAFE_REQUEST_ID.fullmatch(candidate):
                    return candidate
        return uuid.uuid4().hex


# (request path, HTTP status, message, headers) -> the error response in the protocol of that path
ErrorResponse = Callable[[str, int, str, Mapping[str, str] | None], Response]


def json_error(path: str, status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


class BearerAuthMiddleware:
    """401 for a protected route (one that depends on `require_api_key` or `require_cds_client`) without a bearer
    token that `app.auth.Authenticator` accepts, before the request body is read or parsed: an unauthenticated
    caller learns nothing about what the body should be. The route's dependency checks again, unless this let the
    request in (its `AUTHENTICATED` state), so a route is never open by a slip here."""

    def __init__(
        self,
        app: ASGIApp,
        authenticator: Authenticator,
        routes: list[APIRoute],
        error_response: ErrorResponse = json_error,
    ) -> None:
        self.app = app
        self.authenticator = authenticator
        self.routes = routes
        self.error_response = error_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self._protected_route(scope) if scope["type"] == "http" else None
        if route is not None:
            state = scope.setdefault("state", {})
            token = bearer_token(Headers(scope=scope).get("authorization"))
            try:
                state[AUTHENTICATED] = await self.authenticator.authenticate(token, accepts_ehr_jwt(route))
            except Unauthorized as error:
                state.setdefault("log_fields", {})["auth_refused"] = error.code
                await self.error_response(scope["path"], error.status, error.message, error.headers)(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)

    def _protected_route(self, scope: Scope) -> APIRoute | None:
        return next((route for route in self.routes if route.matches(scope)[0] is not Match.NONE), None)


class RequestBodyMiddleware:
    """Reads the whole request body before the app does, and refuses, worded by `error_response` for the path
    asked (an OperationOutcome for the FHIR endpoint):

    - 415: a request for a route in `json_routes` whose Content-Type is not JSON, or any request with a
      Content-Encoding other than gzip/identity (a method a route does not take is left to the router: 405);
    - 408: a body not received within `body_timeout_s` (a slow client, or a Content-Length larger than the body);
    - 413: a body over `max_body_bytes`, as sent or once gunzipped (checked while reading and decompressing);
    - 400: a body that is not UTF-8, not valid gzip, nested deeper than MAX_JSON_DEPTH or holding a number of
      more than MAX_NUMBER_DIGITS digits (what would make the JSON parser recurse or convert without end).

    A gzip body is passed on decompressed, without its Content-Encoding.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        body_timeout_s: float,
        json_routes: list[APIRoute],
        error_response: ErrorResponse = json_error,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.json_routes = json_routes  # the routes that read a JSON body: a request for one must say so
        self.error_response = error_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            body = await self._checked_body(scope, receive)
        except _Refused as refused:
            headers = {"Connection": "close"} if refused.status == 408 else None
            await self.error_response(scope["path"], refused.status, refused.message, headers)(scope, receive, send)
            return
        if body is None:  # the client left
            return
        if Headers(scope=scope).get("content-encoding") is not None:
            kept = [
                (name, value)
                for name, value in scope["headers"]
                if name not in (b"content-encoding", b"content-length")
            ]
            # In place: the access log reads from this scope which route the request reached.
            scope["headers"] = [*kept, (b"content-length", str(len(body)).encode())]
        await self.app(scope, _replay(body, receive), send)

    async def _checked_body(self, scope: Scope, receive: Receive) -> bytes | None:
        headers = Headers(scope=scope)
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        takes_json = any(route.matches(scope)[0] is Match.FULL for route in self.json_routes)
        if takes_json and media_type not in JSON_MEDIA_TYPES:
            raise _Refused(415, f"Content-Type must be {' or '.join(JSON_MEDIA_TYPES)}")
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", "gzip"):
            raise _Refused(415, "Content-Encoding must be gzip or identity")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _Refused(413, f"request body exceeds {self.max_body_bytes} bytes")
        try:
            async with asyncio.timeout(self.body_timeout_s):
                body = await self._read(receive)
        except TimeoutError:
            raise _Refused(408, f"request body not received within {self.body_timeout_s:g} s") from None
        if body is None:
            return None
        if encoding == "gzip":
            body = self._gunzip(body)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _Refused(400, f"request body is not valid UTF-8 (byte {error.start})") from None
        problem = json_shape_problem(body)
        if problem is not None:
            raise _Refused(400, f"request body refused: {problem}")
        return body

    async def _read(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                raise _Refused(413, f"request body exceeds {self.max_body_bytes} bytes")
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _gunzip(self, body: bytes) -> bytes:
        decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            data = decompressor.decompress(body, self.max_body_bytes + 1)
        except zlib.error:
            raise _Refused(400, "request body is not valid gzip (Content-Encoding: gzip)") from None
        if len(data) > self.max_body_bytes:
            raise _Refused(413, f"request body exceeds {self.max_body_bytes} bytes once decompressed")
        if not decompressor.eof or decompressor.unused_data:
            raise _Refused(400, "request body is not one complete gzip stream (Content-Encoding: gzip)")
        return data


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_LONG_NUMBER = re.compile(rb"[0-9]{%d,}" % (MAX_NUMBER_DIGITS + 1))
_OPENERS, _CLOSERS = np.frombuffer(b"[{", dtype=np.uint8), np.frombuffer(b"]}", dtype=np.uint8)


def json_shape_problem(body: bytes) -> str | None:
    """What in `body` would make the JSON parser recurse too deep or build a huge integer, or None. Strings are
    blanked out first, so that brackets and digits inside them do not count."""
    skeleton = np.frombuffer(_JSON_STRING.sub(b'""', body), dtype=np.uint8)
    if _LONG_NUMBER.search(skeleton.tobytes()):
        return f"a number has more than {MAX_NUMBER_DIGITS} digits"
    steps = np.isin(skeleton, _OPENERS).astype(np.int32) - np.isin(skeleton, _CLOSERS)
    if steps.size and int(np.cumsum(steps).max()) > MAX_JSON_DEPTH:
        return f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
    return None


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
