"""A job's own LoRA adapters (`--inference-lora`, issue 33) from the prolog's environment to the engine's argv: the
hook reads the plugin's variable, the agent refuses a bad list with the reason, reads each folder as the job's
user (never as root: a folder only root can read fails the job, though root could read it), and the engine
starts with --enable-lora, the catalog's limits and --lora-modules NAME=PATH; a restarted engine keeps them."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from slinfer import inference_lora
from slinfer.agent import hook, launch, lorafiles
from slinfer.agent.engines import EngineManager
from slinfer.agent.gpu import Gpus
from slinfer.agent.records import RecordStore
from slinfer.config import AdapterConfig, AgentConfig, Config, ModelConfig
from slinfer.v1 import engine_pb2 as pb

# An interpreter any user may run (the venv's lives under /root, which only root may enter).
SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = 65534


def _job(job_id: str, loras: list[tuple[str, str]], model: str = "m", uid: int | None = None) -> pb.JobSpec:
    uid = os.getuid() if uid is None else uid
    return pb.JobSpec(job_id=job_id, model=model, uid=uid, gid=uid if uid == NOBODY else os.getgid(),
                      user="nobody" if uid == NOBODY else "", gpus=["0"],
                      loras=[pb.LoraAdapter(name=n, path=p) for n, p in loras])


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder other users may enter (pytest's tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="slinfer-lora-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _adapter(folder: Path, mode: int = 0o755) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    for path in folder.iterdir():
        path.chmod(0o644)
    folder.chmod(mode)
    return folder


def test_the_hook_reads_the_plugins_variable_from_the_prologs_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_UID", "1000")
    monkeypatch.setenv("SLURM_JOB_GID", "1000")
    monkeypatch.setenv(inference_lora.PROLOG_ENV, "mine=/home/a/x\nother=/home/a/y")
    job = hook.job_from_environment("7", "tiny", False)
    assert [(a.name, a.path) for a in job.loras] == [("mine", "/home/a/x"), ("other", "/home/a/y")]
    monkeypatch.setenv(inference_lora.PROLOG_ENV, "bad=/caf\udce9")  # bytes that are not UTF-8, as os.environ has them
    assert [a.path for a in hook.job_from_environment("7", "tiny", False).loras] == ["/caf\ufffd"]
    monkeypatch.delenv(inference_lora.PROLOG_ENV)
    assert list(hook.job_from_environment("7", "tiny", False).loras) == []


def test_the_engines_argv_serves_the_jobs_adapters_with_the_catalogs_limits() -> None:
    plain = ModelConfig(name="m", source="/models/m", max_loras=3, max_lora_rank=8)
    config = Config(models=[plain])
    argv = launch.engine_command(config, plain, "127.0.0.1", 8000, 1, "7", loras=[("mine", "/home/a/x")])
    assert argv[argv.index("--enable-lora"):] == ["--enable-lora", "--max-loras", "3", "--max-lora-rank", "8",
                                                  "--lora-modules", "mine=/home/a/x"]
    assert "--enable-lora" not in launch.engine_command(config, plain, "127.0.0.1", 8000, 1, "7")
    with_catalog = ModelConfig(name="b", source="/models/b", adapters=[AdapterConfig(name="b-a1", source="/ad/a1")])
    argv = launch.engine_command(config, with_catalog, "127.0.0.1", 8000, 1, "7",
                                 loras=[("mine", "/home/a/x,y")])
    modules = argv[argv.index("--lora-modules") + 1:]
    assert modules[0] == "b-a1=/ad/a1" and json.loads(modules[1]) == {"name": "mine", "path": "/home/a/x,y"}
    assert argv.count("--enable-lora") == 1


def test_a_bad_list_is_the_jobs_mistake_with_the_reason() -> None:
    own = ModelConfig(name="own", source="/m", gpus=1, engine_args=["--enable-lora", "--lora-modules", "x=/y"])
    base = ModelConfig(name="b", source="/m", gpus=1, adapters=[AdapterConfig(name="b-a1", source="/ad")])
    config = Config(models=[base, own])
    assert launch.refusal(config, _job("1", [("mine", "/a")], "b"), "n") == ""
    assert launch.refusal(config, _job("1", [("mine", "/a"), ("mine", "/b")], "b"), "n") == \
        '--inference-lora names adapter "mine" twice'
    for name in ("b", "b-a1"):
        assert f'name "{name}" is already served' in launch.refusal(config, _job("1", [(name, "/a")], "b"), "n")
    assert launch.refusal(config, _job("1", [("mine", "rel")], "b"), "n") == \
        "invalid --inference-lora value \"mine=rel\": the path must be absolute (start with '/')"
    refused = launch.refusal(config, _job("1", [("x2", "/a")], "own"), "n")
    assert "sets its engine's LoRA flags in the catalog" in refused
    assert launch.refusal(config, _job("1", [], "own"), "n") == ""


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.mark.skipif(os.geteuid() != 0, reason="reading as another user needs root")
async def test_the_agent_reads_the_folder_as_the_jobs_user_and_starts_the_engine_with_it(
        shared_dir: Path, http: aiohttp.ClientSession) -> None:
    # The engine: a script that records its argv, where user nobody may run it.
    seen = shared_dir / "argv"
    engine = shared_dir / "engine"
    engine.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {seen}\nexec sleep 30\n')
    engine.chmod(0o755)
    shared_dir.chmod(0o777)
    agent = AgentConfig(address="127.0.0.1", engine_command=[str(engine)], run_dir=str(shared_dir / "run"),
                        health_interval_s=0.05, python=SYSTEM_PYTHON)
    config = Config(agent=agent, models=[ModelConfig(name="m", source="/x", gpus=1, max_lora_rank=8)])
    manager = EngineManager(config, RecordStore(shared_dir / "run" / "engines"), http, Gpus())
    private = _adapter(shared_dir / "private", 0o700)
    mine = _adapter(shared_dir / "mine")
    empty = shared_dir / "empty"
    empty.mkdir(mode=0o755)
    try:
        # Root itself reads the private folder: the refusal below is the user's credentials at work.
        assert lorafiles.unreadable([("p", str(private))], python=SYSTEM_PYTHON, uid=0, gid=0, user="root") == ""
        failed = await manager.start(_job("301", [("mine", str(mine)), ("p", str(private))], uid=NOBODY))
        assert failed.state == pb.FAILED
        assert failed.reason == f"--inference-lora p={private}: nobody cannot read it (Permission denied: " \
                                f"{private}/adapter_config.json)"
        assert manager.engines() == [] and not seen.exists(), "a refused job must start no engine"
        missing = await manager.start(_job("302", [("e", str(empty))], uid=NOBODY))
        assert missing.reason.startswith(f"--inference-lora e={empty}: nobody cannot read it (No such file")
        # The positive control: her own readable folder starts the engine with it.
        started = await manager.start(_job("303", [("mine", str(mine))], uid=NOBODY))
        assert started.state == pb.STARTING, started.reason
        for _ in range(200):
            if seen.exists() and seen.read_text():
                break
            await asyncio.sleep(0.02)
        argv = seen.read_text().splitlines()
        assert argv[argv.index("--enable-lora"):] == ["--enable-lora", "--max-loras", "4", "--max-lora-rank", "8",
                                                      "--lora-modules", f"mine={mine}"]
        # The record keeps them: a restarted engine (same argv builder) serves them again.
        (record,) = RecordStore(shared_dir / "run" / "engines").load_all()
        assert record.loras == [["mine", str(mine)]]
        assert manager._argv(record, config.models[0])[-1] == f"mine={mine}"
    finally:
        await manager.stop("303")
        await manager.close()
