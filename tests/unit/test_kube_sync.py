"""The controller's KubeSync and LeaderElection against the in-repo FAKE API server, with injected clocks.

The agent side is the real NodePublisher on the same fake, so the label contract (Pods the agent publishes
are what the controller's Services select and what its garbage collection recognises) is tested end to end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from slinfer.kube import labels as kl
from slinfer.kube.api import NODE_LEASE_NAMESPACE, micro_time
from slinfer.kube.leader import LEADER_LEASE, LeaderElection
from slinfer.kube.objects import GATEWAY_SERVICE, GatewayEndpoint
from slinfer.kube.publisher import NodeIdentity, NodePublisher, PublishedEngine
from slinfer.kube.sync import KubeSync
from tests.fakes.kube import FakeKubeAPI, matches

NS = "slinfer"


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Job:
    job_id: str
    state: str

    @property
    def active(self) -> bool:
        return self.state in ("RUNNING", "PENDING", "COMPLETING", "SUSPENDED")


class Slurm:
    """Stands in for SlurmClient.jobs(): a list the test sets, or an error."""

    def __init__(self) -> None:
        self.list: list[Job] = []
        self.error: Exception | None = None
        self.asked: list[list[str]] = []

    async def jobs_by_id(self, job_ids: Sequence[str]) -> list[Job]:
        self.asked.append(list(job_ids))
        if self.error is not None:
            raise self.error
        return [j for j in self.list if j.job_id in job_ids]


class Registry:
    def __init__(self) -> None:
        self.engines: dict[str, object] = {}

    def get(self, job_id: str) -> object | None:
        return self.engines.get(job_id)


def publisher(api: FakeKubeAPI, clock: Clock, host: str = "gpu01", address: str = "10.0.0.7") -> NodePublisher:
    ident = NodeIdentity(slurm_node=host, address=address, partition="gpu", gpu_model="H100", gpu_count=4)
    return NodePublisher(api, ident, namespace=NS, clock=clock)


def engine(job: str, model: str = "llama", pool: bool = True, port: int = 20001) -> PublishedEngine:
    return PublishedEngine(job_id=job, model=model, port=port, ready=True, user="u", partition="gpu", pool=pool)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def api(clock: Clock) -> FakeKubeAPI:
    return FakeKubeAPI(clock=clock)


@pytest.fixture
def slurm() -> Slurm:
    return Slurm()


@pytest.fixture
def registry() -> Registry:
    return Registry()


def sync(api: FakeKubeAPI, clock: Clock, slurm: Slurm, registry: Registry, models: list[str] | None = None,
         **kwargs: Any) -> KubeSync:
    return KubeSync(api, models if models is not None else ["llama"], registry, slurm, clock, namespace=NS,
                    **kwargs)


async def test_model_services_select_the_pool_pods_the_agent_publishes(api: FakeKubeAPI, clock: Clock,
                                                                       slurm: Slurm, registry: Registry) -> None:
    models = ["llama", "Qwen2.5-72B-Instruct", "x" * 100]
    pub = publisher(api, clock)
    await pub.reconcile([engine("1", "llama"), engine("2", "llama", pool=False, port=20002),
                         engine("3", "Qwen2.5-72B-Instruct", port=20003), engine("4", "x" * 100, port=20004)])
    ks = sync(api, clock, slurm, registry, models)
    await ks.step()
    assert ks.status().healthy
    pods = [api.stored("Pod", n, NS) for n in api.names("Pod", NS)]
    for model in models:
        svc = api.stored("Service", kl.model_service_name(model), NS)
        assert svc is not None and kl.is_dns_label(svc["metadata"]["name"])
        selected = sorted(p["metadata"]["annotations"][kl.JOB_ID_ANNOTATION] for p in pods  # type: ignore[index]
                          if matches(p["metadata"]["labels"], kl.selector(svc["spec"]["selector"])))  # type: ignore[index]
        assert selected == {"llama": ["1"], "Qwen2.5-72B-Instruct": ["3"], "x" * 100: ["4"]}[model]
        assert svc["spec"]["ports"][0]["targetPort"] == kl.PORT_NAME
    # The named port resolves per Pod to the engine's own port.
    for p in pods:
        assert p["spec"]["containers"][0]["ports"][0]["name"] == kl.PORT_NAME  # type: ignore[index]


async def test_services_follow_the_catalog(api: FakeKubeAPI, clock: Clock, slurm: Slurm, registry: Registry) -> None:
    await sync(api, clock, slurm, registry, ["a", "b"]).step()
    assert api.names("Service", NS) == sorted([kl.model_service_name("a"), kl.model_service_name("b")])
    # Someone edits a selector: it is put back, and a key they added is removed.
    name = kl.model_service_name("a")
    await api.patch("Service", name, {"spec": {"selector": {kl.MODEL: "zzz", "extra": "1"}}}, NS)
    ks = sync(api, clock, slurm, registry, ["a", "c"])
    await ks.step()
    assert api.names("Service", NS) == sorted([kl.model_service_name("a"), kl.model_service_name("c")])
    assert api.stored("Service", name, NS)["spec"]["selector"] == kl.model_selector("a")  # type: ignore[index]
    # A Service that is not slinfer's is never touched.
    await api.create("Service", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "theirs"},
                                 "spec": {"ports": [{"port": 1}]}}, NS)
    mark = len(api.calls)
    await ks.step()
    assert [c for c in api.calls[mark:] if c.verb != "list"] == []
    assert "theirs" in api.names("Service", NS)


async def test_gateway_service_with_an_ip_and_with_a_name(api: FakeKubeAPI, clock: Clock, slurm: Slurm,
                                                          registry: Registry) -> None:
    await sync(api, clock, slurm, registry, [], gateway=GatewayEndpoint("10.1.2.3", 8000)).step()
    svc = api.stored("Service", GATEWAY_SERVICE, NS)
    assert "selector" not in svc["spec"] and svc["spec"]["ports"][0]["port"] == 8000  # type: ignore[index]
    eps = api.stored("EndpointSlice", GATEWAY_SERVICE, NS)
    assert eps["metadata"]["labels"]["kubernetes.io/service-name"] == GATEWAY_SERVICE  # type: ignore[index]
    assert eps["endpoints"] == [{"addresses": ["10.1.2.3"], "conditions": {"ready": True}}]  # type: ignore[index]

    # The gateway moves to a DNS name: the Service becomes ExternalName and the slice goes.
    await sync(api, clock, slurm, registry, [], gateway=GatewayEndpoint("head.example.org", 8000)).step()
    svc = api.stored("Service", GATEWAY_SERVICE, NS)
    assert svc["spec"]["type"] == "ExternalName" and svc["spec"]["externalName"] == "head.example.org"  # type: ignore[index]
    assert api.stored("EndpointSlice", GATEWAY_SERVICE, NS) is None


async def test_node_with_an_expired_lease_is_deleted_and_a_live_one_kept(api: FakeKubeAPI, clock: Clock,
                                                                          slurm: Slurm, registry: Registry) -> None:
    alive, dead = publisher(api, clock, "gpu01"), publisher(api, clock, "gpu02", "10.0.0.8")
    await alive.reconcile([engine("1")])
    await dead.reconcile([engine("2", port=20002)])
    slurm.list = [Job("1", "RUNNING"), Job("2", "RUNNING")]
    ks = sync(api, clock, slurm, registry)
    start = clock.now
    await ks.step()
    # gpu02's agent dies now; gpu01's keeps renewing every 10 s.
    for t in range(10, 40, 10):
        clock.now = start + t
        await alive.step()
        await ks.step()
    assert api.stored("Node", "slinfer-gpu02") is not None  # 30 s without renewal: not yet
    clock.now = start + 40
    await alive.step()
    await ks.step()
    assert api.stored("Node", "slinfer-gpu02") is None
    assert api.stored("Lease", "slinfer-gpu02", NODE_LEASE_NAMESPACE) is None
    assert api.stored("Pod", kl.pod_name("slinfer-gpu02", "2"), NS) is None
    for t in range(50, 300, 10):
        clock.now = start + t
        await alive.step()
        await ks.step()
    assert api.stored("Node", "slinfer-gpu01") is not None
    assert ks.nodes_deleted == 1


async def test_expiry_uses_the_controllers_clock_not_the_agents(api: FakeKubeAPI, clock: Clock, slurm: Slurm,
                                                                 registry: Registry) -> None:
    agent_clock = Clock(clock.now - 3600)  # the agent's host is an hour behind
    pub = NodePublisher(api, NodeIdentity("gpu01", "10.0.0.7"), namespace=NS, clock=agent_clock)
    await pub.reconcile([engine("1")])
    slurm.list = [Job("1", "RUNNING")]
    ks = sync(api, clock, slurm, registry)
    for _ in range(12):
        await ks.step()
        clock.now += 10
        agent_clock.now += 10
        await pub.step()
    assert api.stored("Node", "slinfer-gpu01") is not None


async def test_controller_that_just_started_waits_a_full_duration(api: FakeKubeAPI, clock: Clock, slurm: Slurm,
                                                                  registry: Registry) -> None:
    pub = publisher(api, clock)
    await pub.reconcile([engine("1")])
    slurm.list = [Job("1", "RUNNING")]
    clock.now += 3600  # the lease is an hour old when the controller first looks
    ks = sync(api, clock, slurm, registry)
    await ks.step()
    clock.now += 39
    await ks.step()
    assert api.stored("Node", "slinfer-gpu01") is not None
    clock.now += 1
    await ks.step()
    assert api.stored("Node", "slinfer-gpu01") is None


async def renew_only(api: FakeKubeAPI, clock: Clock, node: str = "slinfer-gpu01") -> None:
    """An agent whose renew loop still runs but which no longer manages its Pods (stuck engine handling)."""
    await api.patch("Lease", node, {"spec": {"renewTime": micro_time(clock.now)}}, NODE_LEASE_NAMESPACE)


async def test_pods_of_ended_jobs_go_then_the_idle_node(api: FakeKubeAPI, clock: Clock, slurm: Slurm,
                                                        registry: Registry) -> None:
    pub = publisher(api, clock)
    await pub.reconcile([engine("1"), engine("2", port=20002)])
    slurm.list = [Job("1", "RUNNING"), Job("2", "RUNNING")]
    ks = sync(api, clock, slurm, registry, gc_grace_s=60)
    start = clock.now
    await ks.step()

    slurm.list = [Job("1", "COMPLETED"), Job("2", "RUNNING")]
    registry.engines = {"1": object()}  # the agent still reports the engine for a moment
    clock.now = start + 30
    await renew_only(api, clock)
    await ks.step()
    # Slurm is asked only about the Pods' jobs whose engine no agent reports, never the whole queue.
    assert slurm.asked[-1] == ["2"]
    assert api.stored("Pod", kl.pod_name("slinfer-gpu01", "1"), NS) is not None
    registry.engines = {}
    await ks.step()
    assert api.stored("Pod", kl.pod_name("slinfer-gpu01", "1"), NS) is not None  # seen 30 s, grace 60 s
    clock.now = start + 60
    await renew_only(api, clock)
    slurm.error = RuntimeError("squeue: slurmctld not responding")  # without Slurm's word nothing goes
    await ks.step()
    assert api.stored("Pod", kl.pod_name("slinfer-gpu01", "1"), NS) is not None
    slurm.error = None
    await ks.step()
    assert api.stored("Pod", kl.pod_name("slinfer-gpu01", "1"), NS) is None
    assert api.stored("Pod", kl.pod_name("slinfer-gpu01", "2"), NS) is not None

    # Job 2 is no longer even listed (past MinJobAge): its Pod goes, then the Node, which serves nothing.
    slurm.list = []
    clock.now = start + 80
    await renew_only(api, clock)
    await ks.step()
    assert api.names("Pod", NS) == []
    assert api.stored("Node", "slinfer-gpu01") is not None  # the agent may yet clean it up itself
    for t in (110, 139):
        clock.now = start + t
        await renew_only(api, clock)
        await ks.step()
    assert api.stored("Node", "slinfer-gpu01") is not None  # idle 59 s
    clock.now = start + 140
    await ks.step()
    assert api.stored("Node", "slinfer-gpu01") is None
    assert ks.pods_deleted == 2 and ks.nodes_deleted == 1


async def test_new_pod_of_a_job_squeue_has_not_shown_yet_is_kept(api: FakeKubeAPI, clock: Clock, slurm: Slurm,
                                                                  registry: Registry) -> None:
    ks = sync(api, clock, slurm, registry, gc_grace_s=60)
    pub = publisher(api, clock)
    slurm.list = []  # an squeue snapshot older than the job
    await pub.reconcile([engine("7")])
    await ks.step()
    clock.now += 30
    await pub.step()
    await ks.step()
    assert api.stored("Pod", kl.pod_name("slinfer-gpu01", "7"), NS) is not None


async def test_api_down_is_reported_not_raised(api: FakeKubeAPI, clock: Clock, slurm: Slurm,
                                               registry: Registry) -> None:
    ks = sync(api, clock, slurm, registry)
    api.down = True
    await ks.step()
    st = ks.status()
    assert not st.healthy and "connection refused" in st.text
    api.down = False
    await ks.step()
    assert ks.status().healthy
    assert api.stored("Service", kl.model_service_name("llama"), NS) is not None


# Leader election.


def elected(api: FakeKubeAPI, clock: Clock, slurm: Slurm, registry: Registry, who: str) -> KubeSync:
    return sync(api, clock, slurm, registry, leader_election=LeaderElection(api, NS, who, clock))


async def test_only_the_leader_writes_and_a_standby_takes_over_a_dead_leader(
        api: FakeKubeAPI, clock: Clock, slurm: Slurm, registry: Registry) -> None:
    a, b = elected(api, clock, slurm, registry, "a"), elected(api, clock, slurm, registry, "b")
    await a.step()
    assert a.is_leader
    mark = len(api.calls)
    await b.step()
    assert not b.is_leader and b.status().text == "standby: a leads"
    assert [c.verb for c in api.calls[mark:]] == ["get"]  # a standby only reads the Lease

    start = clock.now
    for t in range(10, 100, 10):  # a keeps renewing: b never takes over
        clock.now = start + t
        await a.step()
        await b.step()
        assert a.is_leader and not b.is_leader
    renew = api.stored("Lease", LEADER_LEASE, NS)["spec"]["renewTime"]  # type: ignore[index]
    assert renew == micro_time(start + 90)

    # a dies at start + 90. b has seen the Lease change at start + 90; it takes over 40 s later, not before.
    clock.now = start + 120
    await b.step()
    assert not b.is_leader
    clock.now = start + 130
    await b.step()
    assert b.is_leader
    lease = api.stored("Lease", LEADER_LEASE, NS)
    assert lease["spec"]["holderIdentity"] == "b" and lease["spec"]["leaseTransitions"] == 1  # type: ignore[index]
    assert lease["spec"]["acquireTime"] == micro_time(start + 130)  # type: ignore[index]


async def test_a_leader_that_cannot_renew_steps_down_before_anyone_can_take_over(
        api: FakeKubeAPI, clock: Clock, slurm: Slurm, registry: Registry) -> None:
    a = elected(api, clock, slurm, registry, "a")
    await a.step()
    start = clock.now
    api.down = True
    clock.now = start + 20
    await a.step()
    assert a.is_leader  # within its renew deadline (2/3 of 40 s)
    clock.now = start + 27
    await a.step()
    assert not a.is_leader
    assert not a.status().healthy


async def test_two_candidates_racing_for_a_free_lease_cannot_both_win(
        api: FakeKubeAPI, clock: Clock, slurm: Slurm, registry: Registry) -> None:
    dead = LeaderElection(api, NS, "dead", clock)
    await dead.step()
    clock.now += 1
    a = LeaderElection(api, NS, "a", clock)
    b = LeaderElection(api, NS, "b", clock)
    await a.step()
    await b.step()
    clock.now += 40  # both have watched "dead" stay silent for its duration

    class Pausing:
        """The fake, but `a` stops after its read until `b` has written."""

        def __init__(self) -> None:
            self.read = asyncio.Event()
            self.go = asyncio.Event()

        async def get(self, *args: Any) -> dict[str, Any]:
            obj = await api.get(*args)
            self.read.set()
            await self.go.wait()
            return obj

        def __getattr__(self, name: str) -> Any:
            return getattr(api, name)

    pausing = Pausing()
    a._api = pausing  # type: ignore[assignment]
    task = asyncio.create_task(a.step())
    await pausing.read.wait()
    assert await b.step()
    pausing.go.set()
    assert not await task  # its write carried the stale resourceVersion: 409, so it is not the leader
    assert api.stored("Lease", LEADER_LEASE, NS)["spec"]["holderIdentity"] == "b"  # type: ignore[index]


async def test_release_lets_the_standby_take_over_at_once(api: FakeKubeAPI, clock: Clock, slurm: Slurm,
                                                          registry: Registry) -> None:
    a, b = LeaderElection(api, NS, "a", clock), LeaderElection(api, NS, "b", clock)
    assert await a.step()
    assert not await b.step()
    await a.release()
    assert not a.is_leader
    clock.now += 1
    assert await b.step()


async def test_run_releases_the_lease_when_cancelled(api: FakeKubeAPI, clock: Clock, slurm: Slurm,
                                                     registry: Registry) -> None:
    stepped = asyncio.Event()

    async def sleep(_: float) -> None:
        stepped.set()
        await asyncio.Event().wait()

    ks = sync(api, clock, slurm, registry, leader_election=LeaderElection(api, NS, "a", clock), sleep=sleep)
    task = asyncio.create_task(ks.run())
    await stepped.wait()
    assert ks.is_leader
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not api.stored("Lease", LEADER_LEASE, NS)["spec"].get("holderIdentity")  # type: ignore[index]
