"""Kubernetes health for `slinfer status` and `slinfer doctor` (slinfer/kube/health.py), standby Leases
(leader.py with `announce`) and the controller's Kubernetes metrics, against the FAKE API server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from slinfer.controller import metrics
from slinfer.kube import labels as kl
from slinfer.kube.health import doctor_results, probe, status_lines
from slinfer.kube.leader import LEADER_LEASE, LeaderElection
from slinfer.kube.publisher import NodeIdentity, NodePublisher, PublishedEngine
from slinfer.kube.sync import KubeSync
from tests.fakes.kube import FakeKubeAPI

NS = "slinfer"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_standbys_announce_themselves_and_the_leader_drops_dead_ones() -> None:
    clock = Clock()
    api = FakeKubeAPI(clock=clock)
    a = LeaderElection(api, NS, "a", clock, announce=True)
    b = LeaderElection(api, NS, "b", clock, announce=True)
    c = LeaderElection(api, NS, "c", clock, announce=True)
    assert await a.step() and not await b.step() and not await c.step()
    assert sorted(api.names("Lease", NS)) == sorted([LEADER_LEASE, b.standby_lease, c.standby_lease])
    health = await probe(api, NS, clock.now)
    assert health.reachable and health.leader is not None and health.leader.holder == "a"
    assert sorted(s.holder for s in health.standbys) == ["b", "c"]
    # c is killed (no release); b goes on. Past 3 durations the leader deletes c's Lease, not b's.
    for _ in range(13):
        clock.now += 10
        await a.step()
        await b.step()
    assert sorted(api.names("Lease", NS)) == sorted([LEADER_LEASE, b.standby_lease])
    # A clean stop deletes the standby's own Lease; a takeover drops the new leader's.
    await a.release()
    clock.now += 1
    assert await b.step()
    assert api.names("Lease", NS) == [LEADER_LEASE]
    health = await probe(api, NS, clock.now)
    assert health.leader is not None and health.leader.holder == "b" and health.standbys == []


async def test_without_announce_a_standby_writes_nothing() -> None:
    clock = Clock()
    api = FakeKubeAPI(clock=clock)
    assert await LeaderElection(api, NS, "a", clock).step()
    mark = len(api.calls)
    assert not await LeaderElection(api, NS, "b", clock).step()
    assert [c.verb for c in api.calls[mark:]] == ["get"]


async def test_status_and_doctor_show_the_api_the_leader_the_standbys_and_the_nodes() -> None:
    clock = Clock()
    api = FakeKubeAPI(clock=clock)
    await LeaderElection(api, NS, "head1-77", clock, announce=True).step()
    await LeaderElection(api, NS, "head2-88", clock, announce=True).step()
    pub = NodePublisher(api, NodeIdentity("gpu01", "10.0.0.7"), namespace=NS, clock=clock)
    await pub.reconcile([PublishedEngine("7", "tiny", 20001, True, "alice", "gpu", True)])
    clock.now += 5
    text = "\n".join(status_lines(await probe(api, NS, clock.now), "https://api:6443"))
    assert "Kubernetes (https://api:6443): API reachable" in text
    assert "leader: head1-77, renewed 5 s ago" in text
    assert "standbys: head2-88 (renewed 5 s ago)" in text
    assert "nodes: slinfer-gpu01 (renewed 5 s ago)" in text
    assert [ok for ok, _, _ in doctor_results(await probe(api, NS, clock.now))] == [True]
    # The node's agent dies: doctor says so once its Lease has run out.
    clock.now += 60
    results = doctor_results(await probe(api, NS, clock.now))
    assert [ok for ok, _, _ in results] == [True, False, False]  # the leader is silent too
    assert "slinfer-gpu01" in results[2][1]
    # The API server goes away: status and doctor say so.
    api.down = True
    health = await probe(api, NS, clock.now)
    assert not health.reachable and "connection refused" in health.error
    assert "API UNREACHABLE" in status_lines(health)[1]
    assert doctor_results(health)[0][0] is False
    assert status_lines(None) == [] and doctor_results(None) == []


class NoJobs:
    async def jobs_by_id(self, job_ids: list[str]) -> list:
        return []


class NoEngines:
    def get(self, job_id: str) -> None:
        return None


async def test_metrics_follow_an_api_outage_and_say_who_leads() -> None:
    clock = Clock()
    api = FakeKubeAPI(clock=clock)
    ks = KubeSync(api, ["tiny"], NoEngines(), NoJobs(), clock, namespace=NS,
                  leader_election=LeaderElection(api, NS, "head1-77", clock))
    registry = CollectorRegistry()
    registry.register(metrics.KubeCollector(ks.status, "unused: the election names it"))

    def sample(name: str) -> float:
        value = registry.get_sample_value(name, {"identity": "head1-77"})
        assert value is not None, generate_latest(registry).decode()
        return value

    await ks.step()
    assert sample("slinfer_kubernetes_api_reachable") == 1 and sample("slinfer_kubernetes_leader") == 1
    assert sample("slinfer_kubernetes_last_success_timestamp_seconds") == clock.now
    assert sample("slinfer_kubernetes_failed_rounds") == 0
    writes = sample("slinfer_kubernetes_writes")
    assert writes >= 1  # the model Service's create
    before = clock.now
    api.down = True
    for _ in range(3):
        clock.now += 10
        await ks.step()
    assert sample("slinfer_kubernetes_api_reachable") == 0 and sample("slinfer_kubernetes_failed_rounds") == 3
    assert sample("slinfer_kubernetes_last_success_timestamp_seconds") == before
    assert sample("slinfer_kubernetes_leader") == 0  # stepped down past its renew deadline
    api.down = False
    clock.now += 10
    await ks.step()
    assert sample("slinfer_kubernetes_api_reachable") == 1 and sample("slinfer_kubernetes_failed_rounds") == 0
    assert kl.model_service_name("tiny") in api.names("Service", NS)


async def test_an_agents_credentials_read_what_they_may_and_say_what_they_may_not() -> None:
    from slinfer.kube.api import Rejected

    clock = Clock()
    api = FakeKubeAPI(clock=clock)
    await LeaderElection(api, NS, "head1-77", clock).step()
    api.fail_next("get", "Lease", Rejected('leases "slinfer-controller" is forbidden', 403, "Forbidden"))
    api.fail_next("list", "Lease", Rejected("leases is forbidden", 403, "Forbidden"))
    health = await probe(api, NS, clock.now)
    assert health.reachable and health.leader is None and "forbidden" in health.error
    text = "\n".join(status_lines(health))
    assert "API reachable" in text and "not readable with these credentials" in text
    assert doctor_results(health)[0][0] is True


def test_status_and_doctor_sections_from_a_config(tmp_path: object) -> None:
    from pathlib import Path

    from slinfer.config import parse
    from slinfer.kube.health import doctor_check, status_section
    from tests.fakes.kuberecorder import write_kubeconfig

    assert status_section(parse({})) == "" and doctor_check(parse({})) == []
    dead = write_kubeconfig(Path(str(tmp_path)) / "kubeconfig", "http://127.0.0.1:9")  # refused
    config = parse({"kubernetes": {"enabled": True, "kubeconfig": str(dead), "request_timeout_s": 2}})
    assert "API UNREACHABLE" in status_section(config) and "Connection refused" in status_section(config)
    ((ok, detail, fix),) = doctor_check(config)
    assert not ok and "does not answer" in detail and "kubeconfig" in fix


def test_without_kubernetes_the_series_are_declared_without_samples() -> None:
    registry = CollectorRegistry()
    registry.register(metrics.KubeCollector(identity="head1"))
    text = generate_latest(registry).decode()
    assert "# TYPE slinfer_kubernetes_api_reachable gauge" in text
    assert registry.get_sample_value("slinfer_kubernetes_api_reachable", {"identity": "head1"}) is None
