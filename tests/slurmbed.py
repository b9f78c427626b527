"""The tests' handle on a running dev-cluster bed: submit jobs, read their state and output, and look for
engine processes independently of the agent's own bookkeeping (by the engine's port and its job marker)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from slinfer import devcluster

# The tests' bed (tests/conftest.py); engines of other beds on this machine have other tags.
TEST_RUN_DIR = Path(os.environ.get("SLINFER_TEST_STATE", "/tmp/slinfer-test")) / "run"


@dataclass
class SlurmBed:
    bed: devcluster.Bed
    jobs_dir: Path

    def env(self) -> dict[str, str]:
        # Jobs inherit this environment (sbatch --export=ALL): they find `slinfer` and the venv's python first.
        path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        return {**os.environ, **self.bed.env(), "PATH": path}

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), env=self.env(), capture_output=True, text=True, check=check,
                              timeout=timeout)

    def sbatch(self, *args: str, script: str) -> str:
        out = self.run("sbatch", "--parsable", "-o", f"{self.jobs_dir}/job-%j.out", *args, "--wrap", script)
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "")

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {state!r} after {timeout:.0f}s, wanted {states}: "
                             f"{self.output(job_id)!r}")

    def output(self, job_id: str) -> str:
        path = self.jobs_dir / f"job-{job_id}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def node_state(self) -> str:
        return devcluster.node_state(self.bed)

    def wait_node_idle(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.node_state()
            if state == "idle":
                return state
            time.sleep(0.5)
        return state

    def env_file(self, job_id: str) -> dict[str, str]:
        path = self.bed.run_dir / "jobs" / f"{job_id}.env"
        if not path.exists():
            return {}
        return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)

    def wait_output(self, job_id: str, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output(job_id))
            if found:
                return found
            time.sleep(0.5)
        raise AssertionError(f"job {job_id}: no {pattern!r} in output after {timeout:.0f}s: {self.output(job_id)!r}")

    def cleanup_jobs(self) -> None:
        jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if jobs:
            self.run("scancel", *jobs, check=False)


def engine_pids(job_id: str, port: int | None = None, run_dir: Path | None = None) -> list[int]:
    """Processes of a job's engine, found without the agent: its marker, or its port on the command line."""
    pids = []
    marker = f"SLINFER_ENGINE_JOB={job_id}@{run_dir or TEST_RUN_DIR}".encode()
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as env_file:
                if marker in env_file.read().split(b"\0"):
                    pids.append(proc.pid)
                    continue
        except OSError:
            continue
        cmd = proc.info["cmdline"] or []
        if port is not None and "--port" in cmd and str(port) in cmd:
            pids.append(proc.pid)
    return pids


def wait_no_engine(job_id: str, port: int | None, timeout: float) -> float:
    """Seconds until no process of the engine is left; fails past the timeout."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if not engine_pids(job_id, port):
            return time.monotonic() - began
        time.sleep(0.1)
    raise AssertionError(f"engine of job {job_id} still has processes {engine_pids(job_id, port)}")
