"""Leader election among several controllers, on the Lease `slinfer-controller`.

Responsible for: acquiring, renewing, losing and releasing the Lease, and saying whether this controller leads
(`is_leader`), which gates the autoscaler and KubeSync. Not responsible for: what happens when it leads, or the
Lease object's shape (objects.py).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from slinfer.kube import labels as kl
from slinfer.kube import objects
from slinfer.kube.api import Conflict, KubeAPI, KubeError, NotFound, micro_time, parse_time

log = logging.getLogger(__name__)

# The Lease the controllers compete for; one per namespace.
LEADER_LEASE = "slinfer-controller"
# A standby's own Lease says it is there (`slinfer status` lists the standbys from them); the prefix of its name.
STANDBY_PREFIX = "slinfer-standby"
# A standby Lease not renewed for this many of its durations belongs to a controller that died: the leader
# deletes it (a clean stop deletes its own at once).
STANDBY_EXPIRY_DURATIONS = 3


class LeaderElection:
    """Holds or watches the `slinfer-controller` Lease; the holder is the leader.

    Like client-go's leader election: the holder renews every step; another candidate takes over when it has
    seen no change of the Lease for its duration (on its own clock); a holder that cannot renew for
    `renew_deadline_s` (less than the duration) steps down before anyone else can take over. Every write
    carries the `resourceVersion` it read, so two candidates cannot both win.
    """

    def __init__(self, api: KubeAPI, namespace: str, identity: str, clock: Callable[[], float] = time.time,
                 lease_duration_s: int = 40, renew_deadline_s: float | None = None, name: str = LEADER_LEASE,
                 announce: bool = False) -> None:
        self._api = api
        self._ns = namespace
        self.identity = identity
        self._clock = clock
        self._duration = lease_duration_s
        self._deadline = renew_deadline_s if renew_deadline_s is not None else lease_duration_s * 2 / 3
        self._name = name
        self._leader = False
        self._renewed_at = 0.0
        self._observed: tuple[str, str, str] | None = None
        self._observed_at = 0.0
        self.holder = ""
        # With `announce`, a standby keeps a Lease of its own (renewed each step) so that it can be listed.
        self._announce = announce
        self._announced = False

    @property
    def standby_lease(self) -> str:
        return kl.dns_label(STANDBY_PREFIX, self.identity)

    @property
    def is_leader(self) -> bool:
        return self._leader

    @staticmethod
    def default_identity() -> str:
        return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    async def step(self) -> bool:
        """One try to acquire or renew; returns whether this controller leads now. Raises only KubeError."""
        now = self._clock()
        try:
            await self._try(now)
        except Conflict as exc:
            # Someone else wrote the Lease between our read and our write: they win this round.
            log.info("leader election: lost a race for Lease %s/%s: %s", self._ns, self._name, exc)
            self._set_leader(False, now, "lost a race")
        except KubeError:
            if self._leader and now - self._renewed_at > self._deadline:
                self._set_leader(False, now, f"could not renew for {now - self._renewed_at:.0f} s "
                                             f"(deadline {self._deadline:.0f} s)")
            raise
        if self._announce:
            await self._presence(now)
        return self._leader

    async def _presence(self, now: float) -> None:
        """A standby renews its own Lease; the leader drops its own and deletes those of dead standbys."""
        if not self._leader:
            try:
                await self._api.patch("Lease", self.standby_lease, {"spec": {"renewTime": micro_time(now)}},
                                      self._ns)
            except NotFound:
                await self._api.create("Lease", objects.standby_lease(
                    self.standby_lease, self._ns, self.identity, self._duration, now), self._ns)
            self._announced = True
            return
        if self._announced:
            await self._drop_presence()
        for lease in await self._api.list("Lease", self._ns, kl.selector(
                {kl.MANAGED_BY: kl.MANAGER, kl.COMPONENT: kl.COMPONENT_LEADER, kl.ROLE: "standby"})):
            spec = lease.get("spec") or {}
            try:
                silent = now - parse_time(str(spec.get("renewTime", "")))
            except ValueError:
                continue
            if silent > STANDBY_EXPIRY_DURATIONS * int(spec.get("leaseDurationSeconds") or self._duration):
                name = lease["metadata"]["name"]
                log.info("leader election: deleting the Lease of standby %s (not renewed for %.0f s)",
                         spec.get("holderIdentity"), silent)
                try:
                    await self._api.delete("Lease", name, self._ns)
                except NotFound:
                    pass

    async def _drop_presence(self) -> None:
        try:
            await self._api.delete("Lease", self.standby_lease, self._ns)
        except NotFound:
            pass
        self._announced = False

    async def release(self) -> None:
        """Gives the Lease up (on shutdown) so that another controller takes over without waiting; a standby
        deletes its own Lease."""
        if self._announced:
            try:
                await self._drop_presence()
            except KubeError as exc:
                log.warning("leader election: could not delete the standby Lease: %s", exc)
        if not self._leader:
            return
        self._leader = False
        try:
            lease = await self._api.get("Lease", self._name, self._ns)
            if (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                rv = str(lease["metadata"].get("resourceVersion", ""))
                await self._api.patch("Lease", self._name, {
                    **objects.precondition(rv), "spec": {"holderIdentity": None, "leaseDurationSeconds": 1}}, self._ns)
        except KubeError as exc:
            log.warning("leader election: could not release the Lease: %s", exc)

    async def _try(self, now: float) -> None:
        try:
            lease = await self._api.get("Lease", self._name, self._ns)
        except NotFound:
            await self._api.create("Lease", self.lease_object(now), self._ns)
            self._renewed_at = now
            self._set_leader(True, now, "created the Lease")
            return
        spec = lease.get("spec") or {}
        holder = str(spec.get("holderIdentity") or "")
        self.holder = holder
        rv = str(lease.get("metadata", {}).get("resourceVersion", ""))
        seen = (holder, str(spec.get("renewTime", "")), rv)
        if seen != self._observed:
            self._observed, self._observed_at = seen, now
        duration = int(spec.get("leaseDurationSeconds") or self._duration)
        if holder == self.identity:
            await self._api.patch("Lease", self._name, {
                **objects.precondition(rv),
                "spec": {"renewTime": micro_time(now), "leaseDurationSeconds": self._duration}}, self._ns)
            self._renewed_at = now
            self._set_leader(True, now, "renewed")
            return
        unchanged = now - self._observed_at
        if holder and unchanged < duration:
            self._set_leader(False, now, f"{holder} holds the Lease")
            return
        transitions = int(spec.get("leaseTransitions") or 0) + (1 if holder else 0)
        await self._api.patch("Lease", self._name, {
            **objects.precondition(rv),
            "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": self._duration,
                     "acquireTime": micro_time(now), "renewTime": micro_time(now),
                     "leaseTransitions": transitions}}, self._ns)
        self._renewed_at = now
        why = (f"took over from {holder} (no renewal seen for {unchanged:.0f} s, duration {duration} s)"
               if holder else "the Lease was free")
        self._set_leader(True, now, why)

    def lease_object(self, now: float) -> dict[str, Any]:
        return objects.leader_lease(self._name, self._ns, self.identity, self._duration, now)

    def _set_leader(self, leader: bool, now: float, why: str) -> None:
        if leader != self._leader:
            log.info("leader election: %s is %s: %s", self.identity, "now the leader" if leader else "not the leader",
                     why)
        self._leader = leader
        if leader:
            self.holder = self.identity
