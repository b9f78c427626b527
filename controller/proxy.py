"""The proxy: one attempt to pass a request to one engine and its answer back to the client.

One pooled keep-alive aiohttp client per engine (keyed by its base URL), closed once the engine is gone.
The request body goes upstream unchanged with the engine's own key in place of the client's. A
non-streaming answer is read whole and returned; an SSE answer is relayed chunk by chunk as it arrives. If
the engine fails before any byte reached the client (refused connection, reset, death before its first
chunk), `EngineFailed` says so and the caller may try another engine; after that, a stream is ended with an
OpenAI-shaped error event, never silently. This module does not choose engines or count requests.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable

import aiohttp
from aiohttp import web
from prometheus_client.metrics import Histogram
from slinfer.controller.registry import Replica
from yarl import URL

log = logging.getLogger(__name__)

_SSE = "text/event-stream"


class EngineFailed(Exception):
    """The engine failed before the client saw any byte; retrying elsewhere is safe."""


class EngineTimeout(Exception):
    """The engine did not answer within the read timeout (not retried: it may still be working)."""


class _Upstream:
    __slots__ = ("auth", "key", "session", "urls")

    def __init__(self, session: aiohttp.ClientSession, api_key: str) -> None:
        self.session = session
        self.key = api_key
        self.auth = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.urls: dict[str, URL] = {}


class Proxy:
    """Pooled clients to engines, and the relay of one request to one of them."""

    def __init__(self, connect_timeout_s: float = 5.0, read_timeout_s: float = 600.0) -> None:
        # sock_read bounds the silence between chunks, not a whole (possibly long) generation.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s,
                                              sock_read=read_timeout_s)
        self._upstreams: dict[str, _Upstream] = {}

    def _upstream(self, replica: Replica) -> _Upstream:
        upstream = self._upstreams.get(replica.base_url)
        if upstream is None:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, keepalive_timeout=60.0)
            session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                            cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
                                            skip_auto_headers=("User-Agent",))
            upstream = _Upstream(session, replica.api_key)
            self._upstreams[replica.base_url] = upstream
        elif upstream.key != replica.api_key:
            upstream.key = replica.api_key
            upstream.auth = {"Authorization": f"Bearer {replica.api_key}", "Content-Type": "application/json"}
        return upstream

    async def forget(self, keep: Iterable[str]) -> None:
        """Closes the clients of engines whose base URL is not in `keep`."""
        keep = set(keep)
        for base_url in [u for u in self._upstreams if u not in keep]:
            upstream = self._upstreams.pop(base_url)
            await upstream.session.close()

    async def close(self) -> None:
        await self.forget(())

    async def forward(self, request: web.Request, replica: Replica, path: str, body: bytes,
                      ttft: Histogram | None = None, started: float = 0.0) -> web.StreamResponse:
        """Sends `body` to the engine's `path` and returns the response for the client.

        A streamed answer is already prepared and relayed in full when this returns.
        """
        upstream = self._upstream(replica)
        url = upstream.urls.get(path)
        if url is None:
            url = upstream.urls[path] = URL(replica.base_url + path)
        try:
            resp = await upstream.session.post(url, data=body, headers=upstream.auth)
        except aiohttp.SocketTimeoutError as exc:
            raise EngineTimeout(f"engine {replica.job_id} sent no answer in time") from exc
        except (TimeoutError, aiohttp.ClientConnectionError) as exc:
            raise EngineFailed(f"engine {replica.job_id} at {replica.base_url}: {exc!r}") from exc
        try:
            content_type = resp.headers.get("Content-Type", "application/json")
            if not content_type.startswith(_SSE):
                try:
                    data = await resp.read()
                except aiohttp.SocketTimeoutError as exc:
                    raise EngineTimeout(f"engine {replica.job_id} stalled mid-answer") from exc
                except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                    raise EngineFailed(f"engine {replica.job_id} died before its answer was complete: "
                                       f"{exc!r}") from exc
                return web.Response(body=data, status=resp.status, headers={"Content-Type": content_type})
            return await self._relay(request, resp, replica, ttft, started)
        finally:
            resp.release()

    async def _relay(self, request: web.Request, resp: aiohttp.ClientResponse, replica: Replica,
                     ttft: Histogram | None, started: float) -> web.StreamResponse:
        try:
            first = await resp.content.readany()
        except aiohttp.SocketTimeoutError as exc:
            raise EngineTimeout(f"engine {replica.job_id} sent no first chunk in time") from exc
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise EngineFailed(f"engine {replica.job_id} died before its first chunk: {exc!r}") from exc
        if not first:
            raise EngineFailed(f"engine {replica.job_id} closed its stream before the first chunk")
        out = web.StreamResponse(status=resp.status, headers={"Content-Type": resp.headers["Content-Type"],
                                                              "Cache-Control": "no-cache"})
        await out.prepare(request)
        if ttft is not None:
            ttft.observe(time.perf_counter() - started)
        await out.write(first)
        while True:
            # Only the engine's side is caught: a client that left raises out of write() and ends the relay.
            try:
                chunk = await resp.content.readany()
            except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                log.warning("engine %s (%s) failed mid-stream: %r", replica.job_id, replica.node, exc)
                error = {"error": {"message": f"the engine serving this request failed mid-stream ({exc!r})",
                                   "type": "upstream_error", "param": None, "code": "engine_failed"}}
                await out.write(b"data: " + json.dumps(error).encode() + b"\n\n")
                break
            if not chunk:
                break
            await out.write(chunk)
        await out.write_eof()
        return out
