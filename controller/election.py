"""Leader election through the controller's database: a standby controller on another host without Kubernetes.

Responsible for: `Election`, the interface both elections give (`step`, `is_leader`, `release`, `identity`,
`holder`): Kubernetes' Lease (slinfer/kube/leader.py) is one, `DbElection` the other; `DbElection`: one row of
the `leader_lease` table (holder, generation, renewals, duration) that the leader renews every few seconds and a
standby takes over once it has seen no renewal for the lease's duration on its own clock (no clock is compared
across hosts); and the fence (`check`): every write transaction of the keys, pins and usage ledger reads the
row first (`FOR UPDATE` on MariaDB, inside SQLite's one writer lock) and is refused (`Fenced`) unless this
controller still holds it at the generation it won, so a leader paused past its lease cannot write once another
took over.
Not responsible for: what a leader does (controller/main.py starts serving only once it leads), or the
database itself (store.py).

A takeover changes the generation with a compare-and-set on (generation, renewals), so two standbys cannot both
win; a leader that cannot renew for `renew_deadline_s` (less than the duration) steps down before any standby
can take over.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from slinfer.controller.store import Database, Fenced, StoreError, Transaction

log = logging.getLogger(__name__)

# The row the controllers of one site compete for (one database per site).
LEASE_NAME = "controller"


class Election(Protocol):
    """What the controller asks of a leader election, Kubernetes' or the database's."""

    identity: str
    # The current holder as last read ("" before the first read or while nobody holds it).
    holder: str

    @property
    def is_leader(self) -> bool: ...

    async def step(self) -> bool:
        """One try to acquire or renew; whether this controller leads now."""

    async def release(self) -> None:
        """Gives the lease up (a clean stop), so that a standby takes over without waiting."""


def default_identity() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class DbElection:
    """Holds or watches the `leader_lease` row of `db`; also the fence of `db`'s write transactions."""

    def __init__(self, db: Database, identity: str, clock: Callable[[], float] = time.monotonic,
                 lease_duration_s: float = 15.0, renew_deadline_s: float | None = None,
                 name: str = LEASE_NAME) -> None:
        self._db = db
        self.identity = identity
        self._clock = clock
        self._duration = lease_duration_s
        self._deadline = renew_deadline_s if renew_deadline_s is not None else lease_duration_s * 2 / 3
        self._name = name
        self._leader = False
        # The generation this controller won; every fenced write checks the row still says it.
        self.generation = 0
        self._renewed_at = 0.0
        self._observed: tuple[str, int, int] | None = None
        self._observed_at = 0.0
        self.holder = ""
        self._table = False
        db.fence = self

    @property
    def is_leader(self) -> bool:
        return self._leader

    def _lock(self) -> str:
        return " FOR UPDATE" if self._db.dialect == "mysql" else ""

    def check(self, tx: Transaction) -> None:
        """The fence: raises Fenced unless the row still names this controller at its generation."""
        if not self._leader:
            raise Fenced(f"{self._db.name}: this controller ({self.identity}) does not hold the lease")
        rows = tx.query(f"SELECT holder, generation FROM leader_lease WHERE name = ?{self._lock()}", (self._name,))
        if not rows or (rows[0][0], int(rows[0][1])) != (self.identity, self.generation):
            found = f"{rows[0][0]!r} at generation {rows[0][1]}" if rows else "nobody"
            raise Fenced(f"{self._db.name}: the lease is {found} now, not this controller's generation "
                         f"{self.generation}: write refused")

    async def step(self) -> bool:
        """One try to acquire or renew (in a thread: a slow server does not stall the event loop); whether
        this controller leads now. Raises StoreError."""
        return await asyncio.to_thread(self.step_now)

    def step_now(self) -> bool:
        now = self._clock()
        try:
            self._try(now)
        except StoreError:
            if self._leader and now - self._renewed_at > self._deadline:
                self._set(False, f"could not renew for {now - self._renewed_at:.1f} s "
                                 f"(deadline {self._deadline:.1f} s)")
            raise
        return self._leader

    def _set(self, leader: bool, why: str) -> None:
        if leader != self._leader:
            log.warning("database election: %s %s (generation %d): %s", self.identity,
                        "leads" if leader else "no longer leads", self.generation, why)
        self._leader = leader

    def _try(self, now: float) -> None:
        if not self._table:
            with self._db.transaction(fenced=False) as tx:
                tx.execute("CREATE TABLE IF NOT EXISTS leader_lease (name VARCHAR(64) PRIMARY KEY, "
                           "holder VARCHAR(255) NOT NULL, generation BIGINT NOT NULL, renewals BIGINT NOT NULL, "
                           "duration_s DOUBLE NOT NULL)")
            # In a transaction of its own: an INSERT IGNORE's shared lock on the row, upgraded by the FOR UPDATE
            # below in the same transaction, deadlocks two candidates that do both at once (MariaDB 1213).
            with self._db.transaction(fenced=False) as tx:
                tx.execute("INSERT OR IGNORE INTO leader_lease VALUES (?, '', 0, 0, ?)",
                           (self._name, self._duration))
            self._table = True
        with self._db.transaction(fenced=False) as tx:
            rows = tx.query(f"SELECT holder, generation, renewals, duration_s FROM leader_lease WHERE name = ?"
                            f"{self._lock()}", (self._name,))
            if not rows:  # the row deleted by hand: made again at the next step
                self._table = False
                raise StoreError(f"{self._db.name}: no lease row {self._name!r}")
            holder, generation, renewals, duration = rows[0]
            generation, renewals, self.holder = int(generation), int(renewals), str(holder)
            if self._leader:
                if (holder, generation) == (self.identity, self.generation):
                    tx.execute("UPDATE leader_lease SET renewals = renewals + 1 WHERE name = ? AND holder = ? "
                               "AND generation = ?", (self._name, self.identity, self.generation))
                    self._renewed_at = now
                    return
                self._set(False, f"{holder or 'nobody'} holds the lease at generation {generation}")
            observed = (self.holder, generation, renewals)
            if observed != self._observed:
                self._observed, self._observed_at = observed, now
            if holder and now - self._observed_at < float(duration):
                return
            won = tx.execute("UPDATE leader_lease SET holder = ?, generation = ?, renewals = 0, duration_s = ? "
                             "WHERE name = ? AND generation = ? AND renewals = ?",
                             (self.identity, generation + 1, self._duration, self._name, generation, renewals))
        if won == 1:
            self.generation, self.holder, self._renewed_at = generation + 1, self.identity, now
            self._set(True, f"took the lease from {holder or 'nobody'}" +
                      (f" (not renewed for {now - self._observed_at:.1f} s)" if holder else ""))

    async def release(self) -> None:
        await asyncio.to_thread(self.release_now)

    def release_now(self) -> None:
        if not self._leader:
            return
        self._leader = False
        try:
            with self._db.transaction(fenced=False) as tx:
                tx.execute("UPDATE leader_lease SET holder = '', renewals = renewals + 1 WHERE name = ? AND "
                           "holder = ? AND generation = ?", (self._name, self.identity, self.generation))
        except StoreError as exc:
            log.warning("database election: could not release the lease: %s", exc)
