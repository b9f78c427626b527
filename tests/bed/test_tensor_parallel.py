"""A model of two GPUs on one node (`tiny-tp2`, gpus = 2 in the bed's catalog) is one vLLM engine with tensor
parallel 2: the controller's pool job asks for two GPUs, the engine's two workers both see exactly those two (the
variable in each worker's own environment, read from its memory), it answers through the gateway, and after
`scancel` no process of it (workers included) is left."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator

import psutil
import pytest

from tests.bed.test_controller import MESSAGES, _client
from tests.bed.test_multinode import _ready_after_submit
from tests.fakes.slurmbed import SlurmBed, engine_pids, wait_until

pytestmark = pytest.mark.bed

MODEL = "tiny-tp2"
# vLLM names its tensor-parallel workers VLLM::Worker_TP<rank> (setproctitle).
WORKER_TITLE = "VLLM::Worker_TP"


def _jobs(bed: SlurmBed) -> list[str]:
    out = bed.run("squeue", "-h", "-o", "%i %j").stdout
    return [p[0] for p in (line.split() for line in out.splitlines()) if len(p) == 2 and p[1] == f"slinfer-{MODEL}"]


def _session(leader: int) -> list[int]:
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getsid(proc.pid) == leader and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except OSError:
            continue
    return found


def _title(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline()).split(" ", 1)[0]
    except psutil.Error:
        return ""


def _visible_devices_in_memory(pid: int) -> set[str]:
    """The CUDA_VISIBLE_DEVICES values in a process's C environment, read from its heap (as root).

    vLLM's workers rename themselves with setproctitle, which blanks the memory /proc/PID/environ shows and moves
    the environment's strings to the heap: each `NAME=value` string of the process's environment is there."""
    values = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
        for line in maps:
            fields = line.split()
            if fields[-1] != "[heap]":
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            mem.seek(start)
            values |= {m.decode() for m in re.findall(rb"CUDA_VISIBLE_DEVICES=([0-9,]*)", mem.read(end - start))}
    return values


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as env_file:
        pairs = [item.split(b"=", 1) for item in env_file.read().split(b"\0") if b"=" in item]
    return {k.decode(): v.decode(errors="replace") for k, v in pairs}


@pytest.fixture
def tp_bed(slurm_bed: SlurmBed) -> Iterator[SlurmBed]:
    slurm_bed.run("scancel", "--name", f"slinfer-{MODEL}", check=False)
    slurm_bed.admin("scale", MODEL, "auto")
    yield slurm_bed
    # The controller replaces a cancelled replica while its load window still remembers the test's request:
    # pinned to 0 it submits nothing more, and the later tests find the node idle.
    slurm_bed.admin("scale", MODEL, "0")
    slurm_bed.run("scancel", "--name", f"slinfer-{MODEL}", check=False)
    wait_until("the controller's jobs to end", lambda: not _jobs(slurm_bed), 120)


def test_two_gpus_are_one_engine_that_answers_and_leaves_nothing_after_scancel(tp_bed: SlurmBed) -> None:
    bed = tp_bed
    began = time.monotonic()
    # The first request scales from zero: the controller submits the pool job with --gres=gpu:2.
    reply = _client(bed).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert reply.usage is not None and reply.usage.completion_tokens > 0, reply
    (job,) = _jobs(bed)
    print(f"\n{MODEL}: first request answered {time.monotonic() - began:.1f}s after it was sent; "
          f"sbatch -> READY {_ready_after_submit(bed, job):.1f}s (controller's measure)")
    detail = bed.run("scontrol", "show", "job", "-d", job).stdout
    assert "gpu:2" in detail, detail

    # The engine's processes: its session (vLLM's workers rename themselves with setproctitle, which also
    # overwrites what /proc shows of their environment, so the job's marker cannot find them).
    main = json.loads((bed.bed.run_dir / "engines" / f"{job}.json").read_text())["pid"]
    pids = _session(main)
    titles = sorted(t for t in (_title(p) for p in pids) if t.startswith(WORKER_TITLE))
    assert titles == [f"{WORKER_TITLE}0", f"{WORKER_TITLE}1"], (pids, titles)
    gpus = _environ(main)["CUDA_VISIBLE_DEVICES"].split(",")
    assert len(gpus) == 2 and len(set(gpus)) == 2, gpus
    assert f"IDX:{gpus[0]}-{gpus[1]}" in detail or f"IDX:{gpus[0]},{gpus[1]}" in detail, (gpus, detail)
    # Both workers see exactly those two GPUs: no other value of the variable in either worker's environment.
    workers = [p for p in pids if _title(p).startswith(WORKER_TITLE)]
    seen = {p: _visible_devices_in_memory(p) for p in workers}
    print(f"CUDA_VISIBLE_DEVICES: the job's {','.join(gpus)}; the workers' {seen}")
    assert len(workers) == 2 and all(v == {",".join(gpus)} for v in seen.values()), (gpus, seen)
    # One engine: one replica of the model, at one address.
    assert bed.env_file(job)["OPENAI_BASE_URL"].startswith("http"), bed.env_file(job)

    bed.run("scancel", job)
    wait_until(f"job {job}'s engine processes to be gone", lambda: not engine_pids(job) and not _session(main), 120)
    left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes of job {job}'s engine outlived scancel: {left}"


@pytest.mark.parametrize(("model", "gres", "message"), [
    ("tiny-tp2", "--gres=gpu:1", "model 'tiny-tp2' needs 2 GPU(s) but the job has 1 (submit with --gres=gpu:2)"),
    ("tiny-2node", "--gres=gpu:1", "model 'tiny-2node' runs on 2 node(s) but the job has 1 "
                                   "(submit with --nodes=2 --gres=gpu:1)"),
])
def test_an_allocation_that_does_not_fit_the_model_is_refused_and_the_node_not_drained(
        slurm_bed: SlurmBed, model: str, gres: str, message: str) -> None:
    job = slurm_bed.sbatch(f"--inference={model}", gres, script="echo SCRIPT_RAN")
    assert slurm_bed.wait_state(job, {"FAILED", "COMPLETED"}, 60) == "FAILED"
    out = slurm_bed.output(job)
    assert message in out and "SCRIPT_RAN" not in out, out
    assert slurm_bed.wait_node_idle() == "idle"
    assert engine_pids(job) == []
