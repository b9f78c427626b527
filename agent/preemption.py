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

from slinfer.agent.cgroups import Hierarchy, JobCgroups, hierarchies, is_job_cgroup, mounts, settled

# The batch step starts right after the prolog, as the extern step does (about 0.4 s on the bed); past this the
# engine goes to the extern step rather than stay uncontained any longer.
BATCH_STEP_WAIT_S = 10.0


def batch_cgroups(cgroups: JobCgroups, job_id: str) -> list[Hierarchy]:
    """The batch step's cgroups, each named by the job; empty when the job has no batch step here (yet)."""
    task = cgroups.step_task(job_id, "batch")
    if not task:
        return []
    mounted = mounts((cgroups.proc / "self" / "mounts").read_text())
    return [h for h in hierarchies(cgroups._read(task), mounted) if is_job_cgroup(h, job_id)]


async def wait_for_batch(cgroups: JobCgroups, job_id: str, wait_s: float = BATCH_STEP_WAIT_S) -> list[Hierarchy]:
    """batch_cgroups once they settled (cgroups.settled: Slurm adds the task to them one hierarchy after
    another), or what there is after wait_s."""
    return await settled(lambda: batch_cgroups(cgroups, job_id), wait_s)
