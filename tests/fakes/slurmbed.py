"""The tests' handle on a running dev-cluster bed: submit jobs, read their state and output, and look for
engine processes independently of the agent's own bookkeeping (by the engine's port and its job marker)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from slinfer.dev import devcluster
from slinfer.slurm import queries
from slinfer.slurm.jobs import Job
from slinfer.slurm.runner import Runner, SlurmError

# The tests' bed (tests/conftest.py); engines of other beds on this machine have other tags.
# Who submits a test's job unless it says otherwise.
BED_USER = devcluster.BED_USERS[0]
TEST_RUN_DIR = Path(os.environ.get("SLINFER_TEST_STATE", "/tmp/slinfer-test")) / "run"


@dataclass
class SlurmBed:
    bed: devcluster.Bed
    jobs_dir: Path

    def env(self) -> dict[str, str]:
        # Jobs inherit this environment (sbatch --export=ALL): they find `slinfer` and the venv's python first.
        # The bed's release clients (SLINFER_SLURM) stay first.
        bed_env = self.bed.env()
        path = f"{Path(sys.executable).parent}:{bed_env.get('PATH') or os.environ.get('PATH', '/usr/bin:/bin')}"
        if self.bed.slurm:
            path = f"{self.bed.slurm_bin}:{path}"
        return {**os.environ, **bed_env, "PATH": path}

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), env=self.env(), capture_output=True, text=True, check=check,
                              timeout=timeout)

    def sbatch(self, *args: str, script: str, user: str = BED_USER) -> str:
        """Submits a job as `user`: one of the bed's unprivileged users, as a site's users submit, unless a
        test needs root and says "root"."""
        argv = ["sbatch", "--parsable", "-o", f"{self.jobs_dir}/job-%j.out", *args, "--wrap", script]
        if user == "root":
            out = self.run(*argv)
        elif self.bed.slurm_root is not None:
            out = devcluster.run_as(self.bed, user, argv)  # only root may enter a release root
        else:
            out = self.run("runuser", "-u", user, "--", *argv)
        return out.stdout.strip().split(";")[0]

    def as_user(self, user: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Runs argv as one of the bed's unprivileged users, with the bed's environment."""
        return self.run("runuser", "-u", user, "--", *argv, check=False, timeout=timeout)

    def job(self, job_id: str) -> Job | None:
        """The job as `scontrol show job` reports it (through the shared Slurm layer), or None."""
        try:
            found = Runner(env=self.env()).get(queries.job(job_id))
        except SlurmError:
            return None
        return found[0] if found else None

    def state(self, job_id: str) -> str:
        job = self.job(job_id)
        return job.state if job else ""

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
            if state == "mixed" and self.node_record_idle():
                # Seen in CI on 22.05: sinfo said "mixed" for over 60 s after the last job ended, while slurmctld's
                # own node record said State=IDLE, CPUAlloc=0 and no job ran (sinfo reads the select plugin's
                # per-node counts, which can lag). The record is the authority on what holds the node.
                print(f"sinfo says {state!r}; slurmctld's node record: IDLE, no CPU allocated", file=sys.stderr)
                return "idle"
            time.sleep(0.5)
        # The caller asserts on the state; what Slurm holds on the node says why it is not idle.
        print(f"node still {state!r} after {timeout:.0f}s:\n{self.node_story()}", file=sys.stderr)
        return state

    def node_record_idle(self) -> bool:
        """Whether slurmctld's node record (`scontrol show node`) has the node exactly IDLE (no DRAIN, COMPLETING
        or other flag) with no CPU allocated."""
        out = self.run("scontrol", "show", "node", self.bed.node_names[0], check=False).stdout
        fields = dict(re.findall(r"(\w+)=(\S*)", out))
        return fields.get("State") == "IDLE" and fields.get("CPUAlloc") == "0"

    def node_story(self) -> str:
        """Slurm's own account of the node and of every job it still knows, for a failure's message."""
        parts = []
        for argv in (("scontrol", "show", "node"), ("squeue", "--all", "--states=all", "--format=%i %u %T %r %M %N"),
                     ("scontrol", "show", "job", "--details")):
            done = self.run(*argv, check=False)
            parts.append(f"$ {' '.join(argv)}\n{done.stdout}{done.stderr}")
        return "\n".join(parts)

    def node_reason(self) -> str:
        return Runner(env=self.env()).get(queries.node_reason(devcluster.NODE_NAME))

    def resume_node(self) -> None:
        self.run("scontrol", "update", f"nodename={devcluster.NODE_NAME}", "state=resume", check=False)

    def slurmd_log_since(self, offset: int) -> str:
        """What slurmd (and the plugin's hook, through it) logged past `offset`: the story of a drain."""
        with open(self.bed.logs / "slurmd.log", "rb") as log_file:
            log_file.seek(offset)
            return log_file.read().decode(errors="replace")

    def slurmd_log_size(self) -> int:
        path = self.bed.logs / "slurmd.log"
        return path.stat().st_size if path.exists() else 0

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
        jobs = [j.job_id for j in Runner(env=self.env()).get(queries.all_jobs())]
        if jobs:
            self.run("scancel", *jobs, check=False)

    def admin(self, *args: str) -> None:
        """`slinfer ARGS` against the bed's controller (scale, drain, keys, ...)."""
        subprocess.run([f"{sys.prefix}/bin/slinfer", *args], env=self.env(), check=True, capture_output=True,
                       timeout=30)

    def retire_models(self, *models: str, timeout: float = 180) -> None:
        """No job of `models` left and none coming, then each back to following the load: a module's teardown.
        A bare scancel is not enough: the controller replaces a cancelled replica while its load window still
        remembers the module's last requests, and that job would hold the node through the next module's tests.
        So each model is pinned to 0 until its jobs are gone and the controller's load for it reads 0."""
        for model in models:
            self.admin("scale", model, "0")
            self.run("scancel", "--name", f"slinfer-{model}", check=False)
        names = {f"slinfer-{model}" for model in models}
        deadline = time.monotonic() + timeout
        while True:
            listed = self.run("squeue", "-h", "-o", "%j").stdout.split()
            status = json.loads(self.run(sys.executable, "-m", "slinfer.cli.main", "status", "--json").stdout)
            loads = {m["name"]: float(m.get("load", 0.0)) for m in status.get("models", []) if m["name"] in models}
            if not names & set(listed) and not any(loads.values()):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"after {timeout:.0f}s: jobs {sorted(names & set(listed))}, loads {loads}")
            time.sleep(1.0)
        for model in models:
            self.admin("scale", model, "auto")

    def controller_jobs(self, model: str = "") -> dict[str, str]:
        """Live jobs the controller submitted (named slinfer-MODEL), of one model when named: id -> state."""
        out = self.run("squeue", "-h", "-o", "%i %j %T").stdout.split("\n")
        wanted = (lambda name: name == f"slinfer-{model}") if model else (lambda name: name.startswith("slinfer-"))
        return {p[0]: p[2] for p in (line.split() for line in out if line.strip()) if wanted(p[1])}

    def ready_replicas(self, model: str) -> int:
        """The model's READY replicas, as the gateway's /v1/models reports them."""
        env = self.bed.env()
        request = urllib.request.Request(f"{env['SLINFER_GATEWAY_URL']}/models",
                                         headers={"Authorization": f"Bearer {env['SLINFER_API_KEY']}"})
        with urllib.request.urlopen(request, timeout=5) as response:
            models = json.load(response)["data"]
        return int(next(m for m in models if m["id"] == model).get("ready_replicas", 0))

    def wait_no_jobs(self, timeout: float = 120) -> None:
        """Until Slurm lists no job of this bed at all (a test that needs an idle node starts from one)."""
        deadline = time.monotonic() + timeout
        while Runner(env=self.env()).get(queries.all_jobs()):
            if time.monotonic() > deadline:
                raise AssertionError(f"jobs still listed after {timeout:.0f}s")
            time.sleep(0.5)


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


def wait_until(what: str, predicate: Callable[[], object], timeout: float, interval: float = 0.5,
               tolerating: tuple[type[Exception], ...] = ()) -> float:
    """Seconds until `predicate` holds (an exception in `tolerating` counts as not yet); fails past the timeout,
    naming `what`."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        try:
            if predicate():
                return time.monotonic() - began
        except tolerating:
            pass
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_no_engine(job_id: str, port: int | None, timeout: float) -> float:
    """Seconds until no process of the engine is left; fails past the timeout."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if not engine_pids(job_id, port):
            return time.monotonic() - began
        time.sleep(0.1)
    raise AssertionError(f"engine of job {job_id} still has processes {engine_pids(job_id, port)}")
