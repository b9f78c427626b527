"""One vLLM engine across the two nodes of one job, on the two-node bed (`tiny-2node`: nodes = 2, gpus = 1 in the
bed's catalog): the controller's pool job asks for both nodes, each node's agent runs its rank (rank 0 serves
HTTP, rank 1 headless), only rank 0 is published and answers through the head's gateway, the engine is one
replica, `kill -9` of rank 1 fails the engine with the reason, and `scancel` leaves no process on either node.
The first test measures the ready time of the same model on 1 GPU, 2 GPUs and 2 nodes in one run."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import psutil
import pytest

from tests.bed.test_controller import MESSAGES, _client
from tests.bed.test_multinode import _engine_env, _gateway_metrics
from tests.fakes.slurmbed import SlurmBed, engine_pids, wait_until

pytestmark = pytest.mark.bed

MODEL = "tiny-2node"
# The same tiny model as one engine of 1 GPU, of 2 GPUs (tensor parallel) and of 2 nodes: the ready times compared.
LAYOUTS = ("tiny", "tiny-tp2", MODEL)
# The agent watches the ranks' connections every health_interval_s (0.5 s on the bed); the dead rank's agent
# also kills what is left of it. A few seconds of slack on this loaded two-core machine.
FAIL_WITHIN_S = 60.0


def _jobs(bed: SlurmBed, model: str) -> dict[str, str]:
    """The controller's live jobs of `model`: id -> node list."""
    out = bed.run("squeue", "-h", "-o", "%i %j %N").stdout
    return {p[0]: (p[2] if len(p) > 2 else "") for p in (line.split() for line in out.splitlines())
            if len(p) >= 2 and p[1] == f"slinfer-{model}"}


def _ready_line(bed: SlurmBed, job_id: str) -> float:
    found: list[str] = []

    def logged() -> bool:
        text = (bed.bed.logs / "controller.out").read_text(errors="replace")
        found[:] = re.findall(rf"job {job_id} READY (\S+)s after submit", text)
        return bool(found)

    wait_until(f"the controller's READY line for job {job_id}", logged, 20, 0.2)
    return float(found[0])


def _replicas(bed: SlurmBed, model: str, state: str) -> int:
    found = re.search(rf'^slinfer_replicas\{{model="{model}",state="{state}"\}} (\S+)$', _gateway_metrics(bed),
                      re.MULTILINE)
    return int(float(found.group(1))) if found else 0


def _leaders(bed: SlurmBed, job_id: str) -> dict[str, int]:
    """Each node's engine process of the job (its session leader), from the node agent's record."""
    found = {}
    for node in bed.bed.node_names:
        path = bed.bed.node_run_dir(node) / "engines" / f"{job_id}.json"
        if path.exists():
            found[node] = json.loads(path.read_text())["pid"]
    return found


def _all_pids(bed: SlurmBed, job_id: str, leaders: dict[str, int]) -> dict[str, list[int]]:
    """Each node's processes of the job's engine: the job's marker, and the session of its engine (vLLM's
    workers rename themselves with setproctitle, which also overwrites what /proc shows of their environment)."""
    found = {}
    for node in bed.bed.node_names:
        pids = set(engine_pids(job_id, run_dir=bed.bed.node_run_dir(node)))
        for proc in psutil.process_iter(["status"]):
            try:
                if node in leaders and os.getsid(proc.pid) == leaders[node] and proc.info["status"] != "zombie":
                    pids.add(proc.pid)
            except OSError:
                continue
        found[node] = sorted(pids)
    return found


def _cancel(bed: SlurmBed, model: str) -> None:
    """No job of `model` left, and none coming: the controller replaces a cancelled replica while its load
    window remembers the last request, unless pinned to 0 (the next request unpins it)."""
    bed.admin("scale", model, "0")
    bed.run("scancel", "--name", f"slinfer-{model}", check=False)
    wait_until(f"the controller's {model} jobs to end", lambda: not _jobs(bed, model), 120)


def _ask(bed: SlurmBed, model: str) -> None:
    bed.admin("scale", model, "auto")
    reply = _client(bed).chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)
    assert reply.usage is not None and reply.usage.completion_tokens > 0, (model, reply)


def test_ready_time_of_one_model_on_one_gpu_two_gpus_and_two_nodes(multi: SlurmBed) -> None:
    ready = {}
    for model in LAYOUTS:
        _cancel(multi, model)
        _ask(multi, model)
        (job,) = _jobs(multi, model)
        ready[model] = _ready_line(multi, job)
        leaders = _leaders(multi, job)
        assert len(leaders) == (2 if model == MODEL else 1), leaders
        _cancel(multi, model)
        wait_until(f"job {job}'s engine processes to be gone",
              lambda j=job, ls=leaders: not any(_all_pids(multi, j, ls).values()), 120)
    print("\nsbatch -> READY (controller's measure, one run): "
          + ", ".join(f"{m} {s:.1f}s" for m, s in ready.items()))


def test_one_engine_across_two_nodes_serves_from_rank_0_and_fails_whole_when_rank_1_dies(multi: SlurmBed) -> None:
    bed = multi.bed
    _cancel(multi, MODEL)
    _ask(multi, MODEL)
    ((job, nodelist),) = _jobs(multi, MODEL).items()
    head, other = bed.node_names
    hosts = multi.run("scontrol", "show", "hostnames", nodelist).stdout.split()
    assert hosts == [head, other], nodelist
    # Rank 0 serves on the first node and is the one endpoint; rank 1 runs headless on the second.
    head_env, other_env = _engine_env(multi, job, head), _engine_env(multi, job, other)
    assert head_env["OPENAI_BASE_URL"].startswith(f"http://{bed.node_address(head)}:"), head_env
    assert "OPENAI_BASE_URL" not in other_env and "SLINFER_ERROR" not in other_env, other_env
    assert json.loads(Path(other_env["SLINFER_STATUS_FILE"]).read_text())["base_url"] == "", other_env
    assert _replicas(multi, MODEL, "READY") == 1
    leaders = _leaders(multi, job)
    pids = _all_pids(multi, job, leaders)
    assert pids[head] and pids[other], pids
    rank1 = psutil.Process(leaders[other])
    assert "--headless" in rank1.cmdline() and "--node-rank" in rank1.cmdline(), rank1.cmdline()
    print(f"\njob {job} on {nodelist}: sbatch -> READY {_ready_line(multi, job):.1f}s (controller's measure)")

    rank1.kill()
    began = time.monotonic()
    # Rank 0's agent fails the engine (its status file says so until the controller, seeing the replica FAILED,
    # cancels the job and the epilog removes it; its log keeps the line).
    failed = re.compile(rf"job {job}: engine FAILED: (.*)$", re.MULTILINE)
    head_log = bed.logs / f"agent-{head}.log"
    wait_until("rank 0's engine to fail", lambda: failed.search(head_log.read_text(errors="replace")),
               FAIL_WITHIN_S, 0.2)
    found = failed.search(head_log.read_text(errors="replace"))
    assert found is not None
    reason = found.group(1)
    assert f"rank 1 at {bed.node_address(other)} left the engine" in reason, reason
    print(f"rank 1 killed: rank 0 FAILED {time.monotonic() - began:.1f}s later: {reason}")
    wait_until("no READY replica of the failed engine", lambda: _replicas(multi, MODEL, "READY") == 0, 30)
    # The job ends whole by one of two paths, whichever comes first: its `slinfer hold` exits 1 on the engine's
    # FAILED (the rank's reason is in rank 0's agent log, above), or the controller, seeing the replica FAILED,
    # cancels it naming the rank.
    cancelled = re.compile(rf"cancel {job}: engine failed \(rank 1 at ")

    def ended_by() -> str:
        if cancelled.search((bed.logs / "controller.out").read_text(errors="replace")):
            return "the controller's scancel"
        return "its own hold (exit 1)" if multi.state(job) == "FAILED" else ""

    wait_until("the failed engine's job to end, by its hold or the controller", ended_by, 60)
    print(f"job {job} ended by {ended_by()}")

    multi.run("scancel", job, check=False)
    wait_until(f"job {job}'s processes to be gone on both nodes",
          lambda: not any(_all_pids(multi, job, leaders).values()), 120)
    left = [p for ps in pids.values() for p in ps if psutil.pid_exists(p)
            and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes of job {job} outlived scancel: {left}"
    # The failed engine's processes are gone before the job's epilogs ran; the epilogs then drop both records.
    records = [Path(bed.node_run_dir(node) / "engines" / f"{job}.json") for node in bed.node_names]
    wait_until(f"job {job}'s epilogs to drop its engine records", lambda: not any(r.exists() for r in records), 60)
    _cancel(multi, MODEL)  # the controller's replacement of the failed replica, if it made one
