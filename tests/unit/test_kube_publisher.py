"""The agent's NodePublisher against the in-repo FAKE API server (tests/fakes/kube.py), with an injected clock."""

from __future__ import annotations

import asyncio
import re

import pytest

from slinfer.kube import labels as kl
from slinfer.kube.api import NODE_LEASE_NAMESPACE, NotFound, Rejected, micro_time
from slinfer.kube.publisher import NodeIdentity, NodePublisher, PublishedEngine
from tests.fakes.kube import FakeKubeAPI

NS = "slinfer"
NODE = "slinfer-gpu01"
MICRO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def identity() -> NodeIdentity:
    return NodeIdentity(slurm_node="gpu01", address="10.0.0.7", partition="gpu", gpu_model="NVIDIA H100 80GB HBM3",
                        gpu_count=4, kernel_version="6.1.0", os_image="Debian 12", machine_id="abc", boot_id="b")


def engine(job: str = "101", ready: bool = False, port: int = 20001, model: str = "llama-3.1-8b",
           pool: bool = True) -> PublishedEngine:
    return PublishedEngine(job_id=job, model=model, port=port, ready=ready, user="alice", partition="gpu",
                           pool=pool, gpus=1, started_at=1_700_000_000.0)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def api(clock: Clock) -> FakeKubeAPI:
    return FakeKubeAPI(clock=clock)


@pytest.fixture
def pub(api: FakeKubeAPI, clock: Clock) -> NodePublisher:
    return NodePublisher(api, identity(), namespace=NS, clock=clock)


def pod_of(api: FakeKubeAPI, job: str = "101") -> dict | None:
    return api.stored("Pod", kl.pod_name(NODE, job), NS)


async def test_first_engine_registers_node_lease_and_pod(api: FakeKubeAPI, pub: NodePublisher,
                                                         clock: Clock) -> None:
    await pub.reconcile([engine()])

    node = api.stored("Node", NODE)
    assert node is not None
    labels = node["metadata"]["labels"]
    assert labels[kl.NODE_ROLE] == ""
    assert labels[kl.PARTITION] == "gpu"
    assert labels[kl.GPU_PRODUCT] == "NVIDIA-H100-80GB-HBM3"
    assert labels[kl.GPU_COUNT] == "4"
    assert node["spec"]["taints"] == [{"key": kl.TAINT_KEY, "value": "true", "effect": "NoSchedule"}]
    status = node["status"]
    assert [(c["type"], c["status"]) for c in status["conditions"]] == [("Ready", "True")]
    assert {"type": "InternalIP", "address": "10.0.0.7"} in status["addresses"]
    assert status["capacity"][kl.GPU_RESOURCE] == "4"
    assert re.match(r"^v\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?$", status["nodeInfo"]["kubeletVersion"])

    lease = api.stored("Lease", NODE, NODE_LEASE_NAMESPACE)
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == NODE
    assert lease["spec"]["leaseDurationSeconds"] == 40
    assert MICRO.match(lease["spec"]["renewTime"])
    assert lease["spec"]["renewTime"] == micro_time(clock.now)
    assert lease["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": node["metadata"]["uid"]}]

    pod = pod_of(api)
    assert pod is not None
    assert pod["spec"]["nodeName"] == NODE
    assert pod["metadata"]["labels"][kl.MODEL] == "llama-3.1-8b"
    assert pod["metadata"]["labels"][kl.JOB_ID] == "101"
    assert pod["metadata"]["ownerReferences"][0]["uid"] == node["metadata"]["uid"]
    assert pod["status"]["phase"] == "Running"
    assert pod["status"]["podIP"] == "10.0.0.7"
    ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert ready["Ready"] == "False"
    assert pub.status().healthy and pub.status().registered


async def test_nothing_is_published_before_the_first_engine(api: FakeKubeAPI, pub: NodePublisher,
                                                            clock: Clock) -> None:
    await pub.step()
    assert api.calls == []
    await pub.reconcile([])
    assert api.names("Node") == []
    # Once it knows the server holds nothing of its own, an idle agent makes no calls at all.
    count = len(api.calls)
    clock.now += 600
    await pub.reconcile([])
    await pub.step()
    assert len(api.calls) == count


async def test_readiness_change_patches_only_the_pod_status(api: FakeKubeAPI, pub: NodePublisher) -> None:
    await pub.reconcile([engine()])
    before = len(api.calls)
    await pub.reconcile([engine(ready=True)])
    assert api.verbs()[before:] == [f"patch Pod/status {kl.pod_name(NODE, '101')}"]
    ready = {c["type"]: c["status"] for c in pod_of(api)["status"]["conditions"]}  # type: ignore[index]
    assert ready["Ready"] == "True" and ready["ContainersReady"] == "True"
    # Same state again: no call.
    await pub.reconcile([engine(ready=True)])
    assert len(api.calls) == before + 1


async def test_stopped_engine_pod_is_deleted_at_once_and_last_one_removes_the_node(
        api: FakeKubeAPI, pub: NodePublisher) -> None:
    await pub.reconcile([engine("101", ready=True), engine("102", port=20002, ready=True)])
    assert api.names("Pod", NS) == sorted([kl.pod_name(NODE, "101"), kl.pod_name(NODE, "102")])

    await pub.reconcile([engine("102", port=20002, ready=True)])
    deletes = [c for c in api.calls if c.verb == "delete"]
    assert [(c.kind, c.name, c.body) for c in deletes] == [("Pod", kl.pod_name(NODE, "101"), {"gracePeriodSeconds": 0})]
    # Grace 0 matters: the fake, like the API server, only marks a bound Pod deleted otherwise.
    assert api.names("Pod", NS) == [kl.pod_name(NODE, "102")]
    assert api.stored("Node", NODE) is not None

    await pub.reconcile([])
    assert api.names("Pod", NS) == []
    assert api.stored("Node", NODE) is None
    assert api.stored("Lease", NODE, NODE_LEASE_NAMESPACE) is None
    assert not pub.status().registered


async def test_lease_renewal_follows_the_interval(api: FakeKubeAPI, pub: NodePublisher, clock: Clock) -> None:
    await pub.reconcile([engine()])
    start = clock.now

    def renewals() -> list[str]:
        return [c.body["spec"]["renewTime"] for c in api.calls  # type: ignore[index]
                if c.verb == "patch" and c.kind == "Lease"]

    assert renewals() == []
    clock.now = start + 9.9
    await pub.step()
    assert renewals() == []
    clock.now = start + 10.0
    await pub.step()
    assert renewals() == [micro_time(start + 10.0)]
    clock.now = start + 15.0
    await pub.step()
    assert len(renewals()) == 1
    clock.now = start + 20.0
    await pub.step()
    assert renewals() == [micro_time(start + 10.0), micro_time(start + 20.0)]
    assert all(MICRO.match(r) for r in renewals())
    # A whole second still carries six fraction digits (isoformat would drop them).
    assert renewals()[0].endswith(".000000Z")
    assert api.stored("Lease", NODE, NODE_LEASE_NAMESPACE)["spec"]["renewTime"] == micro_time(start + 20.0)  # type: ignore[index]


async def test_run_loop_renews_with_injected_sleep(api: FakeKubeAPI, clock: Clock) -> None:
    start = clock.now
    passed = asyncio.Event()

    async def sleep(seconds: float) -> None:
        clock.now += seconds
        if clock.now >= start + 65:
            passed.set()
        await asyncio.sleep(0)

    pub = NodePublisher(api, identity(), namespace=NS, clock=clock, sleep=sleep)
    await pub.reconcile([engine(ready=True)])
    task = asyncio.create_task(pub.run())
    await asyncio.wait_for(passed.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    times = [c.body["spec"]["renewTime"] for c in api.calls  # type: ignore[index]
             if c.verb == "patch" and c.kind == "Lease"]
    # Every 10 s (the 60 s resync also renews, on the same beat).
    assert times[:6] == [micro_time(start + 10 * i) for i in range(1, 7)]


async def test_conflict_on_create_adopts_a_matching_pod_and_replaces_a_different_one(
        api: FakeKubeAPI, pub: NodePublisher) -> None:
    await pub.reconcile([engine("101")])
    # Pods that appeared after the publisher's last list (a create whose answer was lost, say).
    await api.create("Pod", pub.pod_object(engine("102", port=20002)), NS)
    await api.create("Pod", pub.pod_object(engine("103", port=29999)), NS)
    adopted = api.stored("Pod", kl.pod_name(NODE, "102"), NS)["metadata"]["uid"]  # type: ignore[index]
    mark = len(api.calls)

    await pub.reconcile([engine("101"), engine("102", port=20002), engine("103", port=20003)])
    assert pub.status().healthy
    p102, p103 = kl.pod_name(NODE, "102"), kl.pod_name(NODE, "103")
    assert [f"{c.verb} {c.name}" for c in api.calls[mark:] if c.kind == "Pod" and not c.subresource] == [
        f"create {p102}", f"get {p102}", f"create {p103}", f"get {p103}", f"delete {p103}", f"create {p103}"]
    assert api.stored("Pod", p102, NS)["metadata"]["uid"] == adopted  # type: ignore[index]
    port = api.stored("Pod", p103, NS)["spec"]["containers"][0]["ports"][0]  # type: ignore[index]
    assert port["containerPort"] == 20003
    # Both got their status, so both show Running.
    assert api.stored("Pod", p102, NS)["status"]["phase"] == "Running"  # type: ignore[index]
    assert api.stored("Pod", p103, NS)["status"]["phase"] == "Running"  # type: ignore[index]


async def test_engine_restarted_on_another_port_gets_a_new_pod(api: FakeKubeAPI, pub: NodePublisher) -> None:
    await pub.reconcile([engine(port=20001, ready=True)])
    first = pod_of(api)["metadata"]["uid"]  # type: ignore[index]
    await pub.reconcile([engine(port=20005, ready=False)])
    pod = pod_of(api)
    assert pod["metadata"]["uid"] != first  # type: ignore[index]
    assert pod["spec"]["containers"][0]["ports"][0]["containerPort"] == 20005  # type: ignore[index]
    # The fake refuses spec changes (as the API server does), so no patch of the spec was ever tried.
    assert not [c for c in api.calls if c.verb == "patch" and c.kind == "Pod" and not c.subresource]


async def test_api_down_only_delays_with_backoff_and_recovers(api: FakeKubeAPI, pub: NodePublisher,
                                                              clock: Clock) -> None:
    api.down = True
    start = clock.now
    await pub.reconcile([engine(ready=True)])  # must not raise
    st = pub.status()
    assert not st.healthy and st.failures == 1
    assert "connection refused" in st.text and "retry in 1 s" in st.text

    # While backing off, calls only record the wish; no request is made.
    count = len(api.calls)
    clock.now = start + 0.5
    await pub.reconcile([engine(ready=True), engine("102", port=20002)])
    await pub.step()
    assert len(api.calls) == count

    delays = []
    for _ in range(6):
        clock.now = pub.status().retry_at
        before = clock.now
        await pub.step()
        delays.append(pub.status().retry_at - before)
    assert delays == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert pub.status().failures == 7

    api.down = False
    clock.now = pub.status().retry_at
    await pub.step()
    st = pub.status()
    assert st.healthy and st.registered and st.pods == 2
    assert api.stored("Node", NODE) is not None
    assert api.names("Pod", NS) == sorted([kl.pod_name(NODE, "101"), kl.pod_name(NODE, "102")])


async def test_refusing_api_is_reported_not_raised(api: FakeKubeAPI, pub: NodePublisher) -> None:
    api.fail_next("get", "Node", Rejected('nodes "slinfer-gpu01" is forbidden: User cannot get resource', 403,
                                          "Forbidden"))
    await pub.reconcile([engine()])
    st = pub.status()
    assert not st.healthy
    assert "forbidden" in st.last_error


async def test_node_deleted_behind_its_back_is_registered_again(api: FakeKubeAPI, pub: NodePublisher,
                                                                clock: Clock) -> None:
    await pub.reconcile([engine(ready=True)])
    old_uid = api.stored("Node", NODE)["metadata"]["uid"]  # type: ignore[index]
    await api.delete("Node", NODE)
    assert sorted(k[0] for k in api.collect_garbage()) == ["Lease", "Pod"]  # what the cluster's GC does

    clock.now += 10
    await pub.step()  # the renewal finds no Lease, so everything is registered again
    node = api.stored("Node", NODE)
    assert node is not None and node["metadata"]["uid"] != old_uid
    lease = api.stored("Lease", NODE, NODE_LEASE_NAMESPACE)
    assert lease["metadata"]["ownerReferences"][0]["uid"] == node["metadata"]["uid"]  # type: ignore[index]
    pod = pod_of(api)
    assert pod is not None and pod["metadata"]["ownerReferences"][0]["uid"] == node["metadata"]["uid"]
    assert pub.status().healthy


async def test_pod_deleted_by_someone_is_restored_at_resync(api: FakeKubeAPI, pub: NodePublisher,
                                                            clock: Clock) -> None:
    await pub.reconcile([engine(ready=True)])
    await api.delete("Pod", kl.pod_name(NODE, "101"), NS, grace_period_s=0)
    clock.now += 30
    await pub.reconcile([engine(ready=True)])
    assert pod_of(api) is None  # trusted cache until the resync
    clock.now += 30
    await pub.step()
    assert pod_of(api) is not None


async def test_restarted_agent_adopts_what_is_there_and_cleans_the_rest(api: FakeKubeAPI, clock: Clock) -> None:
    first = NodePublisher(api, identity(), namespace=NS, clock=clock)
    await first.reconcile([engine("101", ready=True), engine("102", port=20002, ready=True)])
    uid = pod_of(api, "101")["metadata"]["uid"]  # type: ignore[index]

    second = NodePublisher(api, identity(), namespace=NS, clock=clock)  # the agent restarted; job 102 ended
    mark = len(api.calls)
    await second.reconcile([engine("101", ready=True)])
    later = api.calls[mark:]
    assert not [c for c in later if c.verb == "create"]
    assert [(c.verb, c.name) for c in later if c.kind == "Pod" and c.verb != "list"] == [
        ("delete", kl.pod_name(NODE, "102"))]
    assert pod_of(api, "101")["metadata"]["uid"] == uid  # type: ignore[index]


async def test_a_new_agent_with_nothing_to_serve_removes_a_leftover_node(api: FakeKubeAPI, clock: Clock) -> None:
    first = NodePublisher(api, identity(), namespace=NS, clock=clock)
    await first.reconcile([engine(ready=True)])
    second = NodePublisher(api, identity(), namespace=NS, clock=clock)
    await second.reconcile([])
    assert api.stored("Node", NODE) is None and pod_of(api) is None


async def test_node_create_conflict_from_a_lost_answer_is_fine(api: FakeKubeAPI, pub: NodePublisher) -> None:
    await api.create("Node", pub.node_object())  # an earlier create whose answer never came back ...
    api.fail_next("get", "Node", NotFound("nodes not found", 404))  # ... and a read that raced it
    mark = len(api.calls)
    await pub.reconcile([engine()])
    assert pub.status().healthy
    assert [c.verb for c in api.calls[mark:] if c.kind == "Node" and not c.subresource] == ["get", "create", "get"]
    node = api.stored("Node", NODE)
    lease = api.stored("Lease", NODE, NODE_LEASE_NAMESPACE)
    assert lease["metadata"]["ownerReferences"][0]["uid"] == node["metadata"]["uid"]  # type: ignore[index]


def test_from_engine_maps_the_agents_engines() -> None:
    from slinfer.v1 import engine_pb2 as pb

    base = dict(job_id="9", model="m", base_url="http://10.0.0.7:20017", user="u", partition="p", pool=True,
                gpus=["0", "1"], started_at=5.0)
    assert PublishedEngine.from_engine(pb.Engine(state=pb.READY, **base)) == PublishedEngine(
        "9", "m", 20017, True, "u", "p", True, 2, 5.0)
    assert PublishedEngine.from_engine(pb.Engine(state=pb.STARTING, **base)).ready is False  # type: ignore[union-attr]
    for state in (pb.FAILED, pb.STOPPING, pb.STOPPED):
        assert PublishedEngine.from_engine(pb.Engine(state=state, **base)) is None
    assert PublishedEngine.from_engine(pb.Engine(state=pb.READY, **{**base, "base_url": ""})) is None


async def test_resync_restores_its_labels_and_taint_but_keeps_other_taints(api: FakeKubeAPI, pub: NodePublisher,
                                                                          clock: Clock) -> None:
    await pub.reconcile([engine()])
    unreachable = {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}
    await api.patch("Node", NODE, {"metadata": {"labels": {kl.PARTITION: "other", "site": "x"}},
                                   "spec": {"taints": [unreachable]}})
    clock.now += 60
    await pub.step()
    node = api.stored("Node", NODE)
    assert node["metadata"]["labels"][kl.PARTITION] == "gpu"  # type: ignore[index]
    assert node["metadata"]["labels"]["site"] == "x"  # type: ignore[index]
    assert node["spec"]["taints"] == [unreachable, {"key": kl.TAINT_KEY, "value": "true", "effect": "NoSchedule"}]  # type: ignore[index]
    mark = len(api.calls)
    clock.now += 60
    await pub.step()  # nothing to restore now: no patch of the Node itself
    assert [c for c in api.calls[mark:] if c.kind == "Node" and c.verb == "patch" and not c.subresource] == []


async def test_notify_returns_at_once_and_run_publishes(api: FakeKubeAPI, pub: NodePublisher) -> None:
    task = asyncio.create_task(pub.run())
    await asyncio.sleep(0.01)
    assert api.calls == []  # nothing to serve, nothing published
    pub.notify([engine(ready=True)])
    assert api.calls == []  # notify itself makes no call
    for _ in range(100):
        await asyncio.sleep(0.01)
        if pod_of(api) is not None:
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pod_of(api) is not None and api.stored("Node", NODE) is not None
