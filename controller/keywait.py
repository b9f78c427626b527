"""A gateway tier worker's miss path for client keys: a key made a moment ago works at once.

A key made through the admin API reaches the tier with the controller's feed, tens of ms after the admin call
answered: a client that makes a key and uses it at once would meet a worker that does not know it yet. A key
that is not in the worker's table is therefore not refused at once: the worker waits for the feed's next
messages, checking the key after each, until it appears or `KEY_WAIT_S` passed, and only then answers 401.
A key the feed revoked is refused at once: nothing more can come for it.

Responsible for: that bounded wait (woken by every message the feed applies, never by polling; the same
wait for a model an administrator unpinned from 0 a moment ago, `settle`), answering at
once where waiting cannot help (the watch of the controller is down: no message is coming), and bounding what
unknown keys cost: at most `MAX_WAITERS` requests wait at once per worker, the others are refused at once.
The wait asks the controller nothing, so random keys add no load to it, however many are sent.
Not responsible for: the keys themselves (keys.KeyStore, fed by routefeed.RouteFeed), the 401 answer
(gateway.py), or the built-in gateway, whose keys are the controller's own and never late.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Iterable

from slinfer.controller.keys import KeyInfo
from slinfer.waits import within

# The feed brings a new key to every worker in 20-25 ms (bench/feed_scale.py, 32 watchers); a second leaves room
# for a busy controller and still answers a wrong key within a second, as a login prompt's delay would.
KEY_WAIT_S = 1.0
# Unknown keys waiting at once per worker; beyond it a miss is answered at once (401), so a flood of random keys
# holds at most this many coroutines and sockets in the wait.
MAX_WAITERS = 256
# Revoked keys remembered per worker (their SHA-256, 32 bytes each: 128 KiB), so that a revoked key gets its 401 at
# once; the oldest is forgotten first, and a forgotten one only waits KEY_WAIT_S as an unknown key does.
MAX_GONE = 4096


class KeyWait:
    def __init__(self, verify: Callable[[str], KeyInfo | None], connected: Callable[[], bool],
                 wait_s: float | None = None, max_waiters: int | None = None) -> None:
        self._verify = verify
        self._connected = connected
        self._wait_s = KEY_WAIT_S if wait_s is None else wait_s
        self._max_waiters = MAX_WAITERS if max_waiters is None else max_waiters
        self._fed = asyncio.Event()
        self._gone: dict[bytes, None] = {}  # digests of revoked keys, oldest first
        self.waiting = 0
        # What the misses came to, for tests and logs: found after a wait, refused after one, refused at once.
        self.found_late = 0
        self.refused_after_wait = 0
        self.refused_at_once = 0

    def fed(self, removed: Iterable[bytes] = ()) -> None:
        """The feed applied a message, which revoked the keys with these digests: every waiter checks its key
        again."""
        for digest in removed:
            self._gone.pop(digest, None)
            self._gone[digest] = None
            if len(self._gone) > MAX_GONE:
                del self._gone[next(iter(self._gone))]
        event, self._fed = self._fed, asyncio.Event()
        event.set()

    async def verify(self, presented: str) -> KeyInfo | None:
        info = self._verify(presented)
        if info is not None:
            return info
        if (not self._connected() or self.waiting >= self._max_waiters
                or hashlib.sha256(presented.encode()).digest() in self._gone):
            self.refused_at_once += 1
            return None
        deadline = time.monotonic() + self._wait_s
        self.waiting += 1
        try:
            while (left := deadline - time.monotonic()) > 0:
                await within(self._fed.wait(), left)
                info = self._verify(presented)
                if info is not None:
                    self.found_late += 1
                    return info
        finally:
            self.waiting -= 1
        self.refused_after_wait += 1
        return None

    async def settle(self, still: Callable[[], bool]) -> None:
        """Waits while `still()` holds for the feed's next messages, up to the same bound as a key and under the
        same cap of waiters: a model an administrator unpinned from 0 a moment ago is seen unpinned. Returns at
        once when no message can come."""
        if not self._connected() or self.waiting >= self._max_waiters:
            return
        deadline = time.monotonic() + self._wait_s
        self.waiting += 1
        try:
            while still() and (left := deadline - time.monotonic()) > 0:
                await within(self._fed.wait(), left)
        finally:
            self.waiting -= 1
