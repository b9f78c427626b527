"""The streaming relay (controller/proxy.py, upstream.py pass-through) and its meter (controller/usage.py).

Engines here are real TCP servers sending scripted HTTP bytes, so that chunk boundaries, reads and failures are
exactly the ones a test wants; the gateway and clients are real too.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time

import aiohttp
import psutil
import pytest
from test_gateway_upstream import ScriptedServer
from test_usage import bed, register  # noqa: F401  (a fixture, and the helper that feeds it an engine)

from slinfer.controller.usage import Meter

CHAT = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n"


def event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def chat_events(tokens: int, usage: bool) -> list[bytes]:
    out = [event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})]
    # Multi-byte UTF-8, an escaped quote and text that looks like SSE, so that a split or a scan that
    # misreads content shows.
    words = ["héllo", "wörld ✓", 'say "data: x"', "a\\nb", "🙂"]
    out += [event({"choices": [{"index": 0, "delta": {"content": words[i % len(words)]}}]}) for i in range(tokens)]
    if usage:
        out.append(event({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": tokens,
                                                   "total_tokens": 7 + tokens}}))
    out.append(b"data: [DONE]\n\n")
    return out


def frame(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def framings(events: list[bytes]) -> dict[str, list[bytes]]:
    """Write pieces that deliver the same body in different HTTP chunks and reads."""
    body = b"".join(events)
    rng = random.Random(7)
    cuts = sorted(rng.sample(range(1, len(body)), 40))
    odd = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    return {
        "an event per chunk per read": [HEAD] + [frame(e) for e in events] + [b"0\r\n\r\n"],
        "a chunk split across reads": split(HEAD + b"".join(frame(e) for e in events) + b"0\r\n\r\n", 7),
        "several chunks in one read": [HEAD + b"".join(frame(e) for e in events) + b"0\r\n\r\n"],
        "events cut across chunks": [HEAD] + [frame(p) for p in odd] + [b"0\r\n\r\n"],
        "cut chunks, cut reads": split(HEAD + b"".join(frame(p) for p in odd) + b"0\r\n\r\n", 13),
    }


def reference_count(events: list[bytes]) -> tuple[int, int, bool]:
    """The meter's rule, event by event (what it counted before the byte scan): (prompt, completion, exact)."""
    completion, prompt, exact = 0, 0, False
    for e in events:
        text = e.strip().removeprefix(b"data: ")
        if text == b"[DONE]":
            continue
        obj = json.loads(text)
        if obj.get("usage"):
            prompt, completion, exact = obj["usage"]["prompt_tokens"], obj["usage"]["completion_tokens"], True
            continue
        if exact:
            continue
        delta = obj["choices"][0].get("delta", {})
        if delta.get("content") == "":
            continue
        completion += 1
    return prompt, completion, exact


@pytest.fixture
async def scripted():
    servers: list[ScriptedServer] = []

    def make(script, close_after: bool = False) -> ScriptedServer:
        server = ScriptedServer(script, close_after)
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


async def _engine(c, engine_pb, server: ScriptedServer) -> str:
    url = await server.start()
    await (await c.agent()).send([engine_pb("1", "m", url)])
    return url


@pytest.mark.parametrize("usage", [True, False], ids=["exact usage", "estimated"])
async def test_a_stream_is_the_engines_byte_for_byte_whatever_its_chunking(controller_factory, scripted, http,
                                                                           engine_pb, usage):
    events = chat_events(30, usage)
    body = b"".join(events)
    for name, pieces in framings(events).items():
        c = await controller_factory()
        server = scripted(lambda n, pieces=pieces: pieces)
        await _engine(c, engine_pb, server)
        async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()) as resp:
            assert resp.status == 200, name
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            got = await resp.read()
        assert got == body, name
        assert server.requests, name


@pytest.mark.parametrize("usage", [True, False], ids=["exact usage", "estimated"])
def test_the_meter_counts_as_before_however_the_bytes_are_cut(usage):
    events = chat_events(50, usage)
    prompt, completion, exact = reference_count(events)
    body = b"".join(events)
    rng = random.Random(3)
    splits = [[body], [bytes([b]) for b in body], split(body, 64), *[
        [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        for cuts in (sorted(rng.sample(range(1, len(body)), k)) for k in (3, 30, 300))]]
    splits.append(events)  # an event per read
    splits.append([b"".join(events[i:i + 5]) for i in range(0, len(events), 5)])  # several events per read
    for pieces in splits:
        meter = Meter()
        for piece in pieces:
            meter.feed_chunk(piece)
        assert (meter.prompt_tokens, meter.completion_tokens, meter.reported, meter.estimated) == \
            (prompt, completion, exact, not exact), len(pieces)
    assert completion == 50
    assert prompt == (7 if usage else 0)


def test_the_meter_skips_error_events_and_reads_continuous_usage():
    meter = Meter()
    meter.feed_chunk(b"".join(chat_events(4, usage=False)[:-1]))
    meter.feed_chunk(b'data: {"error": {"message": "cut", "code": "engine_failed"}}\n\n')
    assert (meter.completion_tokens, meter.estimated) == (4, True)
    # vLLM's continuous_usage_stats: every chunk carries the running counts; the last one wins.
    meter = Meter()
    for i in range(1, 4):
        meter.feed_chunk(event({"choices": [{"index": 0, "delta": {"content": "x"}}],
                                "usage": {"prompt_tokens": 5, "completion_tokens": i, "total_tokens": 5 + i}}))
    assert (meter.prompt_tokens, meter.completion_tokens, meter.reported, meter.estimated) == (5, 3, True, False)


@pytest.mark.parametrize("usage", [True, False], ids=["exact usage", "estimated"])
async def test_usage_of_a_relayed_stream_reaches_the_ledger(bed, scripted, http, engine_pb, usage):  # noqa: F811
    b = await bed()
    events = chat_events(12, usage)
    pieces = framings(events)["cut chunks, cut reads"]
    server = scripted(lambda n: pieces)
    await register(b, await server.start(), engine_pb)
    key_id, key = b.keys.create("alice", account="physics")
    # The client asks for the usage chunk where the engine sends one (the stream then passes as it is); where
    # the engine sends none though the gateway asked, the count is estimated from the events.
    body = {**CHAT, "stream_options": {"include_usage": True}} if usage else CHAT
    async with http.post(f"{b.url}/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200
        assert await resp.read() == b"".join(events)
    (row,) = b.ledger.query(key_id)
    assert (row.prompt_tokens, row.completion_tokens, row.estimated) == ((7, 12, 0) if usage else (0, 12, 1))


async def test_usage_is_exact_when_the_client_did_not_ask_and_the_gateway_did(bed, standins, http,  # noqa: F811
                                                                               engine_pb):
    b = await bed()
    engine = await standins(model="m", tokens=12)
    await register(b, engine.base_url, engine_pb)
    key_id, key = b.keys.create("alice", account="physics")
    async with http.post(f"{b.url}/v1/chat/completions", json=CHAT,
                         headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200
        relayed = await resp.read()
    # The gateway asked the engine for the usage chunk, and the client got the stream it asked for: without it,
    # byte for byte what the engine sends a request that does not ask.
    assert json.loads(engine.seen.bodies[-1])["stream_options"] == {"include_usage": True}
    assert relayed == b"".join(engine.events("chat", 12)) + b"data: [DONE]\n\n"
    assert b'"usage"' not in relayed
    (row,) = b.ledger.query(key_id)
    assert (row.prompt_tokens, row.completion_tokens, row.estimated) == (8, 12, 0)
    # The positive control: a client that asks gets the usage chunk, and the same exact count.
    async with http.post(f"{b.url}/v1/chat/completions", json={**CHAT, "stream_options": {"include_usage": True}},
                         headers={"Authorization": f"Bearer {key}"}) as resp:
        asked = await resp.read()
    assert asked == relayed.removesuffix(b"data: [DONE]\n\n") + engine.usage_event("chat", 12) + b"data: [DONE]\n\n"
    assert sum(r.completion_tokens for r in b.ledger.query(key_id)) == 24


async def test_a_stream_cut_by_the_engine_ends_with_the_error_event(controller_factory, scripted, http, engine_pb):
    events = chat_events(10, usage=False)
    # Four events, then half of the fifth's chunk, then the engine dies.
    sent = HEAD + b"".join(frame(e) for e in events[:4]) + frame(events[4])[:20]
    c = await controller_factory()
    await _engine(c, engine_pb, scripted(lambda n: split(sent, 50), close_after=True))
    async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()) as resp:
        assert resp.status == 200
        got = await resp.read()
    assert got.startswith(b"".join(events[:4]))
    last = got.removeprefix(b"".join(events[:4]) + events[4][:20 - len(b"%x\r\n" % len(events[4]))])
    assert last.startswith(b"data: ")
    assert json.loads(last.removeprefix(b"data: "))["error"]["code"] == "engine_failed"
    assert c.registry.get("1").outstanding == 0


async def test_an_engine_silent_mid_stream_times_out_but_a_slow_one_does_not(controller_factory, http, engine_pb):
    """One silence timer per stream: a stream longer than the read timeout whose chunks keep coming is
    relayed whole; one that stops for longer than the timeout ends with the error event, in about that time."""
    events = chat_events(12, usage=False)
    stall = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
        writer.write(HEAD)
        for i, e in enumerate(events):
            writer.write(frame(e))
            await writer.drain()
            if stall.is_set() and i == 3:
                await asyncio.sleep(30)
            await asyncio.sleep(0.1)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        c = await controller_factory(read_timeout_s=0.6)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        await (await c.agent()).send([engine_pb("1", "m", url)])
        started = time.monotonic()
        async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()) as resp:
            assert await resp.read() == b"".join(events)
        assert time.monotonic() - started > 1.0  # longer than the read timeout, and not cut
        stall.set()
        started = time.monotonic()
        async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()) as resp:
            got = await resp.read()
        took = time.monotonic() - started
        assert got.startswith(b"".join(events[:4]))
        error = json.loads(got.removeprefix(b"".join(events[:4])).removeprefix(b"data: "))
        assert error["error"]["code"] == "engine_failed"
        assert "silent for 0.6 s" in error["error"]["message"]
        assert 0.6 <= took < 0.4 + 0.6 + 2.0
    finally:
        server.close()


class Firehose:
    """An engine that streams `total` bytes of SSE as fast as its socket takes them, counting what it wrote."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.written = 0
        self.closed_by_peer = asyncio.Event()
        self.event = event({"choices": [{"index": 0, "delta": {"content": "x" * 900}}]})
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
        writer.write(HEAD)
        piece = frame(self.event * 16)
        try:
            while self.written < self.total:
                writer.write(piece)
                await writer.drain()
                self.written += len(piece)
            writer.write(frame(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
            await reader.read()  # until the gateway closes
        except ConnectionError:
            pass
        self.closed_by_peer.set()
        writer.close()

    def body_size(self) -> int:
        per = len(self.event * 16)
        return -(-self.total // len(frame(self.event * 16))) * per + len(b"data: [DONE]\n\n")

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()


def _request_bytes(port: int, key: str) -> bytes:
    body = json.dumps(CHAT).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def test_a_client_that_stops_reading_holds_bounded_memory_and_is_cut_off(controller_factory, engine_pb):
    total = 64 << 20  # far more than every buffer on the way together
    engine = Firehose(total)
    c = await controller_factory(client_timeout_s=1.5)
    try:
        await (await c.agent()).send([engine_pb("1", "m", await engine.start())])
        port = int(c.url.rsplit(":", 1)[1])
        me = psutil.Process()
        rss_before = me.memory_info().rss
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, _request_bytes(port, c.client_key))
        head = await loop.sock_recv(sock, 4096)
        assert head.startswith(b"HTTP/1.1 200")
        stopped = time.monotonic()  # the client reads nothing more from here
        await asyncio.sleep(0.8)
        plateau = engine.written
        await asyncio.sleep(0.4)
        # Backpressure reached the engine: it is blocked, having written a small part of the stream.
        assert engine.written == plateau
        assert plateau < 24 << 20, plateau
        # ... and the gateway (this process) holds a bounded part of it: about its two buffer limits.
        assert me.memory_info().rss - rss_before < 12 << 20
        (pool,) = c.gateway._proxy._pools.values()
        await asyncio.wait_for(engine.closed_by_peer.wait(), 1.5 + 3.0)
        cut_after = time.monotonic() - stopped
        assert 1.5 <= cut_after < 1.5 + 3.0
        assert engine.written < total
        # The client's connection was cut too: reading now ends (after what the kernel still held).
        got = 0
        with pytest.raises(ConnectionResetError):
            while True:
                data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 5)
                if not data:
                    raise ConnectionResetError("closed")
                got += len(data)
        assert got < 24 << 20
        sock.close()
        assert not pool._idle  # the engine's connection was not kept
        assert c.registry.get("1").outstanding == 0
    finally:
        engine.stop()


async def test_a_slow_reader_gets_every_byte(controller_factory, engine_pb):
    """Backpressure pauses and resumes the engine's socket; nothing is lost or reordered on the way."""
    engine = Firehose(6 << 20)
    c = await controller_factory(client_timeout_s=5.0)
    try:
        await (await c.agent()).send([engine_pb("1", "m", await engine.start())])
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()) as resp:
                got = bytearray()
                while data := await resp.content.read(256 * 1024):
                    got += data
                    await asyncio.sleep(0.02)
        assert len(got) == engine.body_size()
        assert got.endswith(b"data: [DONE]\n\n")
        assert got[:-len(b"data: [DONE]\n\n")] == engine.event * (len(got) // len(engine.event))
        assert engine.written >= 6 << 20
    finally:
        engine.stop()



async def test_an_http_1_0_client_gets_the_stream_unframed_until_the_close(controller_factory, scripted, engine_pb):
    events = chat_events(8, usage=False)
    c = await controller_factory()
    await _engine(c, engine_pb, scripted(lambda n: framings(events)["a chunk split across reads"]))
    port = int(c.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_request_bytes(port, c.client_key).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
    answer = await asyncio.wait_for(reader.read(), 10)  # to the close
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert b"transfer-encoding" not in head.lower()
    assert body == b"".join(events)
