"""slinfer's objects in Kubernetes, built as plain JSON: the agent's Node, node Lease and engine Pods, the
controller's model and gateway Services, the gateway's EndpointSlice and the leader Lease.

Responsible for: what each object looks like, given who the host is and what it serves. Every function here is
pure (the clock's reading comes in as an argument), so tests validate the objects against the API's schemas.
Not responsible for: names and label keys (labels.py), sending anything (publisher.py, sync.py, leader.py), or
deciding which objects should exist.
"""

from __future__ import annotations

import ipaddress
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from slinfer import __version__ as slinfer_version
from slinfer.kube import labels as kl
from slinfer.kube.api import NODE_LEASE_NAMESPACE, micro_time, rfc3339
from slinfer.v1 import engine_pb2

# The Kubernetes minor this node's API use follows; kubeletVersion must look like semver for kubectl and tools.
KUBE_COMPAT = "1.30.0"
# What an engine Pod shows as its container: nothing pulls it (the agent runs the engine), kubectl displays it.
ENGINE_IMAGE = "slinfer/vllm-engine"
ENGINE_CONTAINER = "engine"

# platform.machine() names in Kubernetes' GOARCH spelling, for the kubernetes.io/arch label.
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "ppc64le": "ppc64le"}


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _mem_total_kib() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            try:
                return int(line.split()[1])
            except (IndexError, ValueError):
                return 0
    return 0


def _os_image() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return platform.system()


@dataclass(frozen=True)
class NodeIdentity:
    """Who this host is, as the Node shows it."""

    slurm_node: str
    address: str
    partition: str = ""
    gpu_model: str = ""
    gpu_count: int = 0
    kernel_version: str = ""
    os_image: str = ""
    architecture: str = "amd64"
    machine_id: str = ""
    boot_id: str = ""
    # The host's CPUs and memory, for the Node's capacity (0: not known, not shown).
    cpus: int = 0
    memory_kib: int = 0

    @property
    def node_name(self) -> str:
        return kl.node_name(self.slurm_node)

    @classmethod
    def detect(cls, slurm_node: str, address: str, partition: str = "", gpu_model: str = "",
               gpu_count: int = 0) -> NodeIdentity:
        """Fills the host facts (kernel, OS, architecture, machine and boot ids) from this machine."""
        return cls(slurm_node=slurm_node, address=address, partition=partition, gpu_model=gpu_model,
                   gpu_count=gpu_count, kernel_version=platform.release(), os_image=_os_image(),
                   architecture=_ARCH.get(platform.machine(), platform.machine()),
                   machine_id=_read("/etc/machine-id"), boot_id=_read("/proc/sys/kernel/random/boot_id"),
                   cpus=os.cpu_count() or 0, memory_kib=_mem_total_kib())


@dataclass(frozen=True)
class PublishedEngine:
    """An engine as Kubernetes shows it: one Pod."""

    job_id: str
    model: str
    port: int
    ready: bool
    user: str
    partition: str
    # Pool engines are what the model Services select; private ones are shown but not selected.
    pool: bool
    gpus: int = 0
    started_at: float = 0.0

    @classmethod
    def from_engine(cls, engine: engine_pb2.Engine) -> PublishedEngine | None:
        """The Pod view of an agent's engine; None for one that has no process to show (failed, stopping)."""
        if engine.state not in (engine_pb2.STARTING, engine_pb2.READY):
            return None
        port = urlsplit(engine.base_url).port
        if port is None:
            return None
        return cls(job_id=engine.job_id, model=engine.model, port=port, ready=engine.state == engine_pb2.READY,
                   user=engine.user, partition=engine.partition, pool=engine.pool, gpus=len(engine.gpus),
                   started_at=engine.started_at)


# The Service (and EndpointSlice) that names the controller's gateway inside the cluster.
GATEWAY_SERVICE = "slinfer-gateway"
# Model Services listen on plain HTTP's port, so that clients in the cluster need no port in the URL.
MODEL_SERVICE_PORT = 80


@dataclass(frozen=True)
class GatewayEndpoint:
    """Where the cluster reaches the gateway: an IP gets an EndpointSlice, a DNS name an ExternalName Service."""

    address: str
    port: int


def node(ident: NodeIdentity) -> dict[str, Any]:
    labels = {
        kl.MANAGED_BY: kl.MANAGER,
        kl.COMPONENT: kl.COMPONENT_NODE,
        kl.NODE_ROLE: "",
        kl.SLURM_NODE: kl.label_value(ident.slurm_node),
        kl.GPU_COUNT: str(ident.gpu_count),
        "kubernetes.io/hostname": ident.node_name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": ident.architecture,
    }
    if ident.partition:
        labels[kl.PARTITION] = kl.label_value(ident.partition)
    if ident.gpu_model:
        labels[kl.GPU_PRODUCT] = kl.label_value(ident.gpu_model.replace(" ", "-"))
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": ident.node_name, "labels": labels,
                     "annotations": {"slinfer.io/address": ident.address}},
        "spec": {"taints": [{"key": kl.TAINT_KEY, "value": "true", "effect": "NoSchedule"}]},
    }


def node_status(ident: NodeIdentity, now: float, registered_at: float) -> dict[str, Any]:
    gpus = str(ident.gpu_count)
    resources = {kl.GPU_RESOURCE: gpus, "pods": str(max(1, ident.gpu_count))}
    # Without cpu and memory, `kubectl describe node` divides by zero (-9223372036854775808%).
    if ident.cpus:
        resources["cpu"] = str(ident.cpus)
    if ident.memory_kib:
        resources["memory"] = f"{ident.memory_kib}Ki"
    return {"status": {
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "SlinferAgentReady",
            "message": "slinfer agent is serving engines",
            "lastHeartbeatTime": rfc3339(now), "lastTransitionTime": rfc3339(registered_at),
        }],
        "addresses": [{"type": "InternalIP", "address": ident.address},
                      {"type": "Hostname", "address": ident.slurm_node}],
        "capacity": resources,
        "allocatable": dict(resources),
        "nodeInfo": {
            "kubeletVersion": f"v{KUBE_COMPAT}-slinfer-{slinfer_version}",
            "kubeProxyVersion": "",
            "containerRuntimeVersion": f"slinfer://{slinfer_version}",
            "operatingSystem": "linux",
            "architecture": ident.architecture,
            "kernelVersion": ident.kernel_version,
            "osImage": ident.os_image,
            "machineID": ident.machine_id,
            "systemUUID": ident.machine_id,
            "bootID": ident.boot_id,
        },
    }}


def node_lease(ident: NodeIdentity, duration_s: int, now: float, node_uid: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": ident.node_name, "namespace": NODE_LEASE_NAMESPACE,
                            "labels": {kl.MANAGED_BY: kl.MANAGER, kl.COMPONENT: kl.COMPONENT_NODE}}
    if node_uid:
        # The cluster's garbage collector removes the Lease with the Node.
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": ident.node_name,
                                    "uid": node_uid}]
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": meta,
        "spec": {"holderIdentity": ident.node_name, "leaseDurationSeconds": duration_s,
                 "renewTime": micro_time(now)},
    }


def pod(ident: NodeIdentity, namespace: str, engine: PublishedEngine, node_uid: str) -> dict[str, Any]:
    name = kl.pod_name(ident.node_name, engine.job_id)
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {
            kl.MANAGED_BY: kl.MANAGER,
            kl.COMPONENT: kl.COMPONENT_ENGINE,
            kl.MODEL: kl.label_value(engine.model),
            kl.JOB_ID: kl.label_value(engine.job_id),
            kl.NODE: ident.node_name,
            kl.POOL: "true" if engine.pool else "false",
            **({kl.PARTITION: kl.label_value(engine.partition)} if engine.partition else {}),
        },
        "annotations": {
            kl.MODEL_NAME_ANNOTATION: engine.model,
            kl.JOB_ID_ANNOTATION: engine.job_id,
            kl.USER_ANNOTATION: engine.user,
        },
    }
    if node_uid:
        # Deleting a dead Node then removes its Pods too.
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": ident.node_name,
                                    "uid": node_uid}]
    container: dict[str, Any] = {
        "name": ENGINE_CONTAINER,
        "image": ENGINE_IMAGE,
        "ports": [{"name": kl.PORT_NAME, "containerPort": engine.port, "hostPort": engine.port,
                   "protocol": "TCP"}],
    }
    if engine.gpus:
        container["resources"] = {"limits": {kl.GPU_RESOURCE: str(engine.gpus)},
                                  "requests": {kl.GPU_RESOURCE: str(engine.gpus)}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "nodeName": ident.node_name,
            # The engine listens on the host's address: its Pod IP is the node's.
            "hostNetwork": True,
            "containers": [container],
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "tolerations": [{"key": kl.TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
        },
    }


def pod_status(ident: NodeIdentity, engine: PublishedEngine, now: float) -> dict[str, Any]:
    ready = "True" if engine.ready else "False"
    started = rfc3339(engine.started_at or now)
    stamp = rfc3339(now)
    addr = ident.address
    return {"status": {
        "phase": "Running",
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": started},
            {"type": "Initialized", "status": "True", "lastTransitionTime": started},
            {"type": "ContainersReady", "status": ready, "lastTransitionTime": stamp},
            {"type": "Ready", "status": ready, "lastTransitionTime": stamp},
        ],
        "hostIP": addr,
        "hostIPs": [{"ip": addr}],
        "podIP": addr,
        "podIPs": [{"ip": addr}],
        "startTime": started,
        "containerStatuses": [{
            "name": ENGINE_CONTAINER, "image": ENGINE_IMAGE, "imageID": "", "ready": engine.ready,
            "started": True, "restartCount": 0, "state": {"running": {"startedAt": started}},
        }],
    }}


def model_service(model: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": kl.model_service_name(model), "namespace": namespace,
                     "labels": {kl.MANAGED_BY: kl.MANAGER, kl.COMPONENT: kl.COMPONENT_MODEL_SERVICE,
                                kl.MODEL: kl.label_value(model)},
                     "annotations": {kl.MODEL_NAME_ANNOTATION: model}},
        "spec": {"type": "ClusterIP", "selector": kl.model_selector(model),
                 "ports": [{"name": kl.PORT_NAME, "port": MODEL_SERVICE_PORT, "targetPort": kl.PORT_NAME,
                            "protocol": "TCP"}]},
    }


def gateway(gw: GatewayEndpoint, namespace: str) -> list[tuple[str, dict[str, Any]]]:
    """The gateway's Service, plus an EndpointSlice pointing at it when its address is an IP."""
    labels = {kl.MANAGED_BY: kl.MANAGER, kl.COMPONENT: kl.COMPONENT_GATEWAY}
    port = {"name": kl.PORT_NAME, "port": gw.port, "protocol": "TCP"}
    try:
        ip = ipaddress.ip_address(gw.address)
    except ValueError:
        return [("Service", {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": GATEWAY_SERVICE, "namespace": namespace, "labels": labels},
            "spec": {"type": "ExternalName", "externalName": gw.address, "ports": [port]},
        })]
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": GATEWAY_SERVICE, "namespace": namespace, "labels": labels},
        # No selector: the gateway is not a Pod; the EndpointSlice below names its address.
        "spec": {"type": "ClusterIP", "ports": [{**port, "targetPort": gw.port}]},
    }
    endpoints = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": GATEWAY_SERVICE, "namespace": namespace,
                     "labels": {**labels, "kubernetes.io/service-name": GATEWAY_SERVICE,
                                # Not the EndpointSlice controller's name, so it leaves this slice alone.
                                kl.SLICE_MANAGED_BY: kl.SLICE_MANAGER}},
        "addressType": "IPv4" if ip.version == 4 else "IPv6",
        "endpoints": [{"addresses": [str(ip)], "conditions": {"ready": True}}],
        "ports": [port],
    }
    return [("Service", service), ("EndpointSlice", endpoints)]


def leader_lease(name: str, namespace: str, identity: str, duration_s: int, now: float) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {kl.MANAGED_BY: kl.MANAGER, kl.COMPONENT: kl.COMPONENT_LEADER}},
        "spec": {"holderIdentity": identity, "leaseDurationSeconds": duration_s,
                 "acquireTime": micro_time(now), "renewTime": micro_time(now), "leaseTransitions": 0},
    }


def standby_lease(name: str, namespace: str, identity: str, duration_s: int, now: float) -> dict[str, Any]:
    """A standby controller's own Lease: it says the standby is there (the leader Lease says who leads)."""
    return {
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {kl.MANAGED_BY: kl.MANAGER, kl.COMPONENT: kl.COMPONENT_LEADER,
                                kl.ROLE: "standby"}},
        "spec": {"holderIdentity": identity, "leaseDurationSeconds": duration_s, "renewTime": micro_time(now)},
    }


def precondition(rv: str) -> dict[str, Any]:
    # Every API server sends a resourceVersion; a recording test server may not, and then there is nothing to check.
    return {"metadata": {"resourceVersion": rv}} if rv else {}
