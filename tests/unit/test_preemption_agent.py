"""Where a pool engine lives (agent/preemption.py): its job's batch step, found through the batch step's task,
so that Slurm's preemption notice (which kills the extern step's processes) leaves it serving through the grace.
The move and the notice themselves run on the bed (tests/bed/test_preemption.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from slinfer.agent import preemption
from slinfer.agent.cgroups import JobCgroups


def _proc(tmp_path: Path, pid: int, lines: str) -> JobCgroups:
    cg = tmp_path / "cg"
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "self" / "mounts").write_text(
        f"cgroup {cg}/memory cgroup rw,memory 0 0\ncgroup {cg}/freezer cgroup rw,freezer 0 0\n")
    (tmp_path / "proc" / str(pid)).mkdir()
    (tmp_path / "proc" / str(pid) / "cgroup").write_text(lines)
    return JobCgroups("node1", proc=tmp_path / "proc")


def test_the_batch_steps_cgroups_are_its_tasks_job_cgroups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cgroups = _proc(tmp_path, 4242, "5:memory:/slurm_node1/uid_0/job_42/step_batch\n"
                                    "4:freezer:/slurm_node1/uid_0/job_42/step_batch\n"
                                    "3:cpu:/\n1:name=systemd:/user.slice\n")
    monkeypatch.setattr(cgroups, "step_task", lambda job, step: 4242 if (job, step) == ("42", "batch") else 0)
    found = preemption.batch_cgroups(cgroups, "42")
    assert sorted((h.mountpoint.name, h.path) for h in found) == [
        ("freezer", "/slurm_node1/uid_0/job_42/step_batch"), ("memory", "/slurm_node1/uid_0/job_42/step_batch")]
    # No batch step (a private engine's job on another node, or not started yet): nothing, so the extern step.
    assert preemption.batch_cgroups(cgroups, "43") == []


def test_waiting_for_a_batch_step_that_never_comes_ends_empty(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cgroups = _proc(tmp_path, 1, "")
    calls: list[str] = []
    monkeypatch.setattr(cgroups, "step_task", lambda job, step: calls.append(job) or 0)
    began = time.monotonic()
    assert asyncio.run(preemption.wait_for_batch(cgroups, "42", wait_s=0.5)) == []
    assert 0.5 <= time.monotonic() - began < 2.0
    assert len(calls) >= 2, "looked only once"


def test_the_real_process_table_has_no_batch_step_of_an_unknown_job() -> None:
    assert JobCgroups("node1").step_task("999999999", "batch") == 0
