"""The proxy: one attempt to pass a request to one engine and its answer back to the client.

One keep-alive connection pool per engine (`upstream.EnginePool`, keyed by base URL), closed once the engine
is gone. The request body goes upstream unchanged with the engine's own key in place of the client's. A
non-streaming answer is read whole and returned; an SSE answer is relayed as it arrives: its first chunk
through aiohttp (with the headers), the rest passed through from the engine's socket to the client's
(`EngineConnection.relay_to`): a token's read as it came, chunk framing and all, in one write; the last read
with the terminator, in aiohttp's one `write_eof`. If the engine fails before
any byte reached the client (refused connection, reset, death before its first chunk), `EngineFailed` says
so and the caller may try another engine; after that, a stream is ended with an OpenAI-shaped error event,
never silently. A client whose buffer passes its limit holds the engine's socket paused, for at most the
client timeout; then it is cut off. This module does not choose engines or count requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client.metrics import Histogram

from slinfer.controller.registry import Replica
from slinfer.controller.upstream import SINK_HIGH_WATER, EngineConnection, EnginePool, UpstreamError, UpstreamTimeout
from slinfer.controller.usage import UsageFilter

log = logging.getLogger(__name__)

_SSE = "text/event-stream"
# A client over its buffer limit is watched this often until it drains (only slow clients pay for it).
DRAIN_POLL_S = 0.005
# The engine's socket resumes once the client's buffer is down to this.
SINK_LOW_WATER = SINK_HIGH_WATER // 4
# After a stalled client's connection is aborted, aiohttp cancels its handler (handler_cancellation) within a
# loop iteration or two; a handler still running after this long ends by raising instead.
CUT_GRACE_S = 1.0


def _engine_failed_event(message: str) -> bytes:
    """The OpenAI-shaped error event that ends a stream whose engine failed."""
    error = {"error": {"message": message, "type": "upstream_error", "param": None, "code": "engine_failed"}}
    return b"data: " + json.dumps(error).encode() + b"\n\n"


class EngineFailed(Exception):
    """The engine failed before the client saw any byte; retrying elsewhere is safe."""


class EngineTimeout(Exception):
    """The engine did not answer within the read timeout (not retried: it may still be working)."""


class ClientStalled(ConnectionResetError):
    """The client stopped reading a stream for longer than the client timeout; its connection was cut.
    A ConnectionResetError, as a client that left mid-stream raises out of aiohttp's write()."""


class Proxy:
    """Connection pools to engines, and the relay of one request to one of them."""

    def __init__(self, connect_timeout_s: float = 5.0, read_timeout_s: float = 600.0,
                 client_timeout_s: float = 60.0, engine_ssl: ssl.SSLContext | None = None) -> None:
        self._connect_timeout = connect_timeout_s
        # How https engines are verified; None means the system's CAs.
        self._engine_ssl = engine_ssl
        # Bounds the silence between chunks, not a whole (possibly long) generation.
        self._read_timeout = read_timeout_s
        # Bounds how long a stream waits for a client that stopped reading.
        self._client_timeout = client_timeout_s
        self._pools: dict[str, EnginePool] = {}

    def _pool(self, replica: Replica) -> EnginePool:
        pool = self._pools.get(replica.base_url)
        if pool is None:
            try:
                pool = EnginePool(replica.base_url, self._connect_timeout, self._engine_ssl)
            except ValueError as exc:
                raise EngineFailed(f"engine {replica.job_id}: {exc}") from exc
            self._pools[replica.base_url] = pool
        return pool

    async def forget(self, keep: Iterable[str]) -> None:
        """Closes the pools of engines whose base URL is not in `keep`."""
        keep = set(keep)
        for base_url in [u for u in self._pools if u not in keep]:
            self._pools.pop(base_url).close()

    async def close(self) -> None:
        await self.forget(())

    async def _send(self, pool: EnginePool, replica: Replica, payload: bytes) -> EngineConnection:
        """Sends the request and waits for the response head; a stale pooled connection is replaced once."""
        try:
            conn, reused = await pool.acquire()
        except UpstreamError as exc:
            raise EngineFailed(f"engine {replica.job_id}: {exc}") from exc
        for fresh in (False, True):
            conn.start(payload)
            try:
                await conn.head(self._read_timeout)
                return conn
            except UpstreamTimeout as exc:
                pool.discard(conn)
                raise EngineTimeout(f"engine {replica.job_id} sent no answer in time ({exc})") from exc
            except UpstreamError as exc:
                pool.discard(conn)
                if fresh or not reused or not exc.before_response:
                    raise EngineFailed(f"engine {replica.job_id} at {replica.base_url}: {exc}") from exc
                # The engine had closed this idle connection just as it was reused.
                try:
                    conn = await pool.connect()
                except UpstreamError as exc2:
                    raise EngineFailed(f"engine {replica.job_id}: {exc2}") from exc2
        raise AssertionError("unreachable")

    async def forward(self, request: web.Request, replica: Replica, path: str, body: bytes,
                      ttft: Histogram | None = None, started: float = 0.0,
                      tap: Callable[[bytes], None] | None = None,
                      usage: UsageFilter | None = None, content_type: str = "") -> web.StreamResponse:
        """Sends `body` to the engine's `path` (as JSON, or as `content_type`) and returns the response for the client.

        A streamed answer is already prepared and relayed in full when this returns; `tap` sees each of its
        chunks as relayed (the usage meter), or `usage` takes the usage event the gateway asked for out of it.
        """
        pool = self._pool(replica)
        conn = await self._send(pool, replica, pool.request_bytes(path, replica.api_key, body, content_type))
        try:
            content_type = conn.content_type or "application/json"
            if not content_type.startswith(_SSE):
                try:
                    data = await conn.read(self._read_timeout)
                except UpstreamTimeout as exc:
                    raise EngineTimeout(f"engine {replica.job_id} stalled mid-answer ({exc})") from exc
                except UpstreamError as exc:
                    raise EngineFailed(f"engine {replica.job_id} died before its answer was complete: "
                                       f"{exc}") from exc
                return web.Response(body=data, status=conn.status, headers={"Content-Type": content_type})
            return await self._relay(request, conn, replica, content_type, ttft, started, tap, usage)
        finally:
            pool.release(conn)

    async def _relay(self, request: web.Request, conn: EngineConnection, replica: Replica, content_type: str,
                     ttft: Histogram | None, started: float,
                     tap: Callable[[bytes], None] | None, usage: UsageFilter | None = None) -> web.StreamResponse:
        try:
            first = await conn.chunk(self._read_timeout)
        except UpstreamTimeout as exc:
            raise EngineTimeout(f"engine {replica.job_id} sent no first chunk in time ({exc})") from exc
        except UpstreamError as exc:
            raise EngineFailed(f"engine {replica.job_id} died before its first chunk: {exc}") from exc
        if not first:
            raise EngineFailed(f"engine {replica.job_id} closed its stream before the first chunk")
        out = web.StreamResponse(status=conn.status, headers={"Content-Type": content_type,
                                                              "Cache-Control": "no-cache"})
        if request.version >= (1, 1):
            out.enable_chunked_encoding()  # so that `out.chunked` tells the pass-through how to frame
        await out.prepare(request)
        if ttft is not None:
            ttft.observe(time.perf_counter() - started)
        await out.write(usage(first) if usage is not None else first)  # the headers go with it
        if tap is not None:
            tap(first)
        sink = request.transport
        if sink is None or sink.is_closing():
            raise ConnectionResetError("the client left before the stream's second chunk")
        conn.relay_to(sink, out.chunked, tap, usage)  # type: ignore[arg-type]
        error: bytes = b""
        while True:
            # Only the engine's side is caught: a client that left cancels this handler, or raises ClientStalled.
            try:
                if await conn.relayed(self._read_timeout):
                    break
            except UpstreamError as exc:
                log.warning("engine %s (%s) failed mid-stream: %s", replica.job_id, replica.node, exc)
                error = _engine_failed_event(f"the engine serving this request failed mid-stream ({exc})")
                break
            await self._drain(sink, replica)
            conn.resume_relay()
        # aiohttp waits for a paused client here: bounded too (one timer per stream, not per chunk).
        try:
            async with asyncio.timeout(self._client_timeout):
                # The body's last read and what the usage filter held, with the terminator in one write.
                last = conn.take_tail() + (usage.finish() if usage is not None else b"")
                if error:
                    if last:
                        await out.write(last)
                    last = error
                await out.write_eof(last)
        except ConnectionResetError:
            # The client closed as soon as it had the stream's last event (the openai client does): the answer
            # was whole, so this is no failure of the request.
            log.debug("engine %s: the client closed before the stream's terminator", replica.job_id)
        except TimeoutError:
            log.warning("a client did not take the end of its stream from engine %s within %g s; cutting it off",
                        replica.job_id, self._client_timeout)
            await _cut_off(sink, "the client did not take the end of its stream")
        return out

    async def _drain(self, sink: asyncio.Transport, replica: Replica) -> None:
        """Waits until the client's buffer is low again, for at most the client timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._client_timeout
        while (buffered := sink.get_write_buffer_size()) > SINK_LOW_WATER:
            if sink.is_closing():
                raise ConnectionResetError("the client left mid-stream")
            if loop.time() >= deadline:
                log.warning("a client stopped reading its stream from engine %s: %d bytes unsent after %g s; "
                            "cutting it off", replica.job_id, buffered, self._client_timeout)
                await _cut_off(sink, f"the client read nothing for {self._client_timeout:g} s")
            await asyncio.sleep(DRAIN_POLL_S)


async def _cut_off(sink: asyncio.Transport, why: str) -> None:
    """Aborts a stalled client's connection; the handler is then cancelled like one whose client left."""
    sink.abort()
    await asyncio.sleep(CUT_GRACE_S)
    raise ClientStalled(why)
