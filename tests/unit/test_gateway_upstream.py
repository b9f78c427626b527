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


class GatedServer:
    """A real TCP server that answers a request only when the test lets it (`answer(n)` lets n more answer)."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0
        self._turns = asyncio.Semaphore(0)
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def answer(self, n: int = 1) -> None:
        for _ in range(n):
            self._turns.release()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                self.requests += 1
                await self._turns.acquire()
                writer.write(LENGTH_RESPONSE)
                await writer.drain()
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


async def _until(check: Callable[[], bool], within_s: float = 5.0) -> None:
    async with asyncio.timeout(within_s):
        while not check():  # noqa: ASYNC110 (a condition on the pool's counts, which signal nothing)
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("max_opening", [2, 16])
async def test_a_burst_opens_at_most_max_opening_unanswered_connections_and_waits_in_order(max_opening, monkeypatch):
    # A busy engine may not accept (nor answer) new connections for seconds: at most max_opening requests wait
    # behind that; the rest wait in the gateway, in arrival order, for a connection or an opening.
    monkeypatch.setattr(upstream, "OPENING_HOLD_S", 60.0)
    server = GatedServer()
    pool = EnginePool(await server.start(), 5, max_opening=max_opening)
    served: list[int] = []
    got: list[int] = []

    async def request(i: int) -> None:
        conn, _ = await pool.acquire()
        got.append(i)
        conn.start(pool.request_bytes("/v1/x", "k", b"{}"))
        try:
            await conn.head(5)
            await conn.read(5)
            served.append(i)
        finally:
            pool.release(conn)

    tasks = []
    for i in range(6):
        tasks.append(asyncio.create_task(request(i)))
        await asyncio.sleep(0.01)  # arrival order
    try:
        await _until(lambda: server.requests == min(6, max_opening))
        await asyncio.sleep(0.1)
        # Control (16): every request has a connection of its own at once.
        assert server.connections == server.requests == min(6, max_opening)
        assert pool.opening == min(6, max_opening) and pool.waiting() == 6 - min(6, max_opening)
        server.answer(1)  # the first answers: its opening goes to the next waiting, its connection to the one after
        await _until(lambda: served == [0] and server.requests == min(6, max_opening + 2))
        if max_opening == 2:
            # The first two waiting got a turn (one a new connection, its opening; one the first's connection).
            assert server.connections == 3 and pool.waiting() == 2 and sorted(got) == [0, 1, 2, 3]
        server.answer(5)
        await asyncio.gather(*tasks)
        assert sorted(served) == sorted(got) == list(range(6))
        if max_opening == 2:
            assert server.connections < 6  # some connections served two requests
        assert pool.opening == 0 and pool.waiting() == 0
    finally:
        for task in tasks:
            task.cancel()
        await server.stop()


async def test_a_waiting_request_that_goes_away_passes_on_its_turn(monkeypatch):
    monkeypatch.setattr(upstream, "OPENING_HOLD_S", 60.0)
    server = GatedServer()
    pool = EnginePool(await server.start(), 5, max_opening=1)
    first, _ = await pool.acquire()
    first.start(pool.request_bytes("/v1/x", "k", b"{}"))
    gone = asyncio.create_task(pool.acquire())
    nxt = asyncio.create_task(pool.acquire())
    await _until(lambda: pool.waiting() == 2)
    gone.cancel()  # its client left while it waited
    with contextlib.suppress(asyncio.CancelledError):
        await gone
    server.answer(1)
    await first.head(5)
    conn, reused = await asyncio.wait_for(nxt, 5)  # the opening the first one's answer freed
    assert not reused and pool.opening == 1 and pool.waiting() == 0
    await first.read(5)
    # A request given a connection that goes away before it runs hands it on (here: back to the idle ones).
    late = asyncio.create_task(pool.acquire())  # `conn` has not answered: no opening is free
    await _until(lambda: pool.waiting() == 1)
    pool.release(first)  # handed to `late`, which is cancelled in the same moment
    late.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await late
    assert pool.waiting() == 0
    again, reused = await pool.acquire()
    assert reused and again is first
    pool.release(again)
    pool.discard(conn)  # it ends without an answer: its opening is free again
    assert pool.opening == 0
    await server.stop()


async def test_waiting_requests_do_not_hang_when_new_connections_fail():
    # Nothing listens: every opening fails, and each waiting request gets its own turn to fail.
    pool = EnginePool("http://127.0.0.1:9", 5, max_opening=1)
    results = await asyncio.gather(*(pool.acquire() for _ in range(4)), return_exceptions=True)
    assert all(isinstance(r, UpstreamError) for r in results), results
    assert pool.opening == 0 and pool.waiting() == 0


@pytest.mark.parametrize("hold_s", [0.2, 60.0])
async def test_an_answer_that_comes_late_holds_an_opening_only_so_long(hold_s, monkeypatch):
    # A request that is not streamed is answered only at its end: its new connection frees its opening after
    # OPENING_HOLD_S, so the requests behind it open theirs (control: with a long hold they still wait).
    monkeypatch.setattr(upstream, "OPENING_HOLD_S", hold_s)
    server = GatedServer()
    pool = EnginePool(await server.start(), 5, max_opening=1)
    first, _ = await pool.acquire()
    first.start(pool.request_bytes("/v1/x", "k", b"{}"))
    behind = [asyncio.create_task(pool.acquire()) for _ in range(2)]
    try:
        await asyncio.sleep(0.7)
        if hold_s < 0.7:
            assert all(t.done() for t in behind) and server.connections == 3 and pool.waiting() == 0
        else:
            assert not any(t.done() for t in behind) and server.connections == 1 and pool.waiting() == 2
    finally:
        for task in behind:
            task.cancel()
        pool.discard(first)
        for task in behind:
            with contextlib.suppress(asyncio.CancelledError):
                conn, _ = await task
                pool.discard(conn)
        await server.stop()
