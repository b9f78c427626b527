"""A gateway tier process's link to the controller: the route table it watches and the reports it sends.

Responsible for: one `GatewayFeed.Watch` stream (reconnected with backoff, resuming from the version held)
whose full state and deltas (feedlog.FeedMirror) update this gateway's copy of the routes (Registry.mirror, on
a change of the pool only), client keys (KeyStore.apply, with this gateway's share of each key's rate) and quota
totals (UsageRelay); a delta that does not follow the version held makes it watch again for the full state;
a `GatewayFeed.Report` every `REPORT_INTERVAL_S` with this gateway's in-flight and queued counts per model,
its requests per engine and its usage sums (kept for the next report when one fails); and what `/healthz`
says about the controller. While the controller is away the last table keeps serving.
Not responsible for: serving requests (gateway.py), or deciding anything the controller owns (scaling, the
ledger, quotas' totals).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from slinfer import tls
from slinfer.backoff import GATEWAY_RECONNECT, Backoff
from slinfer.config import Config
from slinfer.controller.feedlog import FeedMirror
from slinfer.controller.gateway import Demand
from slinfer.controller.keys import KeyInfo, KeyStore
from slinfer.controller.registry import Registry, Replica
from slinfer.controller.usage import UsageRow
from slinfer.controller.usagerelay import UsageRelay
from slinfer.v1 import engine_pb2, gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)

# Load and usage reach the controller this often: the autoscaler samples every 2 s, quotas need totals < 1 s old.
REPORT_INTERVAL_S = 0.5
# A report that takes longer is abandoned (its usage goes into the next one).
REPORT_TIMEOUT_S = 2.0


class RouteFeed:
    def __init__(self, config: Config, name: str, registry: Registry, keys: KeyStore, relay: UsageRelay,
                 models: list[str], demand: Callable[[str], Demand],
                 outstanding: Callable[[], dict[str, int]]) -> None:
        self._config = config
        self._address = config.controller.address
        self.name = name
        self._registry = registry
        self._keys = keys
        self._relay = relay
        self._models = models
        self._demand = demand
        self._outstanding = outstanding
        self._scaled_to_zero: frozenset[str] = frozenset()
        self.mirror = FeedMirror()
        self.gaps = 0  # deltas that did not follow the version held (each cost a full state)
        self.first_table = asyncio.Event()
        self.connected = False
        self.tables = 0
        self._table_at = 0.0  # unix seconds the last table was received
        self._lost_at = time.time()
        self._last_error = "not connected yet"
        # Called after each message applied with the digests of the keys it revoked (keywait.KeyWait.fed: a
        # request with a key not held yet looks again).
        self.on_applied: Callable[[list[bytes]], None] | None = None

    # ---- what the gateway reads --------------------------------------------------------------------------
    def scaled_to_zero(self, model: str) -> bool:
        return model in self._scaled_to_zero

    def model_state(self, model: str) -> dict[str, Any] | None:
        """What the controller held of `model` short of ready at the last table (modelstatus.ModelBoard.held):
        its Slurm jobs and refusals, which a tier worker cannot see; None when nothing."""
        held = self.mirror.model_states.get(model)
        if held is None:
            return None
        try:
            state = json.loads(held)
        except ValueError:
            return None
        return state if isinstance(state, dict) else None

    def health(self) -> dict[str, object]:
        if self.connected:
            # The epoch names the controller run whose table this worker holds: a new one after a restart.
            return {"controller": "connected", "gateway": self.name, "epoch": self.mirror.epoch,
                    "table_age_s": round(time.time() - self._table_at, 3)}
        return {"controller": "unreachable", "gateway": self.name,
                "serving": "last known routes" if self.tables else "no routes yet",
                "unreachable_for_s": round(time.time() - self._lost_at, 1),
                "table_age_s": round(time.time() - self._table_at, 1) if self.tables else None,
                "last_error": self._last_error}

    # ---- applying the feed ------------------------------------------------------------------------------
    @staticmethod
    def _share(value: int, gateways: int) -> int:
        """This gateway's share of a key's rate or burst: together the gateways hold the key's."""
        return -(-value // gateways) if value else 0

    def _key_info(self, k: gateway_pb2.ClientKey) -> KeyInfo:
        share = max(1, self.mirror.gateways)
        return KeyInfo(key_id=k.key_id, name=k.name, account=k.account, source=k.source,
                       requests_per_minute=self._share(k.requests_per_minute, share),
                       tokens_per_day=k.tokens_per_day, burst=self._share(k.burst, share), user=k.user)

    def apply(self, table: gateway_pb2.RouteTable) -> bool:
        """Applies one message of the feed; False (nothing changed) for a delta that does not follow the
        version held: the caller watches again for the full state."""
        applied = self.mirror.apply(table)
        if applied is None:
            self.gaps += 1
            log.warning("gateway %s: feed delta %s -> %s does not follow version %d; asking for the full state",
                        self.name, table.base_version, table.version, self.mirror.version)
            return False
        if applied.pending:  # a page of a full state: the routes held serve until its last page
            return True
        if applied.replicas:
            rows = self.mirror.replicas.values()
            # started_at: the feed does not carry the engine's start, so a replica new to this gateway counts from
            # now (a known one keeps its object and time): /v1/models says "starting" with how long, not "offline".
            now = time.time()
            replicas = [Replica(job_id=r.job_id, model=r.model, node=r.node, base_url=r.base_url,
                                api_key=r.api_key, state=r.state, pool=r.pool, draining=r.draining, started_at=now)
                        for r in rows]
            known = {r.job_id for r in self._registry.replicas()}
            self._registry.mirror(replicas, {r.node for r in rows if r.agent_alive})
            for r in rows:
                if r.job_id not in known:
                    log.info("gateway %s: replica %s (%s on %s) in the table, state %s%s", self.name, r.job_id,
                             r.model, r.node, engine_pb2.EngineState.Name(r.state),
                             ", draining" if r.draining else "")
        if applied.full or applied.gateways:
            self._keys.replace([(digest, self._key_info(k)) for digest, k in self.mirror.keys.items()])
        elif applied.keys or applied.removed_keys:
            self._keys.apply([(digest, self._key_info(self.mirror.keys[digest])) for digest in applied.keys],
                             applied.removed_keys)
        if self.mirror.day:
            self._relay.apply_totals(self.mirror.day, applied.totals)
        if applied.zero:
            self._scaled_to_zero = self.mirror.zero
        self._table_at = time.time()
        self.tables += 1
        self.first_table.set()
        if self.on_applied is not None:
            self.on_applied(list(applied.removed_keys))
        return True

    # ---- the two loops -----------------------------------------------------------------------------------
    async def run(self) -> None:
        async with tls.aio_channel(self._address, self._config) as channel:
            stub = gateway_pb2_grpc.GatewayFeedStub(channel)
            reports = asyncio.create_task(self._report_loop(stub), name="gateway-report")
            try:
                await self._watch_loop(stub)
            finally:
                reports.cancel()

    async def _watch_loop(self, stub: gateway_pb2_grpc.GatewayFeedStub) -> None:
        backoff = Backoff.of(GATEWAY_RECONNECT)
        while True:
            # Resume from the version held: the controller sends what changed since, or the full state.
            request = gateway_pb2.WatchRequest(gateway=self.name, token=self._config.controller.token,
                                               epoch=self.mirror.epoch, version=self.mirror.version,
                                               pages=True)
            gap = False
            try:
                call = stub.Watch(request)
                async for table in call:
                    if not self.connected:
                        log.info("gateway %s: watching controller %s (%s, version %d)", self.name,
                                 self._address, "full state" if table.full else "resumed", table.version)
                    self.connected = True
                    backoff.succeeded()
                    if not self.apply(table):
                        gap = True
                        call.cancel()
                        break
                error = "a delta missed" if gap else "stream ended"
            except grpc.aio.AioRpcError as exc:
                error = f"{exc.code().name}: {exc.details()}"
            if gap:
                self.mirror = FeedMirror()  # the next watch asks for the full state, at once
                continue
            if self.connected:
                self._lost_at = time.time()
                log.warning("gateway %s: controller %s lost (%s); serving %d known replicas meanwhile",
                            self.name, self._address, error, len(self._registry.replicas()))
            self.connected = False
            self._last_error = error
            await asyncio.sleep(backoff.failed(time.monotonic(), error))

    def _report(self, rows: list[UsageRow]) -> gateway_pb2.GatewayReport:
        models = []
        for model in self._models:
            d = self._demand(model)
            models.append(gateway_pb2.ModelLoad(model=model, in_flight=d.in_flight, queued=d.queued))
        return gateway_pb2.GatewayReport(
            gateway=self.name, token=self._config.controller.token, models=models,
            replicas=[gateway_pb2.ReplicaLoad(job_id=j, outstanding=n) for j, n in self._outstanding().items()],
            usage=[gateway_pb2.UsageSum(day=r.day, key_id=r.key_id, key_name=r.key_name, account=r.account,
                                        model=r.model, requests=r.requests, failed=r.failed,
                                        prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                                        estimated=r.estimated, start=r.start, end=r.end) for r in rows])

    async def _report_loop(self, stub: gateway_pb2_grpc.GatewayFeedStub) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)
            rows = self._relay.take()
            try:
                ack = await stub.Report(self._report(rows), timeout=REPORT_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                self._relay.put_back(rows)
                log.debug("gateway %s: report failed (%s); %d usage sums kept", self.name, exc.code().name,
                          len(rows))
                continue
            self._relay.reported(rows, ack.day, dict(ack.tokens_today))
