"""The gateway: the OpenAI-compatible HTTP front of the service.

It authenticates the client's key, reads `model` (and, for prefix affinity, the prompt's first bytes) from the
body in one validating pass that materialises nothing else, picks an engine through the Balancer among the
Registry's routable ones, waits in the per-model queue when there is none (scale from zero) or all are at
their outstanding limit, retries on another engine when one fails before any byte, and answers every failure
as OpenAI-shaped JSON. It counts in-flight and queued requests per model, which the autoscaler reads through
`demand()`. Which paths it proxies is the route table (routes.py); what `/v1/models` says about each model
is the ModelBoard's (modelstatus.py). It does not start or stop engines, and it never re-serialises a request
body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from slinfer.config import GatewayConfig, ModelConfig
from slinfer.controller import errorshape, metrics
from slinfer.controller.adapters import AdapterLoadFailed, Adapters
from slinfer.controller.balancer import Balancer
from slinfer.controller.fairqueue import Ticket
from slinfer.controller.forms import FormError, form_model
from slinfer.controller.inflight import InFlight
from slinfer.controller.keys import KeyInfo, KeyStore
from slinfer.controller.limits import Limiter
from slinfer.controller.modelstatus import ModelBoard
from slinfer.controller.proxy import EngineFailed, EngineTimeout, Proxy
from slinfer.controller.queue import QueueFull, WaitQueue
from slinfer.controller.registry import Registry, Replica
from slinfer.controller.routes import BY_PATH, Route, not_served_message, served
from slinfer.controller.usage import Meter, UsageFilter, UsageLedger

log = logging.getLogger(__name__)

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
# The Content-Type of a form body (multipart, with its boundary), which the engine gets as the client sent it.
_FORM = web.RequestKey("slinfer.form", str)
# The request's model once it is known, so that a request that ends in an exception is still counted for it.
_MODEL = web.RequestKey("slinfer.model", str)
# How often a draining gateway looks whether its last connection has closed.
DRAIN_POLL_S = 0.05


class UsageSink(Protocol):
    """Where the gateway counts each answered request: the controller's ledger, or a gateway tier's relay."""

    def record(self, key_id: str, key_name: str, account: str, model: str, status: int, meter: Meter) -> None: ...


# A request waiting for engines that reported themselves full looks again this often (an agent's report).
FULL_RECHECK_S = 1.0
# An engine that reports requests waiting with its KV cache at least this full takes no more from the gateway
# (without [gateway].max_outstanding_per_engine): vLLM would only queue them, and another engine may be free.
KV_FULL = 0.98


def engine_full(replica: Replica) -> bool:
    """The engine said (in its agent's last report) that it is at its capacity."""
    return replica.waiting > 0 and replica.kv_cache_usage >= KV_FULL


@dataclass(frozen=True)
class Demand:
    in_flight: int
    queued: int


class _Head(msgspec.Struct):
    """The only parts of a request body the gateway looks at; everything else is skipped unparsed."""

    model: str | None = None
    messages: msgspec.Raw = msgspec.Raw()
    prompt: msgspec.Raw = msgspec.Raw()
    input: msgspec.Raw = msgspec.Raw()
    stream: msgspec.Raw = msgspec.Raw()
    stream_options: msgspec.Raw = msgspec.Raw()


_decode_head = msgspec.json.Decoder(_Head).decode
# Streams whose usage the gateway asks the engine for (vLLM's final usage chunk), to meter from it alone.
_USAGE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_ASK_USAGE = b'"stream_options":{"include_usage":true},'


def ask_for_usage(body: bytes, head: _Head) -> bytes | None:
    """The body of a stream the client did not ask usage for, with the engine asked for it (the gateway then
    strips it); None where the client asked itself, for continuous usage, or the request is no stream."""
    if bytes(head.stream).strip() != b"true":
        return None
    options = bytes(head.stream_options).strip()
    if options and options != b"null":
        try:
            parsed = json.loads(options)
        except ValueError:
            return None
        if not isinstance(parsed, dict) or parsed.get("include_usage") or parsed.get("continuous_usage_stats"):
            return None
        whole = json.loads(body)
        whole["stream_options"] = {**parsed, "include_usage": True}
        return json.dumps(whole, separators=(",", ":")).encode()
    at = body.find(b"{") + 1  # the top level has no stream_options: the key goes first
    return body[:at] + _ASK_USAGE + body[at:]


def error_response(status: int, message: str, type_: str, code: str | None = None,
                   retry_after: int | None = None) -> web.Response:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


class Gateway:
    """OpenAI-compatible HTTP server in front of the Registry's engines."""

    def __init__(self, config: GatewayConfig, models: Sequence[ModelConfig], registry: Registry,
                 keys: KeyStore, proxy: Proxy, balancer: Balancer, queue: WaitQueue,
                 limiter: Limiter | None = None, ledger: UsageLedger | UsageSink | None = None,
                 board: ModelBoard | None = None,
                 scaled_to_zero: Callable[[str], bool] | None = None,
                 health: Callable[[], dict[str, object]] | None = None,
                 state_collectors: Sequence[Collector] = (), instance: str = "") -> None:
        self._config = config
        self._board = board if board is not None else ModelBoard(models, registry)
        # The autoscaler's word that an administrator holds a model at 0 replicas: no replica is coming.
        self._scaled_to_zero = scaled_to_zero
        # A gateway tier's word on its controller feed, added to /healthz.
        self._health = health
        self._draining = False
        self._limiter = limiter
        self._ledger = ledger
        self._catalog = {m.name: m for m in models}
        # The catalog's LoRA adapters: a request for one is served by an engine of its base model.
        self._adapters = Adapters(models)
        self._registry = registry
        self._keys = keys
        self._proxy = proxy
        self._balancer = balancer
        self._queue = queue
        self._in_flight = InFlight()
        self._cooling: dict[str, float] = {}  # job id -> until (perf_counter)
        self._runner: web.AppRunner | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._state_metrics = CollectorRegistry()
        self._state_metrics.register(metrics.StateCollector(
            registry, self._catalog, self._in_flight.model, queue.depth))
        for collector in state_collectors:
            self._state_metrics.register(collector)
        # The gateway tier's instance name, a label on every series it exports ("" for the controller's own).
        self._instance = instance
        self._sites: list[web.TCPSite] = []
        # Labelled children cached: .labels() takes a lock and builds a tuple on every call.
        self._counters: dict[tuple[str, str, int], Any] = {}
        self._latency: dict[tuple[str, str], Any] = {}
        self._ttft: dict[str, Any] = {}
        registry.subscribe(queue.wake_all)
        # Routes of other APIs served on this port (/v1/files, /v1/batches), each a `register(router)`;
        # added before the catch-all 404.
        self.extra_routes: list[Callable[[web.UrlDispatcher], None]] = []
        # The gateway tier's miss path (keywait.KeyWait.verify): a key its table does not hold yet is waited for
        # a moment before 401, as a key the controller made an instant ago is on its way. None: answered at once.
        self.verify_late: Callable[[str], Awaitable[KeyInfo | None]] | None = None
        # A tier worker's: waits (bounded) for the feed's next messages while the given state still holds
        # (keywait.KeyWait.settle), for what an administrator changed a moment ago.
        self.settle_late: Callable[[Callable[[], bool]], Awaitable[None]] | None = None

    async def update_catalog(self, models: Sequence[ModelConfig]) -> dict[str, int]:
        """A reloaded catalog (controller/reload.py: the same models, some settings new) routes from now on; the
        adapters it dropped are unloaded from the running engines (adapters.py). Returns engines left, by adapter."""
        self._catalog.update((m.name, m) for m in models)
        self._board.update_catalog(models)
        return await self._adapters.unload(self._adapters.update(models), self._registry.replicas)

    # ---- the autoscaler's view ---------------------------------------------------------------------
    def demand(self, model: str) -> Demand:
        return Demand(in_flight=self._in_flight.model(model), queued=self._queue.depth(model))

    def outstanding(self) -> dict[str, int]:
        """Requests in flight per engine (job id), for a gateway tier's report to the controller."""
        return {r.job_id: r.outstanding for r in self._registry.replicas() if r.outstanding}

    # ---- server lifecycle --------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._config.max_body_bytes, handler_args={"max_field_size": 16384})
        for path in BY_PATH:
            app.router.add_post(path, self._handle)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get(r"/v1/models/{id:[\s\S]+}", self._model)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        for register in self.extra_routes:
            register(app.router)
        # [\s\S], not '.': a path with a newline in it ("/%0a") must get the JSON 404 too, not aiohttp's text one.
        app.router.add_route("*", r"/{tail:[\s\S]*}", self._not_found)
        app.on_response_prepare.append(self._close_when_draining)
        return app

    async def _close_when_draining(self, request: web.Request, response: web.StreamResponse) -> None:
        # A draining gateway answers with `Connection: close`: the client's next request opens a connection
        # that another listener of the port accepts, instead of finding this one closed.
        if self._draining:
            response.force_close()
            # force_close() this late no longer writes the header; without it the client would reuse the
            # connection and find it closed.
            response.headers["Connection"] = "close"

    async def start(self, host: str, port: int, shutdown_grace_s: float = 30.0, reuse_port: bool = False) -> int:
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
        site = web.TCPSite(self._runner, host, port, backlog=4096, reuse_address=True,
                           reuse_port=reuse_port or None)
        await site.start()
        self._sites = [site]
        self._housekeeping = asyncio.create_task(self._forget_gone_engines())
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("gateway listening on %s:%d", host, bound)
        return int(bound)

    async def listen_also(self, host: str, port: int) -> int:
        """Serves the same app on one more port (a worker's own, for scraping each worker's /metrics)."""
        assert self._runner is not None, "start() first"
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        self._sites.append(site)
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def drain(self, grace_s: float) -> int:
        """Stops accepting, answers every further request with `Connection: close`, and waits (up to
        `grace_s`) until every client connection has closed; returns how many were still open."""
        self._draining = True
        for site in self._sites:
            if site._server is not None:
                site._server.close()  # type: ignore[union-attr]  # the listener only; connections stay
        server = self._runner.server if self._runner is not None else None
        deadline = time.monotonic() + grace_s
        # aiohttp signals no connection's close: poll.
        while server is not None and server.connections and time.monotonic() < deadline:  # noqa: ASYNC110
            # An idle connection's client may be sending on it right now: only one that got a
            # `Connection: close` answer, or the grace's end, closes it.
            await asyncio.sleep(DRAIN_POLL_S)
        left = len(server.connections) if server is not None else 0
        log.info("gateway drained: %d connections still open after %.1f s", left,
                 grace_s - max(0.0, deadline - time.monotonic()))
        return left

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
        await self._board.close()
        await self._adapters.close()

    async def _forget_gone_engines(self) -> None:
        while True:
            await asyncio.sleep(10.0)
            await self._proxy.forget(r.base_url for r in self._registry.replicas())
            self._adapters.forget(r.job_id for r in self._registry.replicas())

    # ---- handlers ----------------------------------------------------------------------------------
    async def _authenticate(self, request: web.Request) -> KeyInfo | None:
        header = request.headers.get("Authorization", "")
        if not header and (api_key := request.headers.get("x-api-key", "")):
            header = f"Bearer {api_key}"  # Anthropic's clients send the key so (/v1/messages)
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        if self.verify_late is not None:
            return await self.verify_late(token.strip())
        return self._keys.verify(token.strip())

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        route = BY_PATH[request.path]
        endpoint = route.endpoint
        model = ""
        status = 500
        meter = route.meter()
        try:
            response, model = await self._serve(request, route, started, meter)
            status = response.status
            return response
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's code for it)
            raise
        finally:
            model = model or request.get(_MODEL, "")
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
                metrics.count_account(key.account, model, status, meter.prompt_tokens, meter.completion_tokens)

    async def _serve(self, request: web.Request, route: Route, started: float,
                     meter: Meter) -> tuple[web.StreamResponse, str]:
        """The response and the model label to count it under ("" unless the model is known: user input
        never becomes a label)."""
        key = await self._authenticate(request)
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
        return await self._parsed(request, route, body, started, meter)

    async def _parsed(self, request: web.Request, route: Route, body: bytes, started: float,
                      meter: Meter) -> tuple[web.StreamResponse, str]:
        try:
            head = _decode_head(body) if not route.form else self._form_head(request, body)
        except FormError as exc:
            return error_response(400, f"Invalid form body: {exc}", "invalid_request_error", "invalid_form"), ""
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
        adapter = ""
        if config is None and (base := self._adapters.base(model)) is not None:
            # An adapter: its base's engines serve it, and its load is its base's (in-flight, queue, autoscaler).
            adapter, config = model, base
        if config is None and not self._registry.replicas(model):
            return error_response(404, f"The model '{model}' does not exist; GET /v1/models lists the models "
                                  "served here.", "invalid_request_error", "model_not_found"), ""
        request[_MODEL] = model
        key = request.get(_KEY)
        if self._limiter is not None and key is not None:
            not_allowed = self._limiter.model_refusal(key, model)
            if not_allowed is not None:
                return error_response(403, not_allowed, "permission_error", "model_not_allowed"), model
        prefix: bytes | None = None
        if config is not None and config.prefix_affinity and route.prompt_field:
            raw = getattr(head, route.prompt_field)
            prefix = bytes(raw)[:AFFINITY_PREFIX_BYTES] or None
        usage: UsageFilter | None = None
        if self._ledger is not None and route.engine_path in _USAGE_PATHS:
            asked = ask_for_usage(body, head)
            if asked is not None:
                body, usage = asked, UsageFilter(meter)
        routed = config.name if adapter and config is not None else model
        return await self._dispatch(request, routed, route.engine_path, body, prefix, started, meter, usage,
                                    adapter), model

    @staticmethod
    def _form_head(request: web.Request, body: bytes) -> _Head:
        """A multipart form's model, as a JSON body's head would carry it; the form's Content-Type goes on."""
        content_type = request.headers.get("Content-Type", "")
        model = form_model(content_type, body)
        request[_FORM] = content_type
        return _Head(model=model)

    async def _dispatch(self, request: web.Request, model: str, path: str, body: bytes, prefix: bytes | None,
                        started: float, meter: Meter, usage: UsageFilter | None = None,
                        adapter: str = "") -> web.StreamResponse:
        # The request's place in the model's waiting order (controller/fairqueue.py) while it waits: ended
        # however the request ends (an answer, a refusal, its client gone).
        place: list[Ticket] = []
        try:
            return await self._dispatch_in_turn(request, model, path, body, prefix, started, meter, usage, adapter,
                                                place)
        finally:
            if place:
                self._queue.leave(model, place.pop())

    async def _dispatch_in_turn(self, request: web.Request, model: str, path: str, body: bytes,
                                prefix: bytes | None, started: float, meter: Meter, usage: UsageFilter | None,
                                adapter: str, place: list[Ticket]) -> web.StreamResponse:
        config = self._config
        deadline = started + config.queue_timeout_s
        tried: frozenset[str] = frozenset()
        failures = 0
        queued_at = 0.0
        policy = self._catalog[model].balancer if model in self._catalog else None
        limit = config.max_outstanding_per_engine
        key = request.get(_KEY)
        account = key.account if key is not None else ""
        looked_again = False
        while True:
            routable = self._registry.routable(model)
            # Without a count set by the administrator, an engine takes requests until it says it is full.
            candidates = routable if limit else [r for r in routable if not engine_full(r)]
            if adapter:
                candidates = self._adapters.prefer_loaded(candidates, adapter, tried)
            replica = None
            if place and place[0].waiting:
                pass  # waiting in the order: it looks for an engine only when its turn is called
            elif self._cooling:
                now = time.perf_counter()
                for job_id in [j for j, until in self._cooling.items() if until <= now]:
                    del self._cooling[job_id]
                replica = self._balancer.pick(candidates, prefix, tried | self._cooling.keys(), limit, policy)
            if replica is None and not (place and place[0].waiting):
                replica = self._balancer.pick(candidates, prefix, tried, limit, policy)
            if replica is not None and not place and self._queue.busy(model):
                # Others wait for this model: this request takes its place in the order rather than overtake
                # them, and the first in the order (perhaps this one) is called to take the free engine.
                try:
                    place.append(self._queue.join(model, account))
                except QueueFull:
                    return self._refuse(model, True, "queue full")
                self._queue.wake_one(model)
                if place[0].waiting:
                    replica = None
            if replica is None:
                # Held at 0 with no replica known (not even one starting): waiting would only delay the 503.
                if (not routable and self._scaled_to_zero is not None and self._scaled_to_zero(model)
                        and not self._registry.replicas(model)):
                    # A tier worker learns an administrator's `slinfer scale` with the feed, a moment later: once,
                    # it waits for the feed's next messages (bounded) before refusing on a pin that may be gone.
                    if self.settle_late is not None and not looked_again:
                        looked_again = True
                        await self.settle_late(lambda: bool(self._scaled_to_zero and self._scaled_to_zero(model)))
                        continue
                    return self._refuse(model, False, "scaled to 0 replicas by an administrator", coming=False)
                saturated = any(r.job_id not in tried for r in routable)
                # Every routable engine already failed this request: wait for the Registry to change (the agent
                # reports the engine down, or a replacement READY), but only for the cool-down; then the same
                # engines may be tried again, within the retry budget.
                failed_all = bool(routable) and not saturated
                now = time.perf_counter()
                if not queued_at:
                    queued_at = now
                    # Engines full: refused at once only when the wait, at the rate requests finish, would
                    # pass queue_timeout_s; a client's patience bounds admission, not a count.
                    if saturated and now + self._queue.expected_wait_s(model) > deadline:
                        return self._refuse(model, True, "the wait would pass queue_timeout_s")
                # Full by their own reports: a finish may not change the next report at once, so look again.
                reported_full = saturated and len(candidates) < len(routable)
                if failed_all:
                    until = min(deadline, now + ENGINE_COOLDOWN_S)
                else:
                    until = min(deadline, now + FULL_RECHECK_S) if reported_full else deadline
                try:
                    if not place:
                        place.append(self._queue.join(model, account))
                    woke = until > now and await self._queue.wait(model, until - now, place[0])
                except QueueFull:
                    return self._refuse(model, saturated, "queue full")
                if not woke and place[0].waiting and (failed_all or reported_full):
                    # A look on its own timer: the first in the order looks; another calls the first instead.
                    if self._queue.first(model, place[0]):
                        self._queue.take(model, place[0])
                    else:
                        self._queue.wake_one(model)
                if failed_all:
                    tried = frozenset()
                elif not woke and not reported_full:
                    return self._refuse(model, saturated, "waited too long")
                if time.perf_counter() >= deadline:
                    return self._refuse(model, saturated, "waited too long")
                continue
            if place:
                self._queue.leave(model, place.pop(), served=True)
            if queued_at:
                metrics.QUEUE_WAIT_SECONDS.labels(model).observe(time.perf_counter() - queued_at)
                queued_at = 0.0
            self._in_flight.start(model, replica)
            try:
                metered = self._ledger is not None
                if usage is not None:
                    usage = UsageFilter(meter)  # a retry on another engine starts the count again
                if adapter:
                    await self._adapters.ensure(replica, adapter)
                response = await self._proxy.forward(request, replica, path, body, self._ttft_child(model), started,
                                                     meter.feed_chunk if metered and usage is None else None, usage,
                                                     request.get(_FORM, ""))
                if type(response) is web.Response and isinstance(response.body, bytes):
                    # An OpenAI error always has a message; a 404 without one is the engine's router: no such route.
                    if response.status == 404 and b'"message"' not in response.body:
                        return await self._route_missing(model, replica, path)
                    if metered:
                        meter.feed_body(response.body)
                    if not 200 <= response.status < 300 and "json" in response.content_type:
                        shaped = errorshape.reshape(response.status, response.body)
                        if shaped is not None:
                            response.body = shaped
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
            except AdapterLoadFailed as exc:
                log.warning("%s: engine %s did not load adapter %s: %s", model, replica.job_id, adapter, exc)
                return error_response(502 if exc.status >= 500 else exc.status, str(exc), "server_error"
                                      if exc.status >= 500 else errorshape.openai_type(exc.status),
                                      "adapter_load_failed")
            finally:
                self._in_flight.finish(model, replica)
                self._queue.finished(model)
                if self._queue.depth(model):
                    self._queue.wake_one(model)

    async def _route_missing(self, model: str, replica: Replica, path: str) -> web.Response:
        """The engine answered a bare 404 (no OpenAI error, so no such route on it): say what it serves."""
        on_engine = await self._board.engine_routes(replica)
        if on_engine is None:
            listing = f"the gateway serves: {', '.join(served())}"
        else:
            listing = f"it serves: {', '.join(f'POST {p}' for p in on_engine) or 'none of the routes here'}"
        log.info("%s: engine %s has no route %s", model, replica.job_id, path)
        return error_response(404, f"The engine of model '{model}' does not serve POST {path}; {listing}",
                              "invalid_request_error", "not_found")

    def _refuse(self, model: str, saturated: bool, why: str, coming: bool = True) -> web.Response:
        depth = self._queue.depth(model)
        if saturated:
            log.info("%s request refused with 429: %s (every engine full: %s; %d queued, %s finishing per s)",
                     model, why, f"{self._config.max_outstanding_per_engine} outstanding"
                     if self._config.max_outstanding_per_engine else "as they report", depth,
                     f"{self._queue.rate(model) or 0:.1f}")
            return error_response(429, f"All replicas of '{model}' are busy ({why}); retry shortly.",
                                  "rate_limit_error", "saturated", RETRY_AFTER_SATURATED_S)
        log.info("%s request refused with 503: %s (no routable replica, %d queued, %d known)", model, why,
                 depth, len(self._registry.replicas(model)))
        then = "one is being started" if coming else "none is being started"
        return error_response(503, f"No replica of '{model}' is ready ({why}); {then}.",
                              "service_unavailable", "no_replica", RETRY_AFTER_NO_REPLICA_S)

    def _ttft_child(self, model: str) -> Any:
        child = self._ttft.get(model)
        if child is None:
            child = self._ttft[model] = metrics.TTFT_SECONDS.labels(model)
        return child

    async def _models(self, request: web.Request) -> web.Response:
        if not await self._authenticate(request):
            return error_response(401, "Missing or invalid API key (send 'Authorization: Bearer KEY')",
                                  "invalid_request_error", "invalid_api_key")
        return web.json_response({"object": "list", "data": await self._model_entries()})

    async def _model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{id}: one model's (or adapter's) entry of /v1/models."""
        if not await self._authenticate(request):
            return error_response(401, "Missing or invalid API key (send 'Authorization: Bearer KEY')",
                                  "invalid_request_error", "invalid_api_key")
        wanted = request.match_info["id"]
        entry = next((e for e in await self._model_entries() if e["id"] == wanted), None)
        if entry is None:
            return error_response(404, f"The model '{wanted[:200]}' does not exist; GET /v1/models lists the "
                                  "models served here.", "invalid_request_error", "model_not_found")
        return web.json_response(entry)

    async def _model_entries(self) -> list[dict[str, Any]]:
        data = await self._board.entries()
        for entry in data:
            name = entry["id"]
            config = self._catalog.get(name)
            entry.update({
                "ready_replicas": len(self._registry.routable(name)),
                "total_replicas": len(self._registry.replicas(name)),
                "min_replicas": config.min_replicas if config else None,
                "max_replicas": config.max_replicas if config else None,
                "in_catalog": config is not None,
                "in_flight": self._in_flight.model(name),
                "queued": self._queue.depth(name),
            })
        return data + self._adapters.entries(data)

    async def _healthz(self, request: web.Request) -> web.Response:
        body: dict[str, object] = {"status": "ok", "agents": len(self._registry.agents()),
                                   "replicas": len(self._registry.replicas())}
        if self._health is not None:
            body.update(self._health())
        return web.json_response(body)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(self._state_metrics, self._instance),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _not_found(self, request: web.Request) -> web.Response:
        return error_response(404, not_served_message(request.method, request.path), "invalid_request_error",
                              "not_found")


def _too_large(limit: int) -> web.Response:
    return error_response(413, f"The request body is larger than {limit} bytes.", "invalid_request_error",
                          "body_too_large")
