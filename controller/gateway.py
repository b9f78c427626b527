"""The gateway: the OpenAI-compatible HTTP front of the service.

It authenticates the client's key, reads `model` (and, for prefix affinity, the prompt's first bytes) from the
body in one validating pass that materialises nothing else, picks an engine through the Balancer among the
Registry's routable ones, waits in the per-model queue when there is none (scale from zero) or all are at
their outstanding limit, retries on another engine when one fails before any byte, and answers every failure
as OpenAI-shaped JSON. It counts in-flight and queued requests per model, which the autoscaler reads through
`demand()`. It does not start or stop engines, and it never re-serialises a request body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry

from slinfer.config import GatewayConfig, ModelConfig
from slinfer.controller import metrics
from slinfer.controller.balancer import Balancer
from slinfer.controller.keys import KeyInfo, KeyStore
from slinfer.controller.limits import Limiter
from slinfer.controller.proxy import EngineFailed, EngineTimeout, Proxy
from slinfer.controller.queue import QueueFull, WaitQueue
from slinfer.controller.registry import Registry
from slinfer.controller.usage import Meter, UsageLedger

log = logging.getLogger(__name__)

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/embeddings": "embeddings"}
# How much of the prompt (raw JSON bytes) decides prefix affinity: enough to tell system prompts apart.
AFFINITY_PREFIX_BYTES = 512
# Retry-After hints: a saturated pool frees up within seconds; a replica from zero takes a Slurm job start.
RETRY_AFTER_SATURATED_S = 1
RETRY_AFTER_NO_REPLICA_S = 10
# An engine that just failed a request is passed over for this long (unless no other is left): its agent
# reports it dead within a heartbeat or two, and until then every request would try it first, as it has the
# fewest outstanding.
ENGINE_COOLDOWN_S = 2.0
# Where a request keeps its authenticated key (aiohttp's per-request storage), for the usage ledger.
_KEY = web.RequestKey("slinfer.key", KeyInfo)


@dataclass(frozen=True)
class Demand:
    in_flight: int
    queued: int


class _Head(msgspec.Struct):
    """The only parts of a request body the gateway looks at; everything else is skipped unparsed."""

    model: str | None = None
    messages: msgspec.Raw = msgspec.Raw()
    prompt: msgspec.Raw = msgspec.Raw()


_decode_head = msgspec.json.Decoder(_Head).decode


def error_response(status: int, message: str, type_: str, code: str | None = None,
                   retry_after: int | None = None) -> web.Response:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


class Gateway:
    """OpenAI-compatible HTTP server in front of the Registry's engines."""

    def __init__(self, config: GatewayConfig, models: Sequence[ModelConfig], registry: Registry,
                 keys: KeyStore, proxy: Proxy, balancer: Balancer, queue: WaitQueue,
                 limiter: Limiter | None = None, ledger: UsageLedger | None = None) -> None:
        self._config = config
        self._limiter = limiter
        self._ledger = ledger
        self._catalog = {m.name: m for m in models}
        self._registry = registry
        self._keys = keys
        self._proxy = proxy
        self._balancer = balancer
        self._queue = queue
        self._in_flight: dict[str, int] = {}
        self._cooling: dict[str, float] = {}  # job id -> until (perf_counter)
        self._runner: web.AppRunner | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._state_metrics = CollectorRegistry()
        self._state_metrics.register(metrics.StateCollector(
            registry, self._catalog, lambda m: self._in_flight.get(m, 0), queue.depth))
        # Labelled children cached: .labels() takes a lock and builds a tuple on every call.
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._latency: dict[tuple[str, str], Any] = {}
        self._ttft: dict[str, Any] = {}
        registry.subscribe(queue.wake_all)

    # ---- the autoscaler's view ---------------------------------------------------------------------
    def demand(self, model: str) -> Demand:
        return Demand(in_flight=self._in_flight.get(model, 0), queued=self._queue.depth(model))

    # ---- server lifecycle --------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._config.max_body_bytes, handler_args={"max_field_size": 16384})
        for path in ENDPOINTS:
            app.router.add_post(path, self._handle)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    async def start(self, host: str, port: int, shutdown_grace_s: float = 30.0) -> int:
        """Serves on host:port (port 0 picks one); returns the bound port.

        `stop()` lets requests in flight finish for up to `shutdown_grace_s` before cutting them.
        """
        # handler_cancellation: a client that leaves cancels its upstream request too, freeing the engine.
        # keepalive_timeout also closes a connection whose request head has not arrived in that time (a client
        # that trickles its headers, or never sends any); aiohttp's default is an hour.
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True,
                                     shutdown_timeout=shutdown_grace_s,
                                     keepalive_timeout=self._config.client_timeout_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=4096, reuse_address=True)
        await site.start()
        self._housekeeping = asyncio.create_task(self._forget_gone_engines())
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("gateway listening on %s:%d", host, bound)
        return int(bound)

    async def stop(self) -> None:
        if self._housekeeping is not None:
            task, self._housekeeping = self._housekeeping, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        await self._proxy.close()

    async def _forget_gone_engines(self) -> None:
        while True:
            await asyncio.sleep(10.0)
            await self._proxy.forget(r.base_url for r in self._registry.replicas())

    # ---- handlers ----------------------------------------------------------------------------------
    def _authenticate(self, request: web.Request) -> KeyInfo | None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        return self._keys.verify(token.strip())

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        endpoint = ENDPOINTS[request.path]
        model = ""
        status = 500
        meter = Meter()
        try:
            response, model = await self._serve(request, endpoint, started, meter)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's code for it)
            raise
        finally:
            key = (model, endpoint, status)
            counter = self._counters.get(key)
            if counter is None:
                counter = self._counters[key] = metrics.REQUESTS.labels(model, endpoint, str(status))
            counter.inc()
            latency = self._latency.get((model, endpoint))
            if latency is None:
                latency = self._latency[(model, endpoint)] = metrics.REQUEST_SECONDS.labels(model, endpoint)
            latency.observe(time.perf_counter() - started)
            key = request.get(_KEY)
            if key is not None and self._ledger is not None:
                self._ledger.record(key.key_id, key.name, key.account, model, status, meter)

    async def _serve(self, request: web.Request, endpoint: str, started: float,
                     meter: Meter) -> tuple[web.StreamResponse, str]:
        """The response and the model label to count it under ("" unless the model is known: user input
        never becomes a label)."""
        key = self._authenticate(request)
        if key is None:
            return error_response(401, "Missing or invalid API key (send 'Authorization: Bearer KEY')",
                                  "invalid_request_error", "invalid_api_key"), ""
        request[_KEY] = key
        if self._limiter is not None:
            refusal = self._limiter.check(key)
            if refusal is not None:
                type_ = "insufficient_quota" if refusal.code == "insufficient_quota" else "rate_limit_error"
                return error_response(429, refusal.message, type_, refusal.code, refusal.retry_after_s), ""
        limit = self._config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return _too_large(limit), ""
        try:
            async with asyncio.timeout(self._config.client_timeout_s):
                body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _too_large(limit), ""
        except TimeoutError:
            return error_response(408, f"The request body did not arrive within {self._config.client_timeout_s:g} "
                                  "s.", "invalid_request_error", "request_timeout"), ""
        return await self._parsed(request, endpoint, body, started, meter)

    async def _parsed(self, request: web.Request, endpoint: str, body: bytes, started: float,
                      meter: Meter) -> tuple[web.StreamResponse, str]:
        try:
            head = _decode_head(body)
        except msgspec.ValidationError as exc:
            return error_response(400, f"Invalid request body: {exc}", "invalid_request_error"), ""
        except msgspec.DecodeError as exc:
            return error_response(400, f"The request body is not valid JSON: {exc}", "invalid_request_error",
                                  "invalid_json"), ""
        model = head.model
        if not model:
            return error_response(400, "You must provide a model parameter.", "invalid_request_error",
                                  "missing_model"), ""
        config = self._catalog.get(model)
        if config is None and not self._registry.replicas(model):
            return error_response(404, f"The model '{model}' does not exist; GET /v1/models lists the models "
                                  "served here.", "invalid_request_error", "model_not_found"), ""
        prefix: bytes | None = None
        if config is not None and config.prefix_affinity:
            raw = head.messages if head.messages else head.prompt
            prefix = bytes(raw)[:AFFINITY_PREFIX_BYTES] or None
        return await self._dispatch(request, model, request.path, body, prefix, started, meter), model

    async def _dispatch(self, request: web.Request, model: str, path: str, body: bytes, prefix: bytes | None,
                        started: float, meter: Meter) -> web.StreamResponse:
        config = self._config
        deadline = started + config.queue_timeout_s
        tried: frozenset[str] = frozenset()
        failures = 0
        queued_at = 0.0
        policy = self._catalog[model].balancer if model in self._catalog else None
        while True:
            candidates = self._registry.routable(model)
            replica = None
            if self._cooling:
                now = time.perf_counter()
                for job_id in [j for j, until in self._cooling.items() if until <= now]:
                    del self._cooling[job_id]
                replica = self._balancer.pick(candidates, prefix, tried | self._cooling.keys(),
                                              config.max_outstanding_per_engine, policy)
            if replica is None:
                replica = self._balancer.pick(candidates, prefix, tried, config.max_outstanding_per_engine, policy)
            if replica is None:
                saturated = any(r.job_id not in tried for r in candidates)
                # Every routable engine already failed this request: wait for the Registry to change (the agent
                # reports the engine down, or a replacement READY), but only for the cool-down; then the same
                # engines may be tried again, within the retry budget.
                failed_all = bool(candidates) and not saturated
                now = time.perf_counter()
                if not queued_at:
                    queued_at = now
                until = min(deadline, now + ENGINE_COOLDOWN_S) if failed_all else deadline
                try:
                    woke = until > now and await self._queue.wait(model, until - now)
                except QueueFull:
                    return self._refuse(model, saturated, "queue full")
                if failed_all:
                    tried = frozenset()
                elif not woke:
                    return self._refuse(model, saturated, "waited too long")
                if time.perf_counter() >= deadline:
                    return self._refuse(model, saturated, "waited too long")
                continue
            if queued_at:
                metrics.QUEUE_WAIT_SECONDS.labels(model).observe(time.perf_counter() - queued_at)
                queued_at = 0.0
            replica.outstanding += 1
            self._in_flight[model] = self._in_flight.get(model, 0) + 1
            try:
                if self._ledger is None:
                    return await self._proxy.forward(request, replica, path, body, self._ttft_child(model),
                                                     started)
                response = await self._proxy.forward(request, replica, path, body, self._ttft_child(model),
                                                     started, meter.feed_chunk)
                if type(response) is web.Response and isinstance(response.body, bytes):
                    meter.feed_body(response.body)
                return response
            except EngineFailed as exc:
                failures += 1
                log.warning("%s request failed on engine %s (%s), attempt %d of %d: %s", model, replica.job_id,
                            replica.node, failures, config.retries + 1, exc)
                if failures > config.retries:
                    return error_response(502, f"The engines failed this request {failures} times; last: {exc}",
                                          "upstream_error", "engine_failed")
                metrics.RETRIES.labels(model).inc()
                tried = tried | {replica.job_id}
                if replica.job_id not in self._cooling:
                    log.info("engine %s (%s) passed over for %.0f s after a failure", replica.job_id,
                             replica.node, ENGINE_COOLDOWN_S)
                self._cooling[replica.job_id] = time.perf_counter() + ENGINE_COOLDOWN_S
            except EngineTimeout as exc:
                return error_response(504, str(exc), "upstream_error", "engine_timeout")
            finally:
                replica.outstanding -= 1
                self._in_flight[model] -= 1
                if self._queue.depth(model):
                    self._queue.wake_one(model)

    def _refuse(self, model: str, saturated: bool, why: str) -> web.Response:
        depth = self._queue.depth(model)
        if saturated:
            log.info("%s request refused with 429: %s (every engine at %d outstanding, %d queued)", model, why,
                     self._config.max_outstanding_per_engine, depth)
            return error_response(429, f"All replicas of '{model}' are busy ({why}); retry shortly.",
                                  "rate_limit_error", "saturated", RETRY_AFTER_SATURATED_S)
        log.info("%s request refused with 503: %s (no routable replica, %d queued, %d known)", model, why,
                 depth, len(self._registry.replicas(model)))
        return error_response(503, f"No replica of '{model}' is ready ({why}); one is being started.",
                              "service_unavailable", "no_replica", RETRY_AFTER_NO_REPLICA_S)

    def _ttft_child(self, model: str) -> Any:
        child = self._ttft.get(model)
        if child is None:
            child = self._ttft[model] = metrics.TTFT_SECONDS.labels(model)
        return child

    async def _models(self, request: web.Request) -> web.Response:
        if not self._authenticate(request):
            return error_response(401, "Missing or invalid API key (send 'Authorization: Bearer KEY')",
                                  "invalid_request_error", "invalid_api_key")
        names = list(self._catalog) + sorted({r.model for r in self._registry.replicas()} - set(self._catalog))
        data = []
        for name in names:
            config = self._catalog.get(name)
            data.append({
                "id": name, "object": "model", "created": 0, "owned_by": "slinfer",
                "ready_replicas": len(self._registry.routable(name)),
                "total_replicas": len(self._registry.replicas(name)),
                "min_replicas": config.min_replicas if config else None,
                "max_replicas": config.max_replicas if config else None,
                "in_catalog": config is not None,
                "in_flight": self._in_flight.get(name, 0),
                "queued": self._queue.depth(name),
            })
        return web.json_response({"object": "list", "data": data})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "agents": len(self._registry.agents()),
                                  "replicas": len(self._registry.replicas())})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(self._state_metrics),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _not_found(self, request: web.Request) -> web.Response:
        return error_response(404, f"No route {request.method} {request.path} (served: GET /v1/models, POST "
                              f"{', '.join(ENDPOINTS)}, GET /healthz, GET /metrics)", "invalid_request_error",
                              "not_found")


def _too_large(limit: int) -> web.Response:
    return error_response(413, f"The request body is larger than {limit} bytes.", "invalid_request_error",
                          "body_too_large")
