"""The gateway against real stand-in engines, with the Registry fed over real gRPC Report streams."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import aiohttp
import openai
import pytest

from slinfer.config import ModelConfig
from slinfer.controller import metrics
from slinfer.v1 import engine_pb2

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def assert_openai_error(body: dict, code: str) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]


async def test_non_streaming_passes_body_unchanged_and_swaps_the_key(controller_factory, standins, http, engine_pb):
    c = await controller_factory()
    engine = await standins(model="m", api_key="engine-secret")
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url, "engine-secret")])
    # Odd spacing and key order: proves the body is passed through, not re-serialised.
    raw = b'{ "messages":[{"role":"user","content":"hi \\u00e9"}],  "model" : "m", "max_tokens":4 }'
    async with http.post(f"{c.url}/v1/chat/completions", data=raw, headers=c.headers()) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "chat.completion"
    assert engine.seen.bodies == [raw]
    assert engine.seen.auth == ["Bearer engine-secret"]
    assert c.registry.get("1").outstanding == 0
    assert c.gateway.demand("m").in_flight == 0


async def test_streaming_is_relayed_chunk_by_chunk(controller_factory, standins, http, engine_pb):
    c = await controller_factory()
    engine = await standins(model="m", tokens=6, token_delay_s=0.15)
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url)])
    started = time.perf_counter()
    arrivals: list[float] = []
    events: list[bytes] = []
    async with http.post(f"{c.url}/v1/chat/completions", json={**CHAT, "stream": True},
                         headers=c.headers()) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for line in resp.content:
            if line.strip():
                arrivals.append(time.perf_counter() - started)
                events.append(line.strip())
    assert events[-1] == b"data: [DONE]"
    assert len(events) == 7
    # The first token reached the client long before the engine finished (6 x 150 ms).
    assert arrivals[0] < 0.4
    assert arrivals[-1] > 0.7
    assert json.loads(events[1].removeprefix(b"data: "))["choices"][0]["delta"]["content"] == " tok1"


async def test_openai_client_streams_and_lists_models(controller_factory, standins, engine_pb):
    c = await controller_factory()
    engine = await standins(model="m", tokens=5)
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url)])
    client = openai.AsyncOpenAI(base_url=f"{c.url}/v1", api_key=c.client_key, max_retries=0)
    try:
        stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                      stream=True)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
        assert text == " tok1 tok2 tok3 tok4"
        completion = await client.completions.create(model="m", prompt="x")
        assert completion.choices[0].text == " ".join(["tok"] * 5)
        embedding = await client.embeddings.create(model="m", input="x")
        assert len(embedding.data[0].embedding) == 8
        models = await client.models.list()
        assert [m.id for m in models.data] == ["m"]
    finally:
        await client.close()


async def test_models_lists_catalog_with_ready_and_total(controller_factory, standins, http, engine_pb):
    c = await controller_factory(models=[ModelConfig(name="m", source="/x", max_replicas=3),
                                         ModelConfig(name="other", source="/y")])
    engine = await standins(model="m")
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url),
                                  engine_pb("2", "m", engine.base_url, state=engine_pb2.STARTING)])
    async with http.get(f"{c.url}/v1/models", headers=c.headers()) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert by_id["m"]["ready_replicas"] == 1 and by_id["m"]["total_replicas"] == 2
    assert by_id["m"]["max_replicas"] == 3 and by_id["m"]["object"] == "model"
    assert by_id["other"]["ready_replicas"] == 0 and by_id["other"]["total_replicas"] == 0


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"},
                                     {"Authorization": "Bearer "}])
async def test_missing_or_wrong_key_is_401(controller_factory, http, headers):
    c = await controller_factory()
    async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=headers) as resp:
        assert resp.status == 401
        assert_openai_error(await resp.json(), "invalid_api_key")
    async with http.get(f"{c.url}/v1/models", headers=headers) as resp:
        assert resp.status == 401


async def test_created_key_works_and_revoked_key_does_not(controller_factory, standins, http, engine_pb):
    c = await controller_factory()
    engine = await standins(model="m")
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url)])
    key_id, secret = c.keys.create("alice")
    async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers(secret)) as resp:
        assert resp.status == 200
    assert c.keys.revoke(key_id)
    async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers(secret)) as resp:
        assert resp.status == 401


@pytest.mark.parametrize(("body", "code"), [
    (b'{"model": "m", "messages": [', "invalid_json"),
    (b"not json", "invalid_json"),
    (b'{"model": "m"} trailing', "invalid_json"),
    (b'{"messages": []}', "missing_model"),
    (b'{"model": ""}', "missing_model"),
    (b"[1, 2]", None),
    (b'{"model": 5}', None),
])
async def test_bad_bodies_are_400(controller_factory, http, body, code):
    c = await controller_factory()
    async with http.post(f"{c.url}/v1/completions", data=body, headers=c.headers()) as resp:
        assert resp.status == 400
        error = await resp.json()
    assert set(error["error"]) == {"message", "type", "param", "code"}
    if code:
        assert error["error"]["code"] == code


async def test_unknown_model_is_404(controller_factory, http):
    c = await controller_factory()
    async with http.post(f"{c.url}/v1/chat/completions", json={**CHAT, "model": "nope"},
                         headers=c.headers()) as resp:
        assert resp.status == 404
        assert_openai_error(await resp.json(), "model_not_found")


async def test_body_too_large_is_413(controller_factory, standins, http, engine_pb):
    c = await controller_factory(max_body_bytes=1000)
    engine = await standins(model="m")
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url)])
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
    async with http.post(f"{c.url}/v1/chat/completions", json=big, headers=c.headers()) as resp:
        assert resp.status == 413
        assert_openai_error(await resp.json(), "body_too_large")

    async def chunks():  # no Content-Length: the limit must hold while reading
        for _ in range(5):
            yield b"x" * 400

    async with http.post(f"{c.url}/v1/chat/completions", data=chunks(), headers=c.headers()) as resp:
        assert resp.status == 413
    assert engine.seen.requests == 0


async def test_scale_from_zero_request_waits_then_succeeds(controller_factory, standins, http, engine_pb):
    c = await controller_factory(queue_timeout_s=10.0)
    engine = await standins(model="m")
    agent = await c.agent()
    await agent.send([engine_pb("1", "m", engine.base_url, state=engine_pb2.STARTING)])
    pending = asyncio.create_task(http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()))
    for _ in range(100):
        if c.gateway.demand("m").queued == 1:
            break
        await asyncio.sleep(0.01)
    assert c.gateway.demand("m").queued == 1
    assert not pending.done()
    await agent.send([engine_pb("1", "m", engine.base_url, state=engine_pb2.READY)])
    resp = await asyncio.wait_for(pending, 5)
    assert resp.status == 200
    resp.release()
    assert c.gateway.demand("m").queued == 0
    assert engine.seen.requests == 1


async def test_expired_wait_and_full_queue_answer_503_with_retry_after(controller_factory, http):
    c = await controller_factory(queue_timeout_s=0.3, queue_size=1)
    waiting = asyncio.create_task(http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()))
    for _ in range(100):
        if c.gateway.demand("m").queued == 1:
            break
        await asyncio.sleep(0.01)
    async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()) as full:
        assert full.status == 503
        assert int(full.headers["Retry-After"]) > 0
        assert_openai_error(await full.json(), "no_replica")
    started = time.perf_counter()
    expired = await asyncio.wait_for(waiting, 5)
    assert expired.status == 503
    assert int(expired.headers["Retry-After"]) > 0
    assert "waited too long" in (await expired.json())["error"]["message"]
    assert time.perf_counter() - started < 1.0
    assert c.gateway.demand("m").queued == 0


async def test_model_scaled_to_zero_is_refused_at_once_unless_a_replica_is_known(controller_factory, standins, http,
                                                                                 engine_pb):
    pinned = {"m"}
    c = await controller_factory(queue_timeout_s=30.0, scaled_to_zero=lambda model: model in pinned)
    started = time.perf_counter()
    async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()) as resp:
        assert resp.status == 503
        assert int(resp.headers["Retry-After"]) > 0
        body = await resp.json()
    assert time.perf_counter() - started < 1.0, "a model held at 0 must not wait out the queue timeout"
    assert_openai_error(body, "no_replica")
    assert "none is being started" in body["error"]["message"]
    # Unpinned, a request with no replica waits for one (scale from zero) instead of being refused.
    pinned.clear()
    waiting = asyncio.create_task(http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    engine = await standins(model="m")
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url)])
    answered = await asyncio.wait_for(waiting, 5)
    assert answered.status == 200
    answered.release()
    # A replica that is known (a user's pool job) is still served while the model is pinned at 0.
    pinned.add("m")
    async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()) as resp:
        assert resp.status == 200


async def test_a_tier_worker_looks_again_at_a_pin_at_0_before_refusing(controller_factory, standins, http,
                                                                       engine_pb):
    """At a tier worker an administrator's unpin (`slinfer scale M auto`) comes with the feed, a moment after the
    command returned: a request for a model it still sees held at 0 waits once for the feed (settle_late) and
    is then served as the unpinned model it is."""
    pinned = {"m"}
    c = await controller_factory(queue_timeout_s=30.0, scaled_to_zero=lambda model: model in pinned)
    settled: list[bool] = []

    async def feed_brings_the_unpin(still: Callable[[], bool]) -> None:
        settled.append(still())
        await asyncio.sleep(0.2)
        pinned.clear()

    c.gateway.settle_late = feed_brings_the_unpin
    engine = await standins(model="m")
    waiting = asyncio.create_task(http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()))
    await asyncio.sleep(0.4)
    assert settled == [True] and not waiting.done(), "it must wait for a replica, not refuse on the old pin"
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url)])
    answered = await asyncio.wait_for(waiting, 5)
    assert answered.status == 200
    answered.release()
    # Control: a pin the feed confirms is refused after that one look, not waited on.

    async def feed_confirms(still: Callable[[], bool]) -> None:
        settled.append(still())

    other = await controller_factory(queue_timeout_s=30.0, scaled_to_zero=lambda model: True)
    other.gateway.settle_late = feed_confirms
    started = time.perf_counter()
    async with http.post(f"{other.url}/v1/chat/completions", json=CHAT, headers=other.headers()) as resp:
        assert resp.status == 503
        assert "none is being started" in (await resp.json())["error"]["message"]
    assert time.perf_counter() - started < 1.0 and settled[-1] is True


async def test_saturated_engines_queue_then_429(controller_factory, standins, http, engine_pb):
    c = await controller_factory(max_outstanding_per_engine=1, queue_size=1, queue_timeout_s=5.0)
    engine = await standins(model="m", delay_s=0.4)
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url)])
    first = asyncio.create_task(http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()))
    await asyncio.sleep(0.1)
    second = asyncio.create_task(http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()))
    await asyncio.sleep(0.1)
    assert c.gateway.demand("m") == type(c.gateway.demand("m"))(in_flight=1, queued=1)
    async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()) as third:
        assert third.status == 429
        assert third.headers["Retry-After"] == "1"
        assert_openai_error(await third.json(), "saturated")
    # The queued one runs as soon as the first finishes: none is lost.
    assert (await first).status == 200
    assert (await second).status == 200
    assert engine.seen.requests == 2


@pytest.mark.parametrize("fail", ["reset", "close_stream", "refused", "bad_url"])
async def test_engine_failing_before_first_byte_is_retried_elsewhere(controller_factory, standins, http, fail,
                                                                  engine_pb):
    c = await controller_factory()
    bad = await standins(model="m")
    good = await standins(model="m")
    bad_url = "http://no-port-here" if fail == "bad_url" else bad.base_url
    if fail in ("refused", "bad_url"):
        await bad.stop()
    else:
        bad.fail = fail
    await (await c.agent()).send([engine_pb("bad", "m", bad_url), engine_pb("good", "m", good.base_url)])
    # One phantom request on the good engine makes the bad one the least loaded: it is tried first...
    c.registry.get("good").outstanding = 1
    before = metrics.RETRIES.labels("m")._value.get()
    for _ in range(6):
        async with http.post(f"{c.url}/v1/chat/completions", json={**CHAT, "stream": True},
                             headers=c.headers()) as resp:
            assert resp.status == 200
            text = await resp.text()
        assert text.endswith("data: [DONE]\n\n")
    assert good.seen.requests == 6
    # ...once: after its failure it is passed over for a cool-down, so only the first request was retried.
    assert metrics.RETRIES.labels("m")._value.get() - before == 1
    if fail not in ("refused", "bad_url"):
        assert bad.seen.requests == 1
    assert c.registry.get("bad").outstanding == 0 and c.registry.get("good").outstanding == 1


async def test_a_lone_failing_engine_is_retried_after_its_cool_down(controller_factory, standins, http,
                                                                     engine_pb):
    c = await controller_factory()
    engine = await standins(model="m")
    engine.fail = "reset"
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url)])
    started = time.perf_counter()
    async with http.post(f"{c.url}/v1/completions", json={"model": "m", "prompt": "x"},
                         headers=c.headers()) as resp:
        assert resp.status == 502  # three tries, all on the one engine, a cool-down apart
    assert 3.5 < time.perf_counter() - started < 6
    assert engine.seen.requests == 3


async def test_request_failed_by_its_only_engine_waits_for_the_restarted_engine(controller_factory, standins,
                                                                                http, engine_pb):
    # kill -9 of the only engine: the agent reports it STARTING, then READY again; the request is not lost.
    c = await controller_factory()
    engine = await standins(model="m")
    engine.fail = "reset"
    agent = await c.agent()
    await agent.send([engine_pb("1", "m", engine.base_url)])
    pending = asyncio.create_task(http.post(f"{c.url}/v1/completions", json={"model": "m", "prompt": "x"},
                                            headers=c.headers()))
    for _ in range(100):
        if engine.seen.requests == 1:
            break
        await asyncio.sleep(0.01)
    await agent.send([engine_pb("1", "m", engine.base_url, state=engine_pb2.STARTING)])
    await asyncio.sleep(2.5)  # past the cool-down: it waits for a routable engine now
    assert not pending.done() and c.gateway.demand("m").queued == 1
    engine.fail = None
    await agent.send([engine_pb("1", "m", engine.base_url, state=engine_pb2.READY)])
    resp = await asyncio.wait_for(pending, 5)
    assert resp.status == 200
    assert engine.seen.requests == 2


async def test_all_engines_failing_gives_502_after_retries(controller_factory, standins, http, engine_pb):
    c = await controller_factory(retries=1)
    engines = [await standins(model="m") for _ in range(3)]
    for e in engines:
        e.fail = "reset"
    await (await c.agent()).send([engine_pb(str(i), "m", e.base_url) for i, e in enumerate(engines)])
    async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()) as resp:
        assert resp.status == 502
        assert_openai_error(await resp.json(), "engine_failed")
    assert sum(e.seen.requests for e in engines) == 2


async def test_engine_error_status_is_passed_through_not_retried(controller_factory, standins, http, engine_pb):
    c = await controller_factory()
    engine = await standins(model="m")
    engine.fail = "status_500"
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url)])
    async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()) as resp:
        assert resp.status == 500
        # Passed on in OpenAI's shape (errorshape.py): the engine's words, OpenAI's type for a 500.
        assert await resp.json() == {"error": {"message": "stand-in told to fail", "type": "server_error",
                                               "param": None, "code": None}}
    assert engine.seen.requests == 1


async def test_engine_dying_mid_stream_ends_with_an_error_event(controller_factory, standins, http, engine_pb):
    c = await controller_factory()
    engine = await standins(model="m", tokens=10)
    engine.fail = "mid_stream"
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url)])
    async with http.post(f"{c.url}/v1/chat/completions", json={**CHAT, "stream": True},
                         headers=c.headers()) as resp:
        assert resp.status == 200
        events = [line.strip() for line in (await resp.read()).split(b"\n") if line.strip()]
    assert len(events) == 4
    last = json.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "engine_failed"
    assert engine.seen.requests == 1
    assert c.registry.get("1").outstanding == 0


async def test_least_outstanding_spreads_and_draining_gets_nothing(controller_factory, standins, http, engine_pb):
    c = await controller_factory()
    a = await standins(model="m", delay_s=0.3)
    b = await standins(model="m", delay_s=0.3)
    await (await c.agent()).send([engine_pb("a", "m", a.base_url), engine_pb("b", "m", b.base_url)])
    replies = await asyncio.gather(*[http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers())
                                     for _ in range(10)])
    assert all(r.status == 200 for r in replies)
    assert (a.seen.requests, b.seen.requests) == (5, 5)
    assert c.registry.set_draining("a")
    replies = await asyncio.gather(*[http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers())
                                     for _ in range(4)])
    assert all(r.status == 200 for r in replies)
    assert (a.seen.requests, b.seen.requests) == (5, 9)


async def test_prefix_affinity_keeps_a_prompt_on_one_engine(controller_factory, standins, http, engine_pb):
    c = await controller_factory(models=[ModelConfig(name="m", source="/x", prefix_affinity=True)])
    engines = [await standins(model="m") for _ in range(3)]
    await (await c.agent()).send([engine_pb(str(i), "m", e.base_url) for i, e in enumerate(engines)])
    for _ in range(5):
        async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()) as resp:
            assert resp.status == 200
    assert sorted(e.seen.requests for e in engines) == [0, 0, 5]


async def test_silent_agent_engines_leave_routing(controller_factory, standins, http, engine_pb):
    c = await controller_factory(agent_timeout_s=0.5, queue_timeout_s=0.3)
    engine = await standins(model="m")
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url)])
    async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()) as resp:
        assert resp.status == 200
    await asyncio.sleep(0.7)
    async with http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()) as resp:
        assert resp.status == 503
    assert engine.seen.requests == 1


async def test_client_leaving_the_queue_frees_its_place(controller_factory, http):
    c = await controller_factory(queue_timeout_s=30.0)
    waiting = asyncio.create_task(http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()))
    for _ in range(100):
        if c.gateway.demand("m").queued == 1:
            break
        await asyncio.sleep(0.01)
    assert c.gateway.demand("m").queued == 1
    waiting.cancel()
    for _ in range(100):
        if c.gateway.demand("m").queued == 0:
            break
        await asyncio.sleep(0.01)
    assert c.gateway.demand("m").queued == 0


async def test_engines_own_error_event_mid_stream_becomes_engine_failed(controller_factory, standins, http,
                                                                         engine_pb):
    c = await controller_factory()
    engine = await standins(model="m", tokens=10)
    engine.fail = "error_event"
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url)])
    async with http.post(f"{c.url}/v1/chat/completions", json={**CHAT, "stream": True},
                         headers=c.headers()) as resp:
        assert resp.status == 200
        events = [line.strip() for line in (await resp.read()).split(b"\n") if line.strip()]
    # The role chunk and two tokens, then the gateway's event in place of the engine's (and no [DONE]).
    assert len(events) == 4, events
    last = json.loads(events[-1].removeprefix(b"data: "))
    assert_openai_error(last, "engine_failed")
    assert "EngineCore encountered an issue." in last["error"]["message"]
    assert c.registry.get("1").outstanding == 0


async def test_client_leaving_mid_stream_releases_the_engine(controller_factory, standins, engine_pb):
    c = await controller_factory()
    engine = await standins(model="m", tokens=50, token_delay_s=0.05)
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url)])
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{c.url}/v1/chat/completions", json={**CHAT, "stream": True},
                                  headers=c.headers())
        await resp.content.readline()
        assert c.registry.get("1").outstanding == 1
        resp.close()
    for _ in range(100):
        if c.registry.get("1").outstanding == 0 and engine.running == 0:
            break
        await asyncio.sleep(0.02)
    assert c.registry.get("1").outstanding == 0
    assert engine.running == 0  # the engine saw the disconnect too


async def test_metrics_and_healthz(controller_factory, standins, http, engine_pb):
    c = await controller_factory()
    engine = await standins(model="m", tokens=3)
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url),
                                  engine_pb("2", "m", engine.base_url, state=engine_pb2.STARTING)])
    async with http.post(f"{c.url}/v1/chat/completions", json={**CHAT, "stream": True},
                         headers=c.headers()) as resp:
        await resp.read()
    async with http.get(f"{c.url}/healthz") as resp:
        assert resp.status == 200
        assert (await resp.json())["replicas"] == 2
    async with http.get(f"{c.url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    assert 'slinfer_replicas{model="m",state="READY"} 1.0' in text
    assert 'slinfer_replicas{model="m",state="STARTING"} 1.0' in text
    assert 'slinfer_gateway_queue_depth{model="m"} 0.0' in text
    assert 'slinfer_gateway_requests_total{code="200",endpoint="chat",model="m"}' in text
    assert 'slinfer_gateway_time_to_first_token_seconds_count{model="m"}' in text
    # The autoscaler's counter is exported (no decision was taken here, so no sample: its TYPE line).
    assert "# TYPE slinfer_scaling_decisions_total counter" in text


async def test_unknown_route_is_openai_404(controller_factory, http):
    c = await controller_factory()
    async with http.get(f"{c.url}/v1/nothing", headers=c.headers()) as resp:
        assert resp.status == 404
        assert_openai_error(await resp.json(), "not_found")


async def test_stop_lets_requests_in_flight_finish(controller_factory, standins, http, engine_pb):
    c = await controller_factory()
    engine = await standins(model="m", delay_s=0.5)
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url)])
    pending = asyncio.create_task(http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers()))
    for _ in range(100):
        if c.gateway.demand("m").in_flight == 1:
            break
        await asyncio.sleep(0.01)
    assert c.gateway.demand("m").in_flight == 1
    await c.gateway.stop()
    resp = await pending
    assert resp.status == 200
    assert (await resp.json())["object"] == "chat.completion"
    with pytest.raises(aiohttp.ClientConnectionError):
        await http.post(f"{c.url}/v1/chat/completions", json=CHAT, headers=c.headers())


async def test_many_concurrent_mixed_requests_all_complete(controller_factory, standins, http, engine_pb):
    c = await controller_factory()
    engines = [await standins(model="m", tokens=8, token_delay_s=0.001) for _ in range(2)]
    await (await c.agent()).send([engine_pb(str(i), "m", e.base_url) for i, e in enumerate(engines)])

    async def one(i: int) -> bytes:
        body = {**CHAT, "stream": i % 2 == 0}
        async with http.post(f"{c.url}/v1/chat/completions", json=body, headers=c.headers()) as resp:
            assert resp.status == 200
            return await resp.read()

    bodies = await asyncio.gather(*(one(i) for i in range(300)))
    assert all(b.endswith(b"data: [DONE]\n\n") for b in bodies[0::2])
    assert all(json.loads(b)["object"] == "chat.completion" for b in bodies[1::2])
    assert sum(e.seen.requests for e in engines) == 300
    assert min(e.seen.requests for e in engines) > 100
    assert [r.outstanding for r in c.registry.replicas()] == [0, 0]
    assert c.gateway.demand("m").in_flight == 0
