"""Admission bounded by time, not by a count (issue 35.8): a request is refused with 429 only when its wait,
at the rate the model's requests finish, would pass queue_timeout_s; by default nothing caps the requests an
engine gets but the engine's own report that it is full."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from slinfer.config import GatewayConfig
from slinfer.controller.queue import RATE_MIN_FINISHES, RATE_WINDOW_S, WaitQueue

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def test_the_expected_wait_follows_the_rate_requests_finish_at() -> None:
    now = [100.0]
    queue = WaitQueue(clock=lambda: now[0])
    assert queue.rate("m") is None and queue.expected_wait_s("m") == 0.0  # nothing known: no refusal
    for _ in range(RATE_MIN_FINISHES - 1):
        queue.finished("m")
        now[0] += 0.5
    assert queue.rate("m") is None  # too few to tell
    for _ in range(7):
        queue.finished("m")
        now[0] += 0.5
    # 10 finishes, one every half second: 2 a second; a request joining an empty queue waits half a second.
    assert abs(queue.rate("m") - 10 / 5.0) < 0.2
    assert abs(queue.expected_wait_s("m") - 0.5) < 0.06
    now[0] += RATE_WINDOW_S + 1  # an idle model forgets its rate
    assert queue.rate("m") is None and queue.expected_wait_s("m") == 0.0


def test_no_count_bound_unless_the_administrator_sets_one() -> None:
    assert GatewayConfig().queue_size == 0 and GatewayConfig().max_outstanding_per_engine == 0

    async def fill(queue: WaitQueue, n: int) -> int:
        waits = [asyncio.create_task(queue.wait("m", 5.0)) for _ in range(n)]
        await asyncio.sleep(0.05)
        depth = queue.depth("m")
        refused = sum(1 for w in waits if w.done() and w.exception() is not None)
        queue.wake_all("m")
        await asyncio.gather(*waits, return_exceptions=True)
        return depth + 1000 * refused

    assert asyncio.run(fill(WaitQueue(), 2000)) == 2000
    assert asyncio.run(fill(WaitQueue(size=10), 12)) == 10 + 2000  # the positive control: a set bound binds


async def test_a_request_is_refused_at_once_only_when_its_wait_would_pass_the_bound(controller_factory,
                                                                                   standins, http,
                                                                                   engine_pb) -> None:
    async def burst(timeout_s: float, n: int) -> list[tuple[int, float, str]]:
        c = await controller_factory(max_outstanding_per_engine=1, queue_timeout_s=timeout_s)
        engine = await standins(model="m", delay_s=0.2)
        await (await c.agent()).send([engine_pb("1", "m", engine.base_url)])
        for _ in range(RATE_MIN_FINISHES + 2):  # the rate: about 5 finishes a second
            async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()) as resp:
                assert resp.status == 200

        async def one() -> tuple[int, float, str]:
            started = time.perf_counter()
            async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()) as resp:
                body = await resp.text()
                return resp.status, time.perf_counter() - started, body

        return await asyncio.gather(*(one() for _ in range(n)))

    # One engine taking one request at a time, 0.2 s each: of 12 at once, the later ones would wait 2 s.
    tight = await burst(1.0, 12)
    refused = [(took, body) for status, took, body in tight if status == 429]
    served = [took for status, took, _ in tight if status == 200]
    assert len(refused) >= 4 and len(served) >= 3, tight
    at_once = [took for took, body in refused if "would pass queue_timeout_s" in body]
    assert len(at_once) >= 4 and max(at_once) < 0.5, refused
    # The positive control: the same burst with a patient client is served in full.
    patient = await burst(30.0, 12)
    assert [status for status, _, _ in patient] == [200] * 12


async def test_by_default_the_engine_gets_every_request_it_would_serve(controller_factory, standins,
                                                                      engine_pb) -> None:
    c = await controller_factory()
    engine = await standins(model="m", delay_s=1.0)
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url)])
    # More than the former constants admitted (512 per engine and 256 waiting): every one reaches the engine.
    n = 800
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        async def one() -> int:
            async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one() for _ in range(n)))
    assert statuses.count(200) == n, {s: statuses.count(s) for s in set(statuses)}
    assert engine.seen.requests == n


async def test_an_engine_that_reports_itself_full_gets_nothing_more(controller_factory, standins, http,
                                                                   engine_pb) -> None:
    c = await controller_factory(queue_timeout_s=5.0)
    full = await standins(model="m")
    free = await standins(model="m")
    agent = await c.agent()
    busy = engine_pb("1", "m", full.base_url)
    busy.load.waiting, busy.load.kv_cache_usage = 3.0, 0.99
    await agent.send([busy, engine_pb("2", "m", free.base_url)])
    for _ in range(10):
        async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()) as resp:
            assert resp.status == 200
    assert (full.seen.requests, free.seen.requests) == (0, 10)
    # The positive control: once it reports room again, it is used.
    roomy = engine_pb("1", "m", full.base_url)
    roomy.load.waiting, roomy.load.kv_cache_usage = 0.0, 0.5
    await agent.send([roomy, engine_pb("2", "m", free.base_url)])
    await asyncio.sleep(0.1)
    for _ in range(10):
        async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()) as resp:
            assert resp.status == 200
    assert full.seen.requests > 0
