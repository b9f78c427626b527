"""A lean HTTP/1.1 keep-alive client for the gateway's hop to engines, with one connection pool per engine.

Why not aiohttp's client: replacing it with this one halved the gateway's CPU per request (about 200 to
100 us on the project's 2-core machine, bench/gateway_overhead.py); this client does only what the hop
needs. It sends a POST with a prebuilt header block, parses the response with `httptools` (llhttp: the status
line, Content-Length / chunked bodies, `Connection: close`; bench/http_parser.py: half the CPU per read of
the hand-written parser it replaced), and hands the body to the caller whole (`read`) or piece by piece as it
arrives (`chunk`, for SSE), pausing the socket when the caller falls behind. A pooled connection the engine
closed while idle is replaced by a fresh one transparently, once (by the proxy). It does not choose engines,
retry on other engines, or follow redirects.

Pass-through (`relay_to`, for a stream once its first chunk reached the client): the body bytes of each
read are written to the client's transport from `data_received` itself, with no task switch and no timer per
chunk (bench/stream_relay.py measures the difference). Once the engine's chunked body is at a chunk boundary,
httptools is left and the framing is followed by a few byte scans per read (`_raw_received`): a read of
whole chunks, each ending a whole SSE event, with no usage or error event in it, goes to an HTTP/1.1 client
verbatim, chunk framing and all, in one write of the bytes received (no parse, no copy, no join; issue 35.2,
bench/relay_cost.py); any other read (a chunk cut across reads, the usage event the client did not ask for,
the engine's error event, an HTTP/1.0 client) has its chunks' data decoded and handed on as before.
The caller's task sleeps until the body ends, the engine fails or falls silent for the read timeout (one
timer per stream that re-arms itself only when it fires), or the client's write buffer passes its limit: then
the engine's socket is paused until the caller has seen the client drain.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections import deque
from collections.abc import Callable

import httptools

# Engines behind uvicorn (vLLM) close idle keep-alive connections after 5 s; stay under that.
IDLE_LIMIT_S = 4.0
# Body bytes buffered for a slow reader before the engine's socket is paused.
HIGH_WATER = 1 << 20
# In pass-through, bytes waiting in the client's transport before the engine's socket is paused: far above
# what a client that keeps up ever leaves there (a few events), far below what would cost memory per stream.
SINK_HIGH_WATER = 256 * 1024


# How vLLM's stream says that its engine failed mid-answer: an event that is an error object, not a chunk.
ENGINE_ERROR_EVENT = b'data: {"error"'


def engine_error_message(event: bytes) -> str:
    """The engine's own words from its error event, or the event itself when it does not parse."""
    try:
        error = json.loads(event.removeprefix(b"data: "))["error"]
        return str(error.get("message") if isinstance(error, dict) else error)[:300]
    except (ValueError, KeyError, TypeError):
        return event[:300].decode(errors="replace")


class UpstreamError(Exception):
    """The connection failed or closed before the response was complete."""

    def __init__(self, message: str, *, before_response: bool) -> None:
        super().__init__(message)
        # True when not a byte of the response had arrived: the request may be sent again.
        self.before_response = before_response


class UpstreamTimeout(UpstreamError):
    """The engine was silent for longer than the read (or connect) timeout."""


# Response headers past this are refused (an engine's are a few hundred bytes).
MAX_HEAD_BYTES = 65536
# A chunk-size line (or the last chunk's trailers) past this is malformed: a size line is a few hex digits.
MAX_FRAME_LINE = 4096
# The bytes that end an SSE event: a chunk whose data ends with them holds whole events only.
_EVENT_END = b"\n\n"
# How a chunk holding one streamed token's event ends: its choices, an array of objects, close the event.
_TOKEN_END = b"}]}\n\n\r\n"


class EngineConnection(asyncio.Protocol):
    """One keep-alive connection; one request at a time; parses the response as bytes arrive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.status = 0
        self.content_type = ""
        self.keep_alive = True
        self._active = False
        self._parser = httptools.HttpResponseParser(self)
        self._head_bytes = 0
        self._headers_done = False
        self._got_bytes = False
        self._remaining = -1  # Content-Length left; -1 when chunked or delimited by the close
        self._chunked = False
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._done = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        # Pass-through: the client's transport, whether it takes chunked framing, what sees the bytes, and
        # the loop time of the engine's last bytes (for the silence timer).
        self._sink: asyncio.WriteTransport | None = None
        self._sink_chunked = True
        self._tap: Callable[[bytes], None] | None = None
        self._filter: Callable[[bytes], bytes] | None = None
        self._sink_full = False
        self._pieces: list[bytes] = []
        self._last = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Raw pass-through: httptools left behind at a chunk boundary, the framing followed by byte scans.
        # `_chunk_done`: httptools' last chunk event was a chunk's end; `_at_boundary`: the last read ended
        # there; `_left`: bytes of the current chunk still to come (its data and CRLF); `_frame_carry`: a
        # size line cut by the read; `_aligned`: the data handed on so far ends an SSE event.
        self._raw = False
        self._chunk_done = False
        self._at_boundary = False
        self._left = 0
        self._frame_carry = b""
        self._aligned = True
        # The data of the read that ended the body, held for the caller's last write (`take_tail`).
        self._tail = b""

    # ---- asyncio.Protocol ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._active and not self._done and self._error is None:
            if self._headers_done and self._remaining < 0 and not self._chunked:
                self._done = True  # a body delimited by the close itself
            else:
                self._error = UpstreamError(f"engine closed the connection ({exc!r})",
                                            before_response=not self._got_bytes)
        self._wake()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def data_received(self, data: bytes) -> None:
        if self._raw:
            self._raw_received(data)
            return
        if not self._active:
            self._fail("engine sent bytes outside a response")
            return
        self._got_bytes = True
        if not self._done:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserError as exc:
                self._fail(f"malformed response from engine: {exc}")
                return
            if not self._headers_done:
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._fail("response headers over 64 KiB")
                    return
            elif self._chunked:
                self._at_boundary = self._chunk_done and data.endswith(b"\r\n")
        if self._sink is not None:
            self._last = self._loop.time()  # type: ignore[union-attr]
            self._flush()
            self._go_raw()
            if not (self._done or self._sink_full or self._error is not None):
                return  # the caller sleeps on: nothing for it to do
        self._wake()

    # ---- parsing (httptools' callbacks) ------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-type":
            self.content_type = value.strip().decode("latin-1")
        elif name == b"content-length":
            self._remaining = 0  # a framed body (its length is httptools' to count)
        elif name == b"transfer-encoding":
            self._chunked = b"chunked" in value.lower()

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        # HTTP/1.0, `Connection: close` or a body that runs until the engine closes: no reuse.
        self.keep_alive = self._parser.should_keep_alive()
        if self._chunked:
            self._remaining = -1
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._push(body)

    def on_chunk_header(self) -> None:
        self._chunk_done = False

    def on_chunk_complete(self) -> None:
        self._chunk_done = True  # llhttp says so once the chunk's closing CRLF is in

    def on_message_complete(self) -> None:
        self._done = True

    def _push(self, data: bytes) -> None:
        if self._sink is not None:
            self._pieces.append(data)
            return
        self._body.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _fail(self, message: str) -> None:
        if self._error is None and not self._done:
            self._error = UpstreamError(message, before_response=False)
        self.keep_alive = False
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---- the caller's side -----------------------------------------------------------------------------
    def start(self, request: bytes) -> None:
        """Sends a request; the connection must be idle."""
        self._active = True
        self._headers_done = self._got_bytes = self._done = self._chunked = False
        self._raw = self._chunk_done = self._at_boundary = False
        self._left = 0
        self._frame_carry = b""
        self._aligned = True
        self._tail = b""
        self.status = 0
        self.content_type = ""
        self.keep_alive = True
        self._remaining = -1
        self._head_bytes = 0
        self._parser = httptools.HttpResponseParser(self)
        self._body.clear()
        self._buffered = 0
        self._error = None
        assert self.transport is not None
        self.transport.write(request)

    async def _wait(self, read_timeout_s: float) -> None:
        if self._error is not None:
            raise self._error
        if self.closed:
            raise UpstreamError("engine connection closed", before_response=not self._got_bytes)
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(read_timeout_s, _expire, waiter)
        try:
            await waiter
        except TimeoutError as exc:
            raise UpstreamTimeout(f"engine silent for {read_timeout_s:g} s",
                                  before_response=not self._got_bytes) from exc
        finally:
            timer.cancel()
            self._waiter = None

    async def head(self, read_timeout_s: float) -> None:
        """Waits for the status line and headers."""
        while not self._headers_done:
            await self._wait(read_timeout_s)

    async def chunk(self, read_timeout_s: float) -> bytes:
        """The next body bytes as they arrive; b"" once the body is complete."""
        while True:
            if self._body:
                data = self._body.popleft()
                self._buffered -= len(data)
                self._aligned = data.endswith(_EVENT_END)  # the caller's usage filter holds none of it back
                if self._paused and self._buffered < HIGH_WATER // 2 and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                return data
            if self._done:
                return b""
            await self._wait(read_timeout_s)

    async def read(self, read_timeout_s: float) -> bytes:
        """The whole body."""
        while not self._done:
            await self._wait(read_timeout_s)
        data = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        self._body.clear()
        self._buffered = 0
        return data

    def finish(self) -> bool:
        """Ends the request; True when the connection can serve another."""
        self._active = False
        self._raw = False
        self._sink = self._tap = self._filter = None
        self._sink_full = False
        self._pieces.clear()
        self._tail = b""
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()
        return self._done and self._error is None and self.keep_alive and not self.closed

    # ---- pass-through ------------------------------------------------------------------------------------
    def relay_to(self, sink: asyncio.WriteTransport, chunked: bool, tap: Callable[[bytes], None] | None,
                 filter_: Callable[[bytes], bytes] | None = None) -> None:
        """From now on the body goes to `sink` as it arrives (what is buffered already goes first); `filter_`
        (the usage filter) says what of each piece the client gets, `tap` sees what it got."""
        self._sink, self._sink_chunked, self._tap, self._filter = sink, chunked, tap, filter_
        self._pieces.extend(self._body)
        self._body.clear()
        self._buffered = 0
        self._flush()
        self._go_raw()
        self._resume()

    def _go_raw(self) -> None:
        """Leaves httptools for the raw pass-through where the body is chunked and the last read ended a chunk."""
        if self._at_boundary and not self._done and self._error is None:
            self._raw = True

    def _raw_received(self, data: bytes) -> None:
        """A read in raw pass-through: the chunk framing followed with byte scans; whole clean chunks verbatim."""
        self._last = self._loop.time()  # type: ignore[union-attr]
        if self._done or self._error is not None:
            self.keep_alive = False  # bytes past the response's end (or after a failure): not reused
            return
        # The common read (vLLM's: one token's event, one chunk, one read), told by checks that read a few
        # bytes each: one size line and the whole chunk; one event (its only blank line at the end), not the
        # engine's error event; and a choice in it (it ends with `}]}`), so not the usage-only event, whose
        # choices are empty. No scan of the whole read for a marker.
        if not self._left and self._aligned and self._sink_chunked and not self._frame_carry \
                and data.endswith(_TOKEN_END):
            n = len(data)
            i = data.find(b"\r\n")
            try:
                whole = i + int(data[:i], 16) + 4 == n
            except ValueError:
                whole = False
            if whole and data.find(_EVENT_END, i) == n - 4 and not data.startswith(ENGINE_ERROR_EVENT, i + 2):
                sink = self._sink
                assert sink is not None
                if self._filter is not None:
                    self._filter.events += 1
                if sink.is_closing():
                    self._sink_full = True
                else:
                    sink.write(data)
                    if self._tap is not None:
                        self._tap(data[i + 2:-2])
                    if sink.get_write_buffer_size() <= SINK_HIGH_WATER:
                        return
                    self._sink_full = True
                if not self._paused and self.transport is not None:
                    self._paused = True
                    self.transport.pause_reading()
                self._wake()
                return
        if self._frame_carry:
            data = self._frame_carry + data
            self._frame_carry = b""
        n = len(data)
        pos = 0
        end = n  # where the bytes for the client end: the last chunk and a cut size line are not theirs
        left = self._left
        # Verbatim only from a chunk boundary, to a client that takes chunks, after whole events.
        clean = not left and self._sink_chunked and self._aligned
        payloads: list[bytes] = []
        while pos < n:
            if left:
                stop = pos + left
                # The chunk's data ends at `stop - 2`, its CRLF at `stop`; either may lie past this read.
                data_end = stop - 2
                if min(n, data_end) > pos:
                    payloads.append(data[pos:min(n, data_end)])
                lo, hi = max(pos, data_end), min(n, stop)  # this read's part of the CRLF
                if hi > lo and data[lo:hi] != b"\r\n"[lo - data_end:hi - data_end]:
                    self._fail("malformed chunk from engine: no CRLF after its data")
                    return
                if stop > n:  # the chunk goes on in the next read
                    self._left = stop - n
                    self._take(payloads, data, n, False)
                    return
                if clean and (left < 4 or not data.startswith(_EVENT_END, stop - 4)):
                    clean = False
                pos, left = stop, 0
                continue
            i = data.find(b"\r\n", pos)
            if i < 0:
                if n - pos > MAX_FRAME_LINE:
                    self._fail("malformed chunk from engine: a size line over 4 KiB")
                    return
                self._frame_carry, end = data[pos:], pos
                break
            try:
                size = int(data[pos:i].split(b";", 1)[0], 16)
            except ValueError:
                size = -1
            if size < 0:
                self._fail(f"malformed chunk size from engine: {data[pos:i][:40]!r}")
                return
            if size:
                left, pos = size + 2, i + 2
                continue
            # The last chunk; its trailers (uvicorn sends none) end at an empty line.
            if data.startswith(b"\r\n", i + 2):
                stop = i + 4
            else:
                j = data.find(b"\r\n\r\n", i)
                if j < 0:
                    if n - pos > MAX_FRAME_LINE:
                        self._fail("malformed last chunk from engine: trailers over 4 KiB")
                        return
                    self._frame_carry, end = data[pos:], pos
                    break
                stop = j + 4
            end, self._done = pos, True
            if stop < n:
                self.keep_alive = False  # bytes past the response's end
            break
        self._left = left
        self._take(payloads, data, end, clean)

    def _take(self, payloads: list[bytes], data: bytes, end: int, clean: bool) -> None:
        """Hands on one raw read: `data[:end]` verbatim where `clean`, else the chunks' data decoded."""
        usage = self._filter
        if clean and end and ENGINE_ERROR_EVENT not in data and (usage is None or b'"usage"' not in data):
            sink = self._sink
            assert sink is not None
            if usage is not None:
                usage.events += data.count(_EVENT_END, 0, end)
            if sink.is_closing():
                self._sink_full = True  # the client left: its handler is being cancelled; stop reading
            elif self._done:
                # The body's last read: its data goes with the terminator, in the caller's one last write.
                self._tail = payloads[0] if len(payloads) == 1 else b"".join(payloads)
                if self._tap is not None:
                    self._tap(self._tail)
            else:
                sink.write(data if end == len(data) else data[:end])
                if self._tap is not None:
                    self._tap(payloads[0] if len(payloads) == 1 else b"".join(payloads))
                if sink.get_write_buffer_size() > SINK_HIGH_WATER:
                    self._sink_full = True
            if self._sink_full and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
        elif payloads:
            self._pieces.extend(payloads)
            self._flush()
        if self._done or self._sink_full or self._error is not None:
            self._wake()

    def _flush(self) -> None:
        pieces = self._pieces
        if not pieces:
            return
        if self._error is not None:
            pieces.clear()  # the engine failed mid-stream: nothing after its error event reaches the client
            return
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self._aligned = data.endswith(_EVENT_END)
        sink = self._sink
        assert sink is not None
        failed_at = data.find(ENGINE_ERROR_EVENT)
        if failed_at >= 0:
            # vLLM reports its dying engine core inside the stream (its own error event, code 500), then ends
            # the stream as if it were whole: what came before passes, the rest becomes the gateway's error.
            event = data[failed_at:].split(b"\n", 1)[0]
            data = data[:failed_at]
            self._error = UpstreamError(f"it said {engine_error_message(event)}", before_response=False)
            self.keep_alive = False
            if not data:
                return
        if self._filter is not None:
            data = self._filter(data)
            if not data:
                return
        if sink.is_closing():
            # The client left; its handler is being cancelled, which ends this request. Stop reading meanwhile.
            self._sink_full = True
        else:
            if self._raw and self._done:
                self._tail += data  # the body's last read: the caller writes it with the terminator
            else:
                sink.write(b"%x\r\n%b\r\n" % (len(data), data) if self._sink_chunked else data)
            if self._tap is not None:
                self._tap(data)
            if self._done:
                return
            if sink.get_write_buffer_size() <= SINK_HIGH_WATER:
                return
            self._sink_full = True
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def take_tail(self) -> bytes:
        """The data of the body's last read (raw pass-through), not yet written: the caller writes it with the
        stream's end, so that the last event and the terminator leave in one write."""
        tail, self._tail = self._tail, b""
        return tail

    def _resume(self) -> None:
        self._sink_full = False
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    async def relayed(self, read_timeout_s: float) -> bool:
        """Sleeps until the body has been passed through (True) or the client's buffer is over its limit
        (False: the engine's socket is paused; call `resume_relay` once the client drained). Raises
        UpstreamError if the engine fails, UpstreamTimeout if it is silent for `read_timeout_s`."""
        loop = self._loop
        assert loop is not None
        self._last = loop.time()
        while True:
            if self._error is not None:
                raise self._error
            if self._done:
                return True
            if self._sink_full:
                return False
            if self.closed:
                raise UpstreamError("engine connection closed", before_response=False)
            waiter = self._waiter = loop.create_future()
            self._timer = loop.call_at(self._last + read_timeout_s, self._silence, waiter, read_timeout_s)
            try:
                await waiter
            except TimeoutError as exc:
                raise UpstreamTimeout(f"engine silent for {read_timeout_s:g} s", before_response=False) from exc
            finally:
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                self._waiter = None

    def resume_relay(self) -> None:
        assert self._loop is not None
        self._last = self._loop.time()
        self._resume()

    def _silence(self, waiter: asyncio.Future[None], read_timeout_s: float) -> None:
        """The silence timer: fires once per timeout period, not per chunk; re-arms if bytes came since."""
        if waiter.done():
            return
        assert self._loop is not None
        due = self._last + read_timeout_s
        if self._loop.time() >= due:
            waiter.set_exception(TimeoutError())
        else:
            self._timer = self._loop.call_at(due, self._silence, waiter, read_timeout_s)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class EnginePool:
    """Keep-alive connections to one engine (host:port), reused most-recent first."""

    def __init__(self, base_url: str, connect_timeout_s: float, ssl_context: ssl.SSLContext | None = None) -> None:
        # An https engine is verified (a certificate for its node) against the site's engine CA.
        self._ssl = (ssl_context or ssl.create_default_context()) if base_url.startswith("https://") else None
        rest = base_url.split("://", 1)[-1].rstrip("/")
        hostport, _, prefix = rest.partition("/")
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"engine base URL {base_url!r} is not http://HOST:PORT")
        self.host = host.strip("[]")
        self.port = int(port)
        self._hostport = hostport
        self._prefix = f"/{prefix}" if prefix else ""
        self._connect_timeout = connect_timeout_s
        # Oldest first; reuse takes the newest, so connections idle past the engine's limit gather at the front.
        self._idle: deque[EngineConnection] = deque()
        self._heads: dict[tuple[str, str], bytes] = {}

    def request_bytes(self, path: str, api_key: str, body: bytes, content_type: str = "") -> bytes:
        """The request; `content_type` other than JSON's (a multipart form's, with its boundary) is not cached."""
        if content_type:
            head = (f"POST {self._prefix}{path} HTTP/1.1\r\nHost: {self._hostport}\r\n"
                    f"Authorization: Bearer {api_key}\r\nContent-Type: {content_type}\r\n"
                    f"Accept: */*\r\nContent-Length: ").encode("latin-1")
            return b"%s%d\r\n\r\n%s" % (head, len(body), body)
        head = self._heads.get((path, api_key))
        if head is None:
            head = self._heads[(path, api_key)] = (
                f"POST {self._prefix}{path} HTTP/1.1\r\nHost: {self._hostport}\r\n"
                f"Authorization: Bearer {api_key}\r\nContent-Type: application/json\r\n"
                f"Accept: */*\r\nContent-Length: ").encode()
        return b"%s%d\r\n\r\n%s" % (head, len(body), body)

    async def acquire(self) -> tuple[EngineConnection, bool]:
        """A connection and whether it was reused from the pool."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_LIMIT_S:
                return conn, True
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()
        return await self.connect(), False

    async def connect(self) -> EngineConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(EngineConnection, self.host, self.port, ssl=self._ssl,
                                                       server_hostname=self.host if self._ssl else None)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"connect to {self._hostport} timed out after {self._connect_timeout} s",
                                  before_response=True) from exc
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {self._hostport}: {exc}", before_response=True) from exc
        return conn

    def release(self, conn: EngineConnection) -> None:
        """Returns a connection whose response was read to the end; any other is closed."""
        if conn.finish():
            now = conn.idle_since = time.monotonic()
            self._idle.append(conn)
            idle = self._idle
            while idle and (idle[0].closed or now - idle[0].idle_since >= IDLE_LIMIT_S):
                self.discard(idle.popleft())
        else:
            self.discard(conn)

    @staticmethod
    def discard(conn: EngineConnection) -> None:
        conn.finish()
        conn.closed = True
        if conn.transport is not None:
            conn.transport.close()

    def close(self) -> None:
        for conn in self._idle:
            self.discard(conn)
        self._idle.clear()
