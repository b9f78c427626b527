"""Catalog LoRA adapters: the config, the engine's flags, the gateway's routing of an adapter to its base's
engine (and its count as the base's load), loading at run time, and GET /v1/models/{id}."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from slinfer.agent import launch
from slinfer.config import AdapterConfig, Config, ConfigError, ModelConfig, parse

BASE = ModelConfig(name="base", source="/models/base", adapters=[AdapterConfig("a1", "/lora/a1"),
                                                                 AdapterConfig("a2", "/lora/a2")])


def _chat(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@dataclass
class LoraEngine:
    """A stand-in vLLM with LoRA: answers with the model it was asked for, lists its adapters, loads more."""

    loaded: list[str] = field(default_factory=list)
    load_status: int = 200
    delay_s: float = 0.0
    models_seen: list[str] = field(default_factory=list)
    loads: list[dict] = field(default_factory=list)
    base_url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/load_lora_adapter", self._load)
        return app

    async def _chat(self, request: web.Request) -> web.Response:
        model = json.loads(await request.read())["model"]
        self.models_seen.append(model)
        await asyncio.sleep(self.delay_s)
        if model != "base" and model not in self.loaded:
            return web.json_response({"error": {"message": f"The model `{model}` does not exist.",
                                                "type": "NotFoundError", "param": None, "code": 404}}, status=404)
        return web.json_response({"object": "chat.completion", "model": model, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": f"from {model}"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": "base", "object": "model", "max_model_len": 512}]
        data += [{"id": a, "object": "model", "parent": "base"} for a in self.loaded]
        return web.json_response({"object": "list", "data": data})

    async def _load(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.loads.append(body)
        if self.load_status != 200:
            return web.json_response({"error": {"message": "LoRA rank 64 is greater than max_lora_rank 16.",
                                                "type": "BadRequestError", "code": 400}}, status=self.load_status)
        self.loaded.append(body["lora_name"])
        return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' added successfully.")


@pytest.fixture
async def lora_engine() -> AsyncIterator[Callable[..., LoraEngine]]:
    runners: list[web.AppRunner] = []

    async def make(**kwargs: object) -> LoraEngine:
        engine = LoraEngine(**kwargs)  # type: ignore[arg-type]
        runner = web.AppRunner(engine.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        engine.base_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return engine

    yield make  # type: ignore[misc]
    for runner in runners:
        await runner.cleanup()


def test_config_reads_adapters_and_refuses_clashes() -> None:
    config = parse({"models": [{"name": "base", "source": "/m", "max_loras": 2,
                                "adapters": [{"name": "a1", "source": "/l/a1"}]}]})
    assert config.models[0].adapters == [AdapterConfig("a1", "/l/a1")] and config.models[0].max_loras == 2
    bad = [({"name": "base", "source": "/l"}, "models[0].adapters[0].name"),  # a model's name
           ({"name": "a1", "source": "/l", "rank": 8}, "models[0].adapters[0].rank"),
           ({"name": "a1"}, "models[0].adapters[0].source"),
           ({"name": "a 1", "source": "/l"}, "models[0].adapters[0].name")]
    for adapter, key in bad:
        with pytest.raises(ConfigError) as caught:
            parse({"models": [{"name": "base", "source": "/m", "adapters": [adapter]}]})
        assert caught.value.key == key, (adapter, caught.value)
    with pytest.raises(ConfigError) as caught:
        parse({"models": [{"name": "base", "source": "/m", "max_lora_rank": 0}]})
    assert caught.value.key == "models[0].max_lora_rank"


def test_engine_gets_lora_flags_only_with_adapters() -> None:
    config = Config()
    argv = launch.engine_command(config, BASE, "127.0.0.1", 8000, 1, "7")
    at = argv.index("--enable-lora")
    assert argv[at:] == ["--enable-lora", "--max-loras", "4", "--max-lora-rank", "16",
                         "--lora-modules", "a1=/lora/a1", "a2=/lora/a2"]
    assert launch.lora_env(BASE) == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    plain = ModelConfig(name="plain", source="/m")
    assert "--enable-lora" not in launch.engine_command(config, plain, "127.0.0.1", 8000, 1, "7")
    assert launch.lora_env(plain) == {}
    # An entry whose engine_args set LoRA itself keeps its own flags.
    own = ModelConfig(name="own", source="/m", engine_args=["--enable-lora"], adapters=BASE.adapters)
    assert launch.engine_command(config, own, "127.0.0.1", 8000, 1, "7").count("--enable-lora") == 1


async def test_adapter_goes_to_its_bases_engine_as_the_bases_load(controller_factory, lora_engine, http,
                                                                   engine_pb) -> None:
    c = await controller_factory(models=[BASE])
    engine = await lora_engine(loaded=["a1", "a2"], delay_s=0.3)
    await (await c.agent()).send([engine_pb("1", "base", engine.base_url)])
    request = asyncio.ensure_future(http.post(f"{c.url}/v1/chat/completions", json=_chat("a1"),
                                              headers=c.headers()))
    await asyncio.sleep(0.15)
    # In flight under the base (what the autoscaler reads), not under the adapter.
    assert c.gateway.demand("base").in_flight == 1 and c.gateway.demand("a1").in_flight == 0
    async with await request as resp:
        assert resp.status == 200
        assert (await resp.json())["choices"][0]["message"]["content"] == "from a1"
    async with http.post(f"{c.url}/v1/chat/completions", json=_chat("base"), headers=c.headers()) as resp:
        assert (await resp.json())["choices"][0]["message"]["content"] == "from base"
    # The engine saw the adapter's name (the body unchanged), and no load: it had the adapter from its start.
    assert engine.models_seen == ["a1", "base"] and engine.loads == []
    # An unknown name is still the gateway's 404 (positive control of the adapter lookup).
    async with http.post(f"{c.url}/v1/chat/completions", json=_chat("a9"), headers=c.headers()) as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"


async def test_adapter_missing_on_the_engine_is_loaded_once_without_a_restart(controller_factory, lora_engine,
                                                                             http, engine_pb) -> None:
    c = await controller_factory(models=[BASE])
    engine = await lora_engine(loaded=["a1"])  # started before the catalog had a2
    await (await c.agent()).send([engine_pb("1", "base", engine.base_url)])
    results = await asyncio.gather(*(http.post(f"{c.url}/v1/chat/completions", json=_chat("a2"),
                                               headers=c.headers()) for _ in range(3)))
    for resp in results:
        assert resp.status == 200
        assert (await resp.json())["choices"][0]["message"]["content"] == "from a2"
        resp.release()
    # Three concurrent first requests, one load, with the catalog's source.
    assert engine.loads == [{"lora_name": "a2", "lora_path": "/lora/a2"}]
    async with http.post(f"{c.url}/v1/chat/completions", json=_chat("a1"), headers=c.headers()) as resp:
        assert resp.status == 200
    assert len(engine.loads) == 1  # a1 was listed by the engine: never loaded


async def test_a_refused_load_is_an_openai_error(controller_factory, lora_engine, http, engine_pb) -> None:
    c = await controller_factory(models=[BASE])
    engine = await lora_engine(load_status=400)
    await (await c.agent()).send([engine_pb("1", "base", engine.base_url)])
    async with http.post(f"{c.url}/v1/chat/completions", json=_chat("a1"), headers=c.headers()) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "adapter_load_failed"
    assert "max_lora_rank" in error["message"] and len(engine.loads) == 1
    assert engine.models_seen == []  # the request itself never reached the engine


async def test_models_lists_adapters_with_parent_and_retrieves_each(controller_factory, lora_engine, http,
                                                                   engine_pb) -> None:
    org = ModelConfig(name="org/model-1", source="/m")
    c = await controller_factory(models=[BASE, org])
    engine = await lora_engine(loaded=["a1", "a2"])
    await (await c.agent()).send([engine_pb("1", "base", engine.base_url)])
    async with http.get(f"{c.url}/v1/models", headers=c.headers()) as resp:
        listing = {m["id"]: m for m in (await resp.json())["data"]}
    assert listing["a1"]["parent"] == "base" and listing["a1"]["root"] == "/lora/a1"
    assert listing["a2"]["slinfer"]["state"] == "ready" and listing["a2"]["max_model_len"] == 512
    assert "parent" not in listing["base"]
    for name in ("base", "a1", "org/model-1"):
        async with http.get(f"{c.url}/v1/models/{name}", headers=c.headers()) as resp:
            assert resp.status == 200, name
            assert await resp.json() == listing[name]
    async with http.get(f"{c.url}/v1/models/nope", headers=c.headers()) as resp:
        assert resp.status == 404
        assert await resp.json() == {"error": {"message": "The model 'nope' does not exist; GET /v1/models lists "
                                               "the models served here.", "type": "invalid_request_error",
                                               "param": None, "code": "model_not_found"}}
    async with http.get(f"{c.url}/v1/models/a1") as resp:
        assert resp.status == 401


async def test_requests_for_an_adapter_prefer_the_engine_that_has_it(controller_factory, lora_engine, http,
                                                                     engine_pb) -> None:
    c = await controller_factory(models=[BASE])
    first, second = await lora_engine(), await lora_engine()  # neither started with a2
    await (await c.agent()).send([engine_pb("1", "base", first.base_url), engine_pb("2", "base", second.base_url)])
    for _ in range(6):
        async with http.post(f"{c.url}/v1/chat/completions", json=_chat("a2"), headers=c.headers()) as resp:
            assert resp.status == 200
    # Both engines idle each time: without the preference, a tie would land on the other engine half the time
    # and load a2 there too (both loading: 31 in 32 runs).
    assert len(first.loads) + len(second.loads) == 1
    assert len(first.models_seen) + len(second.models_seen) == 6
    # The preference yields to load: with the engine that has a2 busy, the other takes the request and loads it.
    having, other = (first, second) if first.loads else (second, first)
    c.registry.get("1" if having is first else "2").outstanding = 3  # type: ignore[union-attr]
    async with http.post(f"{c.url}/v1/chat/completions", json=_chat("a2"), headers=c.headers()) as resp:
        assert resp.status == 200
    assert len(other.loads) == 1
