"""The feed's full state at a site's scale (issue 35.4): serialized once per version and sent in bounded pages,
the same bytes to every gateway that connects at that version; a gateway gathers the pages aside and replaces its
copy at the last one; a delta as large as the state is not kept in the log as a second copy. Each test counts
bytes, builds or copies, with a control."""

from __future__ import annotations

import asyncio
from collections import deque
from pathlib import Path

import grpc
import pytest

from slinfer.controller import feedlog, gatewayhub
from slinfer.controller.feedlog import FeedLog, FeedMirror
from slinfer.controller.gatewayhub import GatewayHub
from slinfer.controller.keys import KeyStore
from slinfer.controller.limits import KeyLimits, Limiter
from slinfer.controller.registry import Registry
from slinfer.controller.usage import UsageLedger, UsageRow
from slinfer.v1 import controller_pb2, engine_pb2, gateway_pb2, gateway_pb2_grpc

TOKEN = "pages-token"


def _feed(keys: int = 300, replicas: int = 40, totals: int = 300) -> FeedLog:
    feed = FeedLog(epoch="e1")
    rows = [(str(j), "m", f"n{j % 5}", f"http://e{j}:8000", f"key{j}", engine_pb2.READY, True, False, True)
            for j in range(replicas)]
    ks = {i.to_bytes(32, "big"): gateway_pb2.ClientKey(sha256=i.to_bytes(32, "big"), key_id=f"k{i}",
                                                       name=f"user{i}", requests_per_minute=60)
          for i in range(keys)}
    feed.publish(rows, ks, ["z"], "2026-12-07", {f"k{i}": i + 1 for i in range(totals)}, 3)
    return feed


def _apply_all(mirror: FeedMirror, pages: list[bytes]) -> list[feedlog.Applied | None]:
    return [mirror.apply(gateway_pb2.RouteTable.FromString(p)) for p in pages]


def test_a_full_state_in_pages_is_the_whole_state_and_each_page_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feedlog, "TOTALS_PER_FRAGMENT", 8)
    feed = _feed()
    whole = FeedMirror()
    assert whole.apply(feed.snapshot()) is not None  # one message: the reference
    pages = feed.pages(page_bytes=2048)
    largest_fragment = 200  # a key or replica of this test serializes well under this
    assert len(pages) >= 8
    assert all(len(p) <= 2048 + largest_fragment for p in pages)
    paged = FeedMirror()
    results = _apply_all(paged, pages)
    assert all(r is not None and r.pending for r in results[:-1])
    last = results[-1]
    assert last is not None and last.full and not last.pending
    assert paged.state() == whole.state() and paged.version == feed.version
    # Control: a page size larger than the state sends it as one page, that is, one message.
    one = feed.pages(page_bytes=feedlog.ONE_MESSAGE)
    assert len(one) == 1 and sum(map(len, pages)) - len(one[0]) < 64 * len(pages)


def test_a_gateway_keeps_its_copy_until_the_last_page_and_a_page_out_of_order_is_a_gap() -> None:
    feed = _feed(keys=10)
    mirror = FeedMirror()
    assert mirror.apply(feed.snapshot()) is not None
    before = mirror.state()
    bigger = _feed(keys=200)  # another controller run with more keys
    pages = bigger.pages(page_bytes=1024)
    assert len(pages) >= 4
    for p in pages[:-1]:
        assert mirror.apply(gateway_pb2.RouteTable.FromString(p)).pending  # type: ignore[union-attr]
        assert mirror.state() == before  # the routes held still serve
    assert mirror.apply(gateway_pb2.RouteTable.FromString(pages[-1])) is not None
    assert len(mirror.keys) == 200 and mirror.epoch == "e1"
    # A lost page: the next one does not follow, the gateway asks again, nothing was replaced.
    fresh = FeedMirror()
    assert fresh.apply(gateway_pb2.RouteTable.FromString(pages[0])).pending  # type: ignore[union-attr]
    assert fresh.apply(gateway_pb2.RouteTable.FromString(pages[2])) is None
    assert fresh.version == 0 and not fresh.keys
    # Control: the same pages in order after the gap apply.
    assert _apply_all(fresh, pages)[-1] is not None and len(fresh.keys) == 200


def test_pages_are_serialized_once_per_version_whatever_the_number_of_gateways() -> None:
    feed = _feed()
    first = feed.pages()
    for _ in range(31):
        assert feed.pages() is first
    assert feed.pages_built == 1
    feed.publish([], {b"\x01" * 32: gateway_pb2.ClientKey(sha256=b"\x01" * 32, key_id="new")}, ["z"],
                 "2026-12-07", {}, 3, removed_replicas=[])
    assert feed.pages() is not first and feed.pages_built == 2  # control: a new version, new bytes


def test_a_delta_as_large_as_the_state_is_not_kept_and_a_gateway_behind_it_gets_the_full_state(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feedlog, "LOG_MAX_DELTA_BYTES", 4096)
    feed = FeedLog(epoch="e1")
    feed.publish([], {}, [], "2026-12-07", {}, 1)
    small = feed.version
    key = gateway_pb2.ClientKey(sha256=b"\x02" * 32, key_id="one")
    feed.publish([], {key.sha256: key}, [], "2026-12-07", {}, 1)
    assert feed.since("e1", small) is not None  # control: a small delta is kept for resuming
    many = {i.to_bytes(32, "big"): gateway_pb2.ClientKey(sha256=i.to_bytes(32, "big"), key_id=f"k{i}")
            for i in range(1000)}
    big = feed.publish([], many, [], "2026-12-07", {}, 1)
    assert big is not None and big.ByteSize() > 4096  # the fault: a delta the size of the state
    assert feed.since("e1", big.base_version) is None  # behind it: the full state, no logged copy
    assert sum(m.ByteSize() for m in feed._log) == 0
    after = feed.publish([], {key.sha256: None}, [], "2026-12-07", {}, 1)
    assert after is not None and feed.since("e1", big.version) == [after]


async def test_gateways_that_connect_together_are_sent_one_version_serialized_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feedlog, "PAGE_BYTES", 2048)
    monkeypatch.setattr(gatewayhub, "TABLE_INTERVAL_S", 30.0)  # no periodic publication within the test
    registry = Registry(agent_timeout_s=5.0)
    keys = KeyStore(tmp_path / "keys.json")
    for n in range(100):
        keys.create(f"user{n}")
    registry.report(controller_pb2.AgentReport(node="n1", address="127.0.0.1", agent_id="a", engines=[
        engine_pb2.Engine(job_id=str(j), model="m", state=engine_pb2.READY, base_url=f"http://{j}", api_key="k",
                          pool=True) for j in range(16)]))
    ledger = UsageLedger(tmp_path / "usage", 60.0)
    hub = GatewayHub(registry, keys, Limiter(KeyLimits(), ledger.tokens_today), ledger, TOKEN, lambda m: False,
                     ["m"], warmup_s=0.0)
    hub.publish()  # the controller has published before the gateways come (a restart's warmup)
    server = grpc.aio.server()
    gatewayhub.add_to_server(hub, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    watchers = 8
    mirrors = [FeedMirror() for _ in range(watchers)]
    messages = [0] * watchers
    have = [asyncio.Event() for _ in range(watchers)]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = gateway_pb2_grpc.GatewayFeedStub(channel)

            async def watch(i: int, pages: bool) -> None:
                request = gateway_pb2.WatchRequest(gateway=f"g{i}", token=TOKEN, pages=pages)
                async for m in stub.Watch(request):
                    messages[i] += 1
                    applied = mirrors[i].apply(m)
                    assert applied is not None
                    if applied.full:
                        have[i].set()  # and stays connected, as a gateway does

            old = 0  # one gateway of an earlier release: it does not ask for pages
            tasks = [asyncio.create_task(watch(i, pages=i != old)) for i in range(watchers)]
            await asyncio.wait_for(asyncio.gather(*(h.wait() for h in have)), 10)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await server.stop(grace=0.2)
    assert hub.feed.pages_built == 2  # 8 gateways: one serialization in pages, one as a message (the old one)
    assert all(len(m.keys) == 100 and len(m.replicas) == 16 for m in mirrors)
    assert len({m.version for m in mirrors}) == 1
    assert messages[old] == 1 and all(n == len(hub.feed.pages()) > 1 for i, n in enumerate(messages) if i != old)


class _CountingLog(deque):  # type: ignore[type-arg]
    """The feed's log, counting the deltas looked at."""

    looked = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        for m in super().__iter__():
            _CountingLog.looked += 1
            yield m

    def __reversed__(self):  # type: ignore[no-untyped-def]
        for m in super().__reversed__():
            _CountingLog.looked += 1
            yield m


def test_a_watcher_one_version_behind_looks_at_one_delta_not_the_whole_log() -> None:
    feed = FeedLog(epoch="e1")
    feed._log = _CountingLog(maxlen=feedlog.LOG_KEEP)
    for n in range(feedlog.LOG_KEEP):
        feed.publish([], {}, [], "2026-12-07", {"k": n + 1}, 1)
    assert len(feed._log) == feedlog.LOG_KEEP
    _CountingLog.looked = 0
    got = feed.since("e1", feed.version - 1)
    assert got is not None and [m.version for m in got] == [feed.version]
    assert _CountingLog.looked <= 2  # the newest, and the one it follows
    # Control: a watcher far behind gets every delta since, in order, and they are looked at.
    _CountingLog.looked = 0
    far = feed.since("e1", feed.version - 500)
    assert far is not None and [m.version for m in far] == list(range(feed.version - 499, feed.version + 1))
    assert _CountingLog.looked >= 500


def test_a_publication_reads_the_totals_that_grew_not_a_copy_of_every_keys(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_796_601_600.0]  # 2026-12-07 00:00 UTC
    ledger = UsageLedger(tmp_path / "usage", 60.0, clock=lambda: now[0])
    for n in range(3000):
        ledger.add_row(UsageRow(day="2026-12-07", key_id=f"k{n}", account="a", model="m", requests=1,
                                prompt_tokens=n + 1))
    hub = GatewayHub(Registry(agent_timeout_s=5.0), KeyStore(tmp_path / "keys.json"),
                     Limiter(KeyLimits(), ledger.tokens_today), ledger, TOKEN, lambda m: False, ["m"], warmup_s=0.0)
    first = hub.publish()
    assert first is not None and len(first.tokens_today) == 3000  # control: the first publication has them all
    copied = []
    every = ledger.totals_today
    monkeypatch.setattr(ledger, "totals_today", lambda: copied.append(1) or every())
    read = []
    grown = ledger.totals_grown

    def counted():  # type: ignore[no-untyped-def]
        day, totals = grown()
        read.append(len(totals))
        return day, totals

    monkeypatch.setattr(ledger, "totals_grown", counted)
    ledger.add_row(UsageRow(day="2026-12-07", key_id="k7", account="a", model="m", requests=1, prompt_tokens=5))
    delta = hub.publish()
    assert delta is not None and dict(delta.tokens_today) == {"k7": 13}
    assert read == [1] and not copied  # one total read, none of the other 2,999 copied
    assert hub.publish() is None and read == [1, 0]
    # A gateway's report is answered with its own keys' totals, not a copy of all of them.
    ack = asyncio.run(hub.Report(gateway_pb2.GatewayReport(gateway="g", token=TOKEN, usage=[gateway_pb2.UsageSum(
        day="2026-12-07", key_id="k9", account="a", model="m", requests=1, prompt_tokens=1)]), None))  # type: ignore[arg-type]
    assert dict(ack.tokens_today) == {"k9": 11} and not copied
    # Control: a new day starts from every key's total again.
    now[0] += 86400
    ledger.add_row(UsageRow(day="2026-12-08", key_id="k1", account="a", model="m", requests=1, prompt_tokens=4))
    new_day = hub.publish()
    assert new_day is not None and new_day.day == "2026-12-08" and dict(new_day.tokens_today) == {"k1": 4}
