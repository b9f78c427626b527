"""The gateway's engine client (controller/upstream.py) against real sockets that send scripted HTTP bytes."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable

import pytest

from slinfer.controller import metrics, upstream
from slinfer.controller.upstream import EnginePool, UpstreamError, UpstreamTimeout

Script = Callable[[int], list[bytes] | None]  # request number -> pieces to send (None: close without answer)


class ScriptedServer:
    """A real TCP server answering each request with scripted byte pieces, sent one write at a time."""

    def __init__(self, script: Script, close_after: bool = False) -> None:
        self.script = script
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
                self.requests.append(head + await reader.readexactly(length))
                pieces = self.script(len(self.requests))
                if pieces is None:
                    break
                for piece in pieces:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.002)
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def make(script: Script, close_after: bool = False) -> ScriptedServer:
        server = ScriptedServer(script, close_after)
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)] if size else [data]


async def roundtrip(pool: EnginePool, body: bytes = b'{"x":1}', stream: bool = False) -> tuple[int, str, bytes]:
    conn, _ = await pool.acquire()
    conn.start(pool.request_bytes("/v1/completions", "key", body))
    try:
        await conn.head(5)
        if stream:
            parts = []
            while chunk := await conn.chunk(5):
                parts.append(chunk)
            data = b"".join(parts)
        else:
            data = await conn.read(5)
        return conn.status, conn.content_type, data
    finally:
        pool.release(conn)


JSON = b'{"id": "cmpl-1", "choices": [{"text": "hello world"}]}'
LENGTH_RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                   % (len(JSON), JSON))
EVENTS = [b'data: {"a":1}\n\n', b'data: {"bb":22}\n\n', b"data: [DONE]\n\n"]
CHUNKED_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n"
                    + b"".join(b"%x%s\r\n%s\r\n" % (len(ev), b";ext=1" if i == 1 else b"", ev)
                               for i, ev in enumerate(EVENTS))
                    + b"0\r\nX-Trailer: t\r\n\r\n")
CHUNKED_DATA = b"".join(EVENTS)


@pytest.mark.parametrize("piece", [0, 1, 3, 7])
async def test_content_length_and_chunked_bodies_parse_across_any_split(scripted, piece):
    answers = [LENGTH_RESPONSE, CHUNKED_RESPONSE]
    server = scripted(lambda n: split(answers[(n - 1) % 2], piece))
    pool = EnginePool(await server.start(), 5)
    assert await roundtrip(pool) == (200, "application/json", JSON)
    assert await roundtrip(pool, stream=True) == (200, "text/event-stream; charset=utf-8", CHUNKED_DATA)
    assert server.connections == 1  # keep-alive: both on one connection
    request = server.requests[0]
    assert request.startswith(b"POST /v1/completions HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer key\r\n" in request
    assert request.endswith(b'\r\n\r\n{"x":1}')


async def test_streamed_chunks_arrive_before_the_body_ends(scripted):
    release = asyncio.Event()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"

    class Slow(ScriptedServer):
        async def _handle(self, reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(head + b"5\r\nfirst\r\n")
            await writer.drain()
            await release.wait()
            writer.write(b"4\r\nlast\r\n0\r\n\r\n")
            await writer.drain()
            writer.close()

    server = Slow(lambda n: None)
    url = await server.start()
    try:
        pool = EnginePool(url, 5)
        conn, _ = await pool.acquire()
        conn.start(pool.request_bytes("/v1/x", "k", b"{}"))
        await conn.head(5)
        assert await asyncio.wait_for(conn.chunk(5), 2) == b"first"
        release.set()
        assert await conn.chunk(5) == b"last"
        assert await conn.chunk(5) == b""
    finally:
        await server.stop()


async def test_connection_close_and_close_delimited_bodies_are_not_reused(scripted):
    server = scripted(lambda n: [b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
                                 b"Connection: close\r\n\r\nboom, no length"], close_after=True)
    pool = EnginePool(await server.start(), 5)
    assert await roundtrip(pool) == (500, "text/plain", b"boom, no length")
    assert await roundtrip(pool) == (500, "text/plain", b"boom, no length")
    assert server.connections == 2


async def test_idle_connection_closed_by_the_engine_is_replaced_transparently(scripted, controller_factory,
                                                                             engine_pb, http):
    # The engine answers the first request, then drops the connection when the second arrives on it (the
    # race of a keep-alive timeout): the proxy sends it again once, on a fresh connection to the same engine.
    server = scripted(lambda n: None if n == 2 else [LENGTH_RESPONSE])
    c = await controller_factory()
    await (await c.agent()).send([engine_pb("1", "m", await server.start())])
    retries_before = metrics.RETRIES.labels("m")._value.get()
    for _ in range(2):
        async with http.post(f"{c.url}/v1/completions", json={"model": "m", "prompt": "x"},
                             headers=c.headers()) as resp:
            assert resp.status == 200
            assert await resp.read() == JSON
    assert server.connections == 2
    assert len(server.requests) == 3
    assert metrics.RETRIES.labels("m")._value.get() == retries_before


async def test_no_content_has_no_body_and_keeps_the_connection(scripted):
    server = scripted(lambda n: [b"HTTP/1.1 204 No Content\r\n\r\n"] if n == 1 else [LENGTH_RESPONSE])
    pool = EnginePool(await server.start(), 5)
    assert await roundtrip(pool) == (204, "", b"")
    assert (await roundtrip(pool))[2] == JSON
    assert server.connections == 1


async def test_engine_dying_before_and_during_the_body(scripted):
    before = scripted(lambda n: None)
    pool = EnginePool(await before.start(), 5)
    with pytest.raises(UpstreamError) as info:
        await roundtrip(pool)
    assert info.value.before_response

    during = scripted(lambda n: [LENGTH_RESPONSE[:-10]], close_after=True)
    pool = EnginePool(await during.start(), 5)
    with pytest.raises(UpstreamError) as info:
        await roundtrip(pool)
    assert not info.value.before_response


async def test_malformed_response_is_an_error(scripted):
    server = scripted(lambda n: [b"SMTP ready\r\n\r\n"])
    pool = EnginePool(await server.start(), 5)
    with pytest.raises(UpstreamError, match="malformed"):
        await roundtrip(pool)


async def test_silent_engine_times_out_and_refused_connect_fails_fast():
    async def silent(reader, writer):
        await reader.read(1000)
        await asyncio.sleep(10)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        pool = EnginePool(f"http://127.0.0.1:{port}", 5)
        conn, _ = await pool.acquire()
        conn.start(pool.request_bytes("/v1/x", "k", b"{}"))
        with pytest.raises(UpstreamTimeout):
            await conn.head(0.2)
        pool.discard(conn)
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1)
    refused = EnginePool(f"http://127.0.0.1:{port}", 5)
    with pytest.raises(UpstreamError) as info:
        await refused.acquire()
    assert info.value.before_response


def test_base_url_must_be_host_port():
    with pytest.raises(ValueError, match="HOST:PORT"):
        EnginePool("http://no-port", 5)
    assert EnginePool("http://[::1]:8000", 5).host == "::1"


async def test_idle_connections_past_the_limit_are_closed(scripted, monkeypatch):
    server = scripted(lambda n: [LENGTH_RESPONSE])
    pool = EnginePool(await server.start(), 5)
    conns = [(await pool.acquire())[0] for _ in range(3)]
    for conn in conns:
        conn.start(pool.request_bytes("/v1/x", "k", b"{}"))
        await conn.head(5)
        await conn.read(5)
    for conn in conns:
        pool.release(conn)
    assert server.connections == 3 and not any(c.closed for c in conns)
    monkeypatch.setattr(upstream, "IDLE_LIMIT_S", 0.0)
    fresh, reused = await pool.acquire()  # every pooled one is past the limit now
    assert not reused and all(c.closed for c in conns)
    fresh.start(pool.request_bytes("/v1/x", "k", b"{}"))
    await fresh.head(5)
    await fresh.read(5)
    monkeypatch.setattr(upstream, "IDLE_LIMIT_S", 4.0)
    pool.release(fresh)
    assert server.connections == 4 and not fresh.closed
    again, reused = await pool.acquire()
    assert reused and again is fresh
