"""Waiting with a time limit without losing a cancellation: the one way the controller, the gateway and the agent
wait for an event, a future or a subprocess with a bound.

Python 3.11's `asyncio.wait_for` returns the awaited result when its task is cancelled just as that result arrives
(CPython gh-86296, fixed in 3.12's rewrite on `asyncio.timeout`). The cancellation is then lost: a loop around the
wait goes on, and shutdown (`asyncio.run`, a test's event loop) waits for that task for ever. Seen in CI: the gateway
feed's publisher was cancelled in the moment a gateway's leaving set its change event, and the test's loop never
closed. `asyncio.timeout` keeps an outside cancellation apart from its own.

Responsible for: bounding a wait and saying whether it finished. Not responsible for: what is waited for, retries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[object], timeout_s: float) -> bool:
    """Awaits `aw` for at most `timeout_s`: True when it finished, False when the time ran out (it is then
    cancelled). A cancellation of the caller always propagates."""
    try:
        async with asyncio.timeout(timeout_s):
            await aw
    except TimeoutError:
        return False
    return True


async def bounded(aw: Awaitable[T], timeout_s: float) -> T:
    """`aw`'s result, or TimeoutError after `timeout_s` (`aw` is then cancelled): `asyncio.wait_for` that never
    swallows a cancellation of the caller."""
    async with asyncio.timeout(timeout_s):
        return await aw
