"""The four bugs a real kube-apiserver (v1.32, built here, issue 32) showed and the in-repo fake hid, each
reproduced against the FAKE that now models the behaviour behind it; plus the namespace's Pod Security label
and field managers, end to end with the real NodePublisher and KubeSync."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from slinfer.kube import labels as kl
from slinfer.kube.api import NODE_LEASE_NAMESPACE
from slinfer.kube.objects import GATEWAY_SERVICE, GatewayEndpoint
from slinfer.kube.publisher import NodeIdentity, NodePublisher, PublishedEngine
from slinfer.kube.sync import KubeSync
from tests.fakes.kube import PSA_ENFORCE, SLICE_CONTROLLER, SLICE_MANAGED_BY, FakeKubeAPI

NS = "slinfer"
ROOT = Path(__file__).resolve().parents[2]
WRITES = ("create", "patch", "delete")


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class NoJobs:
    async def jobs_by_id(self, job_ids: Sequence[str]) -> list:
        return []


class NoEngines:
    def get(self, job_id: str) -> None:
        return None


def engine(job: str = "7") -> PublishedEngine:
    return PublishedEngine(job_id=job, model="tiny", port=20001, ready=True, user="alice", partition="gpu",
                           pool=True)


def publisher(api: FakeKubeAPI, clock: Clock) -> NodePublisher:
    return NodePublisher(api.view(kl.AGENT_FIELD_MANAGER), NodeIdentity("gpu01", "10.0.0.7", "gpu"),
                         namespace=NS, clock=clock)


def ksync(api: FakeKubeAPI, clock: Clock, models: list[str], gateway: GatewayEndpoint | None = None) -> KubeSync:
    return KubeSync(api.view(kl.CONTROLLER_FIELD_MANAGER), models, NoEngines(), NoJobs(), clock, namespace=NS,
                    gateway=gateway, gc_grace_s=60)


def writes(api: FakeKubeAPI, mark: int) -> list[str]:
    return [f"{c.verb} {c.kind} {c.name}" for c in api.calls[mark:] if c.verb in WRITES]


async def test_bug1_the_clusters_endpointslices_of_a_model_service_are_left_alone() -> None:
    clock, api = Clock(), FakeKubeAPI()
    api.clock = clock
    ks = ksync(api, clock, ["tiny"], GatewayEndpoint("10.0.0.1", 8000))
    await ks.step()
    service = kl.model_service_name("tiny")
    (cluster_slice,) = [n for n in api.names("EndpointSlice", NS) if n.startswith(service)]
    labels = api.stored("EndpointSlice", cluster_slice, NS)["metadata"]["labels"]  # type: ignore[index]
    assert labels[kl.MANAGED_BY] == "slinfer" and labels[SLICE_MANAGED_BY] == SLICE_CONTROLLER  # the trap
    for _ in range(3):
        clock.now += 10
        mark = len(api.calls)
        await ks.step()
        assert writes(api, mark) == []
    assert cluster_slice in api.names("EndpointSlice", NS)
    # Its own slice is still slinfer's to remove (positive control): the gateway goes, its slice goes.
    await ksync(api, clock, ["tiny"]).step()
    assert GATEWAY_SERVICE not in api.names("EndpointSlice", NS)
    assert cluster_slice in api.names("EndpointSlice", NS)


async def test_bug2_a_refused_gateway_slice_does_not_stop_garbage_collection() -> None:
    clock, api = Clock(), FakeKubeAPI()
    api.clock = clock
    pub = publisher(api, clock)
    await pub.reconcile([engine()])
    # The config refuses a loopback address at start; a KubeSync built without that check meets the 422.
    ks = ksync(api, clock, ["tiny"], GatewayEndpoint("127.0.0.1", 8000))
    await ks.step()
    assert any(c.verb == "create" and c.kind == "EndpointSlice" for c in api.calls)  # the 422 happened
    st = ks.status()
    assert not st.healthy and "may not be in the loopback range" in st.last_error
    assert kl.model_service_name("tiny") in api.names("Service", NS)  # the other steps ran
    # The agent dies: no more renewals. After the Lease's duration its Node goes, though the slice still fails.
    clock.now += 45
    await ks.step()
    assert api.names("Node") == []
    assert api.stored("Lease", pub.node_name, NODE_LEASE_NAMESPACE) is None
    assert "loopback" in ks.status().last_error and ks.status().nodes_deleted == 1


async def test_bug3_an_externalname_gateway_settles_and_a_quiet_round_writes_nothing() -> None:
    clock, api = Clock(), FakeKubeAPI()
    api.clock = clock
    ks = ksync(api, clock, ["tiny", "small"], GatewayEndpoint("head.example.org", 8000))
    await ks.step()
    stored = api.stored("Service", GATEWAY_SERVICE, NS)
    assert stored["spec"]["ports"][0]["targetPort"] == 8000  # type: ignore[index]  # the server's default
    for _ in range(3):
        clock.now += 10
        mark = len(api.calls)
        await ks.step()
        assert writes(api, mark) == []
    assert ks.status().healthy
    # A real difference is still written (positive control).
    await api.patch("Service", GATEWAY_SERVICE, {"spec": {"externalName": "elsewhere.example.org"}}, NS)
    mark = len(api.calls)
    await ks.step()
    assert writes(api, mark) == [f"patch Service {GATEWAY_SERVICE}"]
    assert api.stored("Service", GATEWAY_SERVICE, NS)["spec"]["externalName"] == "head.example.org"  # type: ignore[index]


async def test_bug4_pods_the_clusters_gc_marked_after_a_node_deletion_are_replaced() -> None:
    clock, api = Clock(), FakeKubeAPI()
    api.clock = clock
    pub = publisher(api, clock)
    await pub.reconcile([engine()])
    name = kl.pod_name(pub.node_name, "7")
    await api.delete("Node", pub.node_name)  # a person deletes the Node
    api.collect_garbage(pod_gc=False)  # the GC: Lease gone, the Pod marked (grace 30 s, no kubelet)
    assert api.stored("Pod", name, NS)["metadata"]["deletionTimestamp"]  # type: ignore[index]
    clock.now += 10
    await pub.step()  # the renewal finds no Lease: the agent registers its Node again
    node = api.stored("Node", pub.node_name)
    assert node is not None
    api.collect_garbage()  # the pod GC: a Node of that name exists, so it would spare a Terminating Pod
    pod = api.stored("Pod", name, NS)
    assert pod is not None and not pod["metadata"].get("deletionTimestamp")
    assert pod["metadata"]["ownerReferences"][0]["uid"] == node["metadata"]["uid"]
    assert pod["status"]["phase"] == "Running"


async def test_bug4_a_pod_an_earlier_node_owned_is_replaced_before_the_gc_marks_it() -> None:
    clock, api = Clock(), FakeKubeAPI()
    api.clock = clock
    pub = publisher(api, clock)
    await pub.reconcile([engine()])
    name = kl.pod_name(pub.node_name, "7")
    await api.delete("Node", pub.node_name)
    clock.now += 60
    await pub.step()  # the resync finds no Node and makes it again, before any garbage collection
    node = api.stored("Node", pub.node_name)
    assert node is not None
    api.collect_garbage()
    pod = api.stored("Pod", name, NS)
    assert pod is not None and not pod["metadata"].get("deletionTimestamp")
    assert pod["metadata"]["ownerReferences"][0]["uid"] == node["metadata"]["uid"]


async def test_engine_pods_pass_the_shipped_namespaces_pod_security_and_fail_baseline() -> None:
    (ns,) = [d for d in yaml.safe_load_all((ROOT / "packaging/kubernetes/namespace.yaml").read_text()) if d]
    clock = Clock()
    api = FakeKubeAPI(clock=clock, namespace_labels={NS: ns["metadata"]["labels"]})
    pub = publisher(api, clock)
    await pub.reconcile([engine()])
    assert pub.status().healthy and api.names("Pod", NS) == [kl.pod_name(pub.node_name, "7")]
    # The cluster's baseline default refuses them (the control).
    strict = FakeKubeAPI(clock=clock, namespace_labels={NS: {PSA_ENFORCE: "baseline"}})
    pub = publisher(strict, clock)
    await pub.reconcile([engine()])
    assert not pub.status().healthy and 'violates PodSecurity "baseline:latest"' in pub.status().last_error
    assert strict.names("Pod", NS) == []


async def test_the_agent_and_the_controller_write_under_their_own_field_managers() -> None:
    clock, api = Clock(), FakeKubeAPI()
    api.clock = clock
    pub = publisher(api, clock)
    await pub.reconcile([engine()])
    await ksync(api, clock, ["tiny"]).step()
    assert set(api.managers("Node", pub.node_name)) == {kl.AGENT_FIELD_MANAGER}
    assert set(api.managers("Pod", kl.pod_name(pub.node_name, "7"), NS)) == {kl.AGENT_FIELD_MANAGER}
    assert set(api.managers("Lease", pub.node_name, NODE_LEASE_NAMESPACE)) == {kl.AGENT_FIELD_MANAGER}
    assert api.managers("Service", kl.model_service_name("tiny"), NS) == [kl.CONTROLLER_FIELD_MANAGER]


async def test_a_steady_node_and_controller_write_only_their_lease_renewals() -> None:
    from slinfer.kube.leader import LeaderElection

    clock, api = Clock(), FakeKubeAPI()
    api.clock = clock
    pub = publisher(api, clock)
    await pub.reconcile([engine()])
    class Serving:
        def get(self, job_id: str) -> object | None:
            return object() if job_id == "7" else None  # the agent reports the job's engine

    ks = KubeSync(api.view(kl.CONTROLLER_FIELD_MANAGER), ["tiny"], Serving(), NoJobs(), clock, namespace=NS,
                  gateway=GatewayEndpoint("10.0.0.1", 8000), leader_election=LeaderElection(api, NS, "c", clock))
    await ks.step()
    mark = len(api.calls)
    for _ in range(60):  # ten minutes, the agent's resyncs included
        clock.now += 10
        await pub.step()
        await ks.step()
    renewals = [f"{c.kind} {c.namespace}/{c.name}" for c in api.calls[mark:] if c.verb in WRITES]
    assert set(renewals) == {f"Lease {NODE_LEASE_NAMESPACE}/{pub.node_name}", "Lease slinfer/slinfer-controller"}
    assert len(renewals) == 120  # one each per 10 s
    # The cluster marks the Node Unknown (as the node lifecycle controller does): the next resync puts it back.
    await api.patch("Node", pub.node_name, {"status": {"conditions": [
        {"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown"}]}}, subresource="status")
    clock.now += 60
    await pub.step()
    ready = api.stored("Node", pub.node_name)["status"]["conditions"][0]  # type: ignore[index]
    assert ready["status"] == "True"


async def test_after_an_api_outage_lease_expiry_is_judged_afresh() -> None:
    """Seen on the real server: a 60 s outage, and the controller's first round after it deleted the live Node
    whose agent (cut off too, backing off 30 s) had not renewed yet."""
    clock, api = Clock(), FakeKubeAPI()
    api.clock = clock
    pub = publisher(api, clock)
    await pub.reconcile([engine()])

    class Serving:
        def get(self, job_id: str) -> object | None:
            return object()

    ks = KubeSync(api.view(kl.CONTROLLER_FIELD_MANAGER), ["tiny"], Serving(), NoJobs(), clock, namespace=NS)
    await ks.step()
    api.down = True
    for _ in range(6):
        clock.now += 10
        await ks.step()
        await pub.step()
    assert not ks.status().reachable
    api.down = False
    clock.now += 10
    await ks.step()  # the first round after: the Lease is 70 s old, but nobody could renew it
    assert api.names("Node") == [pub.node_name]
    clock.now += 25
    await pub.step()  # the agent's backoff ends: it renews
    for _ in range(5):
        clock.now += 10
        await ks.step()
        await pub.step()
    assert api.names("Node") == [pub.node_name] and ks.status().nodes_deleted == 0
    # The control: an agent that stays silent after the outage loses its Node one duration later.
    api.down = True
    clock.now += 10
    await ks.step()
    api.down = False
    for _ in range(3):
        clock.now += 10
        await ks.step()
    assert api.names("Node") == [pub.node_name]  # 20 s since the first round that could see
    clock.now += 25
    await ks.step()
    assert api.names("Node") == [] and ks.status().nodes_deleted == 1
