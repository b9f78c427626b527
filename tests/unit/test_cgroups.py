"""The agent's cgroup path logic, on the texts that /proc gives on cgroup v1 (this machine), on a pure cgroup v2
node and on a hybrid one: which hierarchy each line of /proc/PID/cgroup lives in, which of them are the job's,
and the OOM counter of each version. The move itself runs on the bed (tests/bed/test_containment.py)."""

from __future__ import annotations

import asyncio
import errno
import subprocess
import time
from pathlib import Path
from unittest import mock

import psutil
import pytest

from slinfer.agent.cgroups import STEP_SETTLE_S, Hierarchy, JobCgroups, hierarchies, is_job_cgroup, mounts, settled

V1_MOUNTS = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0
cgroup /sys/fs/cgroup/freezer cgroup rw,relatime,freezer 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,xattr,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0
proc /proc proc rw,relatime 0 0
"""
V1_TASK = """\
9:name=systemd:/
6:freezer:/slurm_node1/uid_1001/job_42/step_extern
4:memory:/slurm_node1/uid_1001/job_42/step_extern/task_0
2:cpu,cpuacct:/slurm_node1/uid_1001/job_42/step_extern/task_0
0::/
"""
V2_MOUNTS = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate,memory_recursiveprot 0 0\n"
V2_TASK = "0::/system.slice/slurmstepd.scope/job_42/step_extern/user/task_special\n"


def test_v1_lines_join_their_mounts_and_only_the_jobs_cgroups_are_targets() -> None:
    found = hierarchies(V1_TASK, mounts(V1_MOUNTS))
    by_dir = {str(h.directory) for h in found if is_job_cgroup(h, "42")}
    assert by_dir == {
        "/sys/fs/cgroup/freezer/slurm_node1/uid_1001/job_42/step_extern",
        "/sys/fs/cgroup/memory/slurm_node1/uid_1001/job_42/step_extern/task_0",
        "/sys/fs/cgroup/cpu,cpuacct/slurm_node1/uid_1001/job_42/step_extern/task_0",
    }
    # The root cgroups (systemd, the v2 tree at /) are not the job's; job 4 is not job 42's prefix.
    assert not any(is_job_cgroup(h, "4") for h in found)


def test_v2_the_job_is_one_leaf_of_the_unified_tree() -> None:
    found = hierarchies(V2_TASK, mounts(V2_MOUNTS))
    assert [str(h.directory) for h in found if is_job_cgroup(h, "42")] == [
        "/sys/fs/cgroup/system.slice/slurmstepd.scope/job_42/step_extern/user/task_special"]


def test_a_hierarchy_that_is_not_mounted_is_skipped() -> None:
    assert hierarchies("5:devices:/slurm/uid_0/job_7/step_extern\n", mounts(V1_MOUNTS)) == []


def test_oom_kills_are_read_from_either_version(tmp_path: Path) -> None:
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    v1.mkdir()
    v2.mkdir()
    (v1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    (v2 / "memory.events").write_text("low 0\nhigh 0\nmax 5\noom 2\noom_kill 2\n")
    cgroups = JobCgroups("node1")
    assert cgroups.oom_kills([Hierarchy(tmp_path, "/v1")]) == 3
    assert cgroups.oom_kills([Hierarchy(tmp_path, "/v2")]) == 2
    assert cgroups.oom_kills([Hierarchy(tmp_path, "/none")]) == 0


def test_a_job_without_an_extern_step_has_no_cgroups_to_join() -> None:
    # No `slurmstepd: [999999999.extern]` runs here, so there is nothing to contain the engine in.
    assert JobCgroups("node1").of_job("999999999") == []
    assert asyncio.run(JobCgroups("node1").wait_for_job("999999999", wait_s=0.3)) == []


def _tree(root: Path, *folders: str) -> None:
    """Cgroup folders as cgroupfs shows them: each level has its cgroup.procs."""
    for folder in folders:
        path = root
        for part in Path(folder).parts:
            path = path / part
            path.mkdir(parents=True, exist_ok=True)
            (path / "cgroup.procs").write_text("")


def test_an_extern_step_without_a_task_is_found_by_its_folders(tmp_path: Path) -> None:
    """Slurm 26.05: `slurmstepd: [J.extern]` keeps no task, so /proc names no cgroup (issue 27 found engines
    outside their jobs). The step's own folder is found in each hierarchy, this node's where two slurmd share the
    host; v2 takes the extern step's leaf; a hierarchy without the job is skipped."""
    cg = tmp_path / "cg"
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "self" / "mounts").write_text(
        f"cgroup {cg}/memory cgroup rw,memory 0 0\ncgroup {cg}/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n"
        f"cgroup {cg}/freezer cgroup rw,freezer 0 0\ncgroup2 {cg}/unified cgroup2 rw 0 0\n")
    _tree(cg / "memory", "slurm_node1/uid_1001/job_42/step_extern", "slurm_node2/uid_1001/job_42/step_extern",
          "slurm_node1/uid_1001/job_43/step_extern")
    _tree(cg / "cpu,cpuacct", "slurm_node1/uid_1001/job_42/step_extern")
    _tree(cg / "unified", "system.slice/slurmstepd.scope/job_42/step_extern/user/task_special")
    (cg / "freezer" / "user.slice").mkdir(parents=True)  # a hierarchy Slurm does not use on this node
    found = JobCgroups("node1", proc=tmp_path / "proc").of_job("42")
    assert sorted((h.mountpoint.name, h.path) for h in found) == [
        ("cpu,cpuacct", "/slurm_node1/uid_1001/job_42/step_extern"),
        ("memory", "/slurm_node1/uid_1001/job_42/step_extern"),
        ("unified", "/system.slice/slurmstepd.scope/job_42/step_extern/user/task_special")]
    assert all(is_job_cgroup(h, "42") for h in found)
    # The other node's view, and a job that is not there at all.
    assert {h.path for h in JobCgroups("node2", proc=tmp_path / "proc").of_job("42")} >= {
        "/slurm_node2/uid_1001/job_42/step_extern"}
    assert JobCgroups("node1", proc=tmp_path / "proc").of_job("44") == []


def test_a_step_is_taken_once_no_hierarchy_has_come_for_a_while(tmp_path: Path) -> None:
    """Slurm puts the extern task into its cgroups (and makes a taskless step's folders) one hierarchy after
    another: an engine moved when only freezer and cpuset had the job stayed outside the memory and devices
    limits (seen on 24.11). The step is polled on until no new hierarchy has come for STEP_SETTLE_S."""
    cg = tmp_path / "cg"
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "self" / "mounts").write_text(
        f"cgroup {cg}/memory cgroup rw,memory 0 0\ncgroup {cg}/freezer cgroup rw,freezer 0 0\n")
    _tree(cg / "freezer", "slurm_node1/uid_1001/job_42/step_extern")
    cgroups = JobCgroups("node1", proc=tmp_path / "proc")
    assert cgroups.find("42") == [Hierarchy(cg / "freezer", "/slurm_node1/uid_1001/job_42/step_extern")]

    async def memory_comes_later() -> list[Hierarchy]:
        waiting = asyncio.create_task(cgroups.wait_for_job("42", wait_s=10))
        await asyncio.sleep(0.5)
        _tree(cg / "memory", "slurm_node1/uid_1001/job_42/step_extern")
        return await waiting

    began = time.monotonic()
    found = asyncio.run(memory_comes_later())
    assert sorted(h.mountpoint.name for h in found) == ["freezer", "memory"]
    assert 0.5 + STEP_SETTLE_S <= time.monotonic() - began < 5


def test_a_descendant_that_exits_before_its_move_is_passed_over_but_the_engine_itself_is_not(tmp_path: Path) -> None:
    """The engine runs short-lived helpers while it starts: one that exited between the listing of the tree and
    its own move made cgroup.procs answer ESRCH, and CI failed a healthy engine for it. The write is forced to
    answer ESRCH for one child; the engine's own ESRCH (it is gone) stays an error."""
    target = Hierarchy(tmp_path / "memory", "/job_42/step_extern")
    target.directory.mkdir(parents=True)
    engine = subprocess.Popen(["/bin/sh", "-c", "sleep 30 & sleep 30 & wait"])
    try:
        for _ in range(200):
            children = sorted(c.pid for c in psutil.Process(engine.pid).children())
            if len(children) == 2:
                break
            time.sleep(0.01)
        assert len(children) == 2
        gone, kept = children
        written: list[int] = []
        real_write = Path.write_text

        def write(path: Path, text: str, *args: object, **kwargs: object) -> int:
            if int(text) in refused:
                raise ProcessLookupError(errno.ESRCH, "No such process")
            written.append(int(text))
            return real_write(path, text)

        refused = {gone}
        with mock.patch.object(Path, "write_text", write):
            assert JobCgroups("node1").contain("42", engine.pid, [target]) == [target]
        assert written == [engine.pid, kept], written
        refused = {engine.pid}
        with mock.patch.object(Path, "write_text", write), pytest.raises(ProcessLookupError):
            JobCgroups("node1").contain("42", engine.pid, [target])
    finally:
        for child in psutil.Process(engine.pid).children():
            child.kill()
        engine.kill()
        engine.wait()


def test_a_task_moved_deeper_in_a_hierarchy_is_a_change_the_step_settles_after() -> None:
    """22.05 puts the extern step's task in `step_extern`, then in `step_extern/task_0` for memory and cpuacct:
    an engine moved at the first stays out of the task's accounting (CI: sacct's TotalCPU of the job was the
    sleep's, not the engine's). The deeper path is taken, STEP_SETTLE_S after it came."""
    cg = Path("/sys/fs/cgroup")
    step = [Hierarchy(cg / "freezer", "/slurm_n/uid_1/job_42/step_extern"),
            Hierarchy(cg / "memory", "/slurm_n/uid_1/job_42/step_extern")]
    task = [step[0], Hierarchy(cg / "memory", "/slurm_n/uid_1/job_42/step_extern/task_0")]
    began = time.monotonic()

    def find() -> list[Hierarchy]:
        return step if time.monotonic() - began < 0.5 else task

    found = asyncio.run(settled(find, 10))
    assert found == task
    assert 0.5 + STEP_SETTLE_S <= time.monotonic() - began < 5
