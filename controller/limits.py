"""Per-key limits of the gateway: a request rate with a burst, and a token quota per UTC day.

Responsible for: deciding, for one authenticated key, whether a new request may go on now, and if not, which
OpenAI-shaped 429 to answer and after how many seconds to retry. The rate is a token bucket per key
(`requests_per_minute` refilled evenly, `burst` deep); the quota compares the key's prompt plus completion
tokens of the current UTC day, as the usage ledger counts them, with `tokens_per_day`. A key's own limits
(set with `slinfer keys create --rpm N --tokens-per-day N`) replace the `[gateway]` defaults; 0 means no limit.
Not responsible for: authenticating keys (the KeyStore), counting tokens (the UsageLedger, asked through
`tokens_today`), or writing the HTTP answer (the gateway).

A quota is checked before a request and charged after its answer, so a key can overshoot its quota by the
tokens of the requests it had in flight when it crossed it; the next request is then refused.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from slinfer.controller.keys import KeyInfo

log = logging.getLogger(__name__)

DAY_S = 86400


@dataclass(frozen=True)
class KeyLimits:
    """0 in a field means no limit."""

    requests_per_minute: int = 0
    # Requests a key may send at once before the rate applies; 0 means a full minute's worth.
    burst: int = 0
    tokens_per_day: int = 0


@dataclass(frozen=True)
class Refusal:
    """Why a request may not go on now: the gateway answers 429 with these."""

    code: str  # "rate_limit_exceeded" or "insufficient_quota", as OpenAI names them
    message: str
    retry_after_s: int


class _Bucket:
    __slots__ = ("level", "updated")

    def __init__(self, level: float, updated: float) -> None:
        self.level = level
        self.updated = updated


class Limiter:
    """The rate buckets of every key seen, and the quota check against the ledger's daily totals.

    Memory is one small bucket per key that sent a request; keys are created by the admin, so this is bounded
    by the key store, not by clients.
    """

    def __init__(self, defaults: KeyLimits, tokens_today: Callable[[str], int],
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self._defaults = defaults
        self._tokens_today = tokens_today
        self._clock = clock
        self._wall = wall
        self._buckets: dict[str, _Bucket] = {}
        self._warned: dict[str, str] = {}

    def limits_for(self, key: KeyInfo) -> KeyLimits:
        d = self._defaults
        rpm = d.requests_per_minute if key.requests_per_minute is None else key.requests_per_minute
        tokens = d.tokens_per_day if key.tokens_per_day is None else key.tokens_per_day
        burst = d.burst if key.burst is None else key.burst
        return KeyLimits(requests_per_minute=rpm, burst=burst, tokens_per_day=tokens)

    def check(self, key: KeyInfo) -> Refusal | None:
        """None when the request may go on (and then it has taken its place in the rate); else the refusal."""
        limits = self.limits_for(key)
        if limits.tokens_per_day:
            used = self._tokens_today(key.key_id)
            if used >= limits.tokens_per_day:
                now = self._wall()
                retry = max(1, math.ceil((math.floor(now / DAY_S) + 1) * DAY_S - now))
                self._note(key, "quota", f"{used} of {limits.tokens_per_day} tokens today")
                return Refusal("insufficient_quota",
                               f"This key used {used} of its {limits.tokens_per_day} tokens for today (UTC); "
                               f"the quota renews at midnight UTC.", retry)
        if limits.requests_per_minute:
            rate = limits.requests_per_minute / 60.0
            depth = float(limits.burst or limits.requests_per_minute)
            now = self._clock()
            bucket = self._buckets.get(key.key_id)
            if bucket is None:
                bucket = self._buckets[key.key_id] = _Bucket(depth, now)
            else:
                bucket.level = min(depth, bucket.level + (now - bucket.updated) * rate)
                bucket.updated = now
            if bucket.level < 1.0:
                retry = max(1, math.ceil((1.0 - bucket.level) / rate))
                self._note(key, "rate", f"{limits.requests_per_minute}/min, burst {depth:.0f}")
                return Refusal("rate_limit_exceeded",
                               f"This key is limited to {limits.requests_per_minute} requests per minute "
                               f"(burst {depth:.0f}); retry in {retry} s.", retry)
            bucket.level -= 1.0
        if self._warned.pop(key.key_id, None) is not None:
            log.info("key %s (%s) is within its limits again", key.key_id, key.name)
        return None

    def _note(self, key: KeyInfo, kind: str, numbers: str) -> None:
        # Logged when a key starts being refused, not on every refused request.
        if self._warned.get(key.key_id) != kind:
            self._warned[key.key_id] = kind
            log.info("key %s (%s, account %r) refused with 429: %s limit reached (%s)", key.key_id, key.name,
                     key.account, kind, numbers)
