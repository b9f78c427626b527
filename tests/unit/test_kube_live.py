"""Opt-in test against a real Kubernetes API server: runs only when KUBECONFIG is set.

It registers a uniquely named Node, renews its Lease, publishes a Pod and a model Service in the namespace
SLINFER_LIVE_NAMESPACE (default `slinfer-livetest`, which must exist: `kubectl create namespace
slinfer-livetest`), checks what the API server stored (and, when the cluster runs the EndpointSlice
controller, that the Service found the Pod), then removes everything it made. It never runs the controller's
garbage collection, which would act on other slinfer Nodes of that cluster.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid

import pytest

from slinfer.config import KubernetesConfig
from slinfer.kube import labels as kl
from slinfer.kube.api import NODE_LEASE_NAMESPACE, ClientKubeAPI, KubeError, NotFound
from slinfer.kube.publisher import NodeIdentity, NodePublisher, PublishedEngine
from slinfer.kube.sync import KubeSync

pytestmark = pytest.mark.skipif(
    not os.environ.get("KUBECONFIG"),
    reason="live Kubernetes test: set KUBECONFIG to a cluster where slinfer may create a Node, a Lease, "
           "a Pod and a Service (and the namespace SLINFER_LIVE_NAMESPACE, default slinfer-livetest, exists)")

NS = os.environ.get("SLINFER_LIVE_NAMESPACE", "slinfer-livetest")


async def test_live_register_renew_publish_and_remove() -> None:
    api = ClientKubeAPI.from_config(KubernetesConfig(enabled=True, kubeconfig=os.environ["KUBECONFIG"]))
    tag = uuid.uuid4().hex[:8]
    ident = NodeIdentity.detect(f"livetest-{tag}", "10.255.255.1", "livetest", "Test GPU", 2)
    node = ident.node_name
    model = f"livetest-{tag}"
    engine = PublishedEngine(job_id=tag, model=model, port=28001, ready=True, user="livetest", partition="livetest",
                             pool=True, gpus=1, started_at=time.time())
    pub = NodePublisher(api, ident, namespace=NS, renew_interval_s=1.0)
    sync = KubeSync(api, [model], _NoEngines(), _NoJobs(), namespace=NS)
    try:
        await pub.reconcile([engine])
        assert pub.status().healthy, pub.status().text

        stored = await api.get("Node", node)
        assert {"type": "InternalIP", "address": "10.255.255.1"} in stored["status"]["addresses"]
        assert stored["status"]["capacity"][kl.GPU_RESOURCE] == "2"
        lease = await api.get("Lease", node, NODE_LEASE_NAMESPACE)
        assert lease["metadata"]["ownerReferences"][0]["uid"] == stored["metadata"]["uid"]
        first = lease["spec"]["renewTime"]
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$", first)

        await asyncio.sleep(1.2)
        await pub.step()
        assert pub.status().healthy, pub.status().text
        renewed = (await api.get("Lease", node, NODE_LEASE_NAMESPACE))["spec"]["renewTime"]
        assert renewed > first

        pod = await api.get("Pod", kl.pod_name(node, tag), NS)
        assert pod["spec"]["nodeName"] == node
        assert pod["status"]["phase"] == "Running"
        assert pod["status"]["podIP"] == "10.255.255.1"
        assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"] == "True"

        await sync.sync_services()
        service = kl.model_service_name(model)
        assert (await api.get("Service", service, NS))["spec"]["selector"] == kl.model_selector(model)
        addresses: list[str] = []
        for _ in range(20):
            slices = await api.list("EndpointSlice", NS, f"kubernetes.io/service-name={service}")
            addresses = [a for s in slices for e in s.get("endpoints") or [] for a in e.get("addresses", [])]
            if addresses:
                break
            await asyncio.sleep(0.5)
        if addresses:
            assert addresses == ["10.255.255.1"]

        await pub.reconcile([])
        with pytest.raises(NotFound):
            await api.get("Node", node)
        with pytest.raises(NotFound):
            await api.get("Pod", kl.pod_name(node, tag), NS)
    finally:
        for kind, name, ns in (("Pod", kl.pod_name(node, tag), NS), ("Service", kl.model_service_name(model), NS),
                               ("Lease", node, NODE_LEASE_NAMESPACE), ("Node", node, "")):
            try:
                await api.delete(kind, name, ns, grace_period_s=0)
            except KubeError:
                pass
        api.close()


class _NoEngines:
    def get(self, job_id: str) -> None:
        return None


class _NoJobs:
    async def jobs(self) -> list:
        return []
