"""Bounded per-model waiting room for requests that have no engine to go to yet.

A request waits here while its model has no routable engine (scale from zero, or every engine failed it) or
every engine is at its outstanding limit. It is woken when the Registry says an engine may have become
routable (all waiters of the model) or when a request of the model finishes (the oldest waiter). A woken
request re-checks for itself; it is not handed an engine. This module does not decide what to answer when
the queue is full or the wait expires (the gateway does).
"""

from __future__ import annotations

import asyncio
from collections import deque


class QueueFull(Exception):
    """The model's queue already holds `size` requests."""


class WaitQueue:
    def __init__(self, size: int) -> None:
        self._size = size
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}

    def depth(self, model: str) -> int:
        waiters = self._waiters.get(model)
        return len(waiters) if waiters else 0

    async def wait(self, model: str, within_s: float) -> bool:
        """Waits to be woken; True when woken, False when `within_s` passed. Raises QueueFull."""
        waiters = self._waiters.setdefault(model, deque())
        if len(waiters) >= self._size:
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
