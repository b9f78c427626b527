"""The controller's side of the gateway tier: the feed that `slinfer-gateway` processes watch, and their reports.

Responsible for: serving `GatewayFeed.Watch`: the full state (pool replicas, client keys with their resolved
limits, models held at zero and today's token totals) on connect or after a gap, then versioned deltas
(feedlog.py) published on every registry or key change and at least every `TABLE_INTERVAL_S` when something
changed, and a heartbeat every `HEARTBEAT_S` when nothing did; and `GatewayFeed.Report` (each gateway's
in-flight and queued counts per model, its requests in flight per engine, and its usage sums, which go into
the controller's one UsageLedger). It answers the autoscaler's questions about load elsewhere:
`demand(model)` and `outstanding(job_id, since)`.
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
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field

import grpc

from slinfer.controller import feedlog
from slinfer.controller.feedlog import FeedLog, ReplicaRow
from slinfer.controller.gateway import Demand
from slinfer.controller.keys import KeyInfo, KeyStore
from slinfer.controller.limits import Limiter
from slinfer.controller.registry import Registry
from slinfer.controller.store import StoreError
from slinfer.controller.usage import UsageLedger, UsageRow
from slinfer.v1 import gateway_pb2, gateway_pb2_grpc
from slinfer.waits import within

log = logging.getLogger(__name__)

# Quotas across gateways are enforced from totals at most this old (plus one report interval): the
# bound in docs/admin/gateway-tier.md.
TABLE_INTERVAL_S = 0.5
# A watcher that got nothing for this long gets an empty message: its stream is alive, nothing changed.
HEARTBEAT_S = 2.0
# A gateway whose last report is older than this is gone: its load no longer counts.
REPORT_STALE_S = 3.0
# A drained engine's requests elsewhere are known only from reports made after the gateways saw the drain:
# one table interval, one report interval (gateway.REPORT_INTERVAL_S) and a margin for a busy host.
DRAIN_SEEN_S = 2.0


def _route_table_bytes(message: gateway_pb2.RouteTable | bytes) -> bytes:
    """The Watch stream's serializer: a full state's pages are serialized once per version (FeedLog.pages) and
    sent as they are to every gateway; deltas and heartbeats are messages."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_to_server(hub: GatewayHub, server: grpc.aio.Server) -> None:
    """Registers the feed as gateway_pb2_grpc.add_GatewayFeedServicer_to_server does, with a Watch serializer
    that sends pre-serialized pages as they are."""
    handlers = {
        "Watch": grpc.unary_stream_rpc_method_handler(
            hub.Watch, request_deserializer=gateway_pb2.WatchRequest.FromString,
            response_serializer=_route_table_bytes),
        "Report": grpc.unary_unary_rpc_method_handler(
            hub.Report, request_deserializer=gateway_pb2.GatewayReport.FromString,
            response_serializer=gateway_pb2.GatewayAck.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("slinfer.v1.GatewayFeed", handlers),))
    server.add_registered_method_handlers("slinfer.v1.GatewayFeed", handlers)


@dataclass
class _Gateway:
    received: float
    models: dict[str, tuple[int, int]] = field(default_factory=dict)  # model -> (in flight, queued)
    replicas: dict[str, int] = field(default_factory=dict)  # job id -> outstanding


class GatewayHub(gateway_pb2_grpc.GatewayFeedServicer):
    """The RouteTable feed and the gateways' reports, with what they tell the autoscaler."""

    def __init__(self, registry: Registry, keys: KeyStore, limiter: Limiter, ledger: UsageLedger, token: str,
                 scaled_to_zero: Callable[[str], bool], models: list[str], warmup_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 model_states: Callable[[], Mapping[str, str]] | None = None) -> None:
        self._registry = registry
        self._keys = keys
        self._limiter = limiter
        self._ledger = ledger
        self._token = token.encode()
        self._scaled_to_zero = scaled_to_zero
        self._models = models
        # What the controller alone knows of each model short of ready (modelstatus.ModelBoard.feed_states).
        self._model_states = model_states
        self._clock = clock
        self._ready_at = clock() + warmup_s
        self._gateways: dict[str, _Gateway] = {}
        self._watchers: list[str] = []  # one entry per watch stream (a name may watch twice while it reconnects)
        # One event per watch stream: a stream that is busy sending when a change comes still sees it.
        self._wakeups: set[asyncio.Event] = set()
        self.feed = FeedLog()
        # Keys that changed since the last publication (every key before the first).
        self._dirty_keys: set[bytes] = set()
        self._all_keys = True
        # Replicas that changed since the last publication, and the nodes published as silent: a publication reads
        # those, not the whole registry (issue 35.7). With no watcher (before the first, after the last) nothing
        # is tracked, and the next publication compares every replica once.
        self._dirty_replicas: set[str] = set()
        self._all_replicas = True
        self._silent: set[str] = set()
        # The full state of the current version, built once for every gateway that connects at that version.
        self._snapshot: gateway_pb2.RouteTable | None = None
        self._change = asyncio.Event()
        self._publisher: asyncio.Task[None] | None = None
        registry.subscribe(lambda _model: self.changed())
        registry.subscribe_replicas(self._replica_changed)
        keys.subscribe(self._key_changed)

    def changed(self) -> None:
        """Something the feed shows changed (a replica READY, a drain, a key): it is published now."""
        self._change.set()

    def _replica_changed(self, job_id: str) -> None:
        if not self._all_replicas:
            self._dirty_replicas.add(job_id)

    def _key_changed(self, digest: bytes) -> None:
        self._dirty_keys.add(digest)
        self.changed()

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
        lately = self._clock() - REPORT_STALE_S
        names = set(self._watchers) | {n for n, g in self._gateways.items() if g.received >= lately}
        if any(n not in self._gateways or self._gateways[n].received < seen_after for n in names):
            return max(total, 1)
        return total

    def in_flight(self) -> dict[str, int]:
        """Requests in flight on each engine by the live gateways' last reports (job id -> count, engines with none
        left out): what `slinfer status` adds to the built-in gateway's own count."""
        counts: dict[str, int] = {}
        for g in self._live():
            for job_id, n in g.replicas.items():
                if n:
                    counts[job_id] = counts.get(job_id, 0) + n
        return counts

    def connected(self) -> int:
        return len(set(self._watchers))

    # ---- the feed ----------------------------------------------------------------------------------------
    def _key_message(self, digest: bytes, info: KeyInfo) -> gateway_pb2.ClientKey:
        limits = self._limiter.limits_for(info)
        return gateway_pb2.ClientKey(sha256=digest, key_id=info.key_id, name=info.name, account=info.account,
                                     source=info.source, requests_per_minute=limits.requests_per_minute,
                                     burst=limits.burst, tokens_per_day=limits.tokens_per_day, user=info.user)

    def publish(self) -> gateway_pb2.RouteTable | None:
        """Publishes what changed since the last publication as one delta, and wakes every watcher for it."""
        # Whose agents fell silent or spoke again since the last publication: their replicas' rows changed.
        silent = set(self._registry.silent_agents())
        for node in silent ^ self._silent:
            self._dirty_replicas.update(self._registry.job_ids(node))
        self._silent = silent
        replicas: list[ReplicaRow] = []
        removed: list[str] | None = []
        if self._all_replicas:
            self._all_replicas = False
            self._dirty_replicas.clear()
            dirty: Iterable[str] = [r.job_id for r in self._registry.replicas()]
            removed = None  # a complete table: the feed compares it with what it published, gone ones too
        else:
            dirty, self._dirty_replicas = self._dirty_replicas, set()
        for job_id in dirty:
            r = self._registry.get(job_id)
            # Only the shared pool: a private engine's key stays with its job and the controller (issue 27).
            if r is None or not r.pool:
                if removed is not None:
                    removed.append(job_id)
            else:
                replicas.append((r.job_id, r.model, r.node, r.base_url, r.api_key, r.state, r.pool, r.draining,
                                 r.node not in silent))
        keys: dict[bytes, gateway_pb2.ClientKey | None] = {}
        if self._all_keys:
            self._all_keys = False
            self._dirty_keys.clear()
            keys = {digest: self._key_message(digest, info) for digest, info in self._keys.entries()}
        else:
            dirty, self._dirty_keys = self._dirty_keys, set()
            for digest in dirty:
                info = self._keys.lookup(digest)
                keys[digest] = None if info is None else self._key_message(digest, info)
        # Only the totals that grew since the last publication (all of them on the first and on a new day): a copy
        # of 100,000 keys' totals took 0.6 ms, every publication (issue 35.7).
        day, totals = self._ledger.totals_grown()
        delta = self.feed.publish(replicas, keys, [m for m in self._models if self._scaled_to_zero(m)], day,
                                  totals, max(1, len(self._watchers)), removed_replicas=removed,
                                  model_states=self._model_states() if self._model_states is not None else None)
        if delta is not None:
            for event in self._wakeups:
                event.set()
        return delta

    def table(self) -> gateway_pb2.RouteTable:
        """The whole state as a gateway that connects now gets it."""
        self.publish()
        return self.snapshot()

    def snapshot(self) -> gateway_pb2.RouteTable:
        """The full state at the current version, one message per version: the gateways that connect together
        (every worker, after a controller restart) share it; one each took the controller past 1 GB with 32
        watchers and 100,000 keys (bench/control_plane_scale.py)."""
        snap = self._snapshot
        if snap is None or snap.epoch != self.feed.epoch or snap.version != self.feed.version:
            snap = self._snapshot = self.feed.snapshot()
        return snap

    async def _publish_loop(self) -> None:
        while True:
            await within(self._change.wait(), TABLE_INTERVAL_S)
            self._change.clear()
            self.publish()

    def _no_watchers(self) -> None:
        """The last watcher left: nothing publishes until one comes, so changes are not tracked meanwhile."""
        if self._publisher is not None:
            self._publisher.cancel()
            self._publisher = None
        self._all_replicas = True
        self._dirty_replicas.clear()

    def _authorized(self, token: str) -> bool:
        return not self._token or hmac.compare_digest(token.encode(), self._token)

    def full_state(self, paged: bool) -> tuple[int, list[bytes]]:
        """The full state at the current version, serialized: in pages for a gateway that takes pages, else as one
        message; the same bytes for every gateway at this version."""
        return self.feed.version, self.feed.pages(None if paged else feedlog.ONE_MESSAGE)

    async def Watch(self, request: gateway_pb2.WatchRequest,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.RouteTable | bytes]:
        if not self._authorized(request.token):
            log.warning("gateway watch from %r (peer %s) rejected: wrong token", request.gateway, context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing controller token")
        name = request.gateway or context.peer()
        wait = self._ready_at - self._clock()
        if wait > 0:
            log.info("gateway %s watching; first table in %.1f s (agents re-reporting after a start)", name, wait)
            await asyncio.sleep(wait)
        self._watchers.append(name)
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.create_task(self._publish_loop(), name="gateway-feed-publish")
        wakeup = asyncio.Event()
        self._wakeups.add(wakeup)
        try:
            # The rate share changed: the next periodic publication sends it (within TABLE_INTERVAL_S). Gateways
            # that connect together (every worker, after a controller restart) so share one version's full state,
            # serialized once, instead of each publishing a version of its own and being sent a state built for
            # it (issue 35.4: 32 of them, 11 MB each).
            if self.feed.version == 0:
                self.publish()
            resume = self.feed.since(request.epoch, request.version)
            log.info("gateway %s watching (%d gateways), %s", name, len(self._watchers),
                     "full state" if resume is None else f"resuming at version {request.version}")
            if resume is None:
                sent, pages = self.full_state(request.pages)
                for page in pages:
                    yield page
                del pages, page  # this stream holds no copy of the state once sent
            else:
                sent = request.version
                for message in resume:
                    sent = message.version
                    yield message
            while True:
                if not wakeup.is_set():
                    await within(wakeup.wait(), HEARTBEAT_S)
                woke = wakeup.is_set()
                wakeup.clear()  # a publication from here on wakes this stream again
                deltas = self.feed.since(self.feed.epoch, sent)
                if deltas is None:  # this stream fell behind what the log keeps
                    sent, pages = self.full_state(request.pages)
                    for page in pages:
                        yield page
                    del pages, page
                elif deltas:
                    for message in deltas:
                        sent = message.version
                        yield message
                elif not woke:
                    yield self.feed.heartbeat()
        finally:
            self._watchers.remove(name)
            self._wakeups.discard(wakeup)
            if not self._watchers:
                self._no_watchers()
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
        try:  # written before the ack (with a database): a controller killed after it loses none of them
            await self._ledger.add_rows_async([
                UsageRow(day=u.day, key_id=u.key_id, account=u.account, model=u.model, requests=u.requests,
                         failed=u.failed, prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                         estimated=u.estimated, key_name=u.key_name, start=u.start, end=u.end)
                for u in request.usage])
        except StoreError as exc:  # the gateway keeps the sums for its next report
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"usage not recorded: {exc}")
        for name, seen in list(self._gateways.items()):
            if seen.received < self._clock() - 60 * REPORT_STALE_S:
                del self._gateways[name]
        # Only this report's keys: the rest reach the gateway as the feed's deltas (not a copy of every key's
        # total for each of 32 gateways' two reports a second).
        day, totals = self._ledger.totals_of({u.key_id for u in request.usage})
        return gateway_pb2.GatewayAck(day=day, tokens_today=totals)
