"""The Registry, fed through real gRPC Report streams (and directly where only its clock matters)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from slinfer.controller.registry import Registry
from slinfer.v1 import controller_pb2, engine_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_report_registers_agent_and_engines(controller_factory, engine_pb):
    c = await controller_factory()
    agent = await c.agent("n1")
    ack = await agent.send([engine_pb("10", "m", "http://10.0.0.1:2000", "k1"),
                            engine_pb("11", "m", "http://10.0.0.1:2001", "k2", state=engine_pb2.STARTING),
                            engine_pb("12", "other", "http://10.0.0.1:2002", pool=False, running=3)])
    assert ack.heartbeat_interval == 0.5
    assert [a.node for a in c.registry.agents()] == ["n1"]
    assert sorted(r.job_id for r in c.registry.replicas()) == ["10", "11", "12"]
    assert [r.job_id for r in c.registry.routable("m")] == ["10"]
    assert c.registry.routable("other") == []  # not in the pool
    r = c.registry.get("12")
    assert (r.node, r.base_url, r.running, r.pool) == ("n1", "http://10.0.0.1:2002", 3.0, False)


async def test_state_changes_and_vanished_engines(controller_factory, engine_pb):
    c = await controller_factory()
    agent = await c.agent("n1")
    await agent.send([engine_pb("10", "m", "http://a:1", state=engine_pb2.STARTING)])
    assert c.registry.routable("m") == []
    await agent.send([engine_pb("10", "m", "http://a:1", state=engine_pb2.READY)])
    assert [r.job_id for r in c.registry.routable("m")] == ["10"]
    await agent.send([])
    assert c.registry.replicas() == []
    assert c.registry.routable("m") == []


async def test_gateway_owned_fields_survive_reports(controller_factory, engine_pb):
    c = await controller_factory()
    agent = await c.agent("n1")
    await agent.send([engine_pb("10", "m", "http://a:1")])
    replica = c.registry.get("10")
    replica.outstanding = 4
    assert c.registry.set_draining("10")
    await agent.send([engine_pb("10", "m", "http://a:1", running=2)])
    assert c.registry.get("10") is replica
    assert (replica.outstanding, replica.draining, replica.running) == (4, True, 2.0)
    assert c.registry.routable("m") == []
    assert c.registry.set_draining("10", False)
    assert c.registry.routable("m") == [replica]
    assert not c.registry.set_draining("unknown")


async def test_two_agents_and_a_moved_job(controller_factory, engine_pb):
    c = await controller_factory()
    a, b = await c.agent("n1"), await c.agent("n2")
    await a.send([engine_pb("10", "m", "http://n1:1")])
    await b.send([engine_pb("20", "m", "http://n2:1")])
    assert sorted(r.node for r in c.registry.routable("m")) == ["n1", "n2"]
    # n1 no longer lists job 10, but n2's report about its own job must not remove n1's.
    await b.send([engine_pb("20", "m", "http://n2:1")])
    assert len(c.registry.routable("m")) == 2


async def test_wrong_token_is_refused(controller_factory, engine_pb):
    c = await controller_factory(token="secret")
    good = await c.agent("n1", token="secret")
    await good.send([engine_pb("10", "m", "http://a:1")])
    bad = await c.agent("n2", token="guess")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await bad.send([engine_pb("20", "m", "http://b:1")])
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert c.registry.get("20") is None
    assert [a.node for a in c.registry.agents()] == ["n1"]


async def test_stream_end_keeps_engines_until_the_timeout(controller_factory, engine_pb):
    c = await controller_factory(agent_timeout_s=0.4)
    agent = await c.agent("n1")
    await agent.send([engine_pb("10", "m", "http://a:1")])
    await agent.close()
    for _ in range(50):
        if not c.registry.agents()[0].connected:
            break
        await asyncio.sleep(0.01)
    assert not c.registry.agents()[0].connected
    assert len(c.registry.routable("m")) == 1  # it may be reconnecting
    await asyncio.sleep(0.5)
    assert c.registry.routable("m") == []
    assert len(c.registry.replicas("m")) == 1  # still shown, just not routed to
    # The agent comes back (a new stream): its engines are routable again at once.
    again = await c.agent("n1")
    await again.send([engine_pb("10", "m", "http://a:1")])
    assert len(c.registry.routable("m")) == 1


def report(node: str, *engines: engine_pb2.Engine) -> controller_pb2.AgentReport:
    return controller_pb2.AgentReport(node=node, agent_id="x", engines=list(engines))


def test_listeners_hear_when_a_replica_may_have_become_routable():
    clock = Clock()
    registry = Registry(agent_timeout_s=5, clock=clock)
    heard: list[str] = []
    registry.subscribe(heard.append)
    starting = engine_pb2.Engine(job_id="1", model="m", state=engine_pb2.STARTING, pool=True)
    ready = engine_pb2.Engine(job_id="1", model="m", state=engine_pb2.READY, pool=True)
    registry.report(report("n", starting))
    assert heard == []
    registry.report(report("n", ready))
    assert heard == ["m"]
    registry.report(report("n", ready))
    assert heard == ["m"]  # no change, no wake-up
    clock.now += 6  # the agent went silent...
    assert registry.routable("m") == []
    registry.report(report("n", ready))  # ...and came back
    assert heard == ["m", "m"]
    registry.set_draining("1")
    registry.set_draining("1", False)
    assert heard == ["m", "m", "m"]


def test_sweep_forgets_long_silent_agents_only():
    clock = Clock()
    registry = Registry(agent_timeout_s=5, clock=clock, forget_after_s=60)
    registry.report(report("old", engine_pb2.Engine(job_id="1", model="m", state=engine_pb2.READY, pool=True)))
    clock.now += 30
    registry.report(report("new", engine_pb2.Engine(job_id="2", model="m", state=engine_pb2.READY, pool=True)))
    clock.now += 31
    registry.sweep()
    assert [a.node for a in registry.agents()] == ["new"]
    assert [r.job_id for r in registry.replicas()] == ["2"]
    assert not registry.agent_alive("new") and not registry.agent_alive("old")


def test_engine_changing_model_is_reindexed():
    registry = Registry()
    registry.report(report("n", engine_pb2.Engine(job_id="1", model="a", state=engine_pb2.READY, pool=True)))
    registry.report(report("n", engine_pb2.Engine(job_id="1", model="b", state=engine_pb2.READY, pool=True)))
    assert registry.routable("a") == [] and [r.job_id for r in registry.routable("b")] == ["1"]


def test_the_pool_takes_only_the_service_users_engines_whatever_an_agent_reports():
    """Issue 27: an ordinary user's `--inference-pool` engine was served other tenants' requests. The agent
    refuses such a job; the registry also never routes a pool replica whose user the pool does not take."""
    clock = Clock()
    registry = Registry(agent_timeout_s=6.0, clock=clock, pool_users=frozenset({"slinfer", "trusted"}))
    engines = [engine_pb2.Engine(job_id=job, model="m", state=engine_pb2.READY, base_url=f"http://a:{job}",
                                 api_key="k", pool=True, user=user)
               for job, user in (("1", "slinfer"), ("2", "mallory"), ("3", "trusted"), ("4", ""))]
    registry.report(controller_pb2.AgentReport(node="n1", engines=engines))
    assert sorted(r.job_id for r in registry.routable("m")) == ["1", "3"]
    assert registry.get("2").pool is False and registry.get("4").pool is False
    # The same engine reported again stays out; a registry without the rule (the tier's mirror) takes it.
    registry.report(controller_pb2.AgentReport(node="n1", engines=engines))
    assert sorted(r.job_id for r in registry.routable("m")) == ["1", "3"]
    open_registry = Registry(agent_timeout_s=6.0, clock=clock)
    open_registry.report(controller_pb2.AgentReport(node="n1", engines=engines))
    assert sorted(r.job_id for r in open_registry.routable("m")) == ["1", "2", "3", "4"]
