"""The Registry, fed through real gRPC Report streams (and directly where only its clock matters)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_has_routable_says_whether_routable_lists_any():
    """The feed's cheap question (issue 35.4) gives routable's answer in each case that keeps a replica out."""
    clock = Clock()
    registry = Registry(agent_timeout_s=5, clock=clock)
    cases = {"ready": {}, "starting": {"state": engine_pb2.STARTING}, "private": {"pool": False}}
    engines = [engine_pb2.Engine(job_id=str(i), model=model, base_url=f"http://a:{i}",
                                 **{"state": engine_pb2.READY, "pool": True, **fields})
               for i, (model, fields) in enumerate(cases.items())]
    registry.report(report("n", *engines))
    for model in [*cases, "absent"]:
        assert registry.has_routable(model) == bool(registry.routable(model)), model
    assert registry.has_routable("ready")  # the control: one that routes
    assert registry.set_draining("0")
    assert not registry.has_routable("ready") and registry.routable("ready") == []
    registry.set_draining("0", False)
    clock.now += 6  # the agent is no longer heard in time
    assert not registry.has_routable("ready") and registry.routable("ready") == []


def _steady_engines(running: float = 1.0) -> list[engine_pb2.Engine]:
    return [engine_pb2.Engine(job_id=job, model="m", state=engine_pb2.READY, base_url=f"http://a:{job}",
                              api_key=f"k{job}", pool=True, user="slinfer", started_at=5.0, ready_at=9.0,
                              load=engine_pb2.EngineLoad(running=running, waiting=2, kv_cache_usage=0.5))
            for job in ("1", "2")]


def _steady_report(engines: list[engine_pb2.Engine], sent_at: float = 1.0) -> controller_pb2.AgentReport:
    return controller_pb2.AgentReport(node="n", address="10.0.0.1", agent_id="a1", engines=engines,
                                      host=controller_pb2.HostTelemetry(load1=sent_at), sent_at=sent_at)


def test_an_unchanged_report_skips_the_replica_work(monkeypatch: pytest.MonkeyPatch):
    """Issue 35.4: an agent sends nearly the same report every second. One whose agent and engines are as last
    time (loads, telemetry and the send time aside) refreshes loads and last_seen only: no replica is compared or
    rebuilt, no listener hears of it. A report that changed one field does all the work (the control)."""
    clock = Clock()
    registry = Registry(agent_timeout_s=5, clock=clock)
    applied: list[str] = []
    apply = registry._apply_engine

    def counted(node: str, engine: engine_pb2.Engine, now: float) -> bool:
        applied.append(engine.job_id)
        return apply(node, engine, now)

    monkeypatch.setattr(registry, "_apply_engine", counted)
    woke: list[str] = []
    changed: list[str] = []
    registry.subscribe(woke.append)
    registry.subscribe_replicas(changed.append)
    registry.report(_steady_report(_steady_engines()))
    assert (applied, woke, changed) == (["1", "2"], ["m"], ["1", "2"])
    assert (registry.reports_applied, registry.reports_unchanged) == (1, 0)

    for second in range(1, 4):  # the same engines, with other loads, host telemetry and send time
        clock.now += 1
        registry.report(_steady_report(_steady_engines(running=10.0 + second), sent_at=1.0 + second))
    assert (applied, woke, changed) == (["1", "2"], ["m"], ["1", "2"])  # no work beyond the first report
    assert (registry.reports_applied, registry.reports_unchanged) == (1, 3)
    replica = registry.get("1")
    assert replica is not None and (replica.running, replica.waiting, replica.last_seen) == (13.0, 2.0, clock.now)
    agent = registry.agents()[0]
    assert agent.last_seen == clock.now and agent.host is not None and agent.host.load1 == 4.0
    assert [r.job_id for r in registry.routable("m")] == ["1", "2"]

    # Controls: each change of a field the registry applies is applied in full, once (the changes add up).
    engines = _steady_engines()
    for field_name, value in (("state", engine_pb2.STOPPING), ("api_key", "rotated"), ("reason", "why"),
                              ("ready_at", 10.0)):
        setattr(engines[0], field_name, value)
        applied.clear()
        registry.report(_steady_report(engines))
        assert applied == ["1", "2"], field_name
        applied.clear()
        registry.report(_steady_report(engines))
        assert applied == [], field_name  # and the next, unchanged, report is cheap again
    assert changed == ["1", "2", "1", "1"]  # the state, then the key (reason and ready_at are not routed)
    assert registry.get("1").state == engine_pb2.STOPPING and registry.get("1").api_key == "rotated"
    assert (registry.get("1").reason, registry.get("1").ready_at) == ("why", 10.0)
    assert (registry.reports_applied, registry.reports_unchanged) == (5, 7)


def test_an_unchanged_report_is_applied_in_full_when_its_replicas_changed_elsewhere():
    """The cheap path is taken only while the agent was heard in time and its replicas are its own: after a
    silence its engines wake their model again, and a job another node reported since is taken back."""
    clock = Clock()
    registry = Registry(agent_timeout_s=5, clock=clock)
    woke: list[str] = []
    registry.subscribe(woke.append)
    steady = _steady_report(_steady_engines())
    registry.report(steady)
    clock.now += 6  # silent past the timeout: not routable, and the same report wakes the model again
    assert registry.routable("m") == []
    registry.report(steady)
    assert woke == ["m", "m"] and len(registry.routable("m")) == 2 and registry.reports_applied == 2
    # Another node reports job 1 (a requeued job, say); n's next report, unchanged, takes it back.
    registry.report(controller_pb2.AgentReport(node="other", agent_id="o", engines=[_steady_engines()[0]]))
    assert registry.get("1").node == "other"
    registry.report(steady)
    assert registry.get("1").node == "n" and registry.reports_applied == 4
    # A mirror replaces everything: the next report is applied in full.
    registry.mirror(registry.replicas(), {"n"})
    registry.report(steady)
    assert registry.reports_applied == 5 and registry.reports_unchanged == 0
    registry.report(steady)
    assert registry.reports_unchanged == 1


class _AlwaysInFull(Registry):
    """The registry without its cheap path for unchanged reports: every report is applied in full."""

    def _still_own(self, replicas: list, node: str) -> bool:  # type: ignore[type-arg]
        return False


_ENGINE = st.builds(
    lambda job, model, state, key, pool, user, running: engine_pb2.Engine(
        job_id=job, model=model, state=state, base_url=f"http://a:{job}", api_key=key, pool=pool, user=user,
        load=engine_pb2.EngineLoad(running=running)),
    st.sampled_from(["1", "2", "3", ""]), st.sampled_from(["m", "n"]),
    st.sampled_from([engine_pb2.STARTING, engine_pb2.READY, engine_pb2.STOPPING]), st.sampled_from(["k", "j"]),
    st.booleans(), st.sampled_from(["slinfer", "mallory"]), st.integers(0, 3))
_STEP = st.one_of(
    st.tuples(st.just("report"), st.sampled_from(["n1", "n2"]), st.sampled_from(["a", "b"]),
              st.lists(_ENGINE, max_size=3)),
    st.tuples(st.just("again"), st.sampled_from(["n1", "n2"])),
    st.tuples(st.just("wait"), st.sampled_from([1.0, 7.0])),
    st.tuples(st.just("drain"), st.sampled_from(["1", "2", "3"]), st.booleans()),
)


def _state(registry: Registry) -> tuple[object, ...]:
    replicas = sorted((r.job_id, r.model, r.node, r.base_url, r.api_key, r.state, r.pool, r.draining, r.running,
                       r.last_seen) for r in registry.replicas())
    agents = sorted((a.node, a.agent_id, a.last_seen, tuple(a.job_ids)) for a in registry.agents())
    return replicas, agents, {m: sorted(r.job_id for r in registry.routable(m)) for m in ("m", "n")}


@settings(max_examples=80, deadline=None)
@given(st.lists(_STEP, max_size=14))
def test_the_cheap_path_ends_in_the_state_of_applying_every_report_in_full(steps: list[tuple]) -> None:  # type: ignore[type-arg]
    """Whatever the reports, silences and drains, a registry that skips the work of unchanged reports holds
    what one that applies every report in full holds, and its listeners hear the same."""
    clock = Clock()
    registries = (Registry(agent_timeout_s=5, clock=clock, pool_users=frozenset({"slinfer"})),
                  _AlwaysInFull(agent_timeout_s=5, clock=clock, pool_users=frozenset({"slinfer"})))
    heard: tuple[list[str], list[str]] = ([], [])
    changed: tuple[list[str], list[str]] = ([], [])
    for registry, woke, touched in zip(registries, heard, changed, strict=True):
        registry.subscribe(woke.append)
        registry.subscribe_replicas(touched.append)
    last: dict[str, controller_pb2.AgentReport] = {}
    for step in steps:
        if step[0] == "report":
            _, node, agent_id, engines = step
            last[node] = controller_pb2.AgentReport(node=node, agent_id=agent_id, engines=engines)
        elif step[0] == "again" and step[1] in last:
            for e in last[step[1]].engines:
                e.load.running += 1  # the same report, with other loads
        elif step[0] == "wait":
            clock.now += step[1]
            continue
        elif step[0] == "drain":
            for registry in registries:
                registry.set_draining(step[1], step[2])
            continue
        else:
            continue
        for registry in registries:
            registry.report(last[step[1]])
        assert _state(registries[0]) == _state(registries[1])
        assert heard[0] == heard[1] and changed[0] == changed[1]
    assert registries[1].reports_unchanged == 0
