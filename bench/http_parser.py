"""The engine-side HTTP parser of the relay: the hand-written one against `httptools`, in one run.

Responsible for: feeding the same vLLM-shaped chunked SSE response (one event of about 190 bytes per read, as
a real engine's steps deliver them) to `EngineConnection.data_received` in pass-through mode, writing to a
sink that only counts, as it was with its hand-written parser (`--before REV`, from git) and as it is now
(httptools inside), and to a bare `httptools.HttpResponseParser` whose body callback frames and writes the
same bytes to the same sink; it prints the µs per read of each (the best of `--repeat` runs, taken in turns).
Only the parsing and the framing differ: the event loop, the sockets and the usage meter are not measured.
Not responsible for: the whole relay's cost (bench/relay_cost.py).

    .venv/bin/python bench/http_parser.py [--events 128] [--streams 2000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httptools

from slinfer.controller.upstream import EngineConnection

ROOT = Path(__file__).resolve().parents[1]

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


def _at_revision(rev: str) -> type[EngineConnection]:
    """EngineConnection as `controller/upstream.py` was at git revision `rev` (its hand-written parser)."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:controller/upstream.py"], check=True,
                            capture_output=True).stdout
    path = Path(tempfile.mkdtemp()) / "upstream_at_rev.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("upstream_at_rev", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EngineConnection  # type: ignore[no-any-return]


async def hand(pieces: list[bytes], streams: int, cls: type[EngineConnection] = EngineConnection) -> float:
    sink = _Sink()
    conn = cls()
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
    parser.add_argument("--before", default="a213966", help="the git revision of the hand-written parser")
    args = parser.parse_args()
    pieces = reads(args.events)
    per = args.streams * len(pieces)
    old = _at_revision(args.before)
    best_old = best_now = best_tools = math.inf
    for _ in range(args.repeat):  # in turns, so that a busy moment hits each alike
        best_old = min(best_old, asyncio.run(hand(pieces, args.streams, old)))
        best_now = min(best_now, asyncio.run(hand(pieces, args.streams)))
        best_tools = min(best_tools, tools(pieces, args.streams))
    print(f"| parser | µs per read ({len(pieces)} reads a stream, best of {args.repeat}) |")
    print("|---|---|")
    print(f"| EngineConnection, hand-written parser ({args.before}) | {1e6 * best_old / per:.2f} |")
    print(f"| EngineConnection now (httptools inside) | {1e6 * best_now / per:.2f} |")
    print(f"| httptools {httptools.__version__} alone, framing the body | {1e6 * best_tools / per:.2f} |")


if __name__ == "__main__":
    main()
