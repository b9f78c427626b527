"""The event loop both the controller and the gateway tier run on.

Responsible for: choosing uvloop where it is installed, asyncio's own loop otherwise.
Not responsible for: anything that runs on the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None (asyncio's default) where uvloop is not installed."""
    # uvloop lowers the gateway's per-request CPU cost (bench/gateway_overhead.py); asyncio's loop works too.
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
