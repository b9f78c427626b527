"""The engine-side HTTP parser of the relay: controller/upstream.py's own against `httptools`, in one run.

Responsible for: feeding the same vLLM-shaped chunked SSE response (one event of about 190 bytes per read, as
a real engine's steps deliver them) to (a) `EngineConnection.data_received` in pass-through mode, writing to a
sink that only counts, and (b) an `httptools.HttpResponseParser` whose body callback frames and writes the same
bytes to the same sink, and printing the µs per read of each (the best of `--repeat` runs). Only the parsing and
the framing differ: the event loop, the sockets and the usage meter are the same either way and not measured.
Not responsible for: the whole relay's cost (bench/relay_cost.py).

    .venv/bin/python bench/http_parser.py [--events 128] [--streams 2000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httptools

from slinfer.controller.upstream import EngineConnection

HEAD = (b"HTTP/1.1 200 OK\r\ndate: Mon, 07 Dec 2026 04:00:00 GMT\r\nserver: uvicorn\r\n"
        b"content-type: text/event-stream; charset=utf-8\r\ntransfer-encoding: chunked\r\n\r\n")
# A vLLM 0.32 chat chunk, compact JSON with a 32-hex id (bench/standin_engine.py writes the same).
EVENT = (b'data: {"id":"chatcmpl-0123456789abcdef0123456789abcdef","object":"chat.completion.chunk",'
         b'"created":1733550000,"model":"tiny","choices":[{"index":0,"delta":{"content":" tok"},'
         b'"logprobs":null,"finish_reason":null}]}\n\n')


class _Sink:
    """A client transport that takes everything and counts it."""

    def __init__(self) -> None:
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.bytes += len(data)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


class _Transport:
    def write(self, data: bytes) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def reads(events: int) -> list[bytes]:
    frame = b"%x\r\n%b\r\n" % (len(EVENT), EVENT)
    return [HEAD + frame] + [frame] * (events - 1) + [b"e\r\ndata: [DONE]\n\n\r\n", b"0\r\n\r\n"]


async def hand(pieces: list[bytes], streams: int) -> float:
    sink = _Sink()
    conn = EngineConnection()
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    started = time.perf_counter()
    for _ in range(streams):
        conn.start(b"")
        conn.data_received(pieces[0])
        conn.relay_to(sink, True, None)  # type: ignore[arg-type]
        for piece in pieces[1:]:
            conn.data_received(piece)
        conn.finish()
    return time.perf_counter() - started


class _Relay:
    """httptools doing the engine side: the body, as parsed, framed and written to the client."""

    def __init__(self, sink: _Sink) -> None:
        self.sink = sink
        self.done = False

    def on_body(self, body: bytes) -> None:
        self.sink.write(b"%x\r\n%b\r\n" % (len(body), body))

    def on_message_complete(self) -> None:
        self.done = True


def tools(pieces: list[bytes], streams: int) -> float:
    sink = _Sink()
    started = time.perf_counter()
    for _ in range(streams):
        relay = _Relay(sink)
        parser = httptools.HttpResponseParser(relay)
        for piece in pieces:
            parser.feed_data(piece)
        assert relay.done and parser.get_status_code() == 200
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=128)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    pieces = reads(args.events)
    per = args.streams * len(pieces)
    best_hand = min(asyncio.run(hand(pieces, args.streams)) for _ in range(args.repeat))
    best_tools = min(tools(pieces, args.streams) for _ in range(args.repeat))
    print(f"| parser | µs per read ({len(pieces)} reads a stream, best of {args.repeat}) |")
    print("|---|---|")
    print(f"| controller/upstream.py | {1e6 * best_hand / per:.2f} |")
    print(f"| httptools {httptools.__version__} | {1e6 * best_tools / per:.2f} |")


if __name__ == "__main__":
    main()
