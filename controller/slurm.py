"""The controller's hands on Slurm: `sbatch`, `squeue --json` and `scancel`, run as argv lists.

Responsible for: building the `sbatch` command of a catalog model's pool job (the batch script only holds the
job while the agent's engine serves), reading the queue, cancelling a job, and turning a failed command into a
SlurmError that carries the command's stderr.
Not responsible for: deciding what to submit or cancel (the autoscaler), or recognising which jobs are the
controller's (the caller filters by name and comment). Submission goes through `sbatch` because only it passes
SPANK options such as `--inference` to the prolog (DESIGN.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from slinfer.config import ModelConfig

log = logging.getLogger(__name__)

# Slurm states in which a job holds or waits for resources; anything else is over or about to be.
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "RESIZING", "SUSPENDED", "REQUEUED"})

JOB_ID = re.compile(r"^[0-9]+(_[0-9]+)?$")


class SlurmError(RuntimeError):
    """A Slurm command that failed, with its argv, exit status and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        status = "timed out" if returncode is None else f"exited {returncode}"
        super().__init__(f"{argv[0]} {status}: {stderr.strip() or '(no stderr)'}")
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    name: str
    comment: str
    state: str  # PENDING, RUNNING, COMPLETED, CANCELLED, ... as squeue spells it
    node: str  # the batch host; empty while pending
    submit_time: float  # unix seconds
    start_time: float  # unix seconds; 0 while pending
    end_time: float  # unix seconds: the time limit's end while running, 0 while pending
    reason: str = ""  # why it is pending, as squeue says

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


def pool_flags(model: ModelConfig) -> list[str]:
    """The SPANK options that make a job serve `model` to the gateway."""
    return [f"--inference={model.name}", "--inference-pool"]


class SlurmClient:
    """Runs Slurm's commands for the controller; every call is a subprocess with a time limit."""

    def __init__(
        self,
        bin_dir: str = "",
        env: Mapping[str, str] | None = None,
        *,
        job_command: Sequence[str] = ("slinfer", "hold"),
        job_output: str = "/dev/null",
        timeout_s: float = 30.0,
    ) -> None:
        if not job_command:
            raise ValueError("job_command must not be empty")
        self._bin_dir = bin_dir
        self._env = dict(os.environ if env is None else env)
        self._job_command = list(job_command)
        self._job_output = job_output
        self._timeout_s = timeout_s

    def batch_script(self) -> str:
        return "#!/bin/sh\nexec " + shlex.join(self._job_command) + "\n"

    def submit_argv(self, model: ModelConfig, job_name: str, comment: str) -> list[str]:
        argv = [self._bin("sbatch"), "--parsable", *pool_flags(model),
                f"--job-name={job_name}", f"--comment={comment}", f"--output={self._job_output}"]
        if model.gpus > 0:
            argv.append(f"--gres=gpu:{model.gpus}")
        if model.partition:
            argv.append(f"--partition={model.partition}")
        if model.account:
            argv.append(f"--account={model.account}")
        if model.qos:
            argv.append(f"--qos={model.qos}")
        argv.append(f"--time={model.time_limit}")
        argv.extend(model.sbatch_args)
        return argv

    async def submit(self, model: ModelConfig, job_name: str, comment: str) -> str:
        """Submits a pool job for `model` and returns its job id."""
        argv = self.submit_argv(model, job_name, comment)
        out = await self._run(argv, self.batch_script())
        # --parsable prints "JOBID" or "JOBID;CLUSTER".
        job_id = out.strip().split(";", 1)[0]
        if not JOB_ID.match(job_id):
            raise SlurmError(argv, 0, f"unexpected sbatch output {out!r}")
        return job_id

    async def jobs(self) -> list[SlurmJob]:
        """Every job squeue knows, finished ones included (Slurm keeps them for MinJobAge)."""
        argv = [self._bin("squeue"), "--json"]
        out = await self._run(argv)
        try:
            data = json.loads(out)
        except json.JSONDecodeError as exc:
            raise SlurmError(argv, 0, f"squeue printed no JSON: {exc}") from exc
        errors = data.get("errors") or []
        if errors:
            raise SlurmError(argv, 0, f"squeue reported errors: {errors}")
        return [_job(raw) for raw in data.get("jobs", [])]

    async def cancel(self, job_id: str) -> None:
        if not JOB_ID.match(job_id):
            raise ValueError(f"{job_id!r} is not a Slurm job id")
        await self._run([self._bin("scancel"), job_id])

    def _bin(self, name: str) -> str:
        return os.path.join(self._bin_dir, name) if self._bin_dir else name

    async def _run(self, argv: list[str], stdin: str | None = None) -> str:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, env=self._env,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            raise SlurmError(argv, 127, str(exc)) from exc
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(stdin.encode() if stdin is not None else None), self._timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise SlurmError(argv, None, f"no answer within {self._timeout_s:g} s") from None
        if proc.returncode != 0:
            raise SlurmError(argv, proc.returncode, err.decode(errors="replace"))
        return out.decode(errors="replace")


def _job(raw: Mapping[str, Any]) -> SlurmJob:
    state = raw.get("job_state", "")
    if isinstance(state, list):  # newer Slurm prints a list of flags
        state = state[0] if state else ""
    return SlurmJob(
        job_id=str(raw.get("job_id", "")),
        name=str(raw.get("name", "")),
        comment=str(raw.get("comment", "") or ""),
        state=str(state),
        node=str(raw.get("batch_host") or raw.get("nodes") or ""),
        submit_time=_seconds(raw.get("submit_time")),
        start_time=_seconds(raw.get("start_time")),
        end_time=_seconds(raw.get("end_time")),
        reason=str(raw.get("state_reason", "") or ""),
    )


def _seconds(value: Any) -> float:
    # 22.05 prints unix seconds; later releases wrap numbers as {"set": bool, "number": N}.
    if isinstance(value, dict):
        return float(value.get("number", 0)) if value.get("set", True) else 0.0
    return float(value or 0)
