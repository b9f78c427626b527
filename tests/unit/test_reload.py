"""Reloading the config without a restart (controller/reload.py): a catalog model's adapters and replica bounds
apply to the running gateway, autoscaler and pins; adapters the catalog dropped are unloaded from the running
engine and are a 404 model_not_found from then on; any other change, or a broken file, keeps the old config and
the log names the key."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from slinfer.config import load
from slinfer.controller.autoscaler import Autoscaler
from slinfer.controller.gateway import Demand
from slinfer.controller.pins import Pins
from slinfer.controller.registry import Registry
from slinfer.controller.reload import Reloader, differences
from tests.unit.test_adapters import LoraEngine, _chat

HEAD = '[controller]\ntoken = "t"\nlisten = "127.0.0.1:7000"\n[gateway]\nlisten = "127.0.0.1:8000"\n'


def _catalog(adapters: dict[str, str], max_replicas: int = 1, source: str = "/models/base") -> str:
    text = f'[[models]]\nname = "base"\nsource = "{source}"\nmax_replicas = {max_replicas}\n'
    for name, path in adapters.items():
        text += f'[[models.adapters]]\nname = "{name}"\nsource = "{path}"\n'
    return text


@dataclass
class UnloadingEngine(LoraEngine):
    """LoraEngine with vLLM's /v1/unload_lora_adapter (404 for an adapter it does not have, as vLLM 0.32)."""

    unloads: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/v1/unload_lora_adapter", self._unload)
        return app

    async def _unload(self, request: web.Request) -> web.Response:
        name = (await request.json())["lora_name"]
        self.unloads.append(name)
        if name not in self.loaded:
            return web.json_response({"error": {"message": f"The lora adapter '{name}' cannot be found.",
                                                "type": "NotFoundError", "code": 404}}, status=404)
        self.loaded.remove(name)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


@pytest.fixture
async def engine() -> AsyncIterator[Callable[..., asyncio.Future[UnloadingEngine]]]:
    runners: list[web.AppRunner] = []

    async def make(**kwargs: object) -> UnloadingEngine:
        made = UnloadingEngine(**kwargs)  # type: ignore[arg-type]
        runner = web.AppRunner(made.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        made.base_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return made

    yield make  # type: ignore[misc]
    for runner in runners:
        await runner.cleanup()


async def _setup(tmp_path: Path, controller_factory, engine, engine_pb, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "slinfer.toml"
    path.write_text(text)
    config = load(path)
    c = await controller_factory(models=config.models)
    running = await engine(loaded=[a.name for a in config.models[0].adapters])
    await (await c.agent()).send([engine_pb("1", "base", running.base_url)])
    pins = Pins(config.models)
    autoscaler = Autoscaler(config.models, Registry(), lambda _m: Demand(0, 0), None, pins=pins)  # type: ignore[arg-type]
    return path, c, running, pins, autoscaler, Reloader(config, [autoscaler, pins], c.gateway.update_catalog)


async def _ids(http, c) -> set[str]:  # type: ignore[no-untyped-def]
    async with http.get(f"{c.url}/v1/models", headers=c.headers()) as resp:
        return {m["id"] for m in (await resp.json())["data"]}


async def test_reload_adds_and_drops_adapters_and_bounds_without_a_restart(tmp_path, controller_factory, engine,
                                                                           engine_pb, http) -> None:
    path, c, running, pins, autoscaler, reloader = await _setup(
        tmp_path, controller_factory, engine, engine_pb, HEAD + _catalog({"a1": "/lora/a1", "a2": "/lora/a2"}))
    async with http.post(f"{c.url}/v1/chat/completions", json=_chat("a1"), headers=c.headers()) as resp:
        assert resp.status == 200  # served before the reload (positive control of the 404 below)
    with pytest.raises(ValueError):
        pins.check("base", 3)  # above max_replicas 1 before the reload
    path.write_text(HEAD + _catalog({"a2": "/lora/a2", "a3": "/lora/a3"}, max_replicas=3))
    outcome = await reloader.reload()
    assert outcome.ok and outcome.applied == ["models[0].max_replicas", "models[0].adapters"]
    # a1 left the running engine through vLLM's unload; a2 stayed.
    assert outcome.unloaded == {"a1": 1} and running.unloads == ["a1"] and running.loaded == ["a2"]
    assert await _ids(http, c) == {"base", "a2", "a3"}
    async with http.post(f"{c.url}/v1/chat/completions", json=_chat("a1"), headers=c.headers()) as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
    async with http.post(f"{c.url}/v1/chat/completions", json=_chat("a3"), headers=c.headers()) as resp:
        assert resp.status == 200 and (await resp.json())["choices"][0]["message"]["content"] == "from a3"
    assert running.loads == [{"lora_name": "a3", "lora_path": "/lora/a3"}]  # loaded into the same engine
    pins.check("base", 3)
    (status,) = autoscaler.status()
    assert (status.min_replicas, status.max_replicas) == (0, 3)
    assert reloader.config.models[0].max_replicas == 3


async def test_a_changed_source_is_unloaded_then_loaded_anew(tmp_path, controller_factory, engine, engine_pb,
                                                             http) -> None:
    path, c, running, _, _, reloader = await _setup(tmp_path, controller_factory, engine, engine_pb,
                                                    HEAD + _catalog({"a1": "/lora/a1"}))
    path.write_text(HEAD + _catalog({"a1": "/lora/a1-v2"}))
    outcome = await reloader.reload()
    assert outcome.unloaded == {"a1": 1} and running.unloads == ["a1"]
    async with http.post(f"{c.url}/v1/chat/completions", json=_chat("a1"), headers=c.headers()) as resp:
        assert resp.status == 200
    assert running.loads == [{"lora_name": "a1", "lora_path": "/lora/a1-v2"}]


async def test_reload_refuses_keys_fixed_at_start_and_names_them(tmp_path, controller_factory, engine, engine_pb,
                                                                 http, caplog) -> None:
    path, c, running, pins, _, reloader = await _setup(tmp_path, controller_factory, engine, engine_pb,
                                                       HEAD + _catalog({"a1": "/lora/a1"}))
    moved = HEAD.replace("7000", "7001").replace("8000", "8001")
    path.write_text(moved + _catalog({"a3": "/lora/a3"}, source="/models/other", max_replicas=3))
    with caplog.at_level(logging.ERROR, logger="slinfer.controller.reload"):
        outcome = await reloader.reload()
    assert outcome.refused == ["controller.listen", "gateway.listen", "models[0].source"]
    assert "controller.listen, gateway.listen, models[0].source cannot change while the controller runs" \
        in caplog.text
    # Nothing applied, not even the keys that could have been: the adapters, the bound.
    assert running.unloads == [] and await _ids(http, c) == {"base", "a1"}
    assert reloader.config.controller.listen == "127.0.0.1:7000"
    with pytest.raises(ValueError):
        pins.check("base", 3)
    # A model added or removed needs a restart too.
    path.write_text(HEAD + _catalog({"a1": "/lora/a1"}) + '[[models]]\nname = "new"\nsource = "/m"\n')
    assert (await reloader.reload()).refused == ["models[1] ('new' added)"]


async def test_a_broken_file_keeps_the_running_config_and_names_the_key(tmp_path, controller_factory, engine,
                                                                        engine_pb, http, caplog) -> None:
    path, c, running, _, _, reloader = await _setup(tmp_path, controller_factory, engine, engine_pb,
                                                    HEAD + _catalog({"a1": "/lora/a1"}))
    before = reloader.config
    path.write_text(HEAD + _catalog({"a 1": "/lora/a1"}))
    with caplog.at_level(logging.ERROR, logger="slinfer.controller.reload"):
        outcome = await reloader.reload()
    assert not outcome.ok and "models[0].adapters[0].name" in outcome.refused[0]
    assert "models[0].adapters[0].name" in caplog.text and "the running config is kept" in caplog.text
    path.write_text(HEAD + "[[models]\n")
    assert "is not valid TOML" in (await reloader.reload()).refused[0]
    assert reloader.config is before and running.unloads == [] and await _ids(http, c) == {"base", "a1"}
    # The file fixed: the next reload applies it.
    path.write_text(HEAD + _catalog({}))
    assert (await reloader.reload()).unloaded == {"a1": 1} and await _ids(http, c) == {"base"}


def test_differences_match_models_by_name(tmp_path: Path) -> None:
    one, two = tmp_path / "1.toml", tmp_path / "2.toml"
    one.write_text(HEAD + _catalog({"a1": "/l"}) + '[[models]]\nname = "m2"\nsource = "/m"\n')
    # The same models in another order, one adapter more: only the adapters differ.
    two.write_text(HEAD + '[[models]]\nname = "m2"\nsource = "/m"\n' + _catalog({"a1": "/l", "a2": "/l2"}))
    assert differences(load(one), load(two)) == ["models[1].adapters"]
    assert differences(load(one), load(one)) == []
