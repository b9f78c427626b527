"""The order in which one model's waiting requests get a free engine: fair among accounts, or first come first served.

Responsible for: tagging each request that joins a model's waiting room, and saying which waiting request is
next. Under "fair" the tags are start-time fair queueing (SFQ, Goyal et al. 1996) over Slurm accounts: an
account's request starts at the later of the room's virtual time and the end of that account's previous
request, and ends 1/weight later; the request with the smallest start goes next (ties: the earlier arrival),
and the virtual time moves to the start of the request that got an engine. An account that queued 64 requests
holds starts 0, 1, ..., 63; another account's lone request joining at virtual time k starts at k and goes next.
A weight of 2 gives an account twice the turns of a weight-1 account while both wait. Under "fifo" the tag is
the arrival number. A request that was called but found no engine goes back with its own tag, so it keeps its
place.
Not responsible for: waking requests or timing them out (controller/queue.py), nor which engine a request gets
(controller/balancer.py). It holds no asyncio state and takes no clock: the tests drive it by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal, Protocol

Policy = Literal["fair", "fifo"]
POLICIES: tuple[Policy, ...] = ("fair", "fifo")

# A weight below this is taken as this: a zero or negative weight would give an account no turn (or an
# infinite one); the config check refuses such weights, this guards the arithmetic.
MIN_WEIGHT = 1e-3


class Ticket:
    """One waiting request's place: its account, its tags, and whether it is in the order now."""

    __slots__ = ("account", "called", "seq", "start", "waiting")

    def __init__(self, account: str, start: float, seq: int) -> None:
        self.account = account
        self.start = start
        self.seq = seq
        # In the order, waiting for its turn.
        self.waiting = False
        # Taken out of the order by `pop`: its turn came and it has not yet said whether it got an engine.
        self.called = False

    def __repr__(self) -> str:
        return f"Ticket({self.account!r}, start={self.start:g}, seq={self.seq})"


class FairOrder:
    """The waiting requests of one model, in the order they get a free engine."""

    def __init__(self, policy: Policy = "fifo", weight: Callable[[str], float] = lambda _account: 1.0) -> None:
        if policy not in POLICIES:
            raise ValueError(f"queue policy {policy!r} is not one of {', '.join(POLICIES)}")
        self.policy = policy
        self._weight = weight
        self._tickets: list[Ticket] = []
        self._virtual = 0.0
        # Each account's end tag of its latest request; cleared whenever nobody waits (an idle account owes
        # nothing: a flood that ended does not count against the account's next request).
        self._finish: dict[str, float] = {}
        self._seq = 0
        # Tickets called and not yet back in the order nor gone: requests about to look for an engine.
        self.calling = 0

    def __len__(self) -> int:
        return len(self._tickets)

    def _called(self, ticket: Ticket, called: bool) -> None:
        if ticket.called != called:
            self.calling += 1 if called else -1
            ticket.called = called

    def join(self, account: str) -> Ticket:
        """A new request's ticket, tagged and placed in the order."""
        self._seq += 1
        if self.policy == "fair":
            start = max(self._virtual, self._finish.get(account, 0.0))
            self._finish[account] = start + 1.0 / max(self._weight(account), MIN_WEIGHT)
        else:
            start = float(self._seq)
        ticket = Ticket(account, start, self._seq)
        self.push(ticket)
        return ticket

    def push(self, ticket: Ticket) -> None:
        """Puts a ticket (new, or called and without an engine) back in the order with its own tags."""
        if not ticket.waiting:
            ticket.waiting = True
            self._called(ticket, False)
            self._tickets.append(ticket)

    def head(self) -> Ticket | None:
        # A scan, not a heap: a model's waiting room holds tens to a few thousand requests, and a removal
        # (a timeout, a client gone) is as common as a pop.
        return min(self._tickets, key=_order, default=None)

    def pop(self) -> Ticket | None:
        """The next ticket, taken out of the order and marked called."""
        ticket = self.head()
        if ticket is not None:
            self._tickets.remove(ticket)
            ticket.waiting = False
            self._called(ticket, True)
        return ticket

    def pop_all(self) -> list[Ticket]:
        """Every ticket, in order, taken out and marked called (one sort, not a scan per ticket)."""
        tickets = sorted(self._tickets, key=_order)
        self._tickets = []
        for ticket in tickets:
            ticket.waiting = False
            self._called(ticket, True)
        return tickets

    def take(self, ticket: Ticket) -> None:
        """Marks `ticket` called (out of the order): it is the head and may look for an engine itself."""
        if ticket.waiting:
            self._tickets.remove(ticket)
            ticket.waiting = False
            self._called(ticket, True)

    def ordered(self) -> list[Ticket]:
        return sorted(self._tickets, key=_order)

    def leave(self, ticket: Ticket, served: bool) -> None:
        """The request is done waiting: it got an engine (`served`, the virtual time moves to its start), or it
        gave up (timed out, refused, its client went away)."""
        if ticket.waiting:
            self._tickets.remove(ticket)
        ticket.waiting = False
        self._called(ticket, False)
        if served and self.policy == "fair":
            self._virtual = max(self._virtual, ticket.start)
        # Forgiven only when nobody waits and nobody called is about to come back with its tag: called tickets
        # (every waiter, when a registry change wakes them all) go back with their old tags, and new requests
        # tagged from a cleared account would overtake them, again at each wake, for as long as the room stays busy.
        if not self._tickets and not self.calling:
            self._finish.clear()


def _order(ticket: Ticket) -> tuple[float, int]:
    return (ticket.start, ticket.seq)


class _Weighted(Protocol):
    weight: float


def weights(accounts: Mapping[str, _Weighted]) -> Callable[[str], float]:
    """An account's weight from [gateway.accounts]: its own entry, else the "*" entry's, else 1."""
    fallback = accounts["*"].weight if "*" in accounts else 1.0

    def weight(account: str) -> float:
        entry = accounts.get(account)
        return entry.weight if entry is not None else fallback

    return weight
