"""Limits of the gateway per key, per Slurm account and per Slurm user: a request rate, a token quota per UTC
day, and the models allowed.

Responsible for: deciding, for one authenticated key, whether a new request may go on now, and if not, which
OpenAI-shaped 429 to answer and after how many seconds to retry; and whether the key may use a model (else the
403's message). The rate is a token bucket per key (`requests_per_minute` refilled evenly, `burst` deep); the
quota compares the key's prompt plus completion tokens of the current UTC day, as the usage ledger counts
them, with `tokens_per_day`. A key's own limits (set with `slinfer keys create --rpm N --tokens-per-day N`)
replace the `[gateway]` defaults; 0 means no limit. On top, the key's account ([gateway.accounts.NAME], else
[gateway.accounts."*"]) and the key's user ([gateway.users.NAME], else "*") have a rate (a bucket per account
or user, a minute's worth deep, at each gateway worker), a daily quota over all their keys' tokens, and a list
of models. A key without an account (or without a user: an administrator's key) has no account (user) limits.
Every refusal names the limit and its config key.
Not responsible for: authenticating keys (the KeyStore), counting tokens (the UsageLedger, asked through
`tokens_today`; an account's or user's sum through `group_tokens`), or writing the HTTP answer (the gateway).

A quota is checked before a request and charged after its answer, so a key can overshoot its quota by the
tokens of the requests it had in flight when it crossed it; the next request is then refused.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from slinfer.config import AccountConfig, UserConfig
from slinfer.controller.keys import KeyInfo, KeyStore

log = logging.getLogger(__name__)

DAY_S = 86400
# A TOML bare key: a table name shown as is in a refusal's config key; another is quoted.
_BARE = re.compile(r"[A-Za-z0-9_-]+")
# An account's or a user's tokens today are a sum over its keys: computed at most this often per account or
# user (a quota is already checked before and charged after a request, so it can overshoot by a little anyway).
GROUP_TOKENS_TTL_S = 1.0


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


class GroupTokens:
    """Tokens today of all the keys of an account, or of a user: the sum of the keys' own totals."""

    def __init__(self, keys: KeyStore, tokens_today: Callable[[str], int],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._keys = keys
        self._tokens_today = tokens_today
        self._clock = clock
        self._cache: dict[tuple[str, str], tuple[float, int]] = {}

    def __call__(self, kind: str, name: str) -> int:
        now = self._clock()
        cached = self._cache.get((kind, name))
        if cached is not None and now - cached[0] < GROUP_TOKENS_TTL_S:
            return cached[1]
        total = sum(self._tokens_today(k.key_id) for k in self._keys.list()
                    if (k.account if kind == "account" else k.user) == name)
        if len(self._cache) > 10000:  # accounts and users of keys that came and went
            self._cache.clear()
        self._cache[(kind, name)] = (now, total)
        return total


@dataclass(frozen=True)
class _Group:
    """An account's or a user's limits as the gateway applies them."""

    kind: str  # "account" or "user"
    name: str
    config_key: str  # the [gateway.accounts.NAME] table that set them
    requests_per_minute: int
    tokens_per_day: int
    models: tuple[str, ...]


class Limiter:
    """The rate buckets of every key, account and user seen, and the quota checks against the ledger's daily
    totals.

    Memory is one small bucket per key, account and user that sent a request; keys are created by the admin or
    by users through munge, bounded per user, so this is bounded by the key store, not by clients.
    """

    def __init__(self, defaults: KeyLimits, tokens_today: Callable[[str], int],
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time, *,
                 accounts: Mapping[str, AccountConfig] | None = None, users: Mapping[str, UserConfig] | None = None,
                 group_tokens: Callable[[str, str], int] | None = None) -> None:
        self._defaults = defaults
        self._tokens_today = tokens_today
        self._clock = clock
        self._wall = wall
        self._buckets: dict[str, _Bucket] = {}
        self._warned: dict[str, str] = {}
        self._accounts = dict(accounts or {})
        self._users = dict(users or {})
        self._group_tokens = group_tokens

    def _groups(self, key: KeyInfo) -> list[_Group]:
        out = []
        for kind, name, table, section in (("account", key.account, self._accounts, "accounts"),
                                           ("user", key.user, self._users, "users")):
            if not name:
                continue
            entry_name = name if name in table else "*"
            entry = table.get(entry_name)
            if entry is None:
                continue
            shown = entry_name if entry_name == "*" or _BARE.fullmatch(entry_name) else json_name(entry_name)
            out.append(_Group(kind, name, f"[gateway.{section}.{shown}]", entry.requests_per_minute,
                              entry.tokens_per_day, tuple(entry.models)))
        return out

    def model_refusal(self, key: KeyInfo, model: str) -> str | None:
        """None when the key's account and user may use `model`; else the 403's message, naming the limit."""
        for group in self._groups(key):
            if group.models and model not in group.models:
                self._note(key, f"models of {group.kind}", f"{model!r} is not in {group.config_key}.models")
                return (f"The {group.kind} '{group.name}' may not use the model '{model}' "
                        f"({group.config_key}.models allows: {', '.join(group.models)}).")
        return None

    def _day_refusal(self, used: int, limit: int, whose: str) -> Refusal:
        now = self._wall()
        retry = max(1, math.ceil((math.floor(now / DAY_S) + 1) * DAY_S - now))
        return Refusal("insufficient_quota", f"{whose} used {used} of its {limit} tokens for today (UTC); the quota "
                       "renews at midnight UTC.", retry)

    def _take(self, bucket_id: str, rpm: int, burst: int) -> int:
        """0 when a request fits `bucket_id`'s rate (and takes its place); else the seconds until one would."""
        rate = rpm / 60.0
        depth = float(burst or rpm)
        now = self._clock()
        bucket = self._buckets.get(bucket_id)
        if bucket is None:
            bucket = self._buckets[bucket_id] = _Bucket(depth, now)
        else:
            bucket.level = min(depth, bucket.level + (now - bucket.updated) * rate)
            bucket.updated = now
        if bucket.level < 1.0:
            return max(1, math.ceil((1.0 - bucket.level) / rate))
        bucket.level -= 1.0
        return 0

    def _group_refusal(self, key: KeyInfo) -> Refusal | None:
        groups = self._groups(key)
        for group in groups:
            if group.tokens_per_day and self._group_tokens is not None:
                used = self._group_tokens(group.kind, group.name)
                if used >= group.tokens_per_day:
                    self._note(key, f"quota of {group.kind}", f"{used} of {group.tokens_per_day} tokens today")
                    return self._day_refusal(used, group.tokens_per_day,
                                             f"The {group.kind} '{group.name}' ({group.config_key}.tokens_per_day)")
        for group in groups:
            if group.requests_per_minute:
                retry = self._take(f"{group.kind}\0{group.name}", group.requests_per_minute, 0)
                if retry:
                    self._note(key, f"rate of {group.kind}", f"{group.requests_per_minute}/min")
                    return Refusal("rate_limit_exceeded",
                                   f"The {group.kind} '{group.name}' is limited to {group.requests_per_minute} "
                                   f"requests per minute at this gateway ({group.config_key}.requests_per_minute);"
                                   f" retry in {retry} s.", retry)
        return None

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
                self._note(key, "quota", f"{used} of {limits.tokens_per_day} tokens today")
                return self._day_refusal(used, limits.tokens_per_day, "This key")
        refusal = self._group_refusal(key)
        if refusal is not None:
            return refusal
        if limits.requests_per_minute:
            depth = limits.burst or limits.requests_per_minute
            retry = self._take(key.key_id, limits.requests_per_minute, depth)
            if retry:
                self._note(key, "rate", f"{limits.requests_per_minute}/min, burst {depth}")
                return Refusal("rate_limit_exceeded",
                               f"This key is limited to {limits.requests_per_minute} requests per minute "
                               f"(burst {depth}); retry in {retry} s.", retry)
        if self._warned.pop(key.key_id, None) is not None:
            log.info("key %s (%s) is within its limits again", key.key_id, key.name)
        return None

    def _note(self, key: KeyInfo, kind: str, numbers: str) -> None:
        # Logged when a key starts being refused, not on every refused request.
        if self._warned.get(key.key_id) != kind:
            self._warned[key.key_id] = kind
            log.info("key %s (%s, account %r) refused with 429: %s limit reached (%s)", key.key_id, key.name,
                     key.account, kind, numbers)


def json_name(name: str) -> str:
    """A table name as TOML writes a key that is not a bare word ("my.account" -> "\"my.account\"")."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
