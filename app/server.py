"""The HTTP server: uvicorn with its httptools protocol, plus what that protocol leaves open to slow or abusive
clients.

- A deadline for a request's head: a connection whose request line and headers are not complete
  `header_timeout_s` after they began (slowloris) is answered 408 and closed. uvicorn only times out idle
  keep-alive connections.
- Caps on the head: more than `max_header_bytes` bytes or `max_headers` fields get 431 and a closed
  connection (httptools parses any size and count).
- The status uvicorn sends itself (400 for a malformed request, e.g. a bad chunk size, after the app has
  started) is recorded for the access log, which would otherwise count the request as abandoned (499).

Request bodies are timed and capped by `app.middleware.RequestBodyMiddleware`. Behind a reverse proxy, set
the same limits there too (docs/integration.md has an nginx snippet).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.middleware import SERVER_STATUS
from app.settings import Settings

logger = logging.getLogger("app.server")
LINGER_S = 1.0


def guarded_protocol(settings: Settings) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with `settings`' head deadline and caps (see the module docstring)."""
    header_timeout_s, max_header_bytes, max_headers = (
        settings.header_timeout_s,
        settings.max_header_bytes,
        settings.max_headers,
    )

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_deadline: asyncio.TimerHandle | None = None
            # Two lower bounds of the current request head's size: the bytes of reads that ended inside it, and
            # the parsed URL and fields. Either past max_header_bytes means the head is.
            self._unfinished_head_bytes = 0
            self._parsed_head_bytes = 0
            self._head_fields = 0
            self._refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._start_head()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return  # lingering before the close: dropped
            if self._head_deadline is None and (self.cycle is None or self.cycle.response_complete):
                self._start_head()  # the next request on a keep-alive connection
            super().data_received(data)
            # Still no complete head after these bytes: they all count towards it.
            if self._head_deadline is not None and not self._refused:
                self._unfinished_head_bytes += len(data)
                if self._unfinished_head_bytes > max_header_bytes:
                    self._refuse(431, "request head too large")

        def on_url(self, url: bytes) -> None:
            self._count_head(len(url), fields=0)
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_head(len(name) + len(value), fields=1)
            super().on_header(name, value)

        def _count_head(self, size: int, fields: int) -> None:
            """Count a parsed part of the head; past a cap, refuse and stop the parser (uvicorn then calls
            send_400_response, which does nothing once refused)."""
            self._head_fields += fields
            self._parsed_head_bytes += size
            if self._head_fields > max_headers:
                self._refuse(431, "too many header fields")
                raise _HeadRefused
            if self._parsed_head_bytes > max_header_bytes:
                self._refuse(431, "request head too large")
                raise _HeadRefused

        def on_headers_complete(self) -> None:
            self._end_head()
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:
            if self._refused:
                return
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.scope["state"][SERVER_STATUS] = 400
            super().send_400_response(msg)

        def connection_lost(self, exc: Exception | None) -> None:
            self._end_head()
            super().connection_lost(exc)

        def _start_head(self) -> None:
            self._unfinished_head_bytes = self._parsed_head_bytes = self._head_fields = 0
            self._head_deadline = self.loop.call_later(header_timeout_s, self._head_too_slow)

        def _end_head(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
                self._head_deadline = None

        def _head_too_slow(self) -> None:
            self._head_deadline = None
            if self._unfinished_head_bytes:  # a request had begun; a silent new connection is simply closed
                self._refuse(408, f"request head not received within {header_timeout_s:g} s")
            else:
                self.transport.close()

        def _refuse(self, status: int, reason: str) -> None:
            """Answer with `status` and close: the connection's state is not worth keeping. The close lingers:
            what the client still sends is read and dropped for a moment, as closing on unread data would reset
            the connection and could destroy the answer before the client reads it."""
            self._end_head()
            self._refused = True
            logger.warning("connection refused", extra={"fields": {"status": status, "reason": reason}})
            phrase = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
            body = reason.encode()
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (status, phrase, len(body), body)
            )
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)

    return GuardedHttpToolsProtocol


class _HeadRefused(Exception):
    pass


def server_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of `uvicorn.run` / `uvicorn.Config` for `settings`."""
    return {
        "host": settings.host,
        "port": settings.port,
        "http": guarded_protocol(settings),
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "log_config": None,  # app.logs configures logging
        "access_log": False,  # app.middleware.AccessLogMiddleware logs each request
    }
