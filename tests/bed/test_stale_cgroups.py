"""The bed removes the job cgroups an earlier life of it left, on this machine's real cgroup v1 hierarchies.

A stale `job_J/step_*` cpuset whose CPUs are not a subset of the new job J's makes Slurm's extern step fail
with EBUSY and drains the node; these tests build exactly that cgroup, prove the kernel refuses the write, and
then that the sweep removes it, kills what ran in it and leaves other beds' jobs alone.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from slinfer.dev import stalecgroups

pytestmark = pytest.mark.bed

CPUSET = Path("/sys/fs/cgroup/cpuset")
# A node name no bed uses, so that the test's cgroups cannot be a running bed's.
NODE_FOLDER = CPUSET / "slurm_slinfer-sweep-test"
OURS = range(990000, 991000)


def _cpuset(folder: Path, cpus: str) -> Path:
    folder.mkdir()
    (folder / "cpuset.mems").write_text("0")
    (folder / "cpuset.cpus").write_text(cpus)
    return folder


def _remove_tree(folder: Path) -> None:
    if folder.exists():
        for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            sub.rmdir()
        folder.rmdir()


@pytest.fixture
def node_folder() -> Iterator[Path]:
    if not (CPUSET / "cpuset.cpus").exists():
        pytest.fail("this test needs the cgroup v1 cpuset hierarchy at /sys/fs/cgroup/cpuset "
                    "(docs/architecture/facts.md)")
    cpus = (CPUSET / "cpuset.effective_cpus").read_text().strip()
    if cpus in ("0", ""):
        pytest.fail(f"this test needs two CPUs in the root cpuset, it has {cpus!r}")
    _remove_tree(NODE_FOLDER)
    _cpuset(NODE_FOLDER, cpus)
    _cpuset(NODE_FOLDER / "uid_0", cpus)
    yield NODE_FOLDER
    _remove_tree(NODE_FOLDER)


def test_a_stale_job_cgroup_is_what_refuses_the_new_jobs_cpus(node_folder: Path) -> None:
    stale = _cpuset(node_folder / "uid_0" / "job_990011", "0-1")
    _cpuset(stale / "step_batch", "1")
    with pytest.raises(OSError, match="busy"):
        (stale / "cpuset.cpus").write_text("0")


def test_the_sweep_kills_and_removes_the_beds_stale_job_cgroups_and_no_one_elses(node_folder: Path) -> None:
    stale = _cpuset(node_folder / "uid_0" / "job_990011", "0-1")
    step = _cpuset(stale / "step_extern", "1")
    _cpuset(step / "task_0", "1")
    other_bed = _cpuset(node_folder / "uid_0" / "job_991000", "0-1")
    orphan = subprocess.Popen(["sleep", "600"])
    try:
        (step / "task_0" / "cgroup.procs").write_text(str(orphan.pid))
        swept = stalecgroups.sweep(OURS)
        assert swept == {stale: [orphan.pid]}
        assert orphan.wait(5) == -9
        assert not stale.exists()
        assert other_bed.is_dir()
    finally:
        orphan.kill()
        orphan.wait()
