"""The relay's raw pass-through (controller/upstream.py `EngineConnection._raw_received`), read by read.

The connection is fed the engine's reads directly and writes to a recording client transport, so that the
test sees each read, each write and which path it took: whole clean chunks verbatim, anything else decoded
and framed anew; after either, the client's body is the engine's byte for byte, less the usage event the
client did not ask for, which the meter reads exactly.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slinfer.controller.upstream import EngineConnection, UpstreamError
from slinfer.controller.usage import Meter, UsageFilter

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n"
USAGE = {"prompt_tokens": 9, "completion_tokens": 20, "total_tokens": 29}


class Sink:
    """The client's transport: records each write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0


class EngineSide:
    """The engine's transport as the connection sees it."""

    def __init__(self) -> None:
        self.paused = self.closed = False

    def write(self, data: bytes) -> None:
        pass

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def close(self) -> None:
        self.closed = True


def events(tokens: int = 20) -> list[bytes]:
    """A vLLM chat stream: role chunk, one event per token (multi-byte text, text that looks like framing),
    the usage chunk and [DONE]."""
    words = ["héllo", "0\r\n\r\n", 'say "usage"', "data: x\n\n", "🙂"]
    out = [b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n']
    out += [b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": words[i % 5]}}]}).encode()
            + b"\n\n" for i in range(tokens)]
    out.append(b"data: " + json.dumps({"choices": [], "usage": USAGE}).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


def frame(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def dechunk(data: bytes) -> bytes:
    out, pos = [], 0
    while pos < len(data):
        i = data.index(b"\r\n", pos)
        size = int(data[pos:i], 16)
        out.append(data[i + 2:i + 2 + size])
        assert data[i + 2 + size:i + 4 + size] == b"\r\n"
        pos = i + 4 + size
    return b"".join(out)


async def relay(reads: list[bytes], chunked_client: bool = True, usage: UsageFilter | None = None,
                tap: Meter | None = None) -> tuple[EngineConnection, Sink, bytes]:
    """Feeds the reads; the first body chunk goes as the proxy sends it, the rest through `relay_to`.
    Returns the connection, the sink, and what the proxy wrote first (its first chunk, filtered)."""
    conn = EngineConnection()
    conn.connection_made(EngineSide())  # type: ignore[arg-type]
    conn.start(b"POST / HTTP/1.1\r\n\r\n")
    rest = list(reads)
    while not conn._body and not conn._done:
        conn.data_received(rest.pop(0))
    first = await conn.chunk(1.0)
    first = usage(first) if usage is not None else first
    sink = Sink()
    if tap is not None:
        tap.feed_chunk(first)
    conn.relay_to(sink, chunked_client, tap.feed_chunk if tap is not None else None, usage)  # type: ignore[arg-type]
    for data in rest:
        conn.data_received(data)
    return conn, sink, first


def client_body(conn: EngineConnection, sink: Sink, first: bytes, usage: UsageFilter | None,
                chunked: bool = True) -> bytes:
    """What the client gets: the proxy's first write, the relay's, then the last read's data and what the usage
    filter held (the proxy writes these with the terminator)."""
    written = b"".join(sink.writes)
    held = usage.finish() if usage is not None else b""
    return first + (dechunk(written) if chunked else written) + conn.take_tail() + held


async def test_vllm_framing_goes_verbatim_and_the_usage_event_is_taken_out():
    evs = events()
    reads = [HEAD + frame(evs[0])] + [frame(e) for e in evs[1:]] + [b"0\r\n\r\n"]
    meter = Meter()
    usage = UsageFilter(meter)
    conn, sink, first = await relay(reads, usage=usage)
    assert conn._raw and conn._done and conn._error is None and conn.keep_alive
    # Each token's read left as it came, framing and all, with nothing added: no parse, no copy.
    assert sink.writes == [frame(e) for e in evs[1:-2]] + [frame(evs[-1])]
    assert client_body(conn, sink, first, usage) == b"".join(evs[:-2]) + evs[-1]
    assert (meter.prompt_tokens, meter.completion_tokens, meter.reported, meter.estimated) == (9, 20, True, False)


async def test_the_same_stream_to_a_client_that_asked_for_usage_keeps_it_and_no_filter_is_needed():
    evs = events()
    reads = [HEAD + frame(evs[0])] + [frame(e) for e in evs[1:]] + [b"0\r\n\r\n"]
    meter = Meter()
    conn, sink, _first = await relay(reads, tap=meter)
    assert conn._raw and conn._done
    assert sink.writes == [frame(e) for e in evs[1:]]  # the usage event verbatim too
    # The meter that reads what the client got (the proxy's tap) saw the usage event.
    assert (meter.prompt_tokens, meter.completion_tokens, meter.reported, meter.estimated) == (9, 20, True, False)


async def test_without_a_usage_event_the_estimate_counts_the_verbatim_events():
    evs = events()
    del evs[-2]
    reads = [HEAD + frame(evs[0])] + [frame(e) for e in evs[1:]] + [b"0\r\n\r\n"]
    meter = Meter()
    usage = UsageFilter(meter)
    conn, sink, first = await relay(reads, usage=usage)
    assert conn._raw
    assert client_body(conn, sink, first, usage) == b"".join(evs)
    # 22 events: the role chunk and [DONE] carry no token.
    assert (meter.completion_tokens, meter.estimated) == (20, True)


async def test_an_http_1_0_client_gets_the_data_unframed():
    evs = events()
    reads = [HEAD + frame(evs[0])] + [frame(e) for e in evs[1:]] + [b"0\r\n\r\n"]
    conn, sink, first = await relay(reads, chunked_client=False)
    assert conn._done
    assert first + b"".join(sink.writes) + conn.take_tail() == b"".join(evs)


async def test_the_last_event_and_the_terminator_in_one_read_leave_in_the_callers_one_last_write():
    evs = events()
    del evs[-2]
    reads = [HEAD + frame(evs[0])] + [frame(e) for e in evs[1:-1]] + [frame(evs[-1]) + b"0\r\n\r\n"]
    meter = Meter()
    conn, sink, _first = await relay(reads, tap=meter)
    assert conn._raw and conn._done
    assert sink.writes == [frame(e) for e in evs[1:-1]]  # [DONE] not written here...
    assert conn.take_tail() == evs[-1]  # ...but held for the write with the terminator
    assert conn.take_tail() == b""
    assert (meter.completion_tokens, meter.estimated) == (20, True)  # the tap saw it


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_chunking_and_any_reads_give_the_same_body_and_the_exact_usage(data):
    evs = events()
    body = b"".join(evs)
    # The engine's chunks cut anywhere (an event across chunks, several in one), then its bytes cut into reads
    # anywhere (a size line, a CRLF, the last chunk cut).
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(body) - 1), max_size=30))))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    wire = b"".join(frame(c) for c in chunks) + b"0\r\n\r\n"
    first_read = len(frame(chunks[0]))
    read_cuts = sorted(set(data.draw(st.lists(st.integers(first_read + 1, len(wire) - 1), max_size=40))))
    reads = [HEAD + wire[:first_read]]
    reads += [wire[a:b] for a, b in zip([first_read, *read_cuts], [*read_cuts, len(wire)], strict=True)]
    meter = Meter()
    usage = UsageFilter(meter)
    conn, sink, first = asyncio.run(relay(reads, usage=usage))
    assert conn._done and conn._error is None
    assert client_body(conn, sink, first, usage) == body.replace(evs[-2], b"")
    assert (meter.prompt_tokens, meter.completion_tokens, meter.reported) == (9, 20, True)


async def test_the_engines_error_event_ends_the_stream_in_raw_mode_too():
    evs = events()
    error = b'data: {"error":{"message":"engine core died","code":500}}\n\n'
    reads = [HEAD + frame(evs[0])] + [frame(e) for e in evs[1:5]] + [frame(error), frame(evs[5]), b"0\r\n\r\n"]
    conn, sink, first = await relay(reads, usage=UsageFilter(Meter()))
    assert conn._raw
    assert isinstance(conn._error, UpstreamError) and "engine core died" in str(conn._error)
    assert first + dechunk(b"".join(sink.writes)) + conn.take_tail() == b"".join(evs[:5])  # nothing after it
    assert not conn.keep_alive


@pytest.mark.parametrize("bad", [b"zz\r\n", b"-5\r\nhello\r\n", b"5\r\nhelloXY"], ids=["size", "negative", "crlf"])
async def test_malformed_framing_in_raw_mode_fails_the_stream(bad):
    evs = events()
    reads = [HEAD + frame(evs[0]), frame(evs[1]), bad]
    conn, sink, _first = await relay(reads)
    assert conn._raw
    assert isinstance(conn._error, UpstreamError) and "malformed" in str(conn._error)
    assert sink.writes == [frame(evs[1])]
    assert conn.transport.closed  # type: ignore[union-attr]


async def test_bytes_after_the_last_chunk_keep_the_connection_from_reuse():
    evs = events(3)
    reads = [HEAD + frame(evs[0]), frame(evs[1]), b"0\r\n\r\nHTTP/1.1 200 OK\r\n"]
    conn, _sink, _first = await relay(reads)
    assert conn._done and not conn.keep_alive
    # The positive control: the same stream ending cleanly is reused.
    conn, _sink, _first = await relay([*reads[:2], b"0\r\n\r\n"])
    assert conn._done and conn.keep_alive and conn.finish()


async def test_a_usage_event_with_its_choices_last_is_taken_out_too():
    """The read-by-read shortcut knows a token's event by its end (`}]}`): a usage-only event ending with its
    empty choices instead (`[]}`) goes the long way and is still taken out."""
    evs = events()
    evs[-2] = b"data: " + json.dumps({"id": "x", "usage": USAGE, "choices": []}).encode() + b"\n\n"
    reads = [HEAD + frame(evs[0])] + [frame(e) for e in evs[1:]] + [b"0\r\n\r\n"]
    meter = Meter()
    usage = UsageFilter(meter)
    conn, sink, first = await relay(reads, usage=usage)
    assert conn._raw
    assert sink.writes == [frame(e) for e in evs[1:-2]] + [frame(evs[-1])]
    assert client_body(conn, sink, first, usage) == b"".join(evs[:-2]) + evs[-1]
    assert (meter.prompt_tokens, meter.completion_tokens, meter.reported) == (9, 20, True)
