"""The RBAC manifests grant exactly what the code uses: every call the agent and the controller make in their
scenarios (run on the FAKE API server) is allowed by their Roles, and every verb the Roles grant is used."""

from __future__ import annotations

from pathlib import Path

import yaml

from slinfer.kube.api import KINDS, NODE_LEASE_NAMESPACE
from slinfer.kube.health import probe
from slinfer.kube.leader import LeaderElection
from slinfer.kube.objects import GatewayEndpoint
from slinfer.kube.publisher import NodeIdentity, NodePublisher, PublishedEngine
from slinfer.kube.sync import KubeSync
from tests.fakes.kube import Call, FakeKubeAPI

ROOT = Path(__file__).resolve().parents[2]
NS = "slinfer"

# (api group, resource, namespace or "" for cluster-wide, verb, resourceName or "")
Grant = tuple[str, str, str, str, str]


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def grants(path: Path) -> set[Grant]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    out: set[Grant] = set()
    for doc in docs:
        if doc["kind"] not in ("Role", "ClusterRole"):
            continue
        ns = doc["metadata"].get("namespace", "") if doc["kind"] == "Role" else ""
        for rule in doc["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        for name in rule.get("resourceNames") or [""]:
                            out.add((group, resource, ns, verb, name))
    return out


def needed(calls: list[Call]) -> set[Grant]:
    out = set()
    for c in calls:
        api_version = KINDS[c.kind].api_version
        group = api_version.rsplit("/", 1)[0] if "/" in api_version else ""
        resource = KINDS[c.kind].plural + (f"/{c.subresource}" if c.subresource else "")
        out.add((group, resource, c.namespace, c.verb, c.name if c.verb in ("get", "patch", "delete") else ""))
    return out


def allowed(need: Grant, have: set[Grant]) -> bool:
    group, resource, ns, verb, name = need
    return (group, resource, ns, verb, "") in have or (group, resource, ns, verb, name) in have


def engine(job: str, port: int, ready: bool = True) -> PublishedEngine:
    return PublishedEngine(job, "llama", port, ready, "u", "gpu", True)


async def agent_calls() -> list[Call]:
    clock = Clock()
    api = FakeKubeAPI(clock=clock)
    pub = NodePublisher(api, NodeIdentity("gpu01", "10.0.0.7", "gpu"), namespace=NS, clock=clock)
    await pub.reconcile([engine("1", 20001, ready=False)])  # register: Node, status, Lease, Pods
    await pub.reconcile([engine("1", 20001)])  # readiness
    await api.create("Pod", pub.pod_object(engine("2", 20002)), NS)  # appears unseen: create 409, get
    del api.calls[-1]  # the test's own call
    await pub.reconcile([engine("1", 20001), engine("2", 20002)])
    await api.patch("Node", pub.node_name, {"spec": {"taints": []}})  # drift: the agent patches its Node
    del api.calls[-1]
    clock.now += 60
    await pub.step()  # renew and resync
    await pub.reconcile([])  # unregister: delete Pods, Lease, Node
    return api.calls


async def controller_calls() -> list[Call]:
    clock = Clock()
    api = FakeKubeAPI(clock=clock)

    class Jobs:
        async def jobs(self) -> list:
            return []

    class Engines:
        def get(self, job_id: str) -> None:
            return None

    election = LeaderElection(api, NS, "a", clock)
    pub = NodePublisher(api, NodeIdentity("gpu01", "10.0.0.7"), namespace=NS, clock=clock)
    await pub.reconcile([engine("1", 20001)])
    mark = len(api.calls)
    ks = KubeSync(api, ["llama", "old"], Engines(), Jobs(), clock, namespace=NS, leader_election=election,
                  gateway=GatewayEndpoint("10.0.0.1", 8000))
    await ks.step()  # create the leader Lease, Services, EndpointSlice
    clock.now += 10
    ks = KubeSync(api, ["llama"], Engines(), Jobs(), clock, namespace=NS, leader_election=election,
                  gateway=GatewayEndpoint("10.0.0.2", 8000))
    await ks.step()  # renew; patch the EndpointSlice; delete a model's Service
    ks = KubeSync(api, ["llama"], Engines(), Jobs(), clock, namespace=NS, leader_election=election,
                  gateway=GatewayEndpoint("head.example.org", 8000))
    clock.now += 10
    await ks.step()  # patch the gateway Service to ExternalName, delete the EndpointSlice
    clock.now += 100
    await ks.step()  # the Pod's job has ended and the Lease expired: delete Pod, Lease, Node
    assert api.names("Node") == []
    # A standby announces itself, renews, and dies; the leader deletes its Lease; the other stops cleanly.
    standby = LeaderElection(api, NS, "b", clock, announce=True)
    await standby.step()
    clock.now += 10
    await standby.step()
    leader = LeaderElection(api, NS, "a", clock, announce=True)
    await leader.step()
    clock.now += 200
    await leader.step()
    await leader.release()
    await probe(api, NS, clock.now)  # slinfer status / doctor on a head node (the controller's credentials)
    return api.calls[mark:]


async def test_agent_rbac_grants_exactly_what_the_agent_uses() -> None:
    have = grants(ROOT / "packaging" / "kubernetes" / "agent-rbac.yaml")
    need = needed(await agent_calls())
    assert [n for n in need if not allowed(n, have)] == []
    used = {(g, r, ns, v) for g, r, ns, v, _ in need}
    assert sorted((g, r, ns, v) for g, r, ns, v, _ in have if (g, r, ns, v) not in used) == []
    assert all(ns in (NS, NODE_LEASE_NAMESPACE, "") for _, _, ns, _, _ in need)


async def test_controller_rbac_grants_exactly_what_the_controller_uses() -> None:
    have = grants(ROOT / "packaging" / "kubernetes" / "controller-rbac.yaml")
    need = needed(await controller_calls())
    assert [n for n in need if not allowed(n, have)] == []
    used = {(g, r, ns, v) for g, r, ns, v, _ in need}
    assert sorted((g, r, ns, v) for g, r, ns, v, _ in have if (g, r, ns, v) not in used) == []
