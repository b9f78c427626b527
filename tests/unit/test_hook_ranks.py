"""The hook's prolog for a rank of an engine across nodes: it passes the job's node list on, and the env file
of a headless rank (no URL of its own) holds only keys the SPANK plugin accepts: a key it refuses failed the
prolog, which drains the node."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from slinfer.agent import hook, jobfiles
from slinfer.config import AgentConfig, Config
from slinfer.v1 import agent_pb2, engine_pb2


class _Stub:
    def __init__(self, engine: engine_pb2.Engine, asked: list[agent_pb2.StartEngineRequest]) -> None:
        self.engine, self.asked = engine, asked

    def StartEngine(self, request: agent_pb2.StartEngineRequest, timeout: float) -> engine_pb2.Engine:
        self.asked.append(request)
        return self.engine


def _prolog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: engine_pb2.Engine
            ) -> tuple[dict[str, str], agent_pb2.StartEngineRequest]:
    asked: list[agent_pb2.StartEngineRequest] = []

    @contextlib.contextmanager
    def connect(_config: Config) -> Iterator[None]:
        yield None

    monkeypatch.setattr(hook, "connect", connect)
    monkeypatch.setattr(hook.agent_pb2_grpc, "AgentStub", lambda _channel: _Stub(engine, asked))
    for key, value in {"SLURM_JOB_UID": str(os.getuid()), "SLURM_JOB_GID": str(os.getgid()),
                       "SLURM_JOB_GPUS": "0", "SLURM_JOB_NODELIST": "node-[1-2]"}.items():
        monkeypatch.setenv(key, value)
    env_file = tmp_path / "jobs" / "7.env"
    config = Config(agent=AgentConfig(run_dir=str(tmp_path)))
    args = argparse.Namespace(job_id="7", model="big", pool=True, env_file=str(env_file))
    assert hook.prolog(config, args) == 0
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    return values, asked[0]


def test_a_headless_rank_gets_its_status_file_and_no_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    values, asked = _prolog(tmp_path, monkeypatch, engine_pb2.Engine(job_id="7", state=engine_pb2.STARTING, rank=1))
    assert asked.job.node_list == "node-[1-2]"
    assert set(values) <= set(jobfiles.ENV_KEYS)
    assert "OPENAI_BASE_URL" not in values and "SLINFER_ERROR" not in values
    assert values["SLINFER_STATUS_FILE"] == str(jobfiles.status_path(tmp_path, "7"))


def test_rank_0_gets_its_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = engine_pb2.Engine(job_id="7", state=engine_pb2.STARTING, base_url="http://10.0.0.1:20001", api_key="k")
    values, _ = _prolog(tmp_path, monkeypatch, engine)
    assert values["OPENAI_BASE_URL"] == "http://10.0.0.1:20001/v1" and values["OPENAI_API_KEY"] == "k"
