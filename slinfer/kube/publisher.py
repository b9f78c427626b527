"""The agent's face in Kubernetes: a Node while this host serves, its Lease, and a Pod per engine.

`NodePublisher` is level-triggered: `reconcile(engines)` records what this host serves now and makes the API
server agree (register the Node with its first engine, one Pod per engine with its readiness, delete Pods of
stopped engines, delete the Node when nothing is served); `run()` renews the Lease every `renew_interval_s`,
refreshes the Node's status, re-lists what is published now and then to repair drift, and retries after
failures. An unreachable or refusing API server only delays publishing, with exponential backoff: no method
raises into the agent's engine handling, and `status()` says what is wrong.

It does not start or stop engines, decide what an engine's state is, or talk to the controller; and it
touches only objects of its own Node (selected by label), never another node's. What the objects look like is
objects.py's.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from slinfer.backoff import Backoff
from slinfer.kube import labels as kl
from slinfer.kube import objects
from slinfer.kube.api import NODE_LEASE_NAMESPACE, Conflict, KubeAPI, KubeError, NotFound, micro_time
from slinfer.kube.objects import NodeIdentity, PublishedEngine

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class PublisherStatus:
    healthy: bool
    text: str
    registered: bool
    pods: int
    failures: int
    last_error: str
    last_success: float
    # When the next attempt is allowed while failing (0 when healthy).
    retry_at: float


@dataclass(frozen=True)
class _PodKey:
    """What makes a published Pod current (a change in any of these means delete and create again)."""

    job_id: str
    model: str
    port: int
    pool: bool


@dataclass
class _Published:
    key: _PodKey
    ready: bool


class NodePublisher:
    """Keeps this host's Node, Lease and engine Pods in the API server in line with the engines it serves."""

    def __init__(self, api: KubeAPI, identity: NodeIdentity, *, namespace: str = "slinfer",
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 renew_interval_s: float = 10.0, lease_duration_s: int = 40,
                 status_interval_s: float = math.inf, resync_interval_s: float = 60.0,
                 backoff_initial_s: float = 1.0, backoff_max_s: float = 30.0) -> None:
        self._api = api
        self._id = identity
        self._ns = namespace
        self._clock = clock
        self._sleep = sleep
        self._renew_interval = renew_interval_s
        self._lease_duration = lease_duration_s
        self._status_interval = status_interval_s
        self._resync_interval = resync_interval_s
        self._backoff = Backoff(backoff_initial_s, backoff_max_s)
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        # What the agent serves; None until the first reconcile, so that run() alone publishes nothing.
        self._desired: dict[str, PublishedEngine] | None = None
        self._dirty = False
        # What the API server is known to hold; only trusted while _synced.
        self._synced = False
        self._registered = False
        self._node_uid = ""
        self._registered_at = 0.0
        self._pods: dict[str, _Published] = {}
        self._renewed_at = 0.0
        self._status_at = 0.0
        self._resync_at = 0.0
        self._last_success = 0.0

    @property
    def node_name(self) -> str:
        return self._id.node_name

    @property
    def registered(self) -> bool:
        return self._registered

    async def reconcile(self, engines: Iterable[PublishedEngine]) -> None:
        """Records what this host serves and tries once to publish it; while backing off it only records.

        One try can take up to the API request timeout when the server hangs; `notify` never waits.
        """
        self.notify(engines)
        if self._clock() >= self._backoff.retry_at:
            await self._attempt(force=True)

    def notify(self, engines: Iterable[PublishedEngine]) -> None:
        """Records what this host serves and wakes run(), which publishes it; returns at once."""
        desired = {kl.pod_name(self.node_name, e.job_id): e for e in engines}
        if desired != self._desired:
            self._desired = desired
            self._dirty = True
        self._wake.set()

    async def step(self) -> None:
        """One tick of run(): retry a failed sync when due, renew the Lease, refresh status, re-list."""
        if self._clock() >= self._backoff.retry_at:
            await self._attempt(force=False)

    async def run(self) -> None:
        """Renews and repairs until cancelled. Never raises (except CancelledError)."""
        while True:
            await self.step()
            delay = max(0.05, self._next_due() - self._clock())
            self._wake.clear()
            sleeper = asyncio.ensure_future(self._sleep(delay))
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waker.cancel()

    def status(self) -> PublisherStatus:
        now = self._clock()
        b = self._backoff
        pods = len(self._pods) if self._registered else 0
        if b.failures:
            text = (f"Kubernetes API failing for {now - b.down_since:.0f} s ({b.failures} attempts), "
                    f"retry in {max(0.0, b.retry_at - now):.0f} s: {b.last_error}")
        elif self._registered:
            text = (f"Node {self.node_name} registered, {pods} Pod(s), "
                    f"Lease renewed {now - self._renewed_at:.1f} s ago")
        else:
            text = f"Node {self.node_name} not registered (serving nothing)"
        return PublisherStatus(healthy=not b.failures, text=text, registered=self._registered, pods=pods,
                               failures=b.failures, last_error=b.last_error, last_success=self._last_success,
                               retry_at=b.retry_at)

    # The objects (built in objects.py), public so that tests can validate them against the API's schemas.

    def node_object(self) -> dict[str, Any]:
        return objects.node(self._id)

    def node_status(self, now: float) -> dict[str, Any]:
        return objects.node_status(self._id, now, self._registered_at or now)

    def lease_object(self, now: float) -> dict[str, Any]:
        return objects.node_lease(self._id, self._lease_duration, now, self._node_uid)

    def pod_object(self, engine: PublishedEngine) -> dict[str, Any]:
        return objects.pod(self._id, self._ns, engine, self._node_uid)

    def pod_status(self, engine: PublishedEngine, now: float) -> dict[str, Any]:
        return objects.pod_status(self._id, engine, now)

    # The work.

    def _next_due(self) -> float:
        now = self._clock()
        if self._backoff.failures:
            return self._backoff.retry_at
        if self._dirty:
            return now
        if not self._registered:
            return now + self._resync_interval
        return min(self._renewed_at + self._renew_interval, self._status_at + self._status_interval,
                   self._resync_at)

    async def _attempt(self, force: bool) -> None:
        async with self._lock:
            now = self._clock()
            try:
                if self._desired is None:
                    return
                if force or self._dirty or not self._synced or now >= self._resync_at or (
                        self._registered and now >= self._status_at + self._status_interval):
                    try:
                        await self._sync(now)
                    except NotFound as exc:
                        # Something of ours vanished (a controller or a person deleted it): re-read and retry once.
                        log.info("kubernetes: %s; re-reading what is published", exc)
                        self._synced = False
                        await self._sync(now)
                if self._registered and now >= self._renewed_at + self._renew_interval:
                    await self._renew(now)
            except KubeError as exc:
                self._fail(now, str(exc))
            except Exception as exc:  # never into the agent's engine handling
                log.exception("kubernetes: unexpected error")
                self._fail(now, f"{type(exc).__name__}: {exc}")
            else:
                if self._backoff.failures:
                    log.info("kubernetes: API usable again after %d failed attempts over %.0f s",
                             self._backoff.failures, now - self._backoff.down_since)
                self._backoff.succeeded()
                self._last_success = now

    def _fail(self, now: float, error: str) -> None:
        self._synced = False
        delay = self._backoff.failed(now, error)
        log.warning("kubernetes: attempt %d failed, retrying in %.0f s: %s", self._backoff.failures, delay, error)

    async def _sync(self, now: float) -> None:
        desired = dict(self._desired or {})
        self._dirty = False
        try:
            if not desired:
                await self._unregister()
            else:
                if not self._synced or not self._registered or now >= self._resync_at:
                    await self._read_back(now)
                elif now >= self._status_at + self._status_interval:
                    await self._api.patch("Node", self.node_name, self.node_status(now), subresource="status")
                    self._status_at = now
                await self._publish_pods(desired, now)
        except BaseException:
            self._dirty = True
            raise

    async def _read_back(self, now: float) -> None:
        """Registers the Node and its Lease if missing and learns which Pods are there."""
        try:
            node = await self._api.get("Node", self.node_name)
        except NotFound:
            try:
                node = await self._api.create("Node", self.node_object())
            except Conflict:
                # An earlier create whose answer was lost.
                node = await self._api.get("Node", self.node_name)
            self._registered_at = now
            log.info("kubernetes: registered Node %s (%d GPUs, partition %r, address %s)", self.node_name,
                     self._id.gpu_count, self._id.partition, self._id.address)
        else:
            wanted = self.node_object()
            labels = node.get("metadata", {}).get("labels") or {}
            taints = node.get("spec", {}).get("taints") or []
            ours = wanted["spec"]["taints"][0]
            # Only our own labels and taint: the node lifecycle controller adds taints of its own.
            if any(labels.get(k) != v for k, v in wanted["metadata"]["labels"].items()) or not any(
                    t.get("key") == ours["key"] and t.get("effect") == ours["effect"] for t in taints):
                kept = [t for t in taints if t.get("key") != ours["key"]]
                node = await self._api.patch("Node", self.node_name, {
                    "metadata": {"labels": wanted["metadata"]["labels"]}, "spec": {"taints": [*kept, ours]}})
                log.info("kubernetes: restored the labels and taint of Node %s", self.node_name)
        fresh = not self._registered or self._node_uid != str(node.get("metadata", {}).get("uid", ""))
        self._registered = True
        self._registered_at = self._registered_at or now
        self._node_uid = str(node.get("metadata", {}).get("uid", ""))
        wanted_status = self.node_status(now)
        # The Lease is the heartbeat (the node lifecycle controller reads it): the status is written when the Node
        # is new, when it differs from what this host reports (the resync finds a Ready the cluster set to
        # Unknown), and every status_interval_s if one is given; a steady node writes only its Lease.
        if fresh or now >= self._status_at + self._status_interval or not _status_current(node, wanted_status):
            await self._api.patch("Node", self.node_name, wanted_status, subresource="status")
            self._status_at = now
        try:
            lease = await self._api.get("Lease", self.node_name, NODE_LEASE_NAMESPACE)
        except NotFound:
            await self._api.create("Lease", self.lease_object(now), NODE_LEASE_NAMESPACE)
        else:
            owners = lease.get("metadata", {}).get("ownerReferences") or []
            wanted_lease = self.lease_object(now)
            if owners != wanted_lease["metadata"].get("ownerReferences", owners):
                await self._api.patch("Lease", self.node_name, {
                    "metadata": {"ownerReferences": wanted_lease["metadata"]["ownerReferences"]},
                    "spec": wanted_lease["spec"]}, NODE_LEASE_NAMESPACE)
            else:
                await self._api.patch("Lease", self.node_name, {"spec": {"renewTime": micro_time(now)}},
                                      NODE_LEASE_NAMESPACE)
        self._renewed_at = now
        pods = await self._api.list("Pod", self._ns, kl.selector({kl.MANAGED_BY: kl.MANAGER,
                                                                  kl.NODE: self.node_name}))
        self._pods = {}
        for pod in pods:
            name = pod["metadata"]["name"]
            why = _untrusted(pod, self._node_uid)
            if why:
                # A Terminating Pod never finishes (no kubelet), and one an earlier Node owned is the cluster
                # garbage collector's to mark: replace it now rather than let it hang until the job ends.
                log.info("kubernetes: replacing Pod %s: %s", name, why)
                await self._delete_pod(name)
                continue
            seen = _published(pod)
            if seen is not None:
                self._pods[name] = seen
        self._synced = True
        self._resync_at = now + self._resync_interval

    async def _publish_pods(self, desired: dict[str, PublishedEngine], now: float) -> None:
        for name, engine in desired.items():
            key = _PodKey(engine.job_id, engine.model, engine.port, engine.pool)
            current = self._pods.get(name)
            if current is not None and current.key != key:
                log.info("kubernetes: Pod %s changed (%s -> %s), creating it again", name, current.key, key)
                await self._delete_pod(name)
                current = None
            if current is None:
                await self._create_pod(name, engine)
                current = _Published(key, ready=False)
                self._pods[name] = current
                await self._api.patch("Pod", name, self.pod_status(engine, now), self._ns, subresource="status")
                current.ready = engine.ready
                log.info("kubernetes: Pod %s for job %s (%s, port %d, ready %s)", name, engine.job_id,
                         engine.model, engine.port, engine.ready)
            elif current.ready != engine.ready:
                await self._api.patch("Pod", name, self.pod_status(engine, now), self._ns, subresource="status")
                current.ready = engine.ready
                log.info("kubernetes: Pod %s ready %s", name, engine.ready)
        for name in [n for n in self._pods if n not in desired]:
            await self._delete_pod(name)
            log.info("kubernetes: deleted Pod %s (engine stopped)", name)

    async def _create_pod(self, name: str, engine: PublishedEngine) -> None:
        try:
            await self._api.create("Pod", self.pod_object(engine), self._ns)
        except Conflict:
            # Left from before an agent restart, or created by a call whose answer was lost: look at it.
            pod = await self._api.get("Pod", name, self._ns)
            seen = None if _untrusted(pod, self._node_uid) else _published(pod)
            if seen is None or seen.key != _PodKey(engine.job_id, engine.model, engine.port, engine.pool):
                await self._delete_pod(name)
                await self._api.create("Pod", self.pod_object(engine), self._ns)

    async def _delete_pod(self, name: str) -> None:
        try:
            await self._api.delete("Pod", name, self._ns, grace_period_s=0)
        except NotFound:
            pass
        self._pods.pop(name, None)

    async def _unregister(self) -> None:
        """Deletes every Pod of this Node, its Lease and the Node; each absence is fine."""
        if self._synced and not self._registered:
            return
        pods = await self._api.list("Pod", self._ns, kl.selector({kl.MANAGED_BY: kl.MANAGER,
                                                                  kl.NODE: self.node_name}))
        for pod in pods:
            await self._delete_pod(pod["metadata"]["name"])
        for kind, ns in (("Lease", NODE_LEASE_NAMESPACE), ("Node", "")):
            try:
                await self._api.delete(kind, self.node_name, ns)
            except NotFound:
                continue
            if kind == "Node":
                log.info("kubernetes: deleted Node %s (serving nothing)", self.node_name)
        self._pods = {}
        self._registered = False
        self._registered_at = 0.0
        self._node_uid = ""
        self._synced = True

    async def _renew(self, now: float) -> None:
        try:
            await self._api.patch("Lease", self.node_name, {"spec": {"renewTime": micro_time(now)}},
                                  NODE_LEASE_NAMESPACE)
        except NotFound:
            # The Lease went (garbage-collected with a deleted Node?): register everything again.
            self._synced = False
            await self._sync(now)
            return
        lateness = now - (self._renewed_at + self._renew_interval)
        if lateness > self._renew_interval:
            log.warning("kubernetes: Lease renewed %.1f s late", lateness)
        self._renewed_at = now


def _status_current(node: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether the stored Node status says what this host would report (heartbeat times aside)."""
    have = node.get("status") or {}
    want = wanted["status"]
    for key in ("capacity", "allocatable", "addresses", "nodeInfo"):
        if any((have.get(key) or {}).get(k) != v for k, v in want[key].items()) if isinstance(want[key], dict) \
                else have.get(key) != want[key]:
            return False
    ready = [c for c in have.get("conditions") or [] if c.get("type") == "Ready"]
    return bool(ready) and ready[0].get("status") == "True" and ready[0].get("reason") == "SlinferAgentReady"


def _untrusted(pod: dict[str, Any], node_uid: str) -> str:
    """Why a listed Pod of this Node cannot stand for an engine ("" when it can): it is being deleted, or its
    owner is an earlier Node of the same name (deleted and made again), whose garbage collection will mark it."""
    meta = pod.get("metadata", {})
    if meta.get("deletionTimestamp"):
        return f"it is Terminating (deletionTimestamp {meta['deletionTimestamp']})"
    owners = [o for o in meta.get("ownerReferences") or [] if o.get("kind") == "Node"]
    if node_uid and owners and not any(o.get("uid") == node_uid for o in owners):
        return f"its owner is an earlier Node (uid {owners[0].get('uid')}, now {node_uid})"
    return ""


def _published(pod: dict[str, Any]) -> _Published | None:
    """What a Pod in the API server says it publishes, or None when it is not one of ours in a known shape."""
    meta = pod.get("metadata", {})
    notes = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    try:
        port = int(pod["spec"]["containers"][0]["ports"][0]["containerPort"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    conditions = (pod.get("status") or {}).get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    key = _PodKey(str(notes.get(kl.JOB_ID_ANNOTATION, "")), str(notes.get(kl.MODEL_NAME_ANNOTATION, "")), port,
                  labels.get(kl.POOL) == "true")
    return _Published(key, ready)
