"""The waiting order of one model: fair among accounts (start-time fair queueing) against first come first served
(controller/fairqueue.py), the waiting room that calls requests in that order (controller/queue.py), and the
gateway serving a lone request of one account while another floods it."""

from __future__ import annotations

import asyncio
import time

import pytest

from slinfer.config import AccountConfig, ConfigError, GatewayConfig, parse
from slinfer.controller.fairqueue import FairOrder, weights
from slinfer.controller.queue import QueueFull, WaitQueue, for_gateway

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def _drain(order: FairOrder, n: int) -> list[str]:
    out = []
    for _ in range(n):
        ticket = order.pop()
        assert ticket is not None
        order.leave(ticket, served=True)
        out.append(ticket.account)
    return out


def test_a_lone_request_goes_next_under_fair_and_last_under_fifo() -> None:
    for policy, position in (("fair", 1), ("fifo", 64)):
        order = FairOrder(policy)  # type: ignore[arg-type]
        for _ in range(64):
            order.join("A")
        order.join("B")
        assert _drain(order, 65).index("B") == position, policy


def test_a_lone_request_joining_mid_flood_is_next() -> None:
    order = FairOrder("fair")
    for _ in range(64):
        order.join("A")
    assert _drain(order, 10) == ["A"] * 10
    order.join("B")
    assert _drain(order, 2) == ["B", "A"]


def test_weights_share_turns_while_both_wait() -> None:
    order = FairOrder("fair", weights({"A": AccountConfig(weight=2.0)}))
    for _ in range(30):
        order.join("A")
        order.join("B")
    first = _drain(order, 30)
    assert first.count("A") == 20 and first.count("B") == 10
    # The "*" entry is every other account's weight.
    assert weights({"*": AccountConfig(weight=3.0)})("C") == 3.0 and weights({})("C") == 1.0


def test_a_called_request_without_an_engine_keeps_its_place() -> None:
    order = FairOrder("fair")
    for _ in range(3):
        order.join("A")
    b = order.join("B")
    assert [order.pop() for _ in range(2)][1] is b  # A0, then B
    order.push(b)  # B found no engine and waits again
    assert order.head() is b and order.ordered()[0] is b


def test_a_flood_that_gave_up_does_not_count_against_the_next_request() -> None:
    order = FairOrder("fair")
    flood = [order.join("A") for _ in range(50)]
    for ticket in flood:
        order.leave(ticket, served=False)  # timed out
    assert len(order) == 0
    order.join("B")
    a = order.join("A")
    b2 = order.join("B")
    assert order.ordered().index(a) < order.ordered().index(b2)  # A is not behind its old flood


def test_called_requests_that_come_back_keep_their_place_before_new_ones() -> None:
    # Every waiter is called (an engine's report wakes them all), one gets the engine, the rest find none and go
    # back: a request that arrives after them must not overtake any of them, however often that repeats.
    order = FairOrder("fair")
    old = [order.join("A") for _ in range(10)]
    for _ in range(3):
        called = order.pop_all()
        order.leave(called[0], served=True)
        for ticket in called[1:]:
            order.push(ticket)
        new = order.join("A")
        assert order.ordered()[-1] is new, [(t in old, t.start) for t in order.ordered()]
        order.leave(new, served=False)  # it gave up: the rest are as they were
    assert order.ordered() == old[3:]
    # Control: once nobody waits and nobody was called, the account's debt is forgiven as before.
    for ticket in order.pop_all():
        order.leave(ticket, served=True)
    assert order.calling == 0 and len(order) == 0
    b = order.join("B")
    a = order.join("A")
    assert order.ordered() == [b, a] and a.start == b.start


def test_config_switch_and_its_errors() -> None:
    assert GatewayConfig().queue_policy == "fair"
    assert for_gateway(parse({"gateway": {"queue_policy": "fifo"}}).gateway)._policy == "fifo"
    for bad, key in (({"queue_policy": "lifo"}, "gateway.queue_policy"),
                     ({"accounts": {"a": {"weight": 0}}}, "gateway.accounts.a.weight"),
                     ({"accounts": {"a": {"wieght": 2}}}, "gateway.accounts.a.wieght")):
        with pytest.raises(ConfigError) as err:
            parse({"gateway": bad})
        assert err.value.key == key


@pytest.mark.parametrize(("policy", "expected"), [("fair", ["A", "B", "A", "A"]), ("fifo", ["A", "A", "A", "B"])])
async def test_the_waiting_room_calls_in_the_fair_order(policy: str, expected: list[str]) -> None:
    queue = WaitQueue(policy=policy)  # type: ignore[arg-type]
    woken: list[str] = []

    async def waiter(account: str) -> None:
        ticket = queue.join("m", account)
        assert await queue.wait("m", 5.0, ticket)
        queue.leave("m", ticket, served=True)
        woken.append(account)

    tasks = [asyncio.create_task(waiter(a)) for a in ("A", "A", "A", "B")]
    await asyncio.sleep(0.01)
    for _ in range(4):
        queue.wake_one("m")
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    assert woken == expected, policy


async def test_a_called_request_that_leaves_passes_its_turn_and_bounds_still_bind() -> None:
    queue = WaitQueue(size=2)
    first, second = queue.join("m", "A"), queue.join("m", "B")
    with pytest.raises(QueueFull):
        queue.join("m", "C")  # the positive control of the count bound
    waiting = asyncio.create_task(queue.wait("m", 5.0, second))
    await asyncio.sleep(0.01)
    queue.wake_one("m")  # calls `first` (not waiting on a future: its client is gone)
    assert first.called and not waiting.done()
    queue.leave("m", first)  # it leaves without using its turn: the turn passes to `second`
    assert await asyncio.wait_for(waiting, 1.0)


async def _latency_of_b(controller_factory, standins, http, engine_pb, policy: str) -> tuple[float, int]:
    c = await controller_factory(max_outstanding_per_engine=1, queue_policy=policy)
    key_a = c.keys.create("flood", account="A")[1]
    key_b = c.keys.create("lone", account="B")[1]
    engine = await standins(model="m", delay_s=0.02)
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url)])
    done: list[str] = []

    async def ask(key: str, who: str) -> float:
        t0 = time.perf_counter()
        async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers(key)) as resp:
            assert resp.status == 200, await resp.text()
        done.append(who)
        return time.perf_counter() - t0

    flood = [asyncio.create_task(ask(key_a, "A")) for _ in range(24)]
    await asyncio.sleep(0.1)  # A's flood is queued
    b = await ask(key_b, "B")
    await asyncio.gather(*flood)
    return b, done.index("B")


async def test_the_gateway_serves_a_lone_request_before_a_flood_only_under_fair(controller_factory, standins,
                                                                                http, engine_pb) -> None:
    fair_s, fair_at = await _latency_of_b(controller_factory, standins, http, engine_pb, "fair")
    fifo_s, fifo_at = await _latency_of_b(controller_factory, standins, http, engine_pb, "fifo")
    print(f"B's latency under A's flood of 24: fair {fair_s:.3f} s (finished {fair_at + 1}th), "
          f"fifo {fifo_s:.3f} s (finished {fifo_at + 1}th)")
    assert fair_at <= 8, fair_at
    assert fifo_at >= 18, fifo_at  # the positive control: first come first served makes B wait for the flood
    assert fair_s < fifo_s


@pytest.mark.parametrize(("policy", "b_at_most", "b_at_least"), [("fair", 1, 0), ("fifo", 5, 5)])
async def test_engines_full_by_their_reports_only_the_first_in_the_order_looks(
        controller_factory, standins, http, engine_pb, policy: str, b_at_most: int, b_at_least: int) -> None:
    """No count bound: the engine says it is full (requests waiting, KV cache full) and the gateway's waiters
    look again on their own timers (a load report wakes nobody). Each timer's look goes to the first in the
    order, so B's request, queued after A's five, goes second under fair and last under fifo."""
    c = await controller_factory(queue_policy=policy)
    key_a = c.keys.create("flood", account="A")[1]
    key_b = c.keys.create("lone", account="B")[1]
    engine = await standins(model="m")
    agent = await c.agent()
    full = engine_pb("1", "m", engine.base_url)
    full.load.waiting, full.load.kv_cache_usage = 1.0, 1.0
    await agent.send([full])
    done: list[str] = []

    async def ask(key: str, who: str) -> None:
        async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers(key)) as resp:
            assert resp.status == 200, await resp.text()
        done.append(who)

    flood = [asyncio.create_task(ask(key_a, "A")) for _ in range(5)]
    await asyncio.sleep(0.05)
    lone = asyncio.create_task(ask(key_b, "B"))
    await asyncio.sleep(0.05)
    assert c.gateway.demand("m").queued == 6 and engine.seen.requests == 0  # all wait: the engine is full
    await agent.send([engine_pb("1", "m", engine.base_url)])  # room again; no wake: the timers look
    await asyncio.gather(lone, *flood)
    assert b_at_least <= done.index("B") <= b_at_most, (policy, done)


def test_a_called_request_keeps_the_room_busy_until_it_looks() -> None:
    queue = WaitQueue()
    assert not queue.busy("m")
    ticket = queue.join("m", "A")
    assert queue.busy("m") and queue.depth("m") == 1
    queue.wake_one("m")  # called: out of the order, about to look
    assert queue.depth("m") == 0 and queue.busy("m")  # a new request must not overtake it
    queue.leave("m", ticket, served=True)
    assert not queue.busy("m")
    order = FairOrder()
    t = order.join("A")
    order.pop()
    order.push(t)  # looked, found nothing, waits again
    assert order.calling == 0 and len(order) == 1
    order.pop()
    order.leave(t, served=False)
    assert order.calling == 0 and len(order) == 0


def test_calling_everyone_keeps_the_order() -> None:
    order = FairOrder("fair")
    for account in ("A", "A", "A", "B", "C"):
        order.join(account)
    called = order.pop_all()
    assert [t.account for t in called] == ["A", "B", "C", "A", "A"]
    assert len(order) == 0 and order.calling == 5 and all(t.called and not t.waiting for t in called)
