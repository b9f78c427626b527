"""Removes the cgroups that Slurm left behind of an earlier life of a bed's jobs.

Responsible for: finding, in every mounted hierarchy, the job cgroups (`slurm*/uid_U/job_J` on cgroup v1,
`.../slurmstepd.scope/job_J` on v2) whose job id is in one bed's range, killing what still runs in them, and
removing them leaf first. Not responsible for: deciding when that is safe (the caller runs it only while none
of the bed's slurmds runs), or any cgroup of a job id outside the range: other beds on the machine share the
same `slurm_NODE` folders.

Why a bed needs it: a fresh bed starts its job ids again at its first one, and a job cgroup left from the last
life (a slurmstepd killed with its bed, a fault test) keeps its old step cgroups. On cgroup v1 a cpuset whose
children are not a subset of the new CPUs refuses them with EBUSY: the new job with that id fails its extern
step, and Slurm drains the node ("batch job complete failure"), as CI saw on Slurm 24.11.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterable
from pathlib import Path

from slinfer.agent import cgroups

# Where Slurm's cgroup plugins put a job below a hierarchy's mountpoint: v1 (slurm or slurm_NODE, per uid) and v2
# (slurmd's scope, with or without systemd's slices above it).
JOB_CGROUP_GLOBS = ("slurm*/uid_*/job_*", "slurmstepd.scope/job_*", "*/slurmstepd.scope/job_*",
                    "*/*/slurmstepd.scope/job_*")
_JOB_DIR = re.compile(r"job_(\d+)$")
# A killed task leaves its cgroup a moment after SIGKILL; rmdir meanwhile fails with EBUSY.
EMPTY_WAIT_S = 5.0


def job_cgroups(mountpoints: Iterable[Path], job_ids: range) -> list[Path]:
    """The job cgroups of `job_ids` under the hierarchies mounted at `mountpoints`."""
    found = []
    for mountpoint in mountpoints:
        for pattern in JOB_CGROUP_GLOBS:
            for folder in mountpoint.glob(pattern):
                match = _JOB_DIR.search(folder.name)
                if match and int(match.group(1)) in job_ids and folder.is_dir():
                    found.append(folder)
    return sorted(set(found))


def _leaf_first(folder: Path) -> list[Path]:
    below = [p for p in folder.rglob("*") if p.is_dir()]
    return [*sorted(below, key=lambda p: len(p.parts), reverse=True), folder]


def _tasks(folders: Iterable[Path]) -> set[int]:
    pids = set()
    for folder in folders:
        try:
            pids.update(int(line) for line in (folder / "cgroup.procs").read_text().split())
        except (OSError, ValueError):
            continue
    return pids


def remove(folder: Path) -> list[int]:
    """Kills what runs in a job cgroup and removes it with everything below; returns the pids it killed.
    Raises OSError naming the folder when one stays (a task that would not die)."""
    tree = _leaf_first(folder)
    killed = sorted(_tasks(tree))
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + EMPTY_WAIT_S
    while _tasks(tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    for sub in tree:
        try:
            sub.rmdir()
        except FileNotFoundError:
            continue
    return killed


def sweep(job_ids: range, mounts_text: str | None = None) -> dict[Path, list[int] | OSError]:
    """Removes every job cgroup of `job_ids` on this machine; returns each folder with the pids that still ran
    in it, or with the error that kept it."""
    if mounts_text is None:
        mounts_text = Path("/proc/self/mounts").read_text()
    mountpoints = set(cgroups.mounts(mounts_text).values())
    result: dict[Path, list[int] | OSError] = {}
    for folder in job_cgroups(mountpoints, job_ids):
        try:
            result[folder] = remove(folder)
        except OSError as error:
            result[folder] = error
    return result
