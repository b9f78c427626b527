"""slinfer.waits: a bounded wait never loses the caller's cancellation (Python 3.11's asyncio.wait_for does when the
awaited result arrives in the same moment, CPython gh-86296: CI's feed test hung at its event loop's close)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from slinfer.waits import bounded, within


async def _loop_cancelled_as_event_set(wait: Callable[[asyncio.Event], Awaitable[object]]) -> bool:
    """A task that waits for an event in a loop, as the feed's publisher does, cancelled in the same moment as the
    event is set (the hub's last watcher leaving does both): whether the task ended within 2 s."""
    event = asyncio.Event()
    rounds = 0

    async def publisher() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            await wait(event)
            event.clear()

    task = asyncio.create_task(publisher())
    await asyncio.sleep(0.01)
    assert rounds == 1  # waiting on the event
    event.set()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=2.0)
    if not done:
        task.cancel()  # a second cancellation, not in the same moment, ends it
        await asyncio.wait([task], timeout=2.0)
    return bool(done)


async def test_a_cancellation_in_the_moment_the_event_is_set_ends_the_loop() -> None:
    assert await _loop_cancelled_as_event_set(lambda e: within(e.wait(), 30.0))


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="gh-86296 is fixed in 3.12: the control shows the bug")
async def test_control_python_3_11s_wait_for_loses_that_cancellation() -> None:
    async def wait_for(e: asyncio.Event) -> None:
        try:
            await asyncio.wait_for(e.wait(), 30.0)
        except TimeoutError:
            pass

    assert not await _loop_cancelled_as_event_set(wait_for)


async def test_within_says_whether_it_finished_and_bounded_returns_or_raises() -> None:
    event = asyncio.Event()
    assert not await within(event.wait(), 0.05)
    asyncio.get_running_loop().call_later(0.02, event.set)
    assert await within(event.wait(), 5.0)
    assert await bounded(asyncio.sleep(0.01, result=7), 5.0) == 7
    with pytest.raises(TimeoutError):
        await bounded(asyncio.sleep(5.0), 0.05)
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    assert not await within(future, 0.01)
    assert future.cancelled()  # what timed out is cancelled, as wait_for did


def test_nothing_in_the_services_waits_with_asyncio_wait_for() -> None:
    """The loops of the controller, the gateway and the agent wait through slinfer.waits."""
    root = Path(__file__).resolve().parents[2]
    files = [p for d in ("controller", "agent", "slinfer/slurm") for p in sorted((root / d).rglob("*.py"))]
    assert root / "controller" / "gatewayhub.py" in files
    assert [str(p.relative_to(root)) for p in files if "asyncio.wait_for(" in p.read_text()] == []
