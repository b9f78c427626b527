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
from slinfer.kube.api import NODE_LEASE_NAMESPACE, Conflict, KubeAPI, KubeError, NotFound, Unavailable, parse_time
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
    # Whether the last round got answers from the API server (a refusal is an answer; a timeout is not).
    reachable: bool = True
    # When a round last ended with every step done (0: never).
    last_success: float = 0.0
    # The leader Lease's holder as last read ("" without leader election or before the first read).
    holder: str = ""
    # Write requests (create, patch, delete) this controller has sent.
    writes: int = 0
    # This controller's identity in leader election ("" without it).
    identity: str = ""


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
        # The errors of the round under way: each step records its own and the others go on.
        self._errors: list[str] = []
        self._reachable = True
        # Set when a call found the API server unreachable: this controller saw nothing for a while, so Lease
        # expiry and idleness are judged afresh from the next successful collection (the agents were cut off too).
        self._blind = False
        self._last_success = 0.0
        self.writes = 0
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
        """One round: election, then (as leader) each Service, then garbage collection. Never raises a KubeError.

        Every step stands alone: a refused object (a 422, a 403) is logged and counted, and the rest of the
        round still runs, so one bad Service never stops dead Nodes from being collected.
        """
        now = self._clock()
        self._errors = []
        self._reachable = True
        if self._election is not None:
            await self._guard("leader election", self._election.step())
        if self.is_leader:
            await self.sync_services()
            await self._guard("garbage collection", self.collect(now))
        if self._errors:
            self._failures += 1
            self._last_error = "; ".join(self._errors)
            log.warning("kubernetes sync: %d step(s) failed (%d round(s) in a row): %s", len(self._errors),
                        self._failures, self._last_error)
        else:
            self._failures = 0
            self._last_error = ""
            self._last_success = now

    async def _guard(self, what: str, work: Awaitable[Any]) -> bool:
        """Runs one step; a KubeError is recorded for the round's status and the round goes on."""
        try:
            await work
        except KubeError as exc:
            self._errors.append(f"{what}: {exc}")
            if isinstance(exc, Unavailable):
                self._reachable = False
                self._blind = True
            log.warning("kubernetes: %s failed: %s", what, exc)
            return False
        return True

    def status(self) -> SyncStatus:
        leader = self.is_leader
        holder = self._election.holder if self._election is not None else ""
        if self._failures:
            text = f"Kubernetes API failing ({self._failures} rounds): {self._last_error}"
        elif self._election is not None and not leader:
            text = f"standby: {self._election.holder or 'nobody'} leads"
        else:
            text = (f"{'leader, ' if self._election is not None else ''}{len(self._models)} model Service(s); "
                    f"deleted {self.nodes_deleted} dead Node(s), {self.pods_deleted} ended Pod(s)")
        return SyncStatus(healthy=not self._failures, leader=leader, text=text, failures=self._failures,
                          last_error=self._last_error, nodes_deleted=self.nodes_deleted,
                          pods_deleted=self.pods_deleted, reachable=self._reachable,
                          last_success=self._last_success, holder=holder, writes=self.writes,
                          identity=self._election.identity if self._election is not None else "")

    # Services.

    def model_service(self, model: str) -> dict[str, Any]:
        return objects.model_service(model, self._ns)

    def gateway_objects(self) -> list[tuple[str, dict[str, Any]]]:
        return objects.gateway(self._gateway, self._ns) if self._gateway is not None else []

    async def sync_services(self) -> None:
        """Creates, corrects and deletes slinfer's own Services and EndpointSlices, each on its own.

        Only objects marked as slinfer's are touched: Services labelled managed-by slinfer, and EndpointSlices
        whose `endpointslice.kubernetes.io/managed-by` is slinfer's (Kubernetes' EndpointSlice controller
        copies a Service's labels, ours included, onto the slices it makes; those are the cluster's). An object
        that matches what slinfer wants in every field slinfer sets is not written, whatever the server added.
        """
        wanted: dict[tuple[str, str], dict[str, Any]] = {
            ("Service", kl.model_service_name(m)): self.model_service(m) for m in self._models}
        for kind, obj in self.gateway_objects():
            wanted[(kind, obj["metadata"]["name"])] = obj
        selectors = {"Service": kl.selector({kl.MANAGED_BY: kl.MANAGER}),
                     "EndpointSlice": kl.selector({kl.MANAGED_BY: kl.MANAGER, kl.SLICE_MANAGED_BY: kl.SLICE_MANAGER})}
        current: dict[tuple[str, str], dict[str, Any]] = {}
        listed: set[str] = set()
        for kind, mine in selectors.items():
            try:
                found = await self._api.list(kind, self._ns, mine)
            except KubeError as exc:
                await self._guard(f"list {kind}s", _raise(exc))
                continue
            listed.add(kind)
            for obj in found:
                labels = obj["metadata"].get("labels") or {}
                if kind == "EndpointSlice" and labels.get(kl.SLICE_MANAGED_BY) != kl.SLICE_MANAGER:
                    continue
                if labels.get(kl.COMPONENT) in (kl.COMPONENT_MODEL_SERVICE, kl.COMPONENT_GATEWAY):
                    current[(kind, obj["metadata"]["name"])] = obj
        for (kind, name), obj in wanted.items():
            if kind not in listed:
                continue
            have = current.get((kind, name))
            if have is None:
                await self._guard(f"create {kind} {self._ns}/{name}", self._create(kind, name, obj))
                continue
            patch = _patch_to(have, obj)
            if patch:
                await self._guard(f"update {kind} {self._ns}/{name}", self._update(kind, name, patch))
        for (kind, name) in sorted(current.keys() - wanted.keys()):
            await self._guard(f"delete {kind} {self._ns}/{name}", self._retire(kind, name))

    async def _create(self, kind: str, name: str, obj: dict[str, Any]) -> None:
        self.writes += 1
        try:
            await self._api.create(kind, obj, self._ns)
            log.info("kubernetes: created %s %s/%s", kind, self._ns, name)
        except Conflict:
            log.info("kubernetes: %s %s/%s appeared meanwhile; next round checks it", kind, self._ns, name)

    async def _update(self, kind: str, name: str, patch: dict[str, Any]) -> None:
        self.writes += 1
        await self._api.patch(kind, name, patch, self._ns)
        log.info("kubernetes: updated %s %s/%s (%s)", kind, self._ns, name, ", ".join(sorted(patch)))

    async def _retire(self, kind: str, name: str) -> None:
        self.writes += 1
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
                if await self._delete("Pod", name, self._ns, 0):
                    self.pods_deleted += 1
                log.info("kubernetes: deleted Pod %s: Slurm job %s has ended and no agent reports its engine "
                         "(Pod seen for %.0f s, grace %.0f s)", name, job, age, self._grace)
                continue
            pods_by_node.setdefault(str(pod.get("spec", {}).get("nodeName", "")), []).append(name)

        if self._blind:
            # Nothing was seen while the API server was unreachable, and the agents could not renew either:
            # every Lease and idle time counts from now, as after this controller's own start.
            log.info("kubernetes: the API server was unreachable; judging %d node Lease(s) afresh from now",
                     len(self._lease_seen))
            self._lease_seen = {name: (renew, now) for name, (renew, _) in self._lease_seen.items()}
            self._idle_since = dict.fromkeys(self._idle_since, now)
            self._blind = False
        node_names = {node["metadata"]["name"] for node in nodes}
        for node_name in [n for n in pods_by_node if n not in node_names]:
            # Pods bound to a Node that is gone (a real cluster's pod GC would also remove them, in time).
            for name in pods_by_node.pop(node_name):
                age = now - self._first_seen[("Pod", name)]
                if age >= self._grace:
                    if await self._delete("Pod", name, self._ns, 0):
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
            if await self._delete("Pod", pod, self._ns, 0):
                self.pods_deleted += 1
        # The cluster's garbage collector would remove the Lease with its owner; this does not wait for it.
        await self._delete("Lease", name, NODE_LEASE_NAMESPACE)
        if not await self._delete("Node", name, ""):
            return
        self.nodes_deleted += 1
        self._lease_seen.pop(name, None)
        self._idle_since.pop(name, None)

    async def _delete(self, kind: str, name: str, namespace: str, grace: int | None = None) -> bool:
        """Deletes one object; a refusal is recorded for the round and the collection goes on."""
        self.writes += 1
        try:
            await self._api.delete(kind, name, namespace, grace_period_s=grace)
        except NotFound:
            pass
        except KubeError as exc:
            where = f"{namespace}/{name}" if namespace else name
            await self._guard(f"delete {kind} {where}", _raise(exc))
            return False
        return True


async def _raise(exc: KubeError) -> None:
    raise exc


def _age_text(renew: str, now: float) -> str:
    try:
        return f", renewTime {renew}, {now - parse_time(renew):.0f} s ago by this clock"
    except ValueError:
        return ""


def contains(have: Any, want: Any) -> bool:
    """Whether `have` (as the server stores it) holds every field `want` sets, with the same value.

    The server fills in defaults (a port's `targetPort` and `protocol`, a ClusterIP, ...): those are not a
    difference. Lists must have the same length, element by element.
    """
    if isinstance(want, dict):
        return isinstance(have, dict) and all(contains(have.get(k), v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(have) == len(want) and all(
            contains(h, w) for h, w in zip(have, want, strict=True))
    return bool(have == want)


def _patch_to(have: dict[str, Any], want: dict[str, Any]) -> dict[str, Any]:
    """A merge patch that makes the fields `want` sets equal in `have` (keys `want` lacks are nulled in
    selectors); empty when the stored object already holds them, defaults the server added included."""
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
                elif not contains(old, value):
                    spec_patch[key] = value
            if spec_patch:
                patch["spec"] = spec_patch
        elif not contains(have.get(top), want[top]):
            patch[top] = want[top]
    labels = want["metadata"].get("labels") or {}
    have_labels = have["metadata"].get("labels") or {}
    if any(have_labels.get(k) != v for k, v in labels.items()):
        patch["metadata"] = {"labels": labels}
    return patch
