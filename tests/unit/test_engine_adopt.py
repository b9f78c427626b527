"""A dead engine is restarted only while Slurm still runs its job on this node. Otherwise it would be an orphan
that no epilog ever stops: one killed by its job's end (Slurm kills a contained job's engine before the epilog
asks the agent to stop it), or one re-adopted dead by an agent that comes back after its job ended. The real
EngineManager, a shell script as the engine, and a Slurm double that answers `job_over` as each case sets it."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from slinfer.agent.engines import EngineManager
from slinfer.agent.gpu import Gpus
from slinfer.agent.processes import engine_processes, engine_tag
from slinfer.agent.records import EngineRecord, RecordStore
from slinfer.agent.slurmview import SlurmView
from slinfer.config import AgentConfig, Config, ModelConfig
from slinfer.v1 import engine_pb2 as pb

# Many health intervals (0.05 s each): a re-adopted dead engine is restarted within the first.
SUPERVISION_S = 1.0


class SlurmAnswers:
    """A named double of the agent's SlurmView: whether the job is over, as the test says."""

    def __init__(self, over: bool) -> None:
        self.over = over
        self.asked: list[str] = []

    async def job_over(self, job_id: str) -> bool:
        self.asked.append(job_id)
        return self.over

    async def refusal(self, job: pb.JobSpec) -> str:
        return ""

    async def job_nodes(self, job_id: str) -> list[str] | None:
        return None  # as a Slurm that does not answer: no node count to check (the model has one node)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _manager(tmp_path: Path, http: aiohttp.ClientSession, slurm: SlurmAnswers) -> tuple[EngineManager, Path]:
    starts = tmp_path / "starts"
    script = tmp_path / "engine"
    script.write_text(f"#!/bin/sh\necho started >> {starts}\nexec sleep 30\n")
    script.chmod(0o755)
    agent = AgentConfig(address="127.0.0.1", engine_command=[str(script)], run_dir=str(tmp_path / "run"),
                        health_interval_s=0.05)
    config = Config(agent=agent, models=[ModelConfig(name="m", source="/x", gpus=1)])
    store = RecordStore.of_run_dir(tmp_path / "run")
    # A record as a killed agent left it: READY, its engine's process gone (a pid no process has now).
    store.save(EngineRecord(job_id="301", model="m", uid=os.getuid(), gid=os.getgid(), user="", gpus=["0"],
                            pool=False, partition="", work_dir="", host="127.0.0.1", port=1, api_key="k",
                            pid=2**22 + 1, create_time=1.0, state=pb.READY))
    return EngineManager(config, store, http, Gpus(), slurm), starts  # type: ignore[arg-type]


async def test_a_dead_engine_of_an_ended_job_is_not_restarted_and_its_record_goes(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    slurm = SlurmAnswers(over=True)
    manager, starts = _manager(tmp_path, http, slurm)
    await manager.adopt_all()
    await asyncio.sleep(SUPERVISION_S)
    try:
        assert slurm.asked == ["301"], "the agent must ask Slurm before restarting a re-adopted engine"
        assert not starts.exists(), "an engine was restarted for a job Slurm says is over"
        assert manager.engines() == []
        assert not (tmp_path / "run" / "engines" / "301.json").exists()
    finally:
        await manager.stop("301")
        await manager.close()


async def test_a_dead_engine_of_a_running_job_is_restarted(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    slurm = SlurmAnswers(over=False)
    manager, starts = _manager(tmp_path, http, slurm)
    await manager.adopt_all()
    await asyncio.sleep(SUPERVISION_S)
    try:
        assert slurm.asked == ["301"]
        assert starts.exists() and starts.read_text().count("started") == 1, "the engine was not restarted"
        (engine,) = manager.engines()
        assert engine.state == pb.STARTING and "engine exited" in engine.reason
    finally:
        result = await manager.stop("301")
        assert result.clean
        await manager.close()


async def test_an_engine_killed_by_its_jobs_end_is_not_restarted(tmp_path: Path,
                                                                  http: aiohttp.ClientSession) -> None:
    slurm = SlurmAnswers(over=False)
    manager, starts = _manager(tmp_path, http, slurm)
    (tmp_path / "run" / "engines" / "301.json").unlink()  # this case starts its own engine
    engine = await manager.start(pb.JobSpec(job_id="302", model="m", uid=os.getuid(), gid=os.getgid(), gpus=["0"]))
    assert engine.state == pb.STARTING
    try:
        for _ in range(100):
            if starts.exists():
                break
            await asyncio.sleep(0.02)
        assert starts.exists(), "the engine never ran"
        # The job ends: Slurm says so, then kills the engine as a contained job's cleanup does.
        slurm.over = True
        pids = [p.pid for p in engine_processes(engine_tag("302", tmp_path / "run"), 0)]
        assert pids
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(SUPERVISION_S)
        assert "302" in slurm.asked
        assert starts.read_text().count("started") == 1, "the engine was restarted after its job's end"
        assert manager.engines() == []
    finally:
        assert (await manager.stop("302")).clean
        await manager.close()


def _scontrol(tmp_path: Path, stdout_file: Path | None, stderr: str = "", code: int = 0) -> str:
    """A stand-in `scontrol` that prints a captured answer of real Slurm 22.05, or fails as Slurm does."""
    script = tmp_path / "scontrol"
    body = f"cat {stdout_file}\n" if stdout_file else ""
    script.write_text(f"#!/bin/sh\n{body}echo '{stderr}' >&2\nexit {code}\n")
    script.chmod(0o755)
    return str(script)


FIXTURES = Path(__file__).parents[1] / "fixtures" / "slurm" / "22.05"


@pytest.mark.parametrize(("answer", "stderr", "code", "node", "over"), [
    ("scontrol-job-running.txt", "", 0, "slinfer-dev", False),
    ("scontrol-job-running.txt", "", 0, "another-node", True),
    ("scontrol-job-ended.txt", "", 0, "slinfer-dev", True),
    (None, "slurm_load_jobs error: Invalid job id specified", 1, "slinfer-dev", True),
    (None, "slurm_load_jobs error: Unable to contact slurm controller (connect failure)", 1, "slinfer-dev", False),
])
async def test_job_over_is_true_only_when_slurm_says_so(tmp_path: Path, answer: str | None, stderr: str, code: int,
                                                        node: str, over: bool) -> None:
    view = SlurmView(node, scontrol=_scontrol(tmp_path, FIXTURES / answer if answer else None, stderr, code))
    assert await view.job_over("268000") is over
