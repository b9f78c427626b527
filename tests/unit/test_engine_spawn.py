"""A job's engine that cannot be started is that job's failure: the real EngineManager answers FAILED with the
reason instead of raising (which gRPC turned into UNKNOWN, the hook into exit 1, and Slurm into a drained node).
Each case forces its fault: an engine command that does not exist, one that is not executable, and a crash of
the restarted engine's spawn."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from unittest import mock

import aiohttp
import pytest

from slinfer.agent.engines import EngineManager
from slinfer.agent.gpu import Gpus
from slinfer.agent.records import RecordStore
from slinfer.config import AgentConfig, Config, ControllerConfig, ModelConfig
from slinfer.v1 import engine_pb2 as pb


def _job(job_id: str) -> pb.JobSpec:
    return pb.JobSpec(job_id=job_id, model="m", uid=os.getuid(), gid=os.getgid(), user="", gpus=["0"])


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _manager(tmp_path: Path, http: aiohttp.ClientSession, command: list[str]) -> EngineManager:
    agent = AgentConfig(address="127.0.0.1", engine_command=command, run_dir=str(tmp_path / "run"),
                        health_interval_s=0.05)
    config = Config(agent=agent, models=[ModelConfig(name="m", source="/x", gpus=1)])
    return EngineManager(config, RecordStore(tmp_path / "run" / "engines"), http, Gpus())


async def test_a_missing_engine_binary_fails_the_job_with_the_reason(tmp_path: Path,
                                                                     http: aiohttp.ClientSession) -> None:
    missing = tmp_path / "no-such-python"
    manager = _manager(tmp_path, http, [str(missing), "-m", "vllm"])
    engine = await manager.start(_job("101"))
    assert engine.state == pb.FAILED
    assert "engine could not be started" in engine.reason and str(missing) in engine.reason
    assert manager.engines() == [], "a failed spawn must leave no engine behind to supervise"


async def test_an_engine_python_the_user_may_not_execute_fails_the_job(tmp_path: Path,
                                                                       http: aiohttp.ClientSession) -> None:
    # Mode 0644: not executable by anyone, root included (exec needs an x bit), as the bed's venv interpreter
    # under /root was for an unprivileged job user.
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\nexit 0\n")
    python.chmod(0o644)
    manager = _manager(tmp_path, http, [str(python)])
    engine = await manager.start(_job("102"))
    assert engine.state == pb.FAILED
    assert "Permission denied" in engine.reason, engine.reason
    # The job can be stopped cleanly afterwards, as its epilog will.
    result = await manager.stop("102")
    assert result.clean


async def test_a_restart_that_cannot_spawn_fails_the_engine(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    # The first start works (an engine that exits at once); the restart finds the command gone.
    script, started = tmp_path / "engine", tmp_path / "started"
    # The shell holds the script open once it has written the marker, so removing the file then cannot
    # change how this first run ends; only the restart finds it gone.
    script.write_text(f"#!/bin/sh\ntouch {started}\nsleep 0.2\nexit 3\n")
    script.chmod(0o755)
    manager = _manager(tmp_path, http, [str(script)])
    engine = await manager.start(_job("103"))
    assert engine.state == pb.STARTING
    for _ in range(200):
        if started.exists():
            break
        await asyncio.sleep(0.02)
    assert started.exists(), "the first engine never ran"
    script.unlink()
    for _ in range(200):
        states = {e.job_id: e for e in manager.engines()}
        if states["103"].state == pb.FAILED:
            break
        await asyncio.sleep(0.05)
    failed = {e.job_id: e for e in manager.engines()}["103"]
    assert failed.state == pb.FAILED
    assert "exited with code 3" in failed.reason and "restart failed" in failed.reason, failed.reason
    await manager.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the engine runs as another uid")
async def test_the_engine_enters_the_jobs_folder_as_the_user_and_its_log_is_the_users_alone(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Issue 27: Popen changed folder as root before it dropped privileges, so a job whose working directory
    was another user's private folder had its engine start inside it. Now the folder is entered as the job's
    user: a folder that user may not enter is not entered (its home instead); one it may enter is (control)."""
    scratch = Path(tempfile.mkdtemp(prefix="slinfer-spawn-"))
    try:
        scratch.chmod(0o755)
        private, open_dir, home = scratch / "private", scratch / "open", scratch / "home"
        for folder, mode in ((private, 0o700), (open_dir, 0o755), (home, 0o755)):
            folder.mkdir()
            folder.chmod(mode)
        os.chown(home, 65534, 65534)
        script = scratch / "engine"
        script.write_text("#!/bin/sh\npwd > \"$HOME/pwd.$SLURM_JOB_ID\"\nexec sleep 30\n")
        script.chmod(0o755)
        manager = _manager(tmp_path, http, [str(script)])
        for job_id, work_dir, expected in (("104", private, home), ("105", open_dir, open_dir)):
            job = pb.JobSpec(job_id=job_id, model="m", uid=65534, gid=65534, user="", gpus=["0"],
                             work_dir=str(work_dir))
            with mock.patch("slinfer.agent.engines.user_home", return_value=str(home)):
                engine = await manager.start(job)
            assert engine.state == pb.STARTING, engine.reason
            marker = home / f"pwd.{job_id}"
            for _ in range(200):
                if marker.exists() and marker.read_text():
                    break
                await asyncio.sleep(0.02)
            assert marker.read_text().strip() == str(expected)
            log = Path(manager.logs_dir) / f"{job_id}.log"
            assert log.stat().st_uid == 65534 and log.stat().st_mode & 0o777 == 0o600
            assert (await manager.stop(job_id)).clean
        await manager.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


async def test_only_the_service_user_and_the_allowlist_may_publish_to_the_pool(tmp_path: Path,
                                                                              http: aiohttp.ClientSession) -> None:
    """Issue 27: `--inference-pool` from anyone else fails that job with the rule in its reason (never the
    prolog); the controller's user (here root) and agent.pool_users start as usual (the positive control)."""
    # Where another uid may run it (pytest's tmp_path is root's alone).
    script = Path(tempfile.mkdtemp(prefix="slinfer-pool-")) / "engine"
    script.parent.chmod(0o755)
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    script.chmod(0o755)
    agent = AgentConfig(address="127.0.0.1", engine_command=[str(script)], run_dir=str(tmp_path / "run"),
                        health_interval_s=0.05, pool_users=["daemon"])
    config = Config(controller=ControllerConfig(user="root"), agent=agent,
                    models=[ModelConfig(name="m", source="/x", gpus=1)])
    manager = EngineManager(config, RecordStore(tmp_path / "run" / "engines"), http, Gpus())
    cases = (("201", 65534, "nobody", pb.FAILED), ("202", 0, "root", pb.STARTING), ("203", 1, "daemon", pb.STARTING))
    try:
        for job_id, uid, user, state in cases:
            if uid and os.geteuid() != 0:
                continue
            engine = await manager.start(pb.JobSpec(job_id=job_id, model="m", uid=uid, gid=uid, user=user,
                                                    gpus=["0"], pool=True))
            assert engine.state == state, (user, engine.reason)
            if state == pb.FAILED:
                assert "--inference-pool is refused for user nobody" in engine.reason
                assert "controller.user" in engine.reason and "agent.pool_users" in engine.reason
        private = await manager.start(pb.JobSpec(job_id="204", model="m", uid=os.getuid(), gid=os.getgid(),
                                                 user="", gpus=["0"], pool=False))
        assert private.state == pb.STARTING, "a private engine needs no permission"
    finally:
        for job_id in ("202", "203", "204"):
            await manager.stop(job_id)
        await manager.close()
        shutil.rmtree(script.parent, ignore_errors=True)


def test_a_failed_exec_seen_only_as_a_zombie_is_still_a_failed_exec(tmp_path: Path) -> None:
    # Forces the race CI met under load: the wrapper's exec of the engine fails and the wrapper exits between
    # the first poll (None) and the read of its /proc cmdline (empty for a zombie).
    from slinfer.agent import processes

    python = tmp_path / "python"
    python.write_text("#!/bin/sh\nexit 0\n")
    python.chmod(0o644)
    real_poll = subprocess.Popen.poll
    raced: list[int] = []

    def poll_late(self: subprocess.Popen[bytes]) -> int | None:
        if not raced:
            for _ in range(2000):
                with open(f"/proc/{self.pid}/stat") as stat:
                    if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                        raced.append(self.pid)
                        break
                time.sleep(0.005)
            raced.append(0)
            return None
        return real_poll(self)

    with mock.patch.object(subprocess.Popen, "poll", poll_late), pytest.raises(PermissionError):
        processes.spawn_as_user([str(python)], uid=os.getuid(), gid=os.getgid(), user="", env={}, cwd=str(tmp_path),
                                fallback_cwd="/", log_path=tmp_path / "log")
    assert raced[0] > 0, "the forced race did not happen: the wrapper never became a zombie"
