"""The gateway feed's deltas (issue 35.3): versioned changes after one full state, a gap answered by the full
state, and any sequence of adds, updates and removes ending where a fresh full table would; the hub's steady
state sends almost nothing, and a gateway that misses a version watches again for the full state."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slinfer.config import Config, ControllerConfig
from slinfer.controller import gatewayhub
from slinfer.controller.feedlog import FeedLog, FeedMirror, ReplicaRow
from slinfer.controller.gatewayhub import GatewayHub
from slinfer.controller.keys import KeyStore
from slinfer.controller.limits import KeyLimits, Limiter
from slinfer.controller.registry import Registry
from slinfer.controller.routefeed import RouteFeed
from slinfer.controller.usage import UsageLedger
from slinfer.controller.usagerelay import UsageRelay
from slinfer.v1 import controller_pb2, engine_pb2, gateway_pb2, gateway_pb2_grpc

TOKEN = "feed-token"


def _row(job: int, version: int = 0, draining: bool = False) -> ReplicaRow:
    return (str(job), "m", f"n{job % 3}", f"http://e{job}:{version}", f"key{job}", engine_pb2.READY, True,
            draining, True)


def _key(n: int, rpm: int = 0) -> gateway_pb2.ClientKey:
    return gateway_pb2.ClientKey(sha256=bytes([n]) * 32, key_id=f"k{n}", name=f"user{n}",
                                 requests_per_minute=rpm)


class _World:
    """What the controller holds, changed step by step as the operations say."""

    def __init__(self) -> None:
        self.replicas: dict[str, ReplicaRow] = {}
        self.keys: dict[int, gateway_pb2.ClientKey] = {}
        self.dirty: set[int] = set()
        self.zero: set[str] = set()
        self.day = "2026-12-07"
        self.totals: dict[str, int] = {}
        self.gateways = 1
        self.states: dict[str, str] = {}

    def do(self, op: tuple[str, int, int]) -> None:
        kind, n, v = op
        if kind == "replica":
            self.replicas[str(n)] = _row(n, v, draining=v % 2 == 1)
        elif kind == "unreplica":
            self.replicas.pop(str(n), None)
        elif kind == "key":
            self.keys[n] = _key(n, rpm=v)
            self.dirty.add(n)
        elif kind == "revoke":
            self.keys.pop(n, None)
            self.dirty.add(n)
        elif kind == "tokens":
            self.totals[f"k{n}"] = self.totals.get(f"k{n}", 0) + v + 1
        elif kind == "zero":
            self.zero ^= {f"model{n % 2}"}
        elif kind == "day":  # the next UTC day (totals only grow within one)
            self.day, self.totals = f"2026-12-{int(self.day[-2:]) + 1:02d}", {}
        elif kind == "gateways":
            self.gateways = 1 + v % 4
        elif kind == "state":  # what the controller holds of a model short of ready: set, changed or gone
            if v == 0:
                self.states.pop(f"model{n % 3}", None)
            else:
                self.states[f"model{n % 3}"] = f'{{"state": "queued", "jobs": {v}}}'

    def publish(self, feed: FeedLog) -> gateway_pb2.RouteTable | None:
        changed = {bytes([n]) * 32: self.keys.get(n) for n in self.dirty}
        self.dirty.clear()
        return feed.publish(self.replicas.values(), changed, self.zero, self.day, self.totals, self.gateways,
                            model_states=self.states)


_ops = st.lists(st.tuples(st.sampled_from(["replica", "unreplica", "key", "revoke", "tokens", "zero", "day",
                                            "gateways", "state"]),
                          st.integers(0, 6), st.integers(0, 3)), max_size=40)


def _fresh(feed: FeedLog) -> FeedMirror:
    mirror = FeedMirror()
    assert mirror.apply(feed.snapshot()) is not None
    return mirror


@settings(max_examples=150, deadline=None)
@given(ops=_ops, publish_every=st.integers(1, 4), resume_at=st.integers(0, 40))
def test_any_sequence_of_deltas_ends_as_a_fresh_full_table(ops, publish_every: int, resume_at: int) -> None:
    world, feed = _World(), FeedLog(epoch="e1")
    world.publish(feed)
    follower = _fresh(feed)  # follows every delta as it comes
    late = FeedMirror()      # connects part way, then resumes from the log
    messages: list[gateway_pb2.RouteTable] = []
    for i, op in enumerate(ops):
        world.do(op)
        if i % publish_every == 0:
            delta = world.publish(feed)
            if delta is not None:
                messages.append(delta)
                assert follower.apply(delta) is not None
        if i == resume_at:
            assert late.apply(feed.snapshot()) is not None
    delta = world.publish(feed)
    if delta is not None:
        assert follower.apply(delta) is not None
    if late.epoch:
        resumed = feed.since(late.epoch, late.version)
        assert resumed is not None
        for m in resumed:
            assert late.apply(m) is not None
        assert late.state() == follower.state()
    assert follower.version == feed.version
    assert follower.state() == _fresh(feed).state()
    # And it is the world itself, not just the feed's own idea of it.
    assert follower.state()[0] == sorted(world.replicas.values())
    assert {k.key_id for k in follower.keys.values()} == {k.key_id for k in world.keys.values()}
    assert follower.totals == world.totals and follower.zero == world.zero
    assert follower.model_states == world.states


@settings(max_examples=60, deadline=None)
@given(ops=_ops.filter(lambda o: len(o) > 2), missed=st.integers(0, 39))
def test_a_gateway_that_misses_a_version_is_refused_the_next_and_the_full_state_repairs_it(ops,
                                                                                         missed: int) -> None:
    world, feed = _World(), FeedLog(epoch="e1")
    world.publish(feed)
    mirror = _fresh(feed)
    deltas = []
    for op in ops:
        world.do(op)
        delta = world.publish(feed)
        if delta is not None:
            deltas.append(delta)
    if len(deltas) < 2:
        return
    lost = missed % (len(deltas) - 1)
    for delta in deltas[:lost]:
        assert mirror.apply(delta) is not None
    before = (mirror.version, mirror.state())
    assert mirror.apply(deltas[lost + 1]) is None  # the gap: refused, and nothing changed
    assert (mirror.version, mirror.state()) == before
    assert mirror.apply(feed.snapshot()) is not None
    assert mirror.state() == _fresh(feed).state()


def test_resume_needs_the_same_epoch_and_a_version_the_log_still_holds() -> None:
    feed = FeedLog(epoch="e1", keep=3)
    world = _World()
    world.publish(feed)
    v1 = feed.version
    for n in range(5):
        world.do(("replica", n, 0))
        world.publish(feed)
    assert feed.version == v1 + 5
    assert feed.since("e1", feed.version) == []
    assert [m.version for m in feed.since("e1", feed.version - 2)] == [feed.version - 1, feed.version]
    assert feed.since("e1", v1) is None       # older than the 3 deltas kept
    assert feed.since("other", feed.version) is None  # another controller run
    assert feed.since("e1", 0) is None
    assert feed.since("e1", feed.version + 1) is None
    assert world.publish(feed) is None  # nothing changed: no new version
    # A delta of another epoch is refused even at the right version.
    mirror = _fresh(feed)
    stranger = FeedLog(epoch="e2")
    for _ in range(feed.version):
        world.do(("tokens", 1, 1))
        world.publish(stranger)
    world.do(("tokens", 1, 1))
    assert mirror.apply(world.publish(stranger)) is None


def test_the_steady_state_carries_nothing_and_a_changed_key_is_the_only_key_sent() -> None:
    world, feed = _World(), FeedLog(epoch="e1")
    for n in range(200):
        world.do(("key", n % 250, 10))
    for n in range(20):
        world.do(("replica", n, 0))
    world.publish(feed)
    assert len(feed.snapshot().keys) == 200
    for _ in range(10):
        assert world.publish(feed) is None
    world.do(("key", 7, 99))
    delta = world.publish(feed)
    assert delta is not None and [k.key_id for k in delta.keys] == ["k7"] and not delta.replicas
    world.do(("tokens", 3, 5))
    delta = world.publish(feed)
    assert delta is not None and dict(delta.tokens_today) == {"k3": 6} and not delta.keys
    assert len(delta.SerializeToString()) < 64


# ---- the hub and a gateway's RouteFeed over real gRPC -------------------------------------------------------
@pytest.fixture
async def hub(tmp_path: Path):
    registry = Registry(agent_timeout_s=5.0)
    keys = KeyStore(tmp_path / "keys.json")
    ledger = UsageLedger(tmp_path / "usage", 60.0)
    hub = GatewayHub(registry, keys, Limiter(KeyLimits(), ledger.tokens_today), ledger, TOKEN, lambda m: False,
                     ["m"], warmup_s=0.0)
    server = grpc.aio.server()
    gatewayhub.add_to_server(hub, server)  # pre-serialized pages
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield hub, registry, keys, port
    finally:
        await server.stop(grace=0.2)


def _report(registry: Registry, job_ids: list[str]) -> None:
    registry.report(controller_pb2.AgentReport(node="n1", address="127.0.0.1", agent_id="a", engines=[
        engine_pb2.Engine(job_id=j, model="m", state=engine_pb2.READY, base_url=f"http://{j}", api_key="ek",
                          pool=True) for j in job_ids]))


async def test_the_hub_sends_the_full_state_once_then_only_changes_and_heartbeats(hub, monkeypatch) -> None:
    monkeypatch.setattr(gatewayhub, "HEARTBEAT_S", 0.3)
    hub, registry, keys, port = hub
    for n in range(300):
        keys.create(f"user{n}")
    _report(registry, ["1", "2"])
    got: list[gateway_pb2.RouteTable] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = gateway_pb2_grpc.GatewayFeedStub(channel)
        call = stub.Watch(gateway_pb2.WatchRequest(gateway="w", token=TOKEN))

        async def read() -> None:
            async for m in call:
                got.append(m)

        reader = asyncio.create_task(read())
        await asyncio.sleep(1.5)  # steady state: heartbeats only
        steady = list(got)
        keys.create("newcomer")
        await asyncio.sleep(0.2)
        _report(registry, ["1"])  # job 2 gone
        await asyncio.sleep(gatewayhub.TABLE_INTERVAL_S * 2)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
    assert steady[0].full and len(steady[0].keys) == 300 and len(steady[0].replicas) == 2
    later = steady[1:]
    assert later and all(not m.full and not m.keys and not m.replicas for m in later)
    assert sum(len(m.SerializeToString()) for m in later) < 100 * len(later)
    changes = [m for m in got[len(steady):] if m.version != m.base_version]
    assert [k.name for m in changes for k in m.keys] == ["newcomer"]
    assert [j for m in changes for j in m.removed_replicas] == ["2"]
    assert all(b.base_version == a.version for a, b in itertools.pairwise(got))


class _Stream:
    def __init__(self, messages: list[gateway_pb2.RouteTable], stop: asyncio.Event) -> None:
        self._messages, self._stop, self.cancelled = messages, stop, False

    def cancel(self) -> None:
        self.cancelled = True

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for m in self._messages:
            yield m
        await self._stop.wait()


async def test_a_routefeed_that_misses_a_version_watches_again_for_the_full_state() -> None:
    world, feed = _World(), FeedLog(epoch="e1")
    world.do(("replica", 1, 0))
    world.do(("key", 1, 60))
    world.publish(feed)
    full = feed.snapshot()
    world.do(("replica", 2, 0))
    d1 = world.publish(feed)
    world.do(("replica", 3, 0))
    d2 = world.publish(feed)
    world.do(("revoke", 1, 0))
    world.publish(feed)
    repaired = feed.snapshot()
    stop = asyncio.Event()
    requests: list[gateway_pb2.WatchRequest] = []
    streams = [_Stream([full, d2], stop), _Stream([repaired], stop)]  # d1 is lost on the way

    class Stub:
        def Watch(self, request: gateway_pb2.WatchRequest) -> _Stream:
            requests.append(request)
            return streams[len(requests) - 1]

    registry = Registry(agent_timeout_s=1.0, clock=lambda: 0.0)
    keys = KeyStore.mirror([])
    config = Config(controller=ControllerConfig(address="127.0.0.1:1", token=TOKEN))
    rf = RouteFeed(config, "gw", registry, keys, UsageRelay(), ["m"], lambda m: None, dict)
    task = asyncio.create_task(rf._watch_loop(Stub()))
    for _ in range(100):
        if len(requests) == 2 and rf.mirror.version == repaired.version:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    assert d1 is not None and d2 is not None
    assert (requests[0].epoch, requests[0].version) == ("", 0)
    assert streams[0].cancelled and rf.gaps == 1
    assert (requests[1].epoch, requests[1].version) == ("", 0), "the second watch asks for the full state"
    assert sorted(r.job_id for r in registry.replicas()) == ["1", "2", "3"]
    assert keys.list() == []  # the revoked key went with the full state
    assert rf.mirror.state() == _fresh(feed).state()
