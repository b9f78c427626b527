"""The proxy: one attempt to pass a request to one engine and its answer back to the client.

One keep-alive connection pool per engine (`upstream.EnginePool`, keyed by base URL), closed once the engine
is gone. The request body goes upstream unchanged with the engine's own key in place of the client's. A
non-streaming answer is read whole and returned; an SSE answer is relayed chunk by chunk as it arrives. If
the engine fails before any byte reached the client (refused connection, reset, death before its first
chunk), `EngineFailed` says so and the caller may try another engine; after that, a stream is ended with an
OpenAI-shaped error event, never silently. This module does not choose engines or count requests.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client.metrics import Histogram

from slinfer.controller.registry import Replica
from slinfer.controller.upstream import EngineConnection, EnginePool, UpstreamError, UpstreamTimeout

log = logging.getLogger(__name__)

_SSE = "text/event-stream"


class EngineFailed(Exception):
    """The engine failed before the client saw any byte; retrying elsewhere is safe."""


class EngineTimeout(Exception):
    """The engine did not answer within the read timeout (not retried: it may still be working)."""


class Proxy:
    """Connection pools to engines, and the relay of one request to one of them."""

    def __init__(self, connect_timeout_s: float = 5.0, read_timeout_s: float = 600.0) -> None:
        self._connect_timeout = connect_timeout_s
        # Bounds the silence between chunks, not a whole (possibly long) generation.
        self._read_timeout = read_timeout_s
        self._pools: dict[str, EnginePool] = {}

    def _pool(self, replica: Replica) -> EnginePool:
        pool = self._pools.get(replica.base_url)
        if pool is None:
            try:
                pool = EnginePool(replica.base_url, self._connect_timeout)
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
                      tap: Callable[[bytes], None] | None = None) -> web.StreamResponse:
        """Sends `body` to the engine's `path` and returns the response for the client.

        A streamed answer is already prepared and relayed in full when this returns; `tap` sees each of its
        chunks as relayed (the usage meter).
        """
        pool = self._pool(replica)
        conn = await self._send(pool, replica, pool.request_bytes(path, replica.api_key, body))
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
            return await self._relay(request, conn, replica, content_type, ttft, started, tap)
        finally:
            pool.release(conn)

    async def _relay(self, request: web.Request, conn: EngineConnection, replica: Replica, content_type: str,
                     ttft: Histogram | None, started: float,
                     tap: Callable[[bytes], None] | None) -> web.StreamResponse:
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
        await out.prepare(request)
        if ttft is not None:
            ttft.observe(time.perf_counter() - started)
        await out.write(first)
        if tap is not None:
            tap(first)
        while True:
            # Only the engine's side is caught: a client that left raises out of write() and ends the relay.
            try:
                chunk = await conn.chunk(self._read_timeout)
            except UpstreamError as exc:
                log.warning("engine %s (%s) failed mid-stream: %s", replica.job_id, replica.node, exc)
                error = {"error": {"message": f"the engine serving this request failed mid-stream ({exc})",
                                   "type": "upstream_error", "param": None, "code": "engine_failed"}}
                await out.write(b"data: " + json.dumps(error).encode() + b"\n\n")
                break
            if not chunk:
                break
            await out.write(chunk)
            if tap is not None:
                tap(chunk)
        await out.write_eof()
        return out
