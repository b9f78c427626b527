"""Per-model waiting room for requests that have no engine to go to yet, bounded by time.

A request waits here while its model has no routable engine (scale from zero, or every engine failed it) or
every engine is full (at `[gateway].max_outstanding_per_engine` where one is set, else reporting requests
waiting with its KV cache full). It is woken when the Registry says an engine may have become routable (all
waiters of the model, in their order) or when a request of the model finishes (the first in the order). The
order is `[gateway].queue_policy`'s (controller/fairqueue.py): fair among accounts, or first come first served.
A woken request re-checks for itself; it is not handed an engine, and one that finds none goes back with its
own place (`Ticket`). The queue measures how fast each model's requests finish
(`finished`), so the gateway can tell at once whether a new request's wait would pass `queue_timeout_s`
(`expected_wait_s`). A count bound (`size`) applies only where the administrator set one.
This module does not decide what to answer when a wait is refused or expires (the gateway does).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from slinfer.config import GatewayConfig
from slinfer.controller.fairqueue import FairOrder, Policy, Ticket, weights
from slinfer.waits import within


class QueueFull(Exception):
    """The model's queue already holds `size` requests (a count bound the administrator set)."""


# Finishes within this window make a model's service rate: long enough to smooth a burst of short requests,
# short enough to follow a replica coming or going.
RATE_WINDOW_S = 10.0
# Fewer finishes than this in the window tell too little: a wait is then bounded by queue_timeout_s alone.
RATE_MIN_FINISHES = 4


class WaitQueue:
    def __init__(self, size: int = 0, clock: Callable[[], float] = time.monotonic, policy: Policy = "fifo",
                 weight: Callable[[str], float] = lambda _account: 1.0) -> None:
        self._size = size
        self._clock = clock
        self._policy: Policy = policy
        self._weight = weight
        self._orders: dict[str, FairOrder] = {}
        self._futures: dict[Ticket, asyncio.Future[None]] = {}
        self._finished: dict[str, deque[float]] = {}

    def _order(self, model: str) -> FairOrder:
        order = self._orders.get(model)
        if order is None:
            order = self._orders[model] = FairOrder(self._policy, self._weight)
        return order

    def depth(self, model: str) -> int:
        order = self._orders.get(model)
        return len(order) if order is not None else 0

    def busy(self, model: str) -> bool:
        """Whether requests of `model` wait, or were called and are about to look for an engine: a new request
        then takes its place in the order rather than overtake them."""
        order = self._orders.get(model)
        return order is not None and (len(order) > 0 or order.calling > 0)

    def finished(self, model: str) -> None:
        """A request of `model` finished on an engine (its slot is free for the next)."""
        times = self._finished.setdefault(model, deque())
        now = self._clock()
        times.append(now)
        while times and times[0] < now - RATE_WINDOW_S:
            times.popleft()

    def rate(self, model: str) -> float | None:
        """Requests of `model` finishing per second lately, or None when too few finished to tell."""
        times = self._finished.get(model)
        if not times:
            return None
        now = self._clock()
        while times and times[0] < now - RATE_WINDOW_S:
            times.popleft()
        if len(times) < RATE_MIN_FINISHES:
            return None
        return (len(times) - 1) / max(now - times[0], 1e-3)

    def expected_wait_s(self, model: str) -> float:
        """How long a request joining now would wait: those ahead of it and itself, at the rate requests
        finish; 0 when the rate is not known (then only the deadline bounds the wait)."""
        rate = self.rate(model)
        return 0.0 if rate is None else (self.depth(model) + 1) / rate

    def join(self, model: str, account: str) -> Ticket:
        """A place in `model`'s order for a request of `account`. Raises QueueFull where a count bound is set
        and reached. The caller ends it with `leave`."""
        order = self._order(model)
        if self._size and len(order) >= self._size:
            raise QueueFull(model)
        return order.join(account)

    def first(self, model: str, ticket: Ticket) -> bool:
        """Whether `ticket` is the next in its order (it may then look for an engine on its own timer)."""
        return self._order(model).head() is ticket

    def take(self, model: str, ticket: Ticket) -> None:
        """The head `ticket` looks for an engine on its own timer: it is called, as if woken."""
        self._order(model).take(ticket)

    def leave(self, model: str, ticket: Ticket, served: bool = False) -> None:
        """`ticket`'s request got an engine (`served`) or stopped waiting. One that was called and did not use
        its turn (its client went away, or it was refused) passes the turn to the next."""
        passed_on = ticket.called and not served
        self._order(model).leave(ticket, served)
        future = self._futures.pop(ticket, None)
        if future is not None and not future.done():
            future.cancel()
        if passed_on:
            self.wake_one(model)

    async def wait(self, model: str, within_s: float, ticket: Ticket | None = None) -> bool:
        """Waits for `ticket`'s turn; True when called, False when `within_s` passed (it then keeps its place).
        A called ticket that waits again goes back in its place.
        Without a ticket, one of account "" is made and ended here. Raises QueueFull where a count bound is set
        and reached."""
        own = ticket is None
        if ticket is None:
            ticket = self.join(model, "")
        try:
            self._order(model).push(ticket)  # back in its place, if it was called and found no engine
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._futures[ticket] = future
            try:
                return await within(future, within_s)
            finally:
                if self._futures.get(ticket) is future:
                    del self._futures[ticket]
        finally:
            if own:
                self.leave(model, ticket, served=True)

    def _call(self, ticket: Ticket) -> None:
        future = self._futures.pop(ticket, None)
        if future is not None and not future.done():
            future.set_result(None)

    def wake_all(self, model: str) -> None:
        """Calls every waiting request of `model`, in its order (they resume in that order and look in turn)."""
        order = self._orders.get(model)
        for ticket in order.pop_all() if order is not None else ():
            self._call(ticket)

    def wake_one(self, model: str) -> None:
        """Calls the next waiting request of `model`."""
        order = self._orders.get(model)
        ticket = order.pop() if order is not None else None
        if ticket is not None:
            self._call(ticket)


def for_gateway(config: GatewayConfig) -> WaitQueue:
    """The waiting room [gateway] describes: its count bound, its order, and the accounts' weights."""
    policy: Policy = "fifo" if config.queue_policy == "fifo" else "fair"
    return WaitQueue(config.queue_size, policy=policy, weight=weights(config.accounts))
