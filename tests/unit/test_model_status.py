"""ModelBoard's states from a real Registry (fed agent reports) and the autoscaler's view of its Slurm jobs, and
`max_model_len` asked of real stand-in engines over HTTP; then the gateway's /v1/models, its 404 naming the
route table, a route an engine lacks answering the engine's own error, and `slinfer models` on a live gateway."""

from __future__ import annotations

import asyncio
import time

import pytest

from slinfer.cli import models as models_cli
from slinfer.cli.main import build_parser
from slinfer.config import ModelConfig
from slinfer.controller.modelstatus import ENGINE_ASK_TIMEOUT_S, ModelBoard
from slinfer.controller.registry import Registry
from slinfer.controller.routes import ROUTES
from slinfer.controller.slurm import SlurmJob
from slinfer.v1 import controller_pb2, engine_pb2

NOW = 1_000_000.0
CATALOG = [ModelConfig(name="m", source="/x", max_replicas=3), ModelConfig(name="idle", source="/y")]


def _job(job_id: str, state: str, submit: float = NOW - 30, start: float = 0.0, reason: str = "") -> SlurmJob:
    return SlurmJob(job_id=job_id, name="slinfer-m", comment="", state=state, node="", submit_time=submit,
                    start_time=start, end_time=0.0, reason=reason)


def _report(registry: Registry, *engines: engine_pb2.Engine) -> None:
    registry.report(controller_pb2.AgentReport(node="n1", address="127.0.0.1", agent_id="a", engines=engines))


def _engine(job_id: str, state: int, base_url: str = "http://127.0.0.1:9", started_at: float = 0.0,
            model: str = "m", pool: bool = True) -> engine_pb2.Engine:
    return engine_pb2.Engine(job_id=job_id, model=model, state=state, base_url=base_url, pool=pool,
                             started_at=started_at)


def _board(jobs: list[SlurmJob]) -> tuple[ModelBoard, Registry]:
    registry = Registry(clock=lambda: NOW)
    return ModelBoard(CATALOG, registry, jobs=lambda: [("m", j) for j in jobs], clock=lambda: NOW), registry


async def test_offline_queued_starting_ready_in_that_order_of_precedence() -> None:
    jobs: list[SlurmJob] = []
    board, registry = _board(jobs)
    entries = {e["id"]: e for e in await board.entries()}
    assert entries["m"]["slinfer"] == {"state": "offline", "min_replicas": 0, "max_replicas": 3}
    assert entries["idle"]["slinfer"]["state"] == "offline"
    assert entries["m"]["max_model_len"] is None and entries["m"]["object"] == "model"

    jobs.append(_job("7", "PENDING", submit=NOW - 42, reason="Resources"))
    assert board.state("m", jobs) == {"state": "queued", "reason": "Resources", "jobs": 1, "queued_s": 42.0}

    # Running, but its agent has not reported the engine yet: starting since the job's start.
    jobs[0] = _job("7", "RUNNING", start=NOW - 12)
    assert board.state("m", jobs) == {"state": "starting", "starting_s": 12.0}
    _report(registry, _engine("7", engine_pb2.STARTING, started_at=NOW - 10))
    assert board.state("m", jobs)["starting_s"] == 12.0  # the earlier of the job's and the engine's start

    # A second job still pending does not hide the one that starts; a READY one makes the model ready.
    jobs.append(_job("8", "PENDING", reason="Priority"))
    assert board.state("m", jobs)["state"] == "starting"
    _report(registry, _engine("7", engine_pb2.READY))
    assert board.state("m", jobs) == {"state": "ready", "replicas": 1}


async def test_a_failed_engine_of_a_running_job_is_not_starting() -> None:
    jobs = [_job("7", "RUNNING", start=NOW - 5)]
    board, registry = _board(jobs)
    _report(registry, _engine("7", engine_pb2.FAILED))
    assert board.state("m", jobs) == {"state": "offline"}


async def test_a_users_private_engine_does_not_make_the_shared_model_starting_or_ready() -> None:
    board, registry = _board([])
    # Alice's own `sbatch --inference=m` job (pool=False) starts, then serves her: the service has no replica.
    _report(registry, _engine("9", engine_pb2.STARTING, started_at=NOW - 20, pool=False))
    assert board.state("m", []) == {"state": "offline"}
    _report(registry, _engine("9", engine_pb2.READY, pool=False))
    assert board.state("m", []) == {"state": "offline"}
    # Positive control: the service's own engine starting beside it makes the model starting, since its start.
    _report(registry, _engine("9", engine_pb2.READY, pool=False),
            _engine("7", engine_pb2.STARTING, started_at=NOW - 4))
    assert board.state("m", []) == {"state": "starting", "starting_s": 4.0}


async def test_max_model_len_is_asked_of_the_engine_once_and_kept_while_offline(standins) -> None:
    engine = await standins(model="m", api_key="engine-key")
    engine.max_model_len = 777
    board, registry = _board([])
    try:
        _report(registry, _engine("7", engine_pb2.READY, engine.base_url))
        registry.get("7").api_key = "engine-key"  # type: ignore[union-attr]
        (m, _) = await board.entries()
        assert m["max_model_len"] == 777 and m["slinfer"]["state"] == "ready"
        engine.max_model_len = 1  # asked once per engine: a second listing does not ask again
        (m, _) = await board.entries()
        assert m["max_model_len"] == 777
        _report(registry)  # the engine is gone
        (m, _) = await board.entries()
        assert m["slinfer"]["state"] == "offline" and m["max_model_len"] == 777
    finally:
        await board.close()


async def test_an_engine_that_does_not_answer_does_not_hold_the_listing() -> None:
    # A listening socket that never answers.
    server = await asyncio.start_server(lambda r, w: asyncio.sleep(60), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    board, registry = _board([])
    try:
        _report(registry, _engine("7", engine_pb2.READY, f"http://127.0.0.1:{port}"))
        began = time.monotonic()
        (m, _) = await board.entries()
        assert time.monotonic() - began < ENGINE_ASK_TIMEOUT_S + 1.0
        assert m["max_model_len"] is None and m["slinfer"]["state"] == "ready"
    finally:
        await board.close()
        server.close()


async def test_gateway_models_carry_the_state_and_the_engines_max_model_len(controller_factory, standins, http,
                                                                            engine_pb) -> None:
    c = await controller_factory(models=CATALOG)
    engine = await standins(model="m", api_key="k")
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url, "k")])
    async with http.get(f"{c.url}/v1/models", headers=c.headers()) as resp:
        assert resp.status == 200
        by_id = {m["id"]: m for m in (await resp.json())["data"]}
    assert by_id["m"]["slinfer"] == {"state": "ready", "replicas": 1, "min_replicas": 0, "max_replicas": 3}
    assert by_id["m"]["max_model_len"] == 1024
    assert by_id["idle"]["slinfer"]["state"] == "offline" and by_id["idle"]["max_model_len"] is None


async def test_slinfer_models_prints_the_gateways_answer_with_the_users_key(controller_factory, standins,
                                                                           engine_pb, monkeypatch, capsys) -> None:
    c = await controller_factory(models=CATALOG)
    engine = await standins(model="m")
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url)])
    monkeypatch.delenv("SLINFER_GATEWAY_URL", raising=False)
    monkeypatch.delenv("SLINFER_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", c.url)
    monkeypatch.setenv("OPENAI_API_KEY", c.client_key)
    args = build_parser().parse_args(["models"])
    rc = await asyncio.to_thread(args.func, args)
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["MODEL", "STATE", "REPLICAS", "MAX_LEN", "DETAIL"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["m"][1:4] == ["ready", "1", "1024"]
    assert rows["idle"][1:4] == ["offline", "0", "-"]
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    with pytest.raises(RuntimeError, match="401"):
        await asyncio.to_thread(args.func, args)
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(RuntimeError, match="SLINFER_API_KEY"):
        models_cli.gateway_and_key()


def test_the_cli_rows_say_why_a_model_is_not_ready() -> None:
    assert models_cli.row({"id": "m", "max_model_len": None, "slinfer": {
        "state": "queued", "reason": "Resources", "queued_s": 61.2, "min_replicas": 0, "max_replicas": 2}}) == [
        "m", "queued", "0", "-", "Slurm job pending (Resources) for 61 s; min 0 max 2"]
    assert models_cli.row({"id": "m", "max_model_len": 512, "slinfer": {"state": "starting", "starting_s": 9.6}}) \
        == ["m", "starting", "0", "512", "engine starting for 10 s"]


async def test_an_unserved_route_names_every_served_one_and_an_engine_lacking_a_route_names_its_own(
        controller_factory, standins, http, engine_pb) -> None:
    c = await controller_factory()
    engine = await standins(model="m")
    await (await c.agent()).send([engine_pb("1", "m", engine.base_url)])
    async with http.post(f"{c.url}/v1/images/generations", json={"model": "m"}, headers=c.headers()) as resp:
        assert resp.status == 404
        error = (await resp.json())["error"]
    assert error["code"] == "not_found" and error["type"] == "invalid_request_error"
    for route in ROUTES:
        assert f"POST {route.path}" in error["message"]
    # The stand-in serves no /detokenize (its router answers a bare 404): the gateway names what it does serve,
    # from its /openapi.json.
    async with http.post(f"{c.url}/detokenize", json={"model": "m", "tokens": [1]}, headers=c.headers()) as resp:
        assert resp.status == 404
        error = (await resp.json())["error"]
    assert error["code"] == "not_found" and error["type"] == "invalid_request_error"
    assert error["message"] == ("The engine of model 'm' does not serve POST /detokenize; it serves: POST "
                                "/v1/chat/completions, POST /v1/completions, POST /v1/responses, POST /v1/embeddings, "
                                "POST /tokenize, POST /v1/messages")
    # An OpenAI-shaped 404 of the engine (a model it does not serve) passes through unchanged.
    engine.fail = "status_500"
    async with http.post(f"{c.url}/tokenize", json={"model": "m", "prompt": "x"}, headers=c.headers()) as resp:
        assert resp.status == 500 and (await resp.json())["error"]["message"] == "stand-in told to fail"
