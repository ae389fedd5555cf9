"""The load generator's HTTP client against a scripted HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from benchmarks.http_client import HttpClient, ProtocolError

Answer = Callable[[bytes], bytes]  # request body -> raw HTTP answer


def json_answer(body: bytes, extra_headers: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra_headers}\r\n".encode() + body


async def with_server(
    answer: Answer, test: Callable[[str, list[int]], Awaitable[None]], idle_timeout_s: float = 60
) -> None:
    """Run `test(url, connections)` against a server that answers each request with `answer(body)` and
    closes a connection idle for `idle_timeout_s`; `connections` counts the connections it accepted."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), idle_timeout_s)
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                writer.write(answer(await reader.readexactly(length)))
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        await test(f"http://127.0.0.1:{port}/classify", connections)


def test_posts_and_reuses_the_connection() -> None:
    async def test(url: str, connections: list[int]) -> None:
        async with HttpClient(url, max_connections=4, timeout_s=5) as client:
            answers = [await client.post_json(b'{"n": %d}' % n) for n in range(3)]
        assert answers == [(200, b'{"n": %d}' % n) for n in range(3)]
        assert len(connections) == 1

    asyncio.run(with_server(json_answer, test))


def test_opens_a_new_connection_after_connection_close() -> None:
    async def test(url: str, connections: list[int]) -> None:
        async with HttpClient(url, max_connections=1, timeout_s=5) as client:
            for _ in range(2):
                assert await client.post_json(b"{}") == (200, b"{}")
        assert len(connections) == 2

    asyncio.run(with_server(lambda body: json_answer(body, "Connection: close\r\n"), test))


def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    async def test(url: str, connections: list[int]) -> None:
        async with HttpClient(url, max_connections=1, timeout_s=5) as client:
            assert await client.post_json(b"{}") == (200, b"{}")
            await asyncio.sleep(0.3)  # past the server's keep-alive timeout
            assert await client.post_json(b"{}") == (200, b"{}")
        assert len(connections) == 2

    asyncio.run(with_server(json_answer, test, idle_timeout_s=0.1))


def test_concurrent_requests_stay_within_max_connections() -> None:
    async def test(url: str, connections: list[int]) -> None:
        async with HttpClient(url, max_connections=3, timeout_s=5) as client:
            answers = await asyncio.gather(*(client.post_json(b"%d" % n) for n in range(20)))
        assert sorted(body for _, body in answers) == sorted(b"%d" % n for n in range(20))
        assert len(connections) <= 3

    asyncio.run(with_server(json_answer, test))


def test_answer_without_content_length_is_a_protocol_error() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"

    async def test(url: str, connections: list[int]) -> None:
        async with HttpClient(url, max_connections=1, timeout_s=5) as client:
            with pytest.raises(ProtocolError):
                await client.post_json(b"{}")

    asyncio.run(with_server(lambda body: chunked, test))


def test_no_answer_times_out() -> None:
    async def test(url: str, connections: list[int]) -> None:
        async with HttpClient(url, max_connections=1, timeout_s=0.2) as client:
            with pytest.raises(TimeoutError):
                await client.post_json(b"{}")

    asyncio.run(with_server(lambda body: b"", test))


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:8000/classify",
        "http://10.0.0.1:8000/classify",
        "https://127.0.0.1:8000/classify",
        "http://127.0.0.1/classify",
    ],
)
def test_only_plain_http_to_127_0_0_1_with_a_port(url: str) -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        HttpClient(url, max_connections=1, timeout_s=1)
