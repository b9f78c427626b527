"""Where a pool engine lives so that it outlives Slurm's preemption notice: its job's batch step.

Responsible for: finding, for a pool job, the cgroups of its batch step on this node (the step that runs the
controller's `slinfer hold`), through the batch step's own task: `slurmstepd: [J.batch]`'s child is in exactly
the cgroups wanted, and /proc/PID/cgroup names them. At the start of a preemption's grace time Slurm sends the
tasks of srun steps SIGTERM, the batch step nothing, and the extern step's processes no catchable signal: on
22.05 they die at once, on 26.05 they are SIGKILLed after KillWait (docs/architecture/facts.md). An engine in
the batch step therefore keeps serving through the grace while the controller drains it, and is still inside
the job's cgroups: the job's limits bind it, and Slurm's end of the job (SIGTERM to the batch step, SIGKILL
after KillWait) kills it even when the agent is gone.
Not responsible for: moving processes (cgroups.JobCgroups.contain does), the extern step (cgroups.py, where
an engine goes when its job has no batch step on this node: a private engine, a rank above 0, a job whose
batch step does not appear in time).
"""

from __future__ import annotations

import asyncio
import time

import psutil

from slinfer.agent.cgroups import Hierarchy, JobCgroups, hierarchies, is_job_cgroup, mounts

# The batch step starts right after the prolog, as the extern step does (about 0.4 s on the bed); past this the
# engine goes to the extern step rather than stay uncontained any longer.
BATCH_STEP_WAIT_S = 10.0
# How often to look for it meanwhile.
BATCH_STEP_POLL_S = 0.2


def batch_task(job_id: str, node_name: str, read: JobCgroups) -> int:
    """The pid of the batch step's task (the batch script) of this job on this node, or 0 when there is none."""
    wanted = f"slurmstepd: [{job_id}.batch]"
    candidates = []
    for stepd in psutil.process_iter(["cmdline"]):
        # slurmstepd rewrites its argv[0] with spaces in it, which /proc may give back split or whole.
        if " ".join(stepd.info["cmdline"] or []) != wanted:
            continue
        try:
            candidates.extend(child.pid for child in stepd.children())
        except psutil.Error:
            continue
    if len(candidates) > 1:
        # Several slurmd on one host (the multi-node bed): v1 paths carry the node's name.
        mine = [pid for pid in candidates if f"slurm_{node_name}/" in read._read(pid)]
        candidates = mine or candidates
    return candidates[0] if candidates else 0


def batch_cgroups(cgroups: JobCgroups, job_id: str) -> list[Hierarchy]:
    """The batch step's cgroups, each named by the job; empty when the job has no batch step here (yet)."""
    task = batch_task(job_id, cgroups.node_name, cgroups)
    if not task:
        return []
    mounted = mounts((cgroups.proc / "self" / "mounts").read_text())
    return [h for h in hierarchies(cgroups._read(task), mounted) if is_job_cgroup(h, job_id)]


async def wait_for_batch(cgroups: JobCgroups, job_id: str, wait_s: float = BATCH_STEP_WAIT_S) -> list[Hierarchy]:
    """batch_cgroups, polled until the batch step exists or wait_s passed; cancellable (no thread sleeps)."""
    deadline = time.monotonic() + wait_s
    while True:
        targets = await asyncio.to_thread(batch_cgroups, cgroups, job_id)
        if targets or time.monotonic() >= deadline:
            return targets
        await asyncio.sleep(BATCH_STEP_POLL_S)
