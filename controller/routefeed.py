"""A gateway tier process's link to the controller: the route table it watches and the reports it sends.

Responsible for: one `GatewayFeed.Watch` stream (reconnected with backoff) whose every table replaces this
gateway's copy of the routes (Registry.mirror), client keys (KeyStore.replace) and quota totals (UsageRelay);
a `GatewayFeed.Report` every `REPORT_INTERVAL_S` with this gateway's in-flight and queued counts per model,
its requests per engine and its usage sums (kept for the next report when one fails); and what `/healthz`
says about the controller. While the controller is away the last table keeps serving.
Not responsible for: serving requests (gateway.py), or deciding anything the controller owns (scaling, the
ledger, quotas' totals).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from slinfer import tls
from slinfer.backoff import GATEWAY_RECONNECT, Backoff
from slinfer.config import Config
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
        self.first_table = asyncio.Event()
        self.connected = False
        self.tables = 0
        self._table_at = 0.0  # unix seconds the last table was received
        self._lost_at = time.time()
        self._last_error = "not connected yet"

    # ---- what the gateway reads --------------------------------------------------------------------------
    def scaled_to_zero(self, model: str) -> bool:
        return model in self._scaled_to_zero

    def health(self) -> dict[str, object]:
        if self.connected:
            return {"controller": "connected", "gateway": self.name,
                    "table_age_s": round(time.time() - self._table_at, 3)}
        return {"controller": "unreachable", "gateway": self.name,
                "serving": "last known routes" if self.tables else "no routes yet",
                "unreachable_for_s": round(time.time() - self._lost_at, 1),
                "table_age_s": round(time.time() - self._table_at, 1) if self.tables else None,
                "last_error": self._last_error}

    # ---- applying a table --------------------------------------------------------------------------------
    def apply(self, table: gateway_pb2.RouteTable) -> None:
        replicas = [Replica(job_id=r.job_id, model=r.model, node=r.node, base_url=r.base_url, api_key=r.api_key,
                            state=r.state, pool=r.pool, draining=r.draining) for r in table.replicas]
        alive = {r.node for r in table.replicas if r.agent_alive}
        known = {r.job_id for r in self._registry.replicas()}
        self._registry.mirror(replicas, alive)
        for r in table.replicas:
            if r.job_id not in known:
                log.info("gateway %s: replica %s (%s on %s) in the table, state %s%s", self.name, r.job_id,
                         r.model, r.node, engine_pb2.EngineState.Name(r.state), ", draining" if r.draining else "")
        self._keys.replace([(k.sha256, KeyInfo(key_id=k.key_id, name=k.name, account=k.account, source=k.source,
                                               requests_per_minute=k.requests_per_minute,
                                               tokens_per_day=k.tokens_per_day, burst=k.burst))
                            for k in table.keys])
        self._relay.apply_totals(table.day, dict(table.tokens_today))
        self._scaled_to_zero = frozenset(table.scaled_to_zero)
        self._table_at = time.time()
        self.tables += 1
        self.first_table.set()

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
        request = gateway_pb2.WatchRequest(gateway=self.name, token=self._config.controller.token)
        while True:
            try:
                async for table in stub.Watch(request):
                    if not self.connected:
                        log.info("gateway %s: watching controller %s (%d replicas, %d keys)", self.name,
                                 self._address, len(table.replicas), len(table.keys))
                    self.connected = True
                    backoff.succeeded()
                    self.apply(table)
                error = "stream ended"
            except grpc.aio.AioRpcError as exc:
                error = f"{exc.code().name}: {exc.details()}"
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
