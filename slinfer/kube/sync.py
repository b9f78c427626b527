"""The controller's side of Kubernetes: model Services, the gateway Service, and garbage collection of dead
Nodes; the objects themselves are built in objects.py.

`KubeSync` keeps one Service per catalog model that selects the pool engines' Pods (the agents publish them),
a `slinfer-gateway` Service for the controller's own gateway, and deletes what agents can no longer clean up:
Nodes whose Lease has not been renewed within its duration (the agent or its host died; nothing in Kubernetes
deletes such a Node), engine Pods whose Slurm job has ended, and slinfer Nodes that serve nothing. Expiry is
judged the way the node lifecycle controller does, by when *this* controller saw a Lease change on its own
clock, so clock skew between hosts does not matter and a controller that just started waits a full duration.
With leader election on (leader.py), only the leader changes anything here.

It does not publish Nodes or Pods (agents do), scale, or route.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from slinfer.kube import labels as kl
from slinfer.kube import objects
from slinfer.kube.api import NODE_LEASE_NAMESPACE, Conflict, KubeAPI, KubeError, NotFound, parse_time
from slinfer.kube.leader import LeaderElection
from slinfer.kube.objects import GatewayEndpoint

log = logging.getLogger(__name__)



class RegistryView(Protocol):
    """The controller's registry: whether an agent still reports an engine for a job."""

    def get(self, job_id: str) -> object | None: ...


class SlurmJob(Protocol):
    @property
    def job_id(self) -> str: ...

    @property
    def active(self) -> bool: ...


class SlurmJobsView(Protocol):
    """What Slurm knows of jobs (the controller's SlurmClient); may raise when Slurm does not answer."""

    async def jobs_by_id(self, job_ids: Sequence[str]) -> Sequence[SlurmJob]: ...


@dataclass(frozen=True)
class SyncStatus:
    healthy: bool
    leader: bool
    text: str
    failures: int
    last_error: str
    nodes_deleted: int
    pods_deleted: int


class KubeSync:
    """Keeps the controller's Kubernetes objects right and removes what dead agents left behind."""

    def __init__(self, api: KubeAPI, models: Iterable[str], registry_view: RegistryView,
                 slurm_jobs_view: SlurmJobsView, clock: Callable[[], float] = time.time, *,
                 leader_election: LeaderElection | None = None, namespace: str = "slinfer",
                 gateway: GatewayEndpoint | None = None, gc_grace_s: float = 60.0, interval_s: float = 10.0,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._api = api
        self._models = list(models)
        self._registry = registry_view
        self._slurm = slurm_jobs_view
        self._clock = clock
        self._election = leader_election
        self._ns = namespace
        self._gateway = gateway
        self._grace = gc_grace_s
        self._interval = interval_s
        self._sleep = sleep
        # First time this controller saw each object (kind, name), and each node Lease's last change.
        self._first_seen: dict[tuple[str, str], float] = {}
        self._lease_seen: dict[str, tuple[str, float]] = {}
        # Since when each Node has had no engine Pod.
        self._idle_since: dict[str, float] = {}
        self._failures = 0
        self._last_error = ""
        self.nodes_deleted = 0
        self.pods_deleted = 0

    @property
    def is_leader(self) -> bool:
        """Whether this controller may scale and clean up: always, unless leader election is on and it lost."""
        return self._election is None or self._election.is_leader

    async def run(self) -> None:
        """Steps every interval until cancelled; gives the leader Lease back when cancelled."""
        try:
            while True:
                await self.step()
                await self._sleep(self._interval)
        finally:
            if self._election is not None:
                await asyncio.shield(self._election.release())

    async def step(self) -> None:
        """One round: election, then (as leader) Services and garbage collection. Never raises a KubeError."""
        now = self._clock()
        try:
            if self._election is not None:
                await self._election.step()
            if self.is_leader:
                await self.sync_services()
                await self.collect(now)
        except KubeError as exc:
            self._failures += 1
            self._last_error = str(exc)
            log.warning("kubernetes sync failed (%d in a row): %s", self._failures, exc)
        else:
            self._failures = 0
            self._last_error = ""

    def status(self) -> SyncStatus:
        leader = self.is_leader
        if self._failures:
            text = f"Kubernetes API failing ({self._failures} rounds): {self._last_error}"
        elif self._election is not None and not leader:
            text = f"standby: {self._election.holder or 'nobody'} leads"
        else:
            text = (f"{'leader, ' if self._election is not None else ''}{len(self._models)} model Service(s); "
                    f"deleted {self.nodes_deleted} dead Node(s), {self.pods_deleted} ended Pod(s)")
        return SyncStatus(healthy=not self._failures, leader=leader, text=text, failures=self._failures,
                          last_error=self._last_error, nodes_deleted=self.nodes_deleted,
                          pods_deleted=self.pods_deleted)

    # Services.

    def model_service(self, model: str) -> dict[str, Any]:
        return objects.model_service(model, self._ns)

    def gateway_objects(self) -> list[tuple[str, dict[str, Any]]]:
        return objects.gateway(self._gateway, self._ns) if self._gateway is not None else []

    async def sync_services(self) -> None:
        wanted: dict[tuple[str, str], dict[str, Any]] = {
            ("Service", kl.model_service_name(m)): self.model_service(m) for m in self._models}
        for kind, obj in self.gateway_objects():
            wanted[(kind, obj["metadata"]["name"])] = obj
        mine = kl.selector({kl.MANAGED_BY: kl.MANAGER})
        current: dict[tuple[str, str], dict[str, Any]] = {}
        for kind in ("Service", "EndpointSlice"):
            for obj in await self._api.list(kind, self._ns, mine):
                component = (obj["metadata"].get("labels") or {}).get(kl.COMPONENT)
                if component in (kl.COMPONENT_MODEL_SERVICE, kl.COMPONENT_GATEWAY):
                    current[(kind, obj["metadata"]["name"])] = obj
        for (kind, name), obj in wanted.items():
            have = current.get((kind, name))
            if have is None:
                try:
                    await self._api.create(kind, obj, self._ns)
                    log.info("kubernetes: created %s %s/%s", kind, self._ns, name)
                except Conflict:
                    log.info("kubernetes: %s %s/%s appeared meanwhile; next round checks it", kind, self._ns, name)
                continue
            patch = _patch_to(have, obj)
            if patch:
                await self._api.patch(kind, name, patch, self._ns)
                log.info("kubernetes: updated %s %s/%s (%s)", kind, self._ns, name, ", ".join(sorted(patch)))
        for (kind, name) in current.keys() - wanted.keys():
            try:
                await self._api.delete(kind, name, self._ns)
                log.info("kubernetes: deleted %s %s/%s (no longer in the catalog)", kind, self._ns, name)
            except NotFound:
                pass

    # Garbage collection.

    async def collect(self, now: float) -> None:
        nodes = await self._api.list("Node", "", kl.selector({kl.MANAGED_BY: kl.MANAGER,
                                                               kl.COMPONENT: kl.COMPONENT_NODE}))
        leases = {lease["metadata"]["name"]: lease for lease in await self._api.list(
            "Lease", NODE_LEASE_NAMESPACE, kl.selector({kl.MANAGED_BY: kl.MANAGER, kl.COMPONENT: kl.COMPONENT_NODE}))}
        pods = await self._api.list("Pod", self._ns, kl.selector({kl.MANAGED_BY: kl.MANAGER,
                                                                   kl.COMPONENT: kl.COMPONENT_ENGINE}))
        # Only Pods whose engine no agent reports can be collected: Slurm is asked about those jobs alone.
        candidates = sorted({str((p["metadata"].get("annotations") or {}).get(kl.JOB_ID_ANNOTATION, ""))
                             for p in pods} - {""})
        active = await self._active_jobs([j for j in candidates if self._registry.get(j) is None])
        seen: set[tuple[str, str]] = set()

        def first_seen(kind: str, name: str) -> float:
            seen.add((kind, name))
            return self._first_seen.setdefault((kind, name), now)

        pods_by_node: dict[str, list[str]] = {}
        for pod in pods:
            name = pod["metadata"]["name"]
            age = now - first_seen("Pod", name)
            job = str((pod["metadata"].get("annotations") or {}).get(kl.JOB_ID_ANNOTATION, ""))
            if active is not None and job and job not in active and self._registry.get(job) is None \
                    and age >= self._grace:
                await self._delete("Pod", name, self._ns, 0)
                self.pods_deleted += 1
                log.info("kubernetes: deleted Pod %s: Slurm job %s has ended and no agent reports its engine "
                         "(Pod seen for %.0f s, grace %.0f s)", name, job, age, self._grace)
                continue
            pods_by_node.setdefault(str(pod.get("spec", {}).get("nodeName", "")), []).append(name)

        node_names = {node["metadata"]["name"] for node in nodes}
        for node_name in [n for n in pods_by_node if n not in node_names]:
            # Pods bound to a Node that is gone (a real cluster's pod GC would also remove them, in time).
            for name in pods_by_node.pop(node_name):
                age = now - self._first_seen[("Pod", name)]
                if age >= self._grace:
                    await self._delete("Pod", name, self._ns, 0)
                    self.pods_deleted += 1
                    log.info("kubernetes: deleted Pod %s: its Node %s does not exist (Pod seen for %.0f s, "
                             "grace %.0f s)", name, node_name, age, self._grace)

        for node in nodes:
            name = node["metadata"]["name"]
            age = now - first_seen("Node", name)
            lease = leases.get(name)
            reason = ""
            if lease is None:
                if age >= self._grace:
                    reason = f"it has no Lease (Node seen for {age:.0f} s, grace {self._grace:.0f} s)"
            else:
                spec = lease.get("spec") or {}
                renew = str(spec.get("renewTime", ""))
                duration = float(spec.get("leaseDurationSeconds") or 40)
                last_renew, changed_at = self._lease_seen.get(name, ("", now))
                if renew != last_renew:
                    changed_at = now
                self._lease_seen[name] = (renew, changed_at)
                silent = now - changed_at
                if silent >= duration:
                    stamp = _age_text(renew, now)
                    reason = (f"its Lease was not renewed for {silent:.0f} s (duration {duration:.0f} s"
                              f"{stamp})")
            if pods_by_node.get(name):
                self._idle_since.pop(name, None)
            elif not reason:
                idle = now - self._idle_since.setdefault(name, now)
                if idle >= self._grace:
                    reason = f"it has served no engine for {idle:.0f} s (grace {self._grace:.0f} s)"
            if reason:
                await self._delete_node(name, pods_by_node.get(name, []), reason)

        for key in list(self._first_seen):
            if key not in seen:
                del self._first_seen[key]
        for name in list(self._lease_seen):
            if name not in leases:
                del self._lease_seen[name]
        for name in list(self._idle_since):
            if name not in node_names:
                del self._idle_since[name]

    async def _active_jobs(self, job_ids: Sequence[str]) -> set[str] | None:
        if not job_ids:
            return set()
        try:
            jobs = await self._slurm.jobs_by_id(job_ids)
        except Exception as exc:  # without Slurm's word, no Pod is judged ended
            log.warning("kubernetes: not collecting ended jobs' Pods this round: Slurm jobs unknown: %s", exc)
            return None
        return {j.job_id for j in jobs if j.active}

    async def _delete_node(self, name: str, pods: list[str], reason: str) -> None:
        log.info("kubernetes: deleting Node %s and its %d Pod(s): %s", name, len(pods), reason)
        for pod in pods:
            await self._delete("Pod", pod, self._ns, 0)
            self.pods_deleted += 1
        # The cluster's garbage collector would remove the Lease with its owner; this does not wait for it.
        await self._delete("Lease", name, NODE_LEASE_NAMESPACE)
        await self._delete("Node", name, "")
        self.nodes_deleted += 1
        self._lease_seen.pop(name, None)
        self._idle_since.pop(name, None)

    async def _delete(self, kind: str, name: str, namespace: str, grace: int | None = None) -> None:
        try:
            await self._api.delete(kind, name, namespace, grace_period_s=grace)
        except NotFound:
            pass


def _age_text(renew: str, now: float) -> str:
    try:
        return f", renewTime {renew}, {now - parse_time(renew):.0f} s ago by this clock"
    except ValueError:
        return ""


def _patch_to(have: dict[str, Any], want: dict[str, Any]) -> dict[str, Any]:
    """A merge patch that makes the fields `want` sets equal in `have` (keys `want` lacks are nulled in maps)."""
    patch: dict[str, Any] = {}
    for top in ("spec", "addressType", "endpoints", "ports"):
        if top not in want:
            continue
        if top == "spec":
            spec_patch = {}
            for key, value in want["spec"].items():
                old = (have.get("spec") or {}).get(key)
                if key == "selector" and isinstance(old, dict):
                    if old != value:
                        spec_patch[key] = {**{k: None for k in old if k not in value}, **value}
                elif old != value:
                    spec_patch[key] = value
            if spec_patch:
                patch["spec"] = spec_patch
        elif have.get(top) != want[top]:
            patch[top] = want[top]
    labels = want["metadata"].get("labels") or {}
    have_labels = have["metadata"].get("labels") or {}
    if any(have_labels.get(k) != v for k, v in labels.items()):
        patch["metadata"] = {"labels": labels}
    return patch
