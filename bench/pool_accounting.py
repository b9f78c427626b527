"""What sacct counts of a POOL engine (issue 29.1): the controller's own job (`slinfer scale tiny 1`), whose
engine the agent writes into the job's batch step's cgroups (agent/engines.py _contain, agent/preemption.py
batch_cgroups), against the CPU the engine's processes really used (psutil, children included, last read just
before the engine went). The control for tests/bed/test_accounting.py's pool-job assertion.

    [SLINFER_SLURM=/opt/slurm/24.11] .venv/bin/python -m bench.pool_accounting STATE_DIR PORT_BASE

PORT_BASE at most 63500: the bed's agent gives engines the ports PORT_BASE+1000..+1999.

Brings a bed up (with its controller) in STATE_DIR, scales `tiny` to 1 as the bed's admin, prints the cgroups of
the engine and of the batch step's own processes, makes the engine work (6 completions of 480 tokens with
ignore_eos through the gateway, as the test's WORK), retires it (`slinfer scale tiny 0`), waits for sacct and
prints the job's, the batch step's and the extern step's TotalCPU and MaxRSS next to the engine's own CPU; then
takes the bed down. Must run as root (the bed).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from slinfer.dev import devcluster
from tests.fakes.slurmbed import SlurmBed, engine_pids, wait_until

# As the bed test's: a warm or cold tiny engine is READY well within this.
READY_TIMEOUT = 300
# As the bed test's WORK: enough tokens that the engine's CPU in the job is seconds, not its start-up's one.
REQUESTS, TOKENS = 6, 480


def _cpu(pids: list[int]) -> float:
    """CPU seconds of the engine's processes and of every descendant, live ones and reaped ones."""
    seen: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            seen[pid] = proc
            seen.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.Error:
            continue
    total = 0.0
    for proc in seen.values():
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
        # A reaped child's CPU is its parent's children_* only if the parent is not itself counted's child.
        if proc.ppid() not in seen:
            total += t.children_user + t.children_system
    return total


def _rss(pids: list[int]) -> int:
    """Bytes resident in the engine's processes and their descendants now (a page shared by several counted in each)."""
    total = 0
    for pid in pids:
        try:
            procs = [psutil.Process(pid)]
            procs += procs[0].children(recursive=True)
            total += sum(p.memory_info().rss for p in procs)
        except psutil.Error:
            continue
    return total


def _cgroups(pid: int) -> str:
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return "(gone)"
    return "; ".join(line.split(":", 1)[1] for line in lines
                     if any(k in line for k in ("cpuacct", "memory", "freezer", "::")))


def _work(bed: devcluster.Bed) -> int:
    env = bed.env()
    body = json.dumps({"model": "tiny", "prompt": "Count:", "max_tokens": TOKENS, "temperature": 0,
                       "ignore_eos": True}).encode()
    n = 0
    for _ in range(REQUESTS):
        request = urllib.request.Request(f"{env['SLINFER_GATEWAY_URL']}/completions", data=body, headers={
            "Authorization": f"Bearer {env['SLINFER_API_KEY']}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            n += int(json.load(response)["usage"]["completion_tokens"])
    return n


def main() -> None:
    state, port = Path(sys.argv[1]), int(sys.argv[2])
    bed = devcluster.Bed(state, port)
    devcluster.down(bed)
    shutil.rmtree(state, ignore_errors=True)
    try:
        devcluster.up(bed)
    except BaseException:
        devcluster.down(bed)
        raise
    jobs_dir = state / "job-output"
    jobs_dir.mkdir()
    jobs_dir.chmod(0o1777)
    slurm = SlurmBed(bed, jobs_dir)
    release = bed.slurm or "system Slurm 22.05"
    try:
        slurm.admin("scale", "tiny", "1")
        wait_until("a READY replica of tiny", lambda: slurm.ready_replicas("tiny") >= 1, READY_TIMEOUT)
        job = next(iter(slurm.controller_jobs("tiny")))
        pids = engine_pids(job, run_dir=bed.run_dir)
        assert pids, f"no engine process of job {job}"
        root = min(pids, key=lambda p: psutil.Process(p).create_time())
        print(f"{release}: job {job}: engine pids {sorted(pids)}; root {root} in {_cgroups(root)}")
        for pid in sorted(pids):
            print(f"  engine {pid} ppid {psutil.Process(pid).ppid()}: {_cgroups(pid)}")
        before = _cpu(pids)
        began = time.monotonic()
        tokens = _work(bed)
        print(f"worked: {tokens} tokens in {time.monotonic() - began:.1f} s; engine CPU {before:.1f} -> "
              f"{_cpu(pids):.1f} s")
        print(f"  after the work: root {root} in {_cgroups(root)}")
        cpu = _cpu(pids)
        rss = _rss([root])
        slurm.admin("scale", "tiny", "0")
        while engine_pids(job, run_dir=bed.run_dir):
            cpu = max(cpu, _cpu(pids))
            time.sleep(0.2)
        fields = "--format=JobID,State,TotalCPU,UserCPU,SystemCPU,MaxRSS"

        def ended() -> bool:
            out = slurm.run("sacct", "-a", "-n", "-P", "-j", job, fields).stdout
            return any(line.startswith(f"{job}|") and "RUNNING" not in line for line in out.splitlines())
        wait_until(f"sacct to list {job}'s end", ended, 120)
        time.sleep(2)
        out = slurm.run("sacct", "-a", "-n", "-P", "-j", job, fields).stdout
        print(f"{release}: job {job}: the engine used >= {cpu:.1f} s of CPU, RSS {rss >> 20} MiB after the work "
              f"(its processes' sum); sacct ({fields[9:]}):")
        for line in out.splitlines():
            print(f"  {line}")
    finally:
        left = devcluster.down(bed)
        print(f"down; left {left}")


if __name__ == "__main__":
    main()
