"""`slinfer wait-ready` and `slinfer hold`: what a job script runs to wait for, and live with, its engine.

Responsible for: reading the status file the agent keeps for the job (its path is in `SLINFER_STATUS_FILE`, set
by the SPANK plugin in every step) and the engine's own `/health`; the progress line (job state, engine state,
seconds waited) shown while something waits for an engine, here and in the demo (examples/ask.py), where the
states come from the controller's Status.
Not responsible for: starting or stopping anything, or reading Slurm (the agent and the controller do).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import TextIO

from slinfer.v1 import admin_pb2

# Often enough that a warm start's READY (about 3 s) is not delayed by the wait itself (0.5 s added 0.25 s on
# average, bench/warmstart.py); ten reads a second of one small local file cost nothing measurable.
POLL_S = 0.1


def _say(message: str) -> None:
    print(f"slinfer: {message}", file=sys.stderr, flush=True)


def _status(path: str) -> dict[str, object] | None:
    try:
        with open(path) as status_file:
            return json.load(status_file)
    except (OSError, ValueError):
        return None


def _healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url.rstrip('/')}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class Progress:
    """One progress line for a wait: rewritten in place on a terminal; in a log, one line per change of state."""

    def __init__(self, stream: TextIO | None = None, clock: object = time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.clock = clock
        self.started = self._now()
        self.tty = self.stream.isatty()
        self.last: tuple[str, str] | None = None

    def _now(self) -> float:
        return float(self.clock())  # type: ignore[operator]

    @property
    def waited(self) -> float:
        return self._now() - self.started

    def update(self, job: str, engine: str) -> None:
        line = f"slinfer: waiting {self.waited:.0f}s: job {job}, engine {engine}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
        elif (job, engine) != self.last:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.last = (job, engine)

    def done(self, message: str) -> None:
        if self.tty and self.last is not None:
            self.stream.write("\r\033[K")
        self.stream.write(f"slinfer: {message} after {self.waited:.0f}s\n")
        self.stream.flush()


def pool_states(reply: admin_pb2.StatusResponse, model: str) -> tuple[str, str]:
    """(job, engine) words for a pool model from the controller's Status, for Progress.update."""
    jobs = [f"{j.job_id} {j.state}" + (f" ({j.reason})" if j.reason and j.reason != "None" else "")
            for j in reply.jobs if j.model == model]
    engines = [r.state for r in reply.replicas if r.model == model and r.pool]
    queued = sum(m.queued for m in reply.models if m.name == model)
    return (", ".join(jobs) or "not submitted yet", ", ".join(engines) or f"not started ({queued} queued)")


def wait_ready(timeout: float) -> int:
    """0 once the engine is READY and answers; 1 when it FAILED or the timeout passed; 2 without an engine."""
    error = os.environ.get("SLINFER_ERROR")
    if error:
        _say(error)
        return 1
    path = os.environ.get("SLINFER_STATUS_FILE")
    if not path:
        _say("this job has no slinfer engine (submit it with --inference=MODEL)")
        return 2
    deadline = time.monotonic() + timeout
    state = "unknown"
    # Inside the job, the job is RUNNING by definition: the prolog has passed.
    job = f"{os.environ.get('SLURM_JOB_ID', '?')} RUNNING"
    progress = Progress()
    while time.monotonic() < deadline:
        status = _status(path)
        if status is not None:
            state = str(status.get("state"))
            if state == "READY" and _healthy(str(status.get("base_url", ""))):
                progress.done(f"engine READY at {status.get('base_url')}")
                return 0
            if state in ("FAILED", "STOPPING", "STOPPED"):
                progress.done(f"engine {state}: {status.get('reason') or 'no reason given'}")
                return 1
        progress.update(job, state if status is not None else "no status yet")
        time.sleep(POLL_S)
    progress.done(f"engine not ready (state {state})")
    return 1


def hold(timeout: float) -> int:
    """Waits for READY, then blocks while the engine lives: the batch script of the controller's jobs."""
    code = wait_ready(timeout)
    if code:
        return code
    path = os.environ["SLINFER_STATUS_FILE"]
    while True:
        status = _status(path)
        if status is None:
            return 0
        if status.get("state") == "FAILED":
            _say(f"engine FAILED: {status.get('reason')}")
            return 1
        time.sleep(2)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    wait = sub.add_parser("wait-ready", help="wait until this job's engine is READY (in a job script)")
    wait.add_argument("--timeout", type=float, default=900.0, help="seconds (default 900)")
    wait.set_defaults(func=lambda args: wait_ready(args.timeout))
    held = sub.add_parser("hold", help="wait for this job's engine, then block while it serves")
    held.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for READY (default 900)")
    held.set_defaults(func=lambda args: hold(args.timeout))
