"""The route table's routes through a real Gateway (with its usage ledger) to real stand-in engines over HTTP:
the Responses API plain and streamed with its tokens in the ledger, and the retry before the first byte on
every proxied route, as chat has it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import openai
import pytest

from slinfer.config import GatewayConfig, ModelConfig
from slinfer.controller import metrics
from slinfer.controller.balancer import Balancer
from slinfer.controller.gateway import Gateway
from slinfer.controller.keys import KeyStore
from slinfer.controller.proxy import Proxy
from slinfer.controller.queue import WaitQueue
from slinfer.controller.registry import Registry
from slinfer.controller.routes import ROUTES
from slinfer.controller.usage import UsageLedger
from slinfer.v1 import controller_pb2, engine_pb2
from tests.unit.conftest import CLIENT_KEY

TOKENS = 5


class Served:
    def __init__(self, gateway: Gateway, registry: Registry, ledger: UsageLedger, url: str) -> None:
        self.gateway, self.registry, self.ledger, self.url = gateway, registry, ledger, url

    def engines(self, *urls: str) -> None:
        """The agent's report: engine job i+1 at urls[i], all READY."""
        engines = [engine_pb2.Engine(job_id=str(i + 1), model="m", state=engine_pb2.READY, base_url=u, pool=True)
                   for i, u in enumerate(urls)]
        self.registry.report(controller_pb2.AgentReport(node="n1", address="127.0.0.1", agent_id="a",
                                                        engines=engines))


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Callable[[], Awaitable[Served]]]:
    made: list[Served] = []

    async def make() -> Served:
        registry = Registry()
        config = GatewayConfig(api_keys=[CLIENT_KEY], queue_timeout_s=5.0)
        ledger = UsageLedger(tmp_path / f"usage{len(made)}")
        gateway = Gateway(config, [ModelConfig(name="m", source="/x")], registry,
                          KeyStore(tmp_path / f"keys{len(made)}.json", config.api_keys), Proxy(), Balancer(),
                          WaitQueue(config.queue_size), ledger=ledger)
        port = await gateway.start("127.0.0.1", 0)
        made.append(Served(gateway, registry, ledger, f"http://127.0.0.1:{port}"))
        return made[-1]

    yield make
    for s in made:
        await s.gateway.stop()


async def test_responses_plain_and_streamed_count_their_tokens_in_the_ledger(served, standins) -> None:
    s = await served()
    engine = await standins(model="m", tokens=TOKENS)
    s.engines(engine.base_url)
    client = openai.AsyncOpenAI(base_url=f"{s.url}/v1", api_key=CLIENT_KEY, max_retries=0)
    try:
        plain = await client.responses.create(model="m", input="hello")
        assert plain.output_text == " ".join(["tok"] * TOKENS)
        stream = await client.responses.create(model="m", input="hello", stream=True)
        events = [e async for e in stream]
    finally:
        await client.close()
    assert [e.type for e in events] == ["response.created"] + ["response.output_text.delta"] * TOKENS + [
        "response.completed"]
    assert engine.seen.bodies[0] == b'{"model":"m","input":"hello"}'  # passed through as the client sent it
    (row,) = s.ledger.query()
    assert (row.requests, row.failed, row.prompt_tokens, row.completion_tokens, row.estimated) == (
        2, 0, 16, 2 * TOKENS, 0)


# Every route the stand-in serves, plain, and streamed where the route streams (the stand-in is a generative
# engine: no /detokenize, no pooling routes, no speech; test_adapters_routes.py has those).
POOLING = ("/v1/rerank", "/v1/score", "/pooling", "/classify", "/v1/audio/transcriptions")
CASES = [(r, False) for r in ROUTES if r.path != "/detokenize" and r.path not in POOLING] + [
    (r, True) for r in ROUTES if r.endpoint in ("chat", "completions", "responses", "messages")]


@pytest.mark.parametrize(("route", "stream"), CASES, ids=[f"{r.endpoint}-{'stream' if st else 'plain'}"
                                                          for r, st in CASES])
async def test_every_route_retries_on_another_engine_before_the_first_byte(served, standins, route,
                                                                           stream) -> None:
    s = await served()
    broken = await standins(model="m")
    broken.fail = "reset"
    good = await standins(model="m")
    s.engines(broken.base_url, good.base_url)
    # The least-outstanding balancer tries the broken engine first: the good one already carries a request.
    s.registry.get("2").outstanding = 1  # type: ignore[union-attr]
    retries = metrics.RETRIES.labels("m")._value.get()
    body = {"model": "m", "prompt": "x", "input": "x", "messages": [{"role": "user", "content": "x"}]}
    if stream:
        body["stream"] = True
    async with aiohttp.ClientSession() as http, http.post(
            f"{s.url}{route.path}", data=json.dumps(body),
            headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as resp:
        text = await resp.text()
        assert resp.status == 200, text
    assert broken.seen.requests == 1 and good.seen.requests == 1
    assert metrics.RETRIES.labels("m")._value.get() == retries + 1
    if stream:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert "tok1" in text
