"""The FAKE API server's models of what a real kube-apiserver and its controllers do (tests/fakes/kube.py), each
on its own, so that the tests of slinfer against the fake test against the behaviour a real server showed
(issue 32: a v1.32 control plane built here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from slinfer.kube.api import Conflict, Rejected
from tests.fakes.kube import (
    DEFAULT_MANAGER,
    PSA_ENFORCE,
    SERVICE_NAME_LABEL,
    SLICE_CONTROLLER,
    SLICE_MANAGED_BY,
    FakeKubeAPI,
)

NS = "slinfer"
ROOT = Path(__file__).resolve().parents[2]


def service(name: str, selector: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"apiVersion": "v1", "kind": "Service",
                            "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "slinfer",
                                                                  "team": "ml"}},
                            "spec": {"ports": [{"name": "http", "port": 80}], **spec}}
    if selector:
        body["spec"]["selector"] = selector
    return body


def pod(name: str, node: str = "n1", host: bool = True, labels: dict[str, str] | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "engine", "image": "x"}
    if host:
        container["ports"] = [{"name": "http", "containerPort": 8000, "hostPort": 8000}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"nodeName": node, "hostNetwork": host, "containers": [container]}}


def node(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}


def slices(api: FakeKubeAPI) -> dict[str, dict[str, Any]]:
    return {n: api.stored("EndpointSlice", n, NS) or {} for n in api.names("EndpointSlice", NS)}


async def test_the_endpointslice_controller_copies_a_services_labels_onto_its_slice() -> None:
    api = FakeKubeAPI()
    await api.create("Service", service("web", {"app": "web"}), NS)
    await api.create("Service", service("plain"), NS)  # no selector: the controller makes no slice for it
    (name, made), = slices(api).items()
    assert name.startswith("web-") and name != "web"
    assert made["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "slinfer", "team": "ml",
                                          SERVICE_NAME_LABEL: "web", SLICE_MANAGED_BY: SLICE_CONTROLLER}
    # Someone deletes it: the controller makes another after the next write.
    await api.delete("EndpointSlice", name, NS)
    await api.create("Node", node("n1"))
    (again,) = slices(api)
    assert again.startswith("web-")
    # A slice someone else manages is left alone; the Service's own goes with the Service.
    await api.create("EndpointSlice", {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                                       "metadata": {"name": "mine", "labels": {SERVICE_NAME_LABEL: "web",
                                                                               SLICE_MANAGED_BY: "me"}},
                                       "addressType": "IPv4", "endpoints": []}, NS)
    await api.delete("Service", "web", NS)
    assert list(slices(api)) == ["mine"]


async def test_an_endpointslice_lists_the_selected_pods_with_an_address() -> None:
    api = FakeKubeAPI()
    await api.create("Service", service("web", {"app": "web"}), NS)
    await api.create("Pod", pod("p1", labels={"app": "web"}), NS)
    await api.create("Pod", pod("p2", labels={"app": "other"}), NS)
    for name in ("p1", "p2"):
        await api.patch("Pod", name, {"status": {"podIP": "10.0.0.7", "conditions": [
            {"type": "Ready", "status": "True"}]}}, NS, subresource="status")
    (made,) = slices(api).values()
    assert [e["targetRef"]["name"] for e in made["endpoints"]] == ["p1"]
    assert made["endpoints"][0]["conditions"] == {"ready": True}


@pytest.mark.parametrize(("address", "where"), [("127.0.0.1", "loopback"), ("::1", "loopback"),
                                                ("169.254.0.9", "link-local"), ("0.0.0.0", "unspecified")])
async def test_an_endpointslice_address_in_a_forbidden_range_is_422(address: str, where: str) -> None:
    api = FakeKubeAPI()
    body = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "gw"},
            "addressType": "IPv6" if ":" in address else "IPv4",
            "endpoints": [{"addresses": [address]}], "ports": []}
    with pytest.raises(Rejected) as err:
        await api.create("EndpointSlice", body, NS)
    assert err.value.status == 422
    assert f'Invalid value: "{address}": may not be in the {where} range' in str(err.value)
    assert api.names("EndpointSlice", NS) == []
    # A routable address is stored (positive control), and patching it to loopback is refused too.
    body["endpoints"] = [{"addresses": ["fd00::5" if ":" in address else "10.0.0.5"]}]
    await api.create("EndpointSlice", body, NS)
    with pytest.raises(Rejected):
        await api.patch("EndpointSlice", "gw", {"endpoints": [{"addresses": [address]}]}, NS)


async def test_defaults_are_filled_in_on_write_and_a_no_op_patch_stores_nothing() -> None:
    api = FakeKubeAPI()
    made = await api.create("Service", service("ext", type="ExternalName", externalName="h.example.org"), NS)
    assert made["spec"]["ports"] == [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}]
    assert "clusterIP" not in made["spec"]
    ip = await api.create("Service", service("ip"), NS)
    assert ip["spec"]["type"] == "ClusterIP" and ip["spec"]["clusterIP"].startswith("10.96.")
    again = await api.patch("Service", "ip", {"spec": {"ports": [{"name": "http", "port": 80}]}}, NS)
    assert again["spec"]["clusterIP"] == ip["spec"]["clusterIP"]  # kept across updates
    assert again["metadata"]["resourceVersion"] == ip["metadata"]["resourceVersion"]  # nothing changed
    changed = await api.patch("Service", "ip", {"spec": {"ports": [{"name": "http", "port": 81}]}}, NS)
    assert changed["metadata"]["resourceVersion"] != ip["metadata"]["resourceVersion"]
    p = await api.create("Pod", pod("p"), NS)
    assert (p["spec"]["dnsPolicy"], p["spec"]["terminationGracePeriodSeconds"]) == ("ClusterFirst", 30)
    assert p["spec"]["containers"][0]["ports"][0]["protocol"] == "TCP"


async def test_graceful_deletion_marks_a_bound_pod_and_force_removes_it() -> None:
    api = FakeKubeAPI(clock=lambda: 1_700_000_000.0)
    await api.create("Pod", pod("p"), NS)
    await api.delete("Pod", "p", NS)
    marked = api.stored("Pod", "p", NS)
    assert marked is not None
    assert marked["metadata"]["deletionTimestamp"] == "2023-11-14T22:13:50Z"  # now + 30 s
    assert marked["metadata"]["deletionGracePeriodSeconds"] == 30
    with pytest.raises(Conflict):
        await api.create("Pod", pod("p"), NS)  # the name is taken while it is Terminating
    await api.delete("Pod", "p", NS, grace_period_s=0)
    assert api.stored("Pod", "p", NS) is None


async def test_garbage_collection_marks_pods_of_a_deleted_node_and_the_pod_gc_spares_a_node_made_again() -> None:
    api = FakeKubeAPI()
    n = await api.create("Node", node("n1"))
    owner = [{"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": n["metadata"]["uid"]}]
    body = pod("p")
    body["metadata"]["ownerReferences"] = owner
    await api.create("Pod", body, NS)
    await api.create("Lease", {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                               "metadata": {"name": "n1", "ownerReferences": owner}, "spec": {}}, "kube-node-lease")
    await api.delete("Node", "n1")
    # The garbage collector's pass alone (the pod GC's orphan rule has not run yet).
    assert api.collect_garbage(pod_gc=False) == [("Lease", "kube-node-lease", "n1"), ("Pod", NS, "p")]
    assert api.stored("Pod", "p", NS)["metadata"]["deletionTimestamp"]  # type: ignore[index]
    assert api.stored("Lease", "n1", "kube-node-lease") is None
    # A Node of that name is back: the pod GC leaves the Terminating Pod, which nothing will finish.
    await api.create("Node", node("n1"))
    api.collect_garbage()
    assert api.stored("Pod", "p", NS) is not None
    # Without the Node, the pod GC deletes it (positive control).
    await api.delete("Node", "n1")
    assert ("Pod", NS, "p") in api.collect_garbage()
    assert api.stored("Pod", "p", NS) is None


async def test_pod_security_admission_on_a_labelled_namespace() -> None:
    api = FakeKubeAPI(namespace_labels={NS: {PSA_ENFORCE: "baseline"}, "free": {PSA_ENFORCE: "privileged"}})
    with pytest.raises(Rejected) as err:
        await api.create("Pod", pod("p"), NS)
    assert err.value.status == 403
    assert ('violates PodSecurity "baseline:latest": host namespaces (hostNetwork=true), hostPort '
            '(container "engine" uses hostPort 8000)') in str(err.value)
    await api.create("Pod", pod("q", host=False), NS)  # nothing of the host: admitted
    await api.create("Pod", pod("p"), "free")
    await api.create("Pod", pod("p"), "unlabelled")
    assert api.names("Pod") == ["p", "p", "q"]


def test_the_shipped_namespace_admits_engine_pods() -> None:
    (ns,) = [d for d in yaml.safe_load_all((ROOT / "packaging/kubernetes/namespace.yaml").read_text()) if d]
    assert ns["metadata"]["labels"][PSA_ENFORCE] == "privileged"


async def test_field_managers_are_recorded_per_writer() -> None:
    api = FakeKubeAPI()
    agent, controller = api.view("slinfer-agent"), api.view("slinfer-controller")
    await agent.create("Node", node("n1"))
    await controller.patch("Node", "n1", {"metadata": {"labels": {"a": "b"}}})
    await agent.patch("Node", "n1", {"status": {"capacity": {"cpu": "4"}}}, subresource="status")
    await api.patch("Node", "n1", {"metadata": {"labels": {"c": "d"}}})
    assert api.managers("Node", "n1") == ["slinfer-agent", "slinfer-controller", "slinfer-agent", DEFAULT_MANAGER]
    fields = api.stored("Node", "n1")["metadata"]["managedFields"]  # type: ignore[index]
    assert fields[2]["subresource"] == "status"
    # A view reads the same store.
    assert (await controller.get("Node", "n1"))["metadata"]["labels"] == {"a": "b", "c": "d"}
