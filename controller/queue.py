"""Per-model waiting room for requests that have no engine to go to yet, bounded by time.

A request waits here while its model has no routable engine (scale from zero, or every engine failed it) or
every engine is full (at `[gateway].max_outstanding_per_engine` where one is set, else reporting requests
waiting with its KV cache full). It is woken when the Registry says an engine may have become routable (all
waiters of the model) or when a request of the model finishes (the oldest waiter). A woken request re-checks
for itself; it is not handed an engine. The queue measures how fast each model's requests finish
(`finished`), so the gateway can tell at once whether a new request's wait would pass `queue_timeout_s`
(`expected_wait_s`). A count bound (`size`) applies only where the administrator set one.
This module does not decide what to answer when a wait is refused or expires (the gateway does).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable


class QueueFull(Exception):
    """The model's queue already holds `size` requests (a count bound the administrator set)."""


# Finishes within this window make a model's service rate: long enough to smooth a burst of short requests,
# short enough to follow a replica coming or going.
RATE_WINDOW_S = 10.0
# Fewer finishes than this in the window tell too little: a wait is then bounded by queue_timeout_s alone.
RATE_MIN_FINISHES = 4


class WaitQueue:
    def __init__(self, size: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self._size = size
        self._clock = clock
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._finished: dict[str, deque[float]] = {}

    def depth(self, model: str) -> int:
        waiters = self._waiters.get(model)
        return len(waiters) if waiters else 0

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

    async def wait(self, model: str, within_s: float) -> bool:
        """Waits to be woken; True when woken, False when `within_s` passed. Raises QueueFull where a count
        bound is set and reached."""
        waiters = self._waiters.setdefault(model, deque())
        if self._size and len(waiters) >= self._size:
            raise QueueFull(model)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(future)
        try:
            await asyncio.wait_for(future, within_s)
            return True
        except TimeoutError:
            return False
        finally:
            if not future.done():
                future.cancel()
            try:
                waiters.remove(future)
            except ValueError:
                pass

    def wake_all(self, model: str) -> None:
        for future in self._waiters.get(model, ()):
            if not future.done():
                future.set_result(None)

    def wake_one(self, model: str) -> None:
        for future in self._waiters.get(model, ()):
            if not future.done():
                future.set_result(None)
                return
