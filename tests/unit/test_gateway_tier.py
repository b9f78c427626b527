"""The gateway tier in one process: the controller's GatewayHub behind a real gRPC server, real gateway workers
(controller/gateway_main.serve_worker) on real ports, stand-in engines. Processes, kill -9 and rolling restarts
are in test_gateway_tier_processes.py."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest

from slinfer.config import Config, ControllerConfig, GatewayConfig, ModelConfig
from slinfer.controller import gatewayhub, routefeed
from slinfer.controller.gateway_main import serve_worker
from slinfer.controller.gatewayhub import GatewayHub
from slinfer.controller.keys import KeyStore
from slinfer.controller.limits import KeyLimits, Limiter
from slinfer.controller.registry import Registry, Replica
from slinfer.controller.usage import Meter, UsageLedger
from slinfer.controller.usagerelay import UsageRelay
from slinfer.v1 import controller_pb2, engine_pb2

TOKEN = "hub-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- pieces ------------------------------------------------------------------------------------------------
def test_mirror_keeps_replica_objects_and_the_table_decides_routability() -> None:
    reg = Registry(agent_timeout_s=1.0, clock=lambda: 0.0)
    woke: list[str] = []
    reg.subscribe(woke.append)
    a = Replica(job_id="1", model="m", node="n1", base_url="http://a", api_key="k", state=engine_pb2.READY,
                pool=True)
    reg.mirror([a], {"n1"})
    assert [r.job_id for r in reg.routable("m")] == ["1"] and woke == ["m"]
    a.outstanding = 3  # a request in flight holds this object
    again = Replica(job_id="1", model="m", node="n1", base_url="http://a2", api_key="k2", state=engine_pb2.READY,
                    pool=True, draining=True)
    lost = Replica(job_id="2", model="m", node="n2", base_url="http://b", api_key="k", state=engine_pb2.READY,
                   pool=True)
    reg.mirror([again, lost], {"n1"})
    assert reg.get("1") is a and a.outstanding == 3 and a.base_url == "http://a2" and a.draining
    # Draining, and an engine whose agent the controller no longer hears: neither is routable.
    assert reg.routable("m") == []
    assert reg.agent_alive("n1") and not reg.agent_alive("n2")
    reg.mirror([], set())
    assert reg.replicas() == [] and reg.agents() == []


def test_relay_totals_only_grow_and_a_failed_report_is_kept() -> None:
    now = [86400.0 * 20000 + 100]
    relay = UsageRelay(clock=lambda: now[0])
    meter = Meter()
    meter.prompt_tokens, meter.completion_tokens = 8, 16
    relay.record("k1", "alice", "acct", "m", 200, meter)
    day = "2024-10-04"
    assert relay.tokens_today("k1") == 24
    rows = relay.take()
    assert relay.take() == []
    relay.put_back(rows)  # the report failed
    rows = relay.take()
    assert len(rows) == 1 and rows[0].requests == 1
    relay.reported(rows, day, {"k1": 24 + 100})  # the ack: another gateway's 100 tokens too
    assert relay.tokens_today("k1") == 124
    relay.apply_totals(day, {"k1": 50})  # an older table arriving late
    assert relay.tokens_today("k1") == 124
    now[0] += 86400  # the next UTC day starts from nothing
    assert relay.tokens_today("k1") == 0


# ---- a hub with workers ------------------------------------------------------------------------------------
@dataclass
class Tier:
    registry: Registry
    keys: KeyStore
    ledger: UsageLedger
    hub: GatewayHub
    port: int
    config: Config
    server: grpc.aio.Server


@pytest.fixture
async def tier(tmp_path: Path) -> AsyncIterator[Tier]:
    registry = Registry(agent_timeout_s=5.0)
    keys = KeyStore(tmp_path / "keys.json", ["config-key"])
    ledger = UsageLedger(tmp_path / "usage", 60.0)
    limiter = Limiter(KeyLimits(), ledger.tokens_today)
    hub = GatewayHub(registry, keys, limiter, ledger, TOKEN, lambda m: False, ["m"], warmup_s=0.0)
    server = grpc.aio.server()
    gatewayhub.add_to_server(hub, server)  # pre-serialized pages
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    config = Config(controller=ControllerConfig(address=f"127.0.0.1:{port}", token=TOKEN, insecure=False),
                    gateway=GatewayConfig(queue_timeout_s=10.0), models=[ModelConfig(name="m", source="/m")])
    try:
        yield Tier(registry, keys, ledger, hub, port, config, server)
    finally:
        await server.stop(grace=0.5)


@contextlib.asynccontextmanager
async def worker(t: Tier, name: str) -> AsyncIterator[str]:
    port = _free_port()
    stop = asyncio.Event()
    task = asyncio.create_task(serve_worker(t.config, f"127.0.0.1:{port}", name, stop, reuse_port=False))
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        for _ in range(400):
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with http.get(f"{url}/healthz") as resp:
                    if resp.status == 200:
                        break
            await asyncio.sleep(0.025)
    try:
        yield url
    finally:
        stop.set()
        await asyncio.wait_for(task, 40)


def _report(registry: Registry, job_id: str, base_url: str, api_key: str, node: str = "n1") -> None:
    registry.report(controller_pb2.AgentReport(node=node, address="127.0.0.1", agent_id="a", engines=[
        engine_pb2.Engine(job_id=job_id, model="m", state=engine_pb2.READY, base_url=base_url, api_key=api_key,
                          pool=True)]))


def _chat(model: str = "m") -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "x"}]}


async def test_a_worker_serves_from_the_feed_reports_demand_and_sees_a_new_replica_fast(tier: Tier,
                                                                                       standins) -> None:
    engine = await standins(model="m", api_key="ek", delay_s=0.3)
    _, secret = tier.keys.create("alice")
    async with worker(tier, "gw-a") as url, aiohttp.ClientSession() as http:
        auth = {"Authorization": f"Bearer {secret}"}
        async with http.get(f"{url}/healthz") as resp:
            health = await resp.json()
        assert health["controller"] == "connected" and health["gateway"] == "gw-a"
        # No replica yet: the request waits (scale from zero) and the controller hears of it as queued demand.
        pending = asyncio.create_task(http.post(f"{url}/v1/chat/completions", headers=auth, json=_chat()))
        for _ in range(100):
            if tier.hub.demand("m").queued == 1:
                break
            await asyncio.sleep(0.05)
        assert tier.hub.demand("m").queued == 1
        ready_at = time.monotonic()
        _report(tier.registry, "7", engine.base_url, "ek")
        async with http.get(f"{url}/healthz") as resp:
            pass
        # The waiting request goes as soon as the table with the READY replica arrives.
        resp = await pending
        seen_after = time.monotonic() - ready_at
        assert resp.status == 200, await resp.text()
        assert seen_after < engine.delay_s + 0.5, f"the gateway saw the new replica after {seen_after:.2f} s"
        # In-flight requests are reported per model and per engine.
        flying = [asyncio.create_task(http.post(f"{url}/v1/chat/completions", headers=auth, json=_chat()))
                  for _ in range(3)]
        for _ in range(40):
            if tier.hub.demand("m").in_flight == 3:
                break
            await asyncio.sleep(0.05)
        assert tier.hub.demand("m").in_flight == 3
        assert tier.hub.outstanding("7", time.time() - 10) == 3
        for f in flying:
            assert (await f).status == 200
        # The usage reaches the controller's ledger: 4 requests of 8 + 16 tokens.
        for _ in range(40):
            if tier.ledger.tokens_today(tier.keys.list()[0].key_id) == 4 * 24:
                break
            await asyncio.sleep(0.05)
        assert tier.ledger.tokens_today(tier.keys.list()[0].key_id) == 4 * 24
        # A revoked key stops working within a table interval; a wrong one never did.
        tier.keys.revoke(tier.keys.list()[0].key_id)
        await asyncio.sleep(gatewayhub.TABLE_INTERVAL_S * 3)
        async with http.post(f"{url}/v1/chat/completions", headers=auth, json=_chat()) as resp:
            assert resp.status == 401
    assert engine.seen.auth and set(engine.seen.auth) == {"Bearer ek"}


async def test_a_drain_waits_for_requests_in_flight_on_other_gateways(tier: Tier, standins) -> None:
    engine = await standins(model="m", api_key="ek", delay_s=4.0)
    _report(tier.registry, "7", engine.base_url, "ek")
    async with worker(tier, "gw-a") as url, aiohttp.ClientSession() as http:
        request = asyncio.create_task(http.post(f"{url}/v1/chat/completions",
                                                headers={"Authorization": "Bearer config-key"}, json=_chat()))
        await asyncio.sleep(0.2)
        since = time.time()
        tier.registry.set_draining("7")
        # Until the gateway has reported after the drain, the hub cannot know it is idle: it says busy.
        assert tier.hub.outstanding("7", since) >= 1
        await asyncio.sleep(gatewayhub.DRAIN_SEEN_S + routefeed.REPORT_INTERVAL_S)
        assert tier.hub.outstanding("7", since) == 1  # the request still runs there
        assert (await request).status == 200
        await asyncio.sleep(routefeed.REPORT_INTERVAL_S * 3)
        assert tier.hub.outstanding("7", since) == 0


async def test_controller_away_the_gateway_keeps_serving_and_says_so(tier: Tier, standins) -> None:
    engine = await standins(model="m", api_key="ek")
    _report(tier.registry, "7", engine.base_url, "ek")
    async with worker(tier, "gw-a") as url, aiohttp.ClientSession() as http:
        auth = {"Authorization": "Bearer config-key"}
        await tier.server.stop(grace=0)  # the controller goes away
        for _ in range(100):
            async with http.get(f"{url}/healthz") as resp:
                health = await resp.json()
            if health["controller"] == "unreachable":
                break
            await asyncio.sleep(0.05)
        assert health["controller"] == "unreachable" and health["serving"] == "last known routes"
        # Even after the agent timeout of the controller, the last table still routes.
        await asyncio.sleep(1.2)
        for _ in range(5):
            async with http.post(f"{url}/v1/chat/completions", headers=auth, json=_chat()) as resp:
                assert resp.status == 200


# The bound in docs/admin/gateway-tier.md: a gateway learns another's spend within one report and one table
# interval, plus the round trips (half a second allowed here on this shared machine).
QUOTA_STALENESS_S = routefeed.REPORT_INTERVAL_S + gatewayhub.TABLE_INTERVAL_S + 0.5


async def test_a_key_quota_holds_across_two_gateways_within_the_stated_bound(tier: Tier, standins) -> None:
    engine = await standins(model="m", api_key="ek", delay_s=0.05)
    _report(tier.registry, "7", engine.base_url, "ek")
    per_request = 8 + 16  # the stand-in's usage
    quota = per_request * 40
    key_id, secret = tier.keys.create("bob", tokens_per_day=quota)
    answered: list[tuple[float, float, int, str]] = []  # (start, end, status, gateway)
    async with worker(tier, "gw-a") as url_a, worker(tier, "gw-b") as url_b:
        async def spend(url: str, name: str) -> None:
            refused = 0
            async with aiohttp.ClientSession() as http:
                while refused < 3:
                    start = time.monotonic()
                    async with http.post(f"{url}/v1/chat/completions", json=_chat(),
                                         headers={"Authorization": f"Bearer {secret}"}) as resp:
                        body = await resp.json()
                    answered.append((start, time.monotonic(), resp.status, name))
                    if resp.status == 429:
                        assert body["error"]["code"] == "insufficient_quota"
                        refused += 1
                    else:
                        assert resp.status == 200, body

        await asyncio.wait_for(asyncio.gather(spend(url_a, "a"), spend(url_b, "b")), 60)
        await asyncio.sleep(routefeed.REPORT_INTERVAL_S * 3)  # the last usage reaches the ledger
    spent = tier.ledger.tokens_today(key_id)
    ok = sorted((end, start, gw) for start, end, status, gw in answered if status == 200)
    assert {gw for _, _, gw in ok} == {"a", "b"}, "both gateways must have spent the key"
    assert spent == per_request * len(ok), "every answered request's tokens reached the controller's ledger"
    crossed_at = ok[quota // per_request - 1][0]  # the answer that brought the total to the quota
    late = [(start - crossed_at, gw) for _, start, gw in ok if start > crossed_at + QUOTA_STALENESS_S]
    assert late == [], f"requests admitted more than {QUOTA_STALENESS_S} s after the quota was spent: {late}"
    # In tokens: at most what the two gateways admit in that window (measured rate before the crossing).
    before = [end for end, _, _ in ok if end <= crossed_at]
    rate = len(before) / max(1e-3, before[-1] - min(s for _, s, _ in ok))
    overshoot = spent - quota
    bound = math.ceil(rate * QUOTA_STALENESS_S + 2) * per_request
    print(f"quota {quota}, spent {spent}: overshoot {overshoot} tokens ({overshoot // per_request} requests) at "
          f"{rate:.0f} requests/s through two gateways; bound {bound}")
    assert 0 <= overshoot <= bound


async def test_a_key_rate_is_shared_between_the_gateways(tier: Tier, standins) -> None:
    engine = await standins(model="m", api_key="ek")
    _report(tier.registry, "7", engine.base_url, "ek")
    _, secret = tier.keys.create("carol", requests_per_minute=20)
    async with worker(tier, "gw-a") as url_a, worker(tier, "gw-b") as url_b, aiohttp.ClientSession() as http:
        await asyncio.sleep(gatewayhub.TABLE_INTERVAL_S * 3)  # both hold a table made with two watching
        statuses = []
        for i in range(30):
            url = (url_a, url_b)[i % 2]
            async with http.post(f"{url}/v1/chat/completions", json=_chat(),
                                 headers={"Authorization": f"Bearer {secret}"}) as resp:
                statuses.append(resp.status)
    # Each gateway holds half the key's 20 per minute (its burst a full minute's worth): 20 in all, not 40.
    assert statuses.count(200) == 20 and statuses.count(429) == 10, statuses


def test_the_program_refuses_bad_arguments_and_config_with_exit_2(tmp_path: Path, capsys) -> None:
    from slinfer.controller.gateway_main import main

    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nqueue_size = "many"\n')
    assert main(["--config", str(bad)]) == 2
    assert "gateway.queue_size" in capsys.readouterr().err
    good = tmp_path / "good.toml"
    good.write_text('[controller]\ntoken = "t"\n')
    assert main(["--config", str(good), "--workers", "2", "--listen", "127.0.0.1:0"]) == 2
    assert "needs a fixed port" in capsys.readouterr().err
    assert main(["--config", str(good), "--workers", "0"]) == 2
    assert "--workers must be 1 or more" in capsys.readouterr().err
    assert main(["--config", str(good), "--listen", "nowhere"]) == 2
    assert "is not HOST:PORT" in capsys.readouterr().err


def test_a_private_engines_key_goes_to_no_gateway(tmp_path: Path) -> None:
    """Issue 27, point 3: only pool replicas are in the feed; a private engine (its key included) is not."""
    registry = Registry(agent_timeout_s=5.0)
    keys = KeyStore(tmp_path / "keys.json")
    ledger = UsageLedger(tmp_path / "usage", 60.0)
    hub = GatewayHub(registry, keys, Limiter(KeyLimits(), ledger.tokens_today), ledger, TOKEN, lambda m: False,
                     ["m"], warmup_s=0.0)
    registry.report(controller_pb2.AgentReport(node="n1", address="127.0.0.1", agent_id="a", engines=[
        engine_pb2.Engine(job_id="7", model="m", state=engine_pb2.READY, base_url="http://pool",
                          api_key="pool-key", pool=True),
        engine_pb2.Engine(job_id="8", model="m", state=engine_pb2.READY, base_url="http://private",
                          api_key="private-key", pool=False)]))
    assert {r.job_id for r in registry.replicas()} == {"7", "8"}  # the controller knows both
    table = hub.table()
    assert [(r.job_id, r.api_key) for r in table.replicas] == [("7", "pool-key")]
    assert b"private-key" not in table.SerializeToString()
