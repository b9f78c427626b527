"""Bounded work per step (issue 35.7): the feed's publication reads what changed, not the whole registry; the
autoscaler's step parses each Slurm state word once; and a smoke run of bench/control_plane_scale.py's smallest
point against a real controller (in this process, over gRPC and TLS).

Work is counted (calls to the registry, to the state parser), never timed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench import control_plane_scale as bench
from slinfer.backoff import BackoffPolicy
from slinfer.controller import main as controller_main
from slinfer.controller.feedlog import FeedMirror
from slinfer.controller.gatewayhub import GatewayHub
from slinfer.controller.keys import KeyStore
from slinfer.controller.limits import KeyLimits, Limiter
from slinfer.controller.registry import Registry
from slinfer.controller.usage import UsageLedger
from slinfer.slurm import jobs as slurm_jobs
from slinfer.slurm.states import JobState
from slinfer.v1 import engine_pb2
from tests.unit.test_control_plane_loop_share import _cluster

NODES = 50


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class _CountingDict(dict):  # type: ignore[type-arg]
    gets = 0

    def get(self, key, default=None):  # type: ignore[no-untyped-def]
        type(self).gets += 1
        return super().get(key, default)


def _hub(tmp_path: Path, registry: Registry) -> tuple[GatewayHub, KeyStore]:
    keys = KeyStore(tmp_path / "keys.json")
    ledger = UsageLedger(tmp_path / "usage", 60.0)
    hub = GatewayHub(registry, keys, Limiter(KeyLimits(), ledger.tokens_today), ledger, "t", lambda m: False,
                     ["m0"], warmup_s=0.0)
    return hub, keys


def _world(tmp_path: Path) -> tuple[Registry, _Clock, GatewayHub, KeyStore, dict[str, int]]:
    clock = _Clock()
    registry = Registry(agent_timeout_s=5.0, clock=clock)
    for node in range(NODES):
        registry.report(bench.agent_report(node))
    hub, keys = _hub(tmp_path, registry)
    calls = {"get": 0, "replicas": 0}
    get, replicas = registry.get, registry.replicas

    def counted_get(job_id: str):  # type: ignore[no-untyped-def]
        calls["get"] += 1
        return get(job_id)

    def counted_replicas(model: str | None = None):  # type: ignore[no-untyped-def]
        calls["replicas"] += 1
        return replicas(model)

    registry.get = counted_get  # type: ignore[method-assign]
    registry.replicas = counted_replicas  # type: ignore[method-assign]
    return registry, clock, hub, keys, calls


def _fresh_state(tmp_path: Path, registry: Registry, keys: KeyStore, hub: GatewayHub) -> None:
    """The incremental feed's state equals what a new hub computes from everything (the full scan)."""
    fresh = GatewayHub(registry, keys, hub._limiter, hub._ledger, "t", lambda m: False, ["m0"], warmup_s=0.0)
    a, b = FeedMirror(), FeedMirror()
    a.apply(hub.feed.snapshot())
    b.apply(fresh.table())
    assert a.state() == b.state()


def test_a_publication_reads_only_the_replicas_that_changed(tmp_path: Path) -> None:
    registry, _clock, hub, keys, calls = _world(tmp_path)
    first = hub.publish()
    # Positive control: the first publication is the whole registry.
    assert first is not None and len(first.replicas) == NODES * bench.ENGINES and calls["replicas"] == 1
    calls.update(get=0, replicas=0)

    keys.create("newcomer")
    delta = hub.publish()
    assert delta is not None and [k.name for k in delta.keys] == ["newcomer"] and not delta.replicas
    assert calls == {"get": 0, "replicas": 0}  # a key's change reads no replica

    report = bench.agent_report(3)
    for e in report.engines:
        e.load.running += 7  # load changes on every report; it is not in the feed
    registry.report(report)
    assert hub.publish() is None and calls == {"get": 0, "replicas": 0}

    report.engines[0].state = engine_pb2.STOPPING
    registry.report(report)
    delta = hub.publish()
    assert delta is not None and [r.job_id for r in delta.replicas] == [report.engines[0].job_id]
    assert delta.replicas[0].state == engine_pb2.STOPPING and calls["get"] == 1 and calls["replicas"] == 0

    del report.engines[1]  # gone from its agent's report
    registry.report(report)
    delta = hub.publish()
    assert delta is not None and list(delta.removed_replicas) == [bench.agent_report(3).engines[1].job_id]
    registry.set_draining(report.engines[2].job_id)
    delta = hub.publish()
    assert delta is not None and [r.draining for r in delta.replicas] == [True]
    assert calls["replicas"] == 0
    _fresh_state(tmp_path, registry, keys, hub)


def test_a_silent_agent_costs_its_own_replicas_not_the_cluster(tmp_path: Path) -> None:
    registry, clock, hub, keys, calls = _world(tmp_path)
    hub.publish()
    clock.now += 6.0  # past the timeout: every agent but node 7 reports again
    for node in range(NODES):
        if node != 7:
            registry.report(bench.agent_report(node))
    calls.update(get=0, replicas=0)
    counting = _CountingDict(registry._agents)
    registry._agents = counting
    delta = hub.publish()
    silent = {e.job_id for e in bench.agent_report(7).engines}
    assert delta is not None and {r.job_id for r in delta.replicas} == silent
    assert all(not r.agent_alive for r in delta.replicas)
    assert calls == {"get": bench.ENGINES, "replicas": 0}
    assert _CountingDict.gets <= 2 + 1  # the silent agent, the first one heard in time, and its job ids
    _fresh_state(tmp_path, registry, keys, hub)

    registry.report(bench.agent_report(7))  # it speaks again
    delta = hub.publish()
    assert delta is not None and {r.job_id for r in delta.replicas} == silent
    assert all(r.agent_alive for r in delta.replicas)
    assert hub.publish() is None  # and nothing more


def test_an_autoscaler_step_parses_each_state_word_once(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed = []
    original = JobState.parse

    def counted(value: object) -> JobState:
        parsed.append(value)
        return original(value)

    slurm_jobs._parsed.cache_clear()
    monkeypatch.setattr(JobState, "parse", staticmethod(counted))
    nodes = 20
    scaler, _, jobs = _cluster(nodes)

    asyncio.run(scaler.step())
    statuses = scaler.status()
    # Positive control: the step did read every job (each model holds its READY replicas, all adopted).
    assert sum(s.ready for s in statuses) == len(jobs) == nodes * bench.ENGINES
    assert parsed == ["RUNNING"]
    slurm_jobs._parsed.cache_clear()


def test_the_benchmark_smallest_point_runs_against_a_real_controller(monkeypatch: pytest.MonkeyPatch) -> None:
    # The hub's first table waits for agents to re-register after a start; a smoke run need not.
    monkeypatch.setattr(controller_main, "AGENT_RECONNECT", BackoffPolicy(initial_s=0.01, max_s=0.01))
    point = bench.Point(nodes=2, keys=20, watchers=2, sweep="nodes")
    r = asyncio.run(bench.run_point(point, seconds=0.2, changes=2, interval=0.05, in_process=True,
                                    heartbeat_s=0.05))
    assert r["nodes"] == 2 and r["reports_per_s"] > 5
    assert r["change_p99_ms"] > 0 and r["create_key_p99_ms"] > 0 and r["status_p99_ms"] > 0
    assert r["rss_mb"] > 10
    assert r["feed_bps"] < bench.GOAL_FEED_BPS  # nothing changed but load: the feed carries next to nothing
    rows = [dict(r, nodes=n, autoscaler_step_ms=n * 0.1, cpu_per_report_us=100.0) for n in (10, 100)]
    exps = bench.exponents(rows)
    assert exps["nodes"]["autoscaler_step_ms"] == pytest.approx(1.0)
    assert exps["nodes"]["cpu_per_report_us"] == pytest.approx(0.0)
    assert "| nodes | 10 |" in bench.table(rows)


class _Name(str):
    """A node name that counts its comparisons."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        type(self).compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_a_gateway_mirror_groups_replicas_by_node_in_one_pass() -> None:
    source = Registry(agent_timeout_s=60.0)
    for node in range(NODES):
        source.report(bench.agent_report(node))
    replicas = source.replicas()
    for r in replicas:
        r.node = _Name(r.node)
    alive = {r.node for r in replicas}
    mirror = Registry(agent_timeout_s=60.0)
    _Name.compared = 0
    mirror.mirror(replicas, alive)
    # Each replica's node is looked up twice (is its agent alive, which node's list); a scan of every replica
    # per node compared NODES x replicas times (20,000 here).
    assert _Name.compared <= 2 * len(replicas)
    agents = {a.node: a.job_ids for a in mirror.agents()}
    assert len(agents) == NODES
    assert agents["node00003"] == sorted(e.job_id for e in bench.agent_report(3).engines)


def test_gateways_that_connect_at_one_version_share_one_full_state(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _registry, _clock, hub, keys, _calls = _world(tmp_path)
    built = []
    snapshot = hub.feed.snapshot

    def counted():  # type: ignore[no-untyped-def]
        built.append(hub.feed.version)
        return snapshot()

    monkeypatch.setattr(hub.feed, "snapshot", counted)
    first = hub.table()
    for _ in range(31):  # the other 31 workers of a site, after a controller restart
        assert hub.snapshot() is first
    assert len(built) == 1 and len(first.replicas) == NODES * bench.ENGINES
    keys.create("newcomer")
    hub.publish()
    later = hub.snapshot()  # a new version: a new full state, with the change
    assert len(built) == 2 and later.version == first.version + 1
    assert "newcomer" in {k.name for k in later.keys}


def test_with_no_watcher_nothing_is_tracked_and_the_next_publication_compares_everything(tmp_path: Path) -> None:
    registry, _clock, hub, _keys, calls = _world(tmp_path)
    hub.publish()
    hub._no_watchers()  # the last gateway left
    for node in range(NODES):
        report = bench.agent_report(node)
        report.engines[0].state = engine_pb2.STOPPING  # a change on every node while nobody watches
        if node == 5:
            del report.engines[1]  # and one replica gone
        registry.report(report)
    assert not hub._dirty_replicas  # nothing accumulates without a watcher
    calls.update(get=0, replicas=0)
    delta = hub.publish()
    assert delta is not None and calls["replicas"] == 1
    assert len(delta.replicas) == NODES and list(delta.removed_replicas) == [bench.agent_report(5).engines[1].job_id]
    _fresh_state(tmp_path, registry, _keys, hub)
