"""The gateway tier's miss path for client keys (controller/keywait.py): a key made a moment ago works at once
through a tier worker, a wrong key is refused within the bound, and unknown keys neither pile up in a worker nor
reach the controller."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time

import aiohttp
import pytest

from slinfer.controller import keywait
from slinfer.controller.keys import KeyInfo, KeyStore
from slinfer.controller.keywait import KeyWait
from tests.unit.test_gateway_tier import Tier, tier, worker  # noqa: F401  (tier: a fixture used by name)

INFO = KeyInfo(key_id="k1", name="alice")


def _store() -> tuple[KeyStore, dict[str, KeyInfo]]:
    """A stand-in for the worker's table: verify() finds what the test put in `known`."""
    known: dict[str, KeyInfo] = {}
    store = KeyStore.mirror([])
    store.verify = known.get  # type: ignore[method-assign]
    return store, known


async def test_a_key_that_arrives_with_the_next_feed_message_is_let_in() -> None:
    store, known = _store()
    late = KeyWait(store.verify, lambda: True, wait_s=2.0)

    def arrive() -> None:
        known["s3cret"] = INFO
        late.fed()

    asyncio.get_running_loop().call_later(0.1, late.fed)  # an unrelated message first: the key is not in it
    asyncio.get_running_loop().call_later(0.2, arrive)
    began = time.monotonic()
    assert await late.verify("s3cret") is INFO
    took = time.monotonic() - began
    assert 0.15 < took < 0.6, f"let in after {took:.2f} s: the message that brought it, not before, not the bound"
    assert (late.found_late, late.refused_after_wait, late.waiting) == (1, 0, 0)
    # Control: the same arrival with no wait is a 401.
    known.clear()
    asyncio.get_running_loop().call_later(0.05, arrive)
    assert await KeyWait(store.verify, lambda: True, wait_s=0.0).verify("s3cret") is None


async def test_a_wrong_key_is_refused_at_the_bound_and_at_once_when_no_feed_can_come() -> None:
    store, known = _store()
    known["good"] = INFO
    late = KeyWait(store.verify, lambda: True, wait_s=0.3)
    began = time.monotonic()
    assert await late.verify("good") is INFO
    assert time.monotonic() - began < 0.05  # a known key never waits
    began = time.monotonic()
    assert await late.verify("wrong") is None
    took = time.monotonic() - began
    assert 0.3 <= took < 0.6 and late.refused_after_wait == 1
    # The watch of the controller is down: nothing can bring the key, so no wait.
    away = KeyWait(store.verify, lambda: False, wait_s=5.0)
    began = time.monotonic()
    assert await away.verify("wrong") is None
    assert time.monotonic() - began < 0.05 and away.refused_at_once == 1


async def test_a_revoked_key_is_refused_at_once_and_the_memory_of_revocations_is_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    store, known = _store()
    late = KeyWait(store.verify, lambda: True, wait_s=0.5)
    known["old"] = INFO
    assert await late.verify("old") is INFO
    del known["old"]
    late.fed([hashlib.sha256(b"old").digest()])  # the feed's delta that revoked it
    began = time.monotonic()
    assert await late.verify("old") is None
    assert time.monotonic() - began < 0.05 and late.refused_at_once == 1
    # Control: a key never seen still waits for the feed.
    began = time.monotonic()
    assert await late.verify("never") is None
    assert time.monotonic() - began >= 0.5 and late.refused_after_wait == 1
    # Only the last MAX_GONE revocations are kept: the oldest then waits as an unknown key does.
    monkeypatch.setattr(keywait, "MAX_GONE", 3)
    late.fed([hashlib.sha256(f"k{i}".encode()).digest() for i in range(4)])
    assert len(late._gone) == 3 and hashlib.sha256(b"k0").digest() not in late._gone
    assert hashlib.sha256(b"k3").digest() in late._gone


async def test_a_flood_of_random_keys_holds_at_most_max_waiters() -> None:
    store, _ = _store()
    late = KeyWait(store.verify, lambda: True, wait_s=0.3, max_waiters=64)
    peak = 0

    async def one() -> KeyInfo | None:
        nonlocal peak
        task = asyncio.ensure_future(late.verify(secrets.token_hex(16)))
        peak = max(peak, late.waiting)
        return await task

    began = time.monotonic()
    results = await asyncio.gather(*(one() for _ in range(1000)))
    took = time.monotonic() - began
    assert results == [None] * 1000
    assert late.refused_after_wait == 64 and late.refused_at_once == 1000 - 64, (late.refused_after_wait,
                                                                                   late.refused_at_once)
    assert late.waiting == 0 and took < 1.0
    assert peak <= 64


# ---- through a real tier worker fed by the controller's GatewayHub over gRPC --------------------------------
def _slow_feed(t: Tier, delay_s: float) -> None:
    """The controller publishes key changes `delay_s` late (a busy controller): the race made deterministic."""
    loop = asyncio.get_running_loop()
    listeners = list(t.keys._listeners)
    t.keys._listeners = [lambda d, f=f: loop.call_later(delay_s, f, d) for f in listeners]


async def _models(http: aiohttp.ClientSession, url: str, secret: str) -> tuple[int, float]:
    began = time.monotonic()
    async with http.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {secret}"}) as resp:
        return resp.status, time.monotonic() - began


async def test_a_key_made_and_used_at_once_works_through_the_tier(tier: Tier,  # noqa: F811
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    async with worker(tier, "gw-a") as url, aiohttp.ClientSession() as http:
        _slow_feed(tier, 0.3)
        _, secret = tier.keys.create("alice")
        status, took = await _models(http, url, secret)
        assert status == 200 and 0.25 < took < keywait.KEY_WAIT_S, f"{status} after {took:.2f} s"
        # Control: the same race without the wait is the 401 a user would have seen.
        monkeypatch.setattr(keywait, "KEY_WAIT_S", 0.0)
    async with worker(tier, "gw-b") as url, aiohttp.ClientSession() as http:
        _slow_feed(tier, 0.3)
        _, secret = tier.keys.create("bob")
        status, _ = await _models(http, url, secret)
        assert status == 401


async def test_a_revoked_key_gets_its_401_at_once_through_the_tier(tier: Tier) -> None:  # noqa: F811
    key_id, secret = tier.keys.create("carol")
    async with worker(tier, "gw-a") as url, aiohttp.ClientSession() as http:
        assert (await _models(http, url, secret))[0] == 200
        tier.keys.revoke(key_id)
        for _ in range(100):
            status, took = await _models(http, url, secret)
            if status == 401:
                break
        assert status == 401 and took < 0.2, f"the first 401 after {took:.2f} s"
        status, took = await _models(http, url, secret)
        assert status == 401 and took < 0.1, f"a revoked key waited {took:.2f} s"
        # Control: a key the worker never saw waits for the feed before its 401.
        status, took = await _models(http, url, "never-made")
        assert status == 401 and took >= keywait.KEY_WAIT_S


async def test_random_keys_ask_the_controller_nothing(tier: Tier, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setattr(keywait, "KEY_WAIT_S", 0.3)
    async with worker(tier, "gw-a") as url, aiohttp.ClientSession() as http:
        lookups = 0
        lookup = tier.keys.lookup

        def counted(digest: bytes) -> KeyInfo | None:
            nonlocal lookups
            lookups += 1
            return lookup(digest)

        monkeypatch.setattr(tier.keys, "lookup", counted)
        watches = tier.hub.connected()
        began = time.monotonic()
        codes = await asyncio.gather(*(_models(http, url, secrets.token_hex(16)) for _ in range(200)))
        took = time.monotonic() - began
        assert {c for c, _ in codes} == {401}
        assert all(t >= 0.3 for _, t in codes), "each waited for the feed before its 401"
        assert lookups == 0 and tier.hub.connected() == watches, "the controller was asked"
        assert took < 3.0
        # Positive control: the counter sees the controller's own key checks.
        tier.keys.verify("x")
        assert lookups == 1


async def test_a_key_made_and_used_at_once_lists_its_files_through_the_tier(tier: Tier,  # noqa: F811
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """/v1/files (and /v1/batches, through the same check) wait for a late key as chat does: a batch user makes a
    key and uploads at once."""
    async with worker(tier, "gw-a") as url, aiohttp.ClientSession() as http:
        _slow_feed(tier, 0.3)
        _, secret = tier.keys.create("alice")
        async with http.get(f"{url}/v1/files", headers={"Authorization": f"Bearer {secret}"}) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["data"] == []
        monkeypatch.setattr(keywait, "KEY_WAIT_S", 0.0)
    # Control: without the wait the same race is a 401.
    async with worker(tier, "gw-b") as url, aiohttp.ClientSession() as http:
        _slow_feed(tier, 0.3)
        _, secret = tier.keys.create("bob")
        async with http.get(f"{url}/v1/files", headers={"Authorization": f"Bearer {secret}"}) as resp:
            assert resp.status == 401


async def test_settle_waits_for_the_feed_while_the_state_holds_and_not_without_a_feed() -> None:
    store, _ = _store()
    pinned = {"m"}
    late = KeyWait(store.verify, lambda: True, wait_s=2.0)

    def unpin() -> None:
        pinned.clear()
        late.fed()

    asyncio.get_running_loop().call_later(0.1, late.fed)  # an unrelated message: still pinned, it waits on
    asyncio.get_running_loop().call_later(0.2, unpin)
    began = time.monotonic()
    await late.settle(lambda: "m" in pinned)
    assert 0.15 < time.monotonic() - began < 1.0 and not pinned
    # Bounded: a pin that stays is waited on only up to the bound; with no feed, not at all.
    bounded = KeyWait(store.verify, lambda: True, wait_s=0.3)
    began = time.monotonic()
    await bounded.settle(lambda: True)
    assert 0.3 <= time.monotonic() - began < 0.8
    cut_off = KeyWait(store.verify, lambda: False, wait_s=2.0)
    began = time.monotonic()
    await cut_off.settle(lambda: True)
    assert time.monotonic() - began < 0.1
