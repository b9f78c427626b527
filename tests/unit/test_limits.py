"""Per-key limits: the rate bucket and the daily quota on a controlled clock, then through the real gateway."""

from __future__ import annotations

import asyncio
from pathlib import Path

import test_usage
from test_usage import register

from slinfer.config import ConfigError, parse
from slinfer.controller.keys import KeyInfo
from slinfer.controller.limits import DAY_S, KeyLimits, Limiter
from slinfer.controller.usage import UsageLedger

KEY = KeyInfo(key_id="k1", name="alice", account="physics")
bed = test_usage.bed  # the fixture: a gateway with a Limiter and a UsageLedger


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_burst_then_steady_rate_then_refill() -> None:
    clock = Clock()
    limiter = Limiter(KeyLimits(requests_per_minute=60, burst=5), lambda k: 0, clock=clock)
    assert [limiter.check(KEY) for _ in range(5)] == [None] * 5
    refusal = limiter.check(KEY)
    assert refusal is not None
    assert refusal.code == "rate_limit_exceeded" and refusal.retry_after_s == 1
    assert "60 requests per minute" in refusal.message
    clock.t += 1.0  # one request's worth at 1/s
    assert limiter.check(KEY) is None
    assert limiter.check(KEY) is not None
    clock.t += 100.0  # refills to the burst, not beyond
    assert [limiter.check(KEY) for _ in range(5)] == [None] * 5
    assert limiter.check(KEY) is not None


def test_burst_defaults_to_a_minute_and_keys_are_independent() -> None:
    clock = Clock()
    limiter = Limiter(KeyLimits(requests_per_minute=3), lambda k: 0, clock=clock)
    other = KeyInfo(key_id="k2", name="bob")
    assert [limiter.check(KEY) for _ in range(3)] == [None] * 3
    refusal = limiter.check(KEY)
    assert refusal is not None and refusal.retry_after_s == 20  # one request per 20 s
    assert limiter.check(other) is None


def test_key_override_replaces_the_default_and_zero_means_unlimited() -> None:
    clock = Clock()
    limiter = Limiter(KeyLimits(requests_per_minute=1, tokens_per_day=10), lambda k: 50, clock=clock)
    free = KeyInfo(key_id="free", name="free", requests_per_minute=0, tokens_per_day=0)
    assert all(limiter.check(free) is None for _ in range(1000))
    strict = KeyInfo(key_id="strict", name="strict", requests_per_minute=2, tokens_per_day=100)
    assert limiter.check(strict) is None and limiter.check(strict) is None
    assert limiter.check(strict) is not None
    assert limiter.limits_for(KEY) == KeyLimits(1, 0, 10)


def test_daily_quota_refuses_until_midnight_utc() -> None:
    used = {"k1": 0}
    wall = Clock(3 * DAY_S + 3600.0)  # 01:00 UTC
    limiter = Limiter(KeyLimits(tokens_per_day=1000), used.__getitem__, wall=wall)
    assert limiter.check(KEY) is None
    used["k1"] = 1000
    refusal = limiter.check(KEY)
    assert refusal is not None and refusal.code == "insufficient_quota"
    assert refusal.retry_after_s == 23 * 3600
    assert "1000 of its 1000 tokens" in refusal.message


def test_quota_comes_from_the_ledger_and_survives_a_restart(tmp_path: Path) -> None:
    from slinfer.controller.usage import Meter

    wall = Clock(10 * DAY_S + 100.0)
    ledger = UsageLedger(tmp_path / "usage", clock=wall)
    meter = Meter()
    meter.feed_body(b'{"usage": {"prompt_tokens": 30, "completion_tokens": 80}}')
    ledger.record("k1", "alice", "physics", "m", 200, meter)
    limiter = Limiter(KeyLimits(tokens_per_day=100), ledger.tokens_today, wall=wall)
    assert limiter.check(KEY) is not None
    ledger.flush()
    restarted = Limiter(KeyLimits(tokens_per_day=100), UsageLedger(tmp_path / "usage", clock=wall).tokens_today,
                        wall=wall)
    assert restarted.check(KEY) is not None
    wall.t += DAY_S  # the next UTC day starts from zero
    assert restarted.check(KEY) is None


def test_config_limits_are_checked_by_name() -> None:
    assert parse({"gateway": {"key_requests_per_minute": 60, "key_tokens_per_day": 10}}).gateway.key_burst == 0
    for key, value, name in (("key_requests_per_minute", -1, "gateway.key_requests_per_minute"),
                             ("key_burst", "5", "gateway.key_burst"),
                             ("usage_flush_s", 0, "gateway.usage_flush_s")):
        try:
            parse({"gateway": {key: value}})
        except ConfigError as exc:
            assert exc.key == name
        else:
            raise AssertionError(f"{key}={value!r} was accepted")


async def test_gateway_answers_429_with_retry_after_in_openai_shape(bed, standins, http, engine_pb) -> None:
    b = await bed()
    engine = await standins(model="m")
    await register(b, engine.base_url, engine_pb)
    _, secret = b.keys.create("limited", account="physics", requests_per_minute=2)
    _, free_secret = b.keys.create("free", account="physics")
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    statuses = []
    for _ in range(3):
        async with http.post(f"{b.url}/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {secret}"}) as resp:
            statuses.append(resp.status)
            answer = await resp.json()
            retry_after = resp.headers.get("Retry-After")
    assert statuses == [200, 200, 429]
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["code"] == "rate_limit_exceeded" and answer["error"]["type"] == "rate_limit_error"
    assert retry_after == "30"
    assert engine.seen.requests == 2  # the refused request never reached the engine
    # Other keys are not held back by one key's limit.
    results = await asyncio.gather(*(http.post(f"{b.url}/v1/chat/completions", json=body,
                                               headers={"Authorization": f"Bearer {free_secret}"})
                                     for _ in range(10)))
    assert [r.status for r in results] == [200] * 10
    for r in results:
        r.release()
    # The refused request is in the ledger as a failed one, without a model (refused before the body is read).
    rows = {r.model: (r.requests, r.failed) for r in b.ledger.query() if r.key_name == "limited"}
    assert rows == {"m": (2, 0), "": (1, 1)}
