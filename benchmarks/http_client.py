"""A minimal asyncio HTTP/1.1 client for load generation against 127.0.0.1.

It POSTs JSON over keep-alive connections and reads answers that carry a Content-Length (what
uvicorn-based servers send for JSON). The load generator shares the machine's cores with the server
under test, so its cost per request matters: `httpx.AsyncClient` measured 1-4 ms of CPU per request
here (rising with the number of connections), this client a small fraction of that.
"""

from __future__ import annotations

import asyncio
from typing import Self
from urllib.parse import urlsplit

ALLOWED_HOST = "127.0.0.1"


class ProtocolError(Exception):
    """An answer this client does not read (no Content-Length, e.g. chunked), or not HTTP at all."""


# What `HttpClient.post_json` raises when a request got no answer.
TRANSPORT_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ProtocolError, TimeoutError)


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def post(self, head: bytes, body: bytes) -> tuple[int, bytes, bool]:
        """Status, body, and whether the server keeps the connection open."""
        self.writer.write(head + body)
        response_head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = response_head[:-4].split(b"\r\n")
        try:
            status = int(status_line.split()[1])
        except (IndexError, ValueError):
            raise ProtocolError("malformed status line") from None
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        if b"content-length" not in headers:
            raise ProtocolError("answer without Content-Length")
        content = await self.reader.readexactly(int(headers[b"content-length"]))
        return status, content, headers.get(b"connection") != b"close"

    def close(self) -> None:
        self.writer.close()


class HttpClient:
    """`async with HttpClient(url, max_connections) as client: status, body = await client.post_json(body)`.

    At most `max_connections` requests are in flight; more wait for a free connection. A connection
    that failed, timed out or was closed by the server is dropped and replaced on demand. A request
    sent just as the server closes an idle connection fails (IncompleteReadError); it is not retried.
    """

    def __init__(self, url: str, max_connections: int, timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname != ALLOWED_HOST or parts.port is None:
            raise ValueError(f"{url}: only http://{ALLOWED_HOST}:PORT/... targets are allowed")
        self._address = (parts.hostname, parts.port)
        self._head_start = (
            f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        ).encode()
        self._timeout_s = timeout_s
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    async def post_json(self, body: bytes) -> tuple[int, bytes]:
        """Status and body of the answer; raises one of TRANSPORT_ERRORS when there is none."""
        async with self._slots:
            connection = self._take_idle() or _Connection(*await asyncio.open_connection(*self._address))
            head = self._head_start + f"Content-Length: {len(body)}\r\n\r\n".encode()
            try:
                status, content, keep_alive = await asyncio.wait_for(connection.post(head, body), self._timeout_s)
            except BaseException:
                connection.close()
                raise
            if keep_alive:
                self._idle.append(connection)
            else:
                connection.close()
            return status, content

    def _take_idle(self) -> _Connection | None:
        """The most recently used idle connection the server has not closed (servers close keep-alive
        connections idle past their timeout: 5 s for uvicorn)."""
        while self._idle:
            connection = self._idle.pop()
            if not connection.reader.at_eof():
                return connection
            connection.close()
        return None
