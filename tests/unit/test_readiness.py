"""The progress line of `slinfer wait-ready` and the demo: what it prints on a terminal and in a log."""

from __future__ import annotations

import io

from slinfer.cli import readiness
from slinfer.v1 import admin_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_gets_one_line_per_change_of_state_with_seconds_waited() -> None:
    out, clock = io.StringIO(), Clock()
    progress = readiness.Progress(out, clock)
    progress.update("7 PENDING", "not started")
    clock.now += 1
    progress.update("7 PENDING", "not started")
    clock.now += 4
    progress.update("7 RUNNING", "STARTING")
    clock.now += 30
    progress.done("engine READY")
    assert out.getvalue().splitlines() == [
        "slinfer: waiting 0s: job 7 PENDING, engine not started",
        "slinfer: waiting 5s: job 7 RUNNING, engine STARTING",
        "slinfer: engine READY after 35s",
    ]


def test_terminal_line_is_rewritten_in_place_every_poll() -> None:
    out, clock = Terminal(), Clock()
    progress = readiness.Progress(out, clock)
    progress.update("7 RUNNING", "STARTING")
    clock.now += 2
    progress.update("7 RUNNING", "STARTING")
    progress.done("engine READY")
    text = out.getvalue()
    assert text.count("\r\033[K") == 3
    assert "waiting 2s: job 7 RUNNING, engine STARTING" in text
    assert "\n" not in text.rstrip("\n")  # one line on screen until done


def test_pool_states_name_the_models_jobs_and_engines_only() -> None:
    reply = admin_pb2.StatusResponse(
        models=[admin_pb2.ModelStatus(name="smollm2", queued=3)],
        jobs=[admin_pb2.JobStatus(job_id="4", model="smollm2", state="RUNNING", reason="Prolog"),
              admin_pb2.JobStatus(job_id="5", model="tiny", state="PENDING")],
        replicas=[admin_pb2.ReplicaStatus(job_id="5", model="tiny", state="READY", pool=True)])
    assert readiness.pool_states(reply, "smollm2") == ("4 RUNNING (Prolog)", "not started (3 queued)")
    reply.replicas.append(admin_pb2.ReplicaStatus(job_id="4", model="smollm2", state="STARTING", pool=True))
    assert readiness.pool_states(reply, "smollm2") == ("4 RUNNING (Prolog)", "STARTING")
    assert readiness.pool_states(admin_pb2.StatusResponse(), "smollm2") == ("not submitted yet",
                                                                            "not started (0 queued)")
