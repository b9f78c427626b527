"""Request-level tests: the exact HTTP requests the official client sends for slinfer, against a recording
server (PyPI kmock, see tests/fakes/kuberecorder.py), through `ClientKubeAPI` loaded from a kubeconfig file."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from slinfer.config import KubernetesConfig
from slinfer.kube import labels as kl
from slinfer.kube.api import MERGE_PATCH, ClientKubeAPI, Rejected, Unavailable, micro_time
from slinfer.kube.leader import LEADER_LEASE, LeaderElection
from slinfer.kube.objects import GATEWAY_SERVICE, GatewayEndpoint
from slinfer.kube.publisher import NodeIdentity, NodePublisher, PublishedEngine
from slinfer.kube.sync import KubeSync
from tests.fakes.kuberecorder import Recorder, recording_api_server, write_kubeconfig

NS = "slinfer"
NODE = "slinfer-gpu01"
POD = kl.pod_name(NODE, "4242")
LEASES = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
MICRO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def rec() -> AsyncIterator[Recorder]:
    async with recording_api_server() as recorder:
        # A real API server answers a create with the object's uid; kmock does not unless told.
        recorder.handler["post", "/api/v1/nodes"] << (lambda req: {
            **req.data, "metadata": {**req.data["metadata"], "uid": "node-uid-1"}})
        yield recorder


@pytest.fixture
def api(rec: Recorder, tmp_path: Path) -> ClientKubeAPI:
    path = write_kubeconfig(tmp_path / "kubeconfig", rec.url)
    return ClientKubeAPI.from_config(KubernetesConfig(enabled=True, kubeconfig=str(path), request_timeout_s=5))


def engine(ready: bool) -> PublishedEngine:
    return PublishedEngine(job_id="4242", model="llama-3.1-8b", port=20001, ready=ready, user="alice",
                           partition="gpu", pool=True, gpus=2, started_at=1_700_000_000.0)


async def test_agent_requests_register_renew_and_remove(rec: Recorder, api: ClientKubeAPI) -> None:
    clock = Clock(1_700_000_000.0)  # a whole second: the fraction must still be sent
    pub = NodePublisher(api, NodeIdentity("gpu01", "10.0.0.7", "gpu", "H100", 4), namespace=NS, clock=clock)

    await pub.reconcile([engine(ready=False)])
    assert pub.status().healthy, pub.status().text
    reqs = rec.requests()
    assert [r.line for r in reqs] == [
        f"GET /api/v1/nodes/{NODE}",
        "POST /api/v1/nodes",
        f"PATCH /api/v1/nodes/{NODE}/status",
        f"GET {LEASES}/{NODE}",
        f"POST {LEASES}",
        f"GET /api/v1/namespaces/{NS}/pods",
        f"POST /api/v1/namespaces/{NS}/pods",
        f"PATCH /api/v1/namespaces/{NS}/pods/{POD}/status",
    ]
    _, create_node, node_status, _, create_lease, list_pods, create_pod, pod_status = reqs
    assert create_node.content_type == "application/json"
    assert create_node.body == pub.node_object()
    assert node_status.content_type == MERGE_PATCH
    assert node_status.body["status"]["conditions"][0]["type"] == "Ready"
    assert node_status.body["status"]["capacity"] == {"nvidia.com/gpu": "4", "pods": "4"}
    lease = create_lease.body
    assert lease["spec"] == {"holderIdentity": NODE, "leaseDurationSeconds": 40,
                             "renewTime": "2023-11-14T22:13:20.000000Z"}
    assert lease["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": "node-uid-1"}]
    assert list_pods.query == {"labelSelector": f"{kl.MANAGED_BY}=slinfer,{kl.NODE}={NODE}"}
    assert create_pod.body["spec"]["nodeName"] == NODE
    assert create_pod.body["metadata"]["labels"][kl.JOB_ID] == "4242"
    assert create_pod.body["metadata"]["labels"][kl.MODEL] == "llama-3.1-8b"
    assert pod_status.content_type == MERGE_PATCH
    assert pod_status.body["status"]["podIP"] == "10.0.0.7"
    assert pod_status.body["status"]["phase"] == "Running"
    # kmock keeps what it was sent, so the Pod reads back with its status.
    assert rec.stored("v1/pods", NS, POD)["status"]["podIP"] == "10.0.0.7"  # type: ignore[index]

    mark = len(rec.requests())
    await pub.reconcile([engine(ready=True)])
    clock.now += 10
    await pub.step()
    later = rec.requests()[mark:]
    assert [r.line for r in later] == [f"PATCH /api/v1/namespaces/{NS}/pods/{POD}/status", f"PATCH {LEASES}/{NODE}"]
    ready = {c["type"]: c["status"] for c in later[0].body["status"]["conditions"]}
    assert ready["Ready"] == "True"
    renew = later[1]
    assert renew.content_type == MERGE_PATCH
    assert renew.body == {"spec": {"renewTime": "2023-11-14T22:13:30.000000Z"}}
    assert MICRO.match(renew.body["spec"]["renewTime"])

    mark = len(rec.requests())
    await pub.reconcile([])
    later = rec.requests()[mark:]
    assert [r.line for r in later] == [
        f"GET /api/v1/namespaces/{NS}/pods",
        f"DELETE /api/v1/namespaces/{NS}/pods/{POD}",
        f"DELETE {LEASES}/{NODE}",
        f"DELETE /api/v1/nodes/{NODE}",
    ]
    assert later[1].body == {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0}
    assert rec.stored("v1/nodes", None, NODE) is None
    assert rec.stored("v1/pods", NS, POD) is None


async def test_a_fractional_renew_time_keeps_six_digits(rec: Recorder, api: ClientKubeAPI) -> None:
    clock = Clock(1_700_000_000.5)
    pub = NodePublisher(api, NodeIdentity("gpu01", "10.0.0.7"), namespace=NS, clock=clock)
    await pub.reconcile([engine(ready=True)])
    create = next(r for r in rec.requests() if r.line == f"POST {LEASES}")
    assert create.body["spec"]["renewTime"] == "2023-11-14T22:13:20.500000Z"
    assert micro_time(clock.now) == "2023-11-14T22:13:20.500000Z"


async def test_controller_requests(rec: Recorder, api: ClientKubeAPI) -> None:
    class NoJobs:
        async def jobs(self) -> list:
            return []

    class NoEngines:
        def get(self, job_id: str) -> None:
            return None

    clock = Clock(1_700_000_000.0)
    ks = KubeSync(api, ["llama-3.1-8b"], NoEngines(), NoJobs(), clock, namespace=NS,
                  leader_election=LeaderElection(api, NS, "ctl-a", clock),
                  gateway=GatewayEndpoint("10.0.0.1", 8000))
    await ks.step()
    assert ks.status().healthy, ks.status().text
    assert ks.is_leader
    reqs = rec.requests()
    svc = kl.model_service_name("llama-3.1-8b")
    assert [r.line for r in reqs] == [
        f"GET /apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{LEADER_LEASE}",
        f"POST /apis/coordination.k8s.io/v1/namespaces/{NS}/leases",
        f"GET /api/v1/namespaces/{NS}/services",
        f"GET /apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices",
        f"POST /api/v1/namespaces/{NS}/services",
        f"POST /api/v1/namespaces/{NS}/services",
        f"POST /apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices",
        "GET /api/v1/nodes",
        f"GET {LEASES}",
        f"GET /api/v1/namespaces/{NS}/pods",
    ]
    lease = reqs[1].body
    assert lease["spec"]["holderIdentity"] == "ctl-a"
    assert lease["spec"]["renewTime"] == lease["spec"]["acquireTime"] == "2023-11-14T22:13:20.000000Z"
    assert reqs[4].body["metadata"]["name"] == svc
    assert reqs[4].body["spec"]["selector"] == kl.model_selector("llama-3.1-8b")
    assert reqs[5].body["metadata"]["name"] == GATEWAY_SERVICE
    assert reqs[6].body["endpoints"][0]["addresses"] == ["10.0.0.1"]
    assert reqs[7].query == {"labelSelector": f"{kl.COMPONENT}=node,{kl.MANAGED_BY}=slinfer"}

    mark = len(reqs)
    clock.now += 10
    await ks.step()
    later = rec.requests()[mark:]
    assert later[0].line == f"GET /apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{LEADER_LEASE}"
    assert later[1].line == f"PATCH /apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{LEADER_LEASE}"
    assert later[1].content_type == MERGE_PATCH
    assert later[1].body["spec"]["renewTime"] == "2023-11-14T22:13:30.000000Z"
    # Everything is in place: the second round only reads.
    assert {r.method for r in later[2:]} == {"GET"}


async def test_unreachable_server_is_unavailable(tmp_path: Path) -> None:
    path = write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9")  # discard port: refused
    api = ClientKubeAPI.from_config(KubernetesConfig(enabled=True, kubeconfig=str(path), request_timeout_s=2))
    with pytest.raises(Unavailable, match="GET /api/v1/nodes/x"):
        await api.get("Node", "x")
    # The publisher turns it into a status, never an exception.
    pub = NodePublisher(api, NodeIdentity("gpu01", "10.0.0.7"), namespace=NS)
    await pub.reconcile([engine(ready=True)])
    assert not pub.status().healthy and "GET /api/v1/nodes/slinfer-gpu01" in pub.status().text


def test_bad_kubeconfig_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("clusters: [")
    with pytest.raises(Rejected, match=str(bad)):
        ClientKubeAPI.from_config(KubernetesConfig(enabled=True, kubeconfig=str(bad)))
    with pytest.raises(Rejected, match="missing"):
        ClientKubeAPI.from_config(KubernetesConfig(enabled=True, kubeconfig=str(tmp_path / "missing")))


async def test_a_hanging_server_costs_one_timeout_not_several(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections (the kernel does) but never answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        path = write_kubeconfig(tmp_path / "kubeconfig", url)
        api = ClientKubeAPI.from_config(KubernetesConfig(enabled=True, kubeconfig=str(path), request_timeout_s=0.5))
        start = time.monotonic()
        with pytest.raises(Unavailable, match="timed out"):
            await api.get("Node", "x")
        assert time.monotonic() - start < 1.5  # urllib3's own retries would make it 2 s
    finally:
        listener.close()


async def test_writes_name_their_field_manager_and_a_replaced_token_file_is_read_again(tmp_path: Path) -> None:
    import json
    import os

    from aiohttp import web

    from tests.fakes.kuberecorder import kubeconfig

    seen: list[tuple[str, dict[str, str], str]] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append((request.method, dict(request.query), request.headers.get("Authorization", "")))
        return web.json_response({"metadata": {"name": "x"}})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        doc = kubeconfig(f"http://127.0.0.1:{port}")
        doc["users"][0]["user"] = {"tokenFile": "token"}  # relative to the kubeconfig, as kubectl reads it
        (tmp_path / "kubeconfig").write_text(json.dumps(doc))
        token = tmp_path / "token"
        token.write_text("first-token\n")
        api = ClientKubeAPI.from_config(KubernetesConfig(enabled=True, kubeconfig=str(tmp_path / "kubeconfig")),
                                        field_manager="slinfer-agent")
        await api.get("Node", "x")
        await api.create("Node", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "x"}})
        await api.patch("Node", "x", {"metadata": {"labels": {"a": "b"}}})
        token.write_text("second-token-after-rotation\n")
        os.utime(token, (time.time() + 5, time.time() + 5))
        await api.delete("Node", "x")
    finally:
        await runner.cleanup()
    assert [(m, q) for m, q, _ in seen] == [
        ("GET", {}), ("POST", {"fieldManager": "slinfer-agent"}), ("PATCH", {"fieldManager": "slinfer-agent"}),
        ("DELETE", {})]
    assert [a for _, _, a in seen] == ["Bearer first-token"] * 3 + ["Bearer second-token-after-rotation"]
