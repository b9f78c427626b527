"""What sacct counts of a process placed in a job's extern step, by the ways the agent has (issue 29): written
into the step's cgroups by hand (JobCgroups.contain, the fallback), adopted by the step's slurmstepd
(JobCgroups.contain_extern, agent/stepd.py) alone, and adopted with the agent's polls (stepd.poll every
STEPD_POLL_S, as agent/engines.py does). The control for tests/bed/test_accounting.py's private-engine test.

    [SLINFER_SLURM=/opt/slurm/24.11] .venv/bin/python bench/extern_accounting.py STATE_DIR PORT_BASE [JOB_S]

Brings a bed up (no controller) in STATE_DIR, submits three jobs as a bed user (`sleep JOB_S`), puts one process
that burns CPU until it is killed into each job's extern step, one way each, lets Slurm end the jobs (which kills
the burners, as it kills an engine), prints each burner's CPU time as /proc last saw it and each extern step's
TotalCPU from sacct, and takes the bed down. Must run as root (the bed).
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from slinfer.agent import stepd
from slinfer.agent.cgroups import JobCgroups
from slinfer.agent.engines import STEPD_POLL_S
from slinfer.dev import devcluster
from tests.fakes.slurmbed import SlurmBed, wait_until

# How long each job lives unless the command line says otherwise: shorter than JobAcctGatherFrequency's default
# 30 s, as a short private job is, so that Slurm's own polls alone would not see the burner.
DEFAULT_JOB_S = 15.0
BURN = "while True: pass\n"
WAYS = ("by hand", "adopted", "adopted + polls")


def _one(slurm: SlurmBed, cgroups: JobCgroups, how: str, job_s: float) -> tuple[str, float]:
    """A job with a burner placed `how`; returns the job and the CPU the burner used as /proc last saw it."""
    job = slurm.sbatch(script=f"sleep {job_s}")
    assert slurm.wait_state(job, {"RUNNING"}, 60) == "RUNNING"
    targets = asyncio.run(cgroups.wait_for_job(job))
    # Reaped as soon as it dies (poll()): slurmstepd waits for an adopted pid to be gone, and a zombie is not.
    burner = subprocess.Popen([sys.executable, "-c", BURN])
    path = None
    if how == "by hand":
        cgroups.contain(job, burner.pid, targets)
    else:
        _, path = cgroups.contain_extern(job, burner.pid, targets)
        assert path is not None, "the stepd did not adopt the burner: see the WARNING above"
    cpu = 0.0
    while burner.poll() is None:
        try:
            times = psutil.Process(burner.pid).cpu_times()
            cpu = times.user + times.system
        except psutil.Error:
            pass
        if path is not None and how.endswith("polls"):
            try:
                stepd.poll(path, job)
            except stepd.StepdError as exc:
                print(f"poll: {exc}")
        time.sleep(STEPD_POLL_S)
    return job, cpu


def main() -> None:
    state, port = Path(sys.argv[1]), int(sys.argv[2])
    job_s = float(sys.argv[3]) if len(sys.argv) > 3 else DEFAULT_JOB_S
    bed = devcluster.Bed(state, port)
    devcluster.down(bed)
    shutil.rmtree(state, ignore_errors=True)
    devcluster.up(bed, controller=False)
    jobs_dir = state / "job-output"
    jobs_dir.mkdir()
    jobs_dir.chmod(0o1777)
    slurm = SlurmBed(bed, jobs_dir)
    cgroups = JobCgroups(devcluster.NODE_NAME)
    # Every release's stepd is asked here, 22.05's too (the agent does not ask it: stepd.ADOPT_MIN_VERSION), so
    # that this measures what adopting there would count.
    stepd.adopt = functools.partial(stepd.adopt, min_version=0)  # type: ignore[assignment]
    try:
        jobs, seen = [], []
        # One job at a time: each burner has the job's core to itself.
        for how in WAYS:
            job, cpu = _one(slurm, cgroups, how, job_s)
            jobs.append(job)
            seen.append(cpu)
        for job, how, cpu in zip(jobs, WAYS, seen, strict=True):
            fields = "--format=JobID,State,TotalCPU"

            def ended(job: str = job, fields: str = fields) -> bool:
                out = slurm.run("sacct", "-n", "-P", "-j", job, fields).stdout
                return any(line.startswith(f"{job}.extern|") and "RUNNING" not in line for line in out.splitlines())
            wait_until(f"sacct to list {job}'s extern step's end", ended, 90)
            out = slurm.run("sacct", "-n", "-P", "-j", job, fields).stdout
            extern = next(line for line in out.splitlines() if line.startswith(f"{job}.extern|"))
            print(f"{bed.slurm or 'system Slurm 22.05'}: {how}: job {job}: the burner used >= {cpu:.1f} s of CPU; "
                  f"sacct {extern}")
    finally:
        left = devcluster.down(bed)
        print(f"down; left {left}")


if __name__ == "__main__":
    main()
