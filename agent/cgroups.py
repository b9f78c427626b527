"""Puts a job's engine into the job's own cgroups, those of its extern step.

Responsible for: finding, for a job, the cgroups that Slurm gave its extern step (`PrologFlags=Contain`) on this
node, on cgroup v1 and v2 alike, and moving an engine's process tree into them, so that the job's memory, core
and device limits bind the engine, Slurm accounts for it, and Slurm's own cleanup kills it even when the agent
is gone. Not responsible for: creating or limiting cgroups (Slurm does), starting or stopping engines.

Where the extern step's cgroups are is release- and layout-specific (v1 `slurm/uid_U/job_J/step_extern` or
`slurm_NODE/...`, v2 under `slurmstepd.scope`, with or without systemd), so they are not guessed where Slurm
shows them: the extern step's own task (the `sleep` that `slurmstepd: [J.extern]` keeps, up to 24.11) is in
exactly the cgroups we want, and `/proc/PID/cgroup` names them, one line per hierarchy. 26.05's extern step has
no task; there the step's own folder is found in each mounted hierarchy (`.../job_J/step_extern`), the node's
own where several slurmd share a host.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from slinfer.agent import stepd

log = logging.getLogger(__name__)

# Slurm starts a job's extern step only after its prolog, from which the engine was started: measured on the
# bed, about 0.4 s after the prolog returns; a loaded node takes longer.
EXTERN_STEP_WAIT_S = 30.0
# How often to look for it meanwhile: a fifth of a second of an engine outside its job's limits at most.
EXTERN_STEP_POLL_S = 0.2
# Folders between a hierarchy's root and `job_J` (v1 `slurm/uid_U`, v2 `system.slice/slurmstepd.scope`, and
# one more for a nested systemd slice).
STEP_SEARCH_DEPTH = 3
# Listings of an engine's descendants while moving them: an engine that starts its engine core and workers
# meanwhile forks a few generations in the first seconds.
CONTAIN_PASSES = 5
# How long a step's cgroups must stay the same before the engine moves in: Slurm put the extern task into freezer
# and cpuset before memory and devices (24.11), and made a taskless step's folders so (26.05), within a second.
STEP_SETTLE_S = 1.0
# Where cgroup/v2 Slurm keeps an extern step's own processes, below the step's folder.
V2_EXTERN_LEAF = "user/task_special"


@dataclass(frozen=True)
class Hierarchy:
    """One line of /proc/PID/cgroup joined to where that hierarchy is mounted."""

    mountpoint: Path
    path: str  # relative to the hierarchy's root, as /proc/PID/cgroup gives it

    @property
    def directory(self) -> Path:
        return self.mountpoint / self.path.lstrip("/")


# The controllers a v1 hierarchy can carry; its mount options name them among the ordinary mount flags.
V1_CONTROLLERS = frozenset({"blkio", "cpu", "cpuacct", "cpuset", "devices", "freezer", "hugetlb", "memory", "misc",
                            "net_cls", "net_prio", "perf_event", "pids", "rdma"})


def _key(controllers: Iterable[str]) -> str:
    names = list(controllers)
    named = [n for n in names if n.startswith("name=")]
    return named[0] if named else ",".join(sorted(n for n in names if n in V1_CONTROLLERS))


def mounts(mounts_text: str) -> dict[str, Path]:
    """Maps each hierarchy's key as /proc/PID/cgroup spells it ("memory", "cpu,cpuacct", "name=systemd", "" for
    v2) to its mountpoint, from the text of /proc/self/mounts."""
    found: dict[str, Path] = {}
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        mountpoint, fstype, options = parts[1], parts[2], parts[3].split(",")
        if fstype == "cgroup2":
            found.setdefault("", Path(mountpoint))
        elif fstype == "cgroup" and (key := _key(options)):
            found.setdefault(key, Path(mountpoint))
    return found


def hierarchies(proc_cgroup_text: str, mounted: dict[str, Path]) -> list[Hierarchy]:
    """The cgroups of a process, from the text of its /proc/PID/cgroup, where their hierarchy is mounted."""
    result = []
    for line in proc_cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers, path = parts[1], parts[2]
        mountpoint = mounted.get(_key(controllers.split(",")) if controllers else "")
        if mountpoint is not None:
            result.append(Hierarchy(mountpoint, path))
    return result


async def settled(find: Callable[[], list[Hierarchy]], wait_s: float) -> list[Hierarchy]:
    """find(), polled until it gives cgroups and no new hierarchy has come for STEP_SETTLE_S, or wait_s passed;
    cancellable (find runs in a thread, no thread sleeps). Slurm puts a step's task into its cgroups (and makes a
    taskless step's folders) one hierarchy after another: an engine moved at the first would escape the others'
    limits (seen on 24.11: freezer and cpuset first, memory and devices later). A task moved deeper in a hierarchy
    (22.05: `step_extern`, then `step_extern/task_0` for memory and cpuacct) is a change too: an engine left in
    the step's folder is bound by its limits but missing from the task's accounting (CI: sacct's TotalCPU)."""
    deadline = time.monotonic() + wait_s
    settled_at = 0.0
    targets: list[Hierarchy] = []
    while True:
        found = await asyncio.to_thread(find)
        now = time.monotonic()
        if len(found) > len(targets) or (found and len(found) == len(targets) and found != targets):
            targets, settled_at = found, now + STEP_SETTLE_S
        if (targets and now >= settled_at) or now >= deadline:
            return targets
        await asyncio.sleep(EXTERN_STEP_POLL_S)


def is_job_cgroup(hierarchy: Hierarchy, job_id: str) -> bool:
    return f"/job_{job_id}/" in f"{hierarchy.path}/"


class JobCgroups:
    """Finds a job's extern step on this node and moves process trees into its cgroups."""

    def __init__(self, node_name: str, proc: Path = Path("/proc")) -> None:
        self.node_name = node_name
        self.proc = proc

    def extern_task(self, job_id: str) -> int:
        """The pid of the extern step's task of this job on this node, or 0 when there is none (no Contain)."""
        return self.step_task(job_id, "extern")

    def step_task(self, job_id: str, step: str) -> int:
        """The pid of a task of step `step` ("extern", "batch") of this job on this node, or 0 when there is
        none: a child of `slurmstepd: [J.STEP]`, in exactly that step's cgroups."""
        wanted = f"slurmstepd: [{job_id}.{step}]"
        candidates = []
        for daemon in psutil.process_iter(["cmdline"]):
            # slurmstepd rewrites its argv[0] with spaces in it, which /proc may give back split or whole.
            if " ".join(daemon.info["cmdline"] or []) != wanted:
                continue
            try:
                candidates.extend(child.pid for child in daemon.children())
            except psutil.Error:
                continue
        if len(candidates) > 1:
            # Several slurmd on one host (the multi-node bed): v1 paths carry the node's name.
            mine = [pid for pid in candidates if f"slurm_{self.node_name}/" in self._read(pid)]
            candidates = mine or candidates
        return candidates[0] if candidates else 0

    def _read(self, pid: int) -> str:
        try:
            return (self.proc / str(pid) / "cgroup").read_text()
        except OSError:
            return ""

    def of_job(self, job_id: str) -> list[Hierarchy]:
        """The extern step's cgroups, each named by the job; empty when the job has none on this node (yet)."""
        return self.find(job_id)

    def find(self, job_id: str) -> list[Hierarchy]:
        """The extern task's job cgroups, else (26.05: no task) the step's folders. Either may still be growing:
        Slurm puts the task (and makes the folders) one hierarchy after another."""
        mounted = mounts((self.proc / "self" / "mounts").read_text())
        task = self.extern_task(job_id)
        if task:
            return [h for h in hierarchies(self._read(task), mounted) if is_job_cgroup(h, job_id)]
        return self.step_folders(job_id, mounted)

    def step_folders(self, job_id: str, mounted: dict[str, Path]) -> list[Hierarchy]:
        """The extern step's cgroups found by their folders (an extern step without a task, 26.05): in each
        mounted hierarchy, the one `.../job_J/step_extern` of this node. v2 keeps processes in leaves only:
        there the leaf Slurm gives the extern step's own processes (`user/task_special`), and a step folder
        with other cgroups below it is left alone."""
        found = []
        for mountpoint in dict.fromkeys(mounted.values()):
            v2 = mountpoint == mounted.get("")
            candidates = [c for depth in range(1, STEP_SEARCH_DEPTH + 1)
                          for c in mountpoint.glob("/".join(["*"] * depth + [f"job_{job_id}", "step_extern"]))]
            if len(candidates) > 1:
                # Several slurmd on one host (the multi-node bed): v1 paths carry the node's name.
                candidates = [c for c in candidates if f"slurm_{self.node_name}" in c.parts]
            if len(candidates) == 1 and (candidates[0] / "cgroup.procs").exists():
                folder = candidates[0]
                if not v2:
                    found.append(Hierarchy(mountpoint, "/" + str(folder.relative_to(mountpoint))))
                elif (folder / V2_EXTERN_LEAF / "cgroup.procs").exists():
                    found.append(Hierarchy(mountpoint, "/" + str((folder / V2_EXTERN_LEAF).relative_to(mountpoint))))
                elif not any(child.is_dir() for child in folder.iterdir()):
                    found.append(Hierarchy(mountpoint, "/" + str(folder.relative_to(mountpoint))))
        return found

    async def wait_for_job(self, job_id: str, wait_s: float = EXTERN_STEP_WAIT_S) -> list[Hierarchy]:
        """The extern step's cgroups once they settled (`settled`), or what there is after wait_s."""
        return await settled(lambda: self.find(job_id), wait_s)

    def move(self, pids: Iterable[int], targets: list[Hierarchy], *, gone_ok: bool = False) -> None:
        """Writes each pid into every target's cgroup.procs (a process moves with its threads). With gone_ok, a
        process that exited before its move (ESRCH) is passed over: nothing of it is left to contain."""
        for pid in pids:
            for target in targets:
                try:
                    (target.directory / "cgroup.procs").write_text(f"{pid}\n")
                except ProcessLookupError:
                    if not gone_ok:
                        raise
                    break

    def contain(self, job_id: str, root_pid: int, targets: list[Hierarchy]) -> list[Hierarchy]:
        """Moves root_pid and its descendants into the job's extern cgroups `targets`; returns them.
        Raises OSError when a move is refused."""
        if not targets:
            return []
        began = time.monotonic()
        self.move([root_pid], targets)
        # Children forked before the move stayed behind; those forked after it are born inside. A child that
        # forks between the listing and its own move leaves its child behind: list again until nothing is new.
        moved: set[int] = set()
        for _ in range(CONTAIN_PASSES):
            try:
                descendants = {child.pid for child in psutil.Process(root_pid).children(recursive=True)}
            except psutil.Error:
                descendants = set()
            if descendants <= moved:
                break
            # A short-lived child (the engine runs helpers while it starts) may exit between the listing and
            # its move: CI failed a healthy engine on that ESRCH.
            self.move(sorted(descendants - moved), targets, gone_ok=True)
            moved |= descendants
        descendants = moved
        log.info("job %s: engine pid %d (+%d descendants) moved into %d cgroups of its extern step (%s) in %.1f ms",
                 job_id, root_pid, len(descendants), len(targets), targets[0].path,
                 (time.monotonic() - began) * 1000)
        return targets

    def contain_extern(self, job_id: str, root_pid: int, targets: list[Hierarchy]
                       ) -> tuple[list[Hierarchy], Path | None]:
        """Puts root_pid and its descendants into the job's extern step; returns the cgroups they are in and
        the socket of the slurmstepd that adopted root_pid (None where it did not). First the step's slurmstepd
        is asked to adopt it (stepd.py): its plugins then put it into the step's cgroups and account for it as
        a task (sacct counts the engine on 24.11 and 26.05, where jobacct_gather counts a step's own tasks
        only); its descendants forked before follow into the cgroups it went to. Where the stepd refuses or is
        not reachable, that is a WARNING with its reason and the pids are written into `targets` by hand
        (contain): containment is never lost, only the accounting of releases after 22.05; a stepd older than
        24.11 is not asked (stepd.ADOPT_MIN_VERSION), an INFO line. A hierarchy of
        `targets` that the adopted pid is not in is joined by hand too. Raises OSError when a move is refused."""
        if not targets:
            return [], None
        try:
            path = stepd.find_socket(self.node_name, job_id, self.proc)
            version = stepd.adopt(path, job_id, root_pid)
        except stepd.StepdTooOld as exc:
            log.info("%s; writing the engine's pids into the extern step's cgroups", exc)
            return self.contain(job_id, root_pid, targets), None
        except stepd.StepdError as exc:
            log.warning("%s; writing the engine's pids into the extern step's cgroups instead (contained, but "
                        "Slurm after 22.05 will not count its CPU and memory in the job's accounting)", exc)
            return self.contain(job_id, root_pid, targets), None
        mounted = mounts((self.proc / "self" / "mounts").read_text())
        adopted = [h for h in hierarchies(self._read(root_pid), mounted) if is_job_cgroup(h, job_id)]
        log.info("job %s: engine pid %d adopted by its extern step's slurmstepd (protocol %s) into %d cgroups",
                 job_id, root_pid, stepd.version_name(version), len(adopted))
        joined = {h.mountpoint for h in adopted}
        return self.contain(job_id, root_pid, adopted + [t for t in targets if t.mountpoint not in joined]), path

    def oom_kills(self, targets: list[Hierarchy]) -> int:
        """How many processes the kernel has killed for the memory limit of these cgroups (v1 memory.oom_control,
        v2 memory.events); 0 where neither is readable."""
        for target in targets:
            for name in ("memory.events", "memory.oom_control"):
                try:
                    text = (target.directory / name).read_text()
                except OSError:
                    continue
                for line in text.splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and value.strip().isdigit():
                        return int(value)
        return 0
