"""The controller's side of the gateway tier: the feed that `slinfer-gateway` processes watch, and their reports.

Responsible for: serving `GatewayFeed.Watch` (a full RouteTable of replicas, client keys with their resolved
limits, models held at zero and today's token totals, sent on every registry change and at least every
`TABLE_INTERVAL_S`), and `GatewayFeed.Report` (each gateway's in-flight and queued counts per model, its
requests in flight per engine, and its usage sums, which go into the controller's one UsageLedger). It answers
the autoscaler's questions about load elsewhere: `demand(model)` and `outstanding(job_id, since)`.
Not responsible for: routing or limiting requests (the gateways do, from the table), scaling (the autoscaler),
or persisting usage (the ledger).

Both calls present `[controller].token`, as agents do, over the same TLS port. A restarted controller sends no
table until `warmup_s` has passed (every live agent has reported again by then): a gateway would otherwise
replace its routes with an empty registry's.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from slinfer.controller.gateway import Demand
from slinfer.controller.keys import KeyStore
from slinfer.controller.limits import Limiter
from slinfer.controller.registry import Registry
from slinfer.controller.usage import UsageLedger, UsageRow
from slinfer.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)

# Quotas across gateways are enforced from totals at most this old (plus one report interval): the
# bound in docs/admin/gateway-tier.md.
TABLE_INTERVAL_S = 0.5
# A gateway whose last report is older than this is gone: its load no longer counts.
REPORT_STALE_S = 3.0
# A drained engine's requests elsewhere are known only from reports made after the gateways saw the drain:
# one table interval, one report interval (gateway.REPORT_INTERVAL_S) and a margin for a busy host.
DRAIN_SEEN_S = 2.0


@dataclass
class _Gateway:
    received: float
    models: dict[str, tuple[int, int]] = field(default_factory=dict)  # model -> (in flight, queued)
    replicas: dict[str, int] = field(default_factory=dict)  # job id -> outstanding


class GatewayHub(gateway_pb2_grpc.GatewayFeedServicer):
    """The RouteTable feed and the gateways' reports, with what they tell the autoscaler."""

    def __init__(self, registry: Registry, keys: KeyStore, limiter: Limiter, ledger: UsageLedger, token: str,
                 scaled_to_zero: Callable[[str], bool], models: list[str], warmup_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = registry
        self._keys = keys
        self._limiter = limiter
        self._ledger = ledger
        self._token = token.encode()
        self._scaled_to_zero = scaled_to_zero
        self._models = models
        self._clock = clock
        self._ready_at = clock() + warmup_s
        self._gateways: dict[str, _Gateway] = {}
        self._watchers: set[str] = set()
        # One event per watch stream: a stream that is busy sending when a change comes still sees it.
        self._wakeups: set[asyncio.Event] = set()
        registry.subscribe(lambda _model: self.changed())

    def changed(self) -> None:
        """Something the table shows changed (a replica READY, a drain); every watcher gets a new table now."""
        for event in self._wakeups:
            event.set()

    # ---- what the autoscaler reads -----------------------------------------------------------------------
    def _live(self) -> list[_Gateway]:
        oldest = self._clock() - REPORT_STALE_S
        return [g for g in self._gateways.values() if g.received >= oldest]

    def demand(self, model: str) -> Demand:
        in_flight = queued = 0
        for g in self._live():
            f, q = g.models.get(model, (0, 0))
            in_flight += f
            queued += q
        return Demand(in_flight=in_flight, queued=queued)

    def outstanding(self, job_id: str, draining_since: float) -> int:
        """Requests live gateways have in flight on the engine; at least 1 while one has not reported since it
        could have seen the drain (`draining_since` on the autoscaler's wall clock)."""
        total = sum(g.replicas.get(job_id, 0) for g in self._live())
        seen_after = self._clock() - (time.time() - draining_since) + DRAIN_SEEN_S
        # Every gateway watching, and every one that reported lately, must have reported since.
        names = self._watchers | {n for n, g in self._gateways.items() if g.received >= self._clock() - REPORT_STALE_S}
        if any(n not in self._gateways or self._gateways[n].received < seen_after for n in names):
            return max(total, 1)
        return total

    def connected(self) -> int:
        return len(self._watchers)

    # ---- the table ---------------------------------------------------------------------------------------
    def table(self) -> gateway_pb2.RouteTable:
        alive = {a.node for a in self._registry.agents() if self._registry.agent_alive(a.node)}
        # Only the shared pool: a private engine's key stays with its job and the controller (issue 27).
        replicas = [gateway_pb2.RoutedReplica(job_id=r.job_id, model=r.model, node=r.node, base_url=r.base_url,
                                              api_key=r.api_key, state=r.state, pool=r.pool, draining=r.draining,
                                              agent_alive=r.node in alive)
                    for r in self._registry.replicas() if r.pool]
        share = max(1, len(self._watchers))
        keys = []
        for digest, info in self._keys.entries():
            limits = self._limiter.limits_for(info)
            # Each gateway enforces its share of the rate: together they hold the key's rate.
            rpm = -(-limits.requests_per_minute // share) if limits.requests_per_minute else 0
            burst = -(-limits.burst // share) if limits.burst else 0
            keys.append(gateway_pb2.ClientKey(sha256=digest, key_id=info.key_id, name=info.name,
                                              account=info.account, source=info.source, requests_per_minute=rpm,
                                              burst=burst, tokens_per_day=limits.tokens_per_day))
        day, totals = self._ledger.totals_today()
        return gateway_pb2.RouteTable(replicas=replicas, keys=keys,
                                      scaled_to_zero=[m for m in self._models if self._scaled_to_zero(m)],
                                      day=day, tokens_today=totals, sent_at=time.time(), gateways=share)

    def _authorized(self, token: str) -> bool:
        return not self._token or hmac.compare_digest(token.encode(), self._token)

    async def Watch(self, request: gateway_pb2.WatchRequest,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.RouteTable]:
        if not self._authorized(request.token):
            log.warning("gateway watch from %r (peer %s) rejected: wrong token", request.gateway, context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing controller token")
        name = request.gateway or context.peer()
        wait = self._ready_at - self._clock()
        if wait > 0:
            log.info("gateway %s watching; first table in %.1f s (agents re-reporting after a start)", name, wait)
            await asyncio.sleep(wait)
        self._watchers.add(name)
        log.info("gateway %s watching (%d gateways)", name, len(self._watchers))
        self.changed()  # the others' rate share changed
        wakeup = asyncio.Event()
        self._wakeups.add(wakeup)
        try:
            while True:
                wakeup.clear()
                yield self.table()
                try:
                    await asyncio.wait_for(wakeup.wait(), TABLE_INTERVAL_S)
                except TimeoutError:
                    pass
        finally:
            self._watchers.discard(name)
            self._wakeups.discard(wakeup)
            self.changed()
            log.info("gateway %s stopped watching (%d gateways)", name, len(self._watchers))

    async def Report(self, request: gateway_pb2.GatewayReport,
                     context: grpc.aio.ServicerContext) -> gateway_pb2.GatewayAck:
        if not self._authorized(request.token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing controller token")
        g = self._gateways.get(request.gateway)
        if g is None:
            g = self._gateways[request.gateway] = _Gateway(received=0.0)
            log.info("gateway %s reporting", request.gateway)
        g.received = self._clock()
        g.models = {m.model: (m.in_flight, m.queued) for m in request.models}
        g.replicas = {r.job_id: r.outstanding for r in request.replicas}
        for u in request.usage:
            self._ledger.add_row(UsageRow(day=u.day, key_id=u.key_id, account=u.account, model=u.model,
                                          requests=u.requests, failed=u.failed, prompt_tokens=u.prompt_tokens,
                                          completion_tokens=u.completion_tokens, estimated=u.estimated,
                                          key_name=u.key_name, start=u.start, end=u.end))
        for name, seen in list(self._gateways.items()):
            if seen.received < self._clock() - 60 * REPORT_STALE_S:
                del self._gateways[name]
        day, totals = self._ledger.totals_today()
        return gateway_pb2.GatewayAck(day=day, tokens_today=totals)
