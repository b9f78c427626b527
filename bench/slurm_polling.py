"""Slurm's cost of the controller's polling, with 5,000 pending jobs of another user in the queue against an
empty queue: `python bench/slurm_polling.py [--foreign 5000] [--steps 300]`.

Responsible for: bringing up its own bed (SLINFER_SLURM picks the release, as for the tests) without the
controller daemon, creating two unprivileged bed users (the controller's service user, as the packaged unit
runs it, and a foreign user), giving the service user two held pool jobs of its own, and measuring per
autoscaler step what the controller's real SlurmClient.jobs() costs: bytes read, wall time, and slurmctld's RPC
time from `sdiag` (reset with `sdiag -r` before each series), and apart from it the one listing of the user's
jobs a controller makes at start. Then the foreign user submits `--foreign` held
jobs and the same series runs again; it prints both and their ratio, beside the whole-queue `squeue --json`
that the controller used to run, and exits 1 when a ratio of the controller's query is over MAX_RATIO.
Not responsible for: the controller's decisions (bench/scaling.py measures those).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pwd
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `bench` is importable

from slinfer.controller.slurm import SlurmClient
from slinfer.dev import devcluster
from slinfer.slurm import queries
from slinfer.slurm.runner import Runner

log = logging.getLogger("bench.slurm_polling")

# The goal: the controller's Slurm cost with a full queue at most this many times an empty queue's.
MAX_RATIO = 1.2
# The controller's service user (packaging/systemd/slinfer-controller.service runs it as a non-root user: squeue
# filters by user on the server only for a non-zero uid, so `--user=root` asks for the whole queue) and the other
# user whose jobs fill the queue.
SERVICE_USER = "slinfer-bench-svc"
FOREIGN_USER = "slinfer-bench-other"
JOB_NAME = "slinfer-tiny"
# The controller's autoscaler interval (controller.autoscale_interval_s' default): the series' clock.
STEP_S = 2.0
_RPC = re.compile(r"^\s+(REQUEST_\w+|MESSAGE_\w+)\s+\(\s*\d+\)\s+count:(\d+)\s+ave_time:\d+\s+total_time:(\d+)")


def ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       check=True)
        return pwd.getpwnam(name)


def rpc_us(runner: Runner, by_type: dict[str, tuple[int, int]] | None = None) -> tuple[int, int]:
    """slurmctld's RPC calls and total time (µs) since the last `sdiag -r`, sdiag's own calls left out;
    with `by_type`, each message type's (calls, µs) are put in it."""
    calls = total = 0
    for line in runner.run(["sdiag"]).splitlines():
        m = _RPC.match(line)
        if m and m.group(1) not in ("REQUEST_STATS_INFO",):
            calls += int(m.group(2))
            total += int(m.group(3))
            if by_type is not None:
                by_type[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return calls, total


def series(bed: devcluster.Bed, steps: int) -> dict[str, float]:
    """A freshly started controller's real SlurmClient: its first call (the listing of its user's jobs, once at
    start) measured on its own, then `steps` autoscaler steps on the controller's 2 s clock."""
    admin = devcluster.slurm_runner(bed)
    simulated = [0.0]
    client = SlurmClient(env={**os.environ, **bed.env()}, user=SERVICE_USER, clock=lambda: simulated[0])
    admin.run(["sdiag", "-r"])
    began = time.perf_counter()
    asyncio.run(client.jobs([JOB_NAME]))
    start_wall = time.perf_counter() - began
    start_bytes = client.runner.bytes_read
    _, start_us = rpc_us(admin)
    admin.run(["sdiag", "-r"])
    walls = []
    jobs = []
    for _ in range(steps):
        simulated[0] += STEP_S
        began = time.perf_counter()
        jobs = asyncio.run(client.jobs([JOB_NAME]))
        walls.append(time.perf_counter() - began)
    by_type: dict[str, tuple[int, int]] = {}
    calls, total_us = rpc_us(admin, by_type)
    log.info("RPCs over %d steps, by type (calls, µs each): %s", steps,
             {t: (n, round(us / n)) for t, (n, us) in by_type.items() if n})
    return {"jobs_seen": len(jobs), "listings": client.listings - 1,
            "bytes_per_step": (client.runner.bytes_read - start_bytes) / steps,
            "wall_ms_per_step": statistics.mean(walls) * 1000, "rpc_calls_per_step": calls / steps,
            "rpc_ms_per_step": total_us / 1000 / steps, "start_bytes": start_bytes,
            "start_wall_ms": start_wall * 1000, "start_rpc_ms": start_us / 1000}


def whole_queue_json(bed: devcluster.Bed, steps: int) -> dict[str, float]:
    """What the controller ran before: `squeue --json` over the whole queue."""
    runner = devcluster.slurm_runner(bed)
    runner.run(["sdiag", "-r"])
    walls = []
    before = runner.bytes_read
    for _ in range(steps):
        began = time.perf_counter()
        runner.run(["squeue", "--json"])
        walls.append(time.perf_counter() - began)
    nbytes = (runner.bytes_read - before) / steps
    _, total_us = rpc_us(runner)
    return {"bytes_per_step": nbytes, "wall_ms_per_step": statistics.median(walls) * 1000,
            "rpc_ms_per_step": total_us / 1000 / steps}


def fill_queue(bed: devcluster.Bed, count: int) -> float:
    """`count` held one-line jobs of the foreign user, one record each (an array would be one record)."""
    began = time.monotonic()

    def submit(batch: int) -> None:
        for _ in range(batch):
            devcluster.run_as(bed, FOREIGN_USER, ["sbatch", "--hold", "--output=/dev/null", "--job-name=other-work",
                                                  "--wrap", "true"])

    per = [count // 8 + (1 if i < count % 8 else 0) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(submit, per))
    return time.monotonic() - began


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--foreign", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=300, help="autoscaler steps per series (300: 10 minutes)")
    ap.add_argument("--state-dir", type=Path, default=Path("/tmp/slinfer-bench-polling"))
    ap.add_argument("--port-base", type=int, default=int(os.environ.get("SLINFER_BENCH_PORT_BASE", 15800)))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bed = devcluster.Bed(args.state_dir, args.port_base)
    devcluster.down(bed)
    shutil.rmtree(bed.state, ignore_errors=True)
    ensure_user(SERVICE_USER)
    ensure_user(FOREIGN_USER)
    devcluster.up(bed, controller=False)
    try:
        admin = devcluster.slurm_runner(bed)
        release = admin.get(queries.release())
        for _ in range(2):  # the service user's own pool jobs, held so that no engine starts
            devcluster.run_as(bed, SERVICE_USER, ["sbatch", "--hold", "--output=/dev/null", f"--job-name={JOB_NAME}",
                                                  "--comment=slinfer:autoscaler model=tiny", "--wrap", "true"])
        empty = series(bed, args.steps)
        empty_json = whole_queue_json(bed, min(args.steps, 20))
        fill_s = fill_queue(bed, args.foreign)
        queued = len(admin.get(queries.all_jobs()))
        full = series(bed, args.steps)
        full_json = whole_queue_json(bed, min(args.steps, 20))
    finally:
        devcluster.down(bed)
    print(f"Slurm {release}: the controller's query per autoscaler step ({args.steps} steps each), "
          f"{queued} jobs queued after {args.foreign} foreign submits in {fill_s:.0f} s")
    print(f"{'':28}{'empty queue':>14}{'5,000 foreign':>16}{'ratio':>8}")
    ratios = {}
    for key, label in (("bytes_per_step", "bytes read"), ("wall_ms_per_step", "wall time (ms)"),
                       ("rpc_ms_per_step", "slurmctld RPC time (ms)")):
        ratios[key] = full[key] / empty[key] if empty[key] else float("inf")
        print(f"{label:28}{empty[key]:>14.2f}{full[key]:>16.2f}{ratios[key]:>8.2f}")
    print(f"{'jobs the controller saw':28}{empty['jobs_seen']:>14.0f}{full['jobs_seen']:>16.0f}")
    print(f"{'RPCs per step':28}{empty['rpc_calls_per_step']:>14.2f}{full['rpc_calls_per_step']:>16.2f}")
    print(f"{'user listings after start':28}{empty['listings']:>14.0f}{full['listings']:>16.0f}")
    print("once, at the controller's start (the listing of its user's jobs; not a per-step cost):")
    for key, label in (("start_bytes", "bytes read"), ("start_wall_ms", "wall time (ms)"),
                       ("start_rpc_ms", "slurmctld RPC time (ms)")):
        print(f"{label:28}{empty[key]:>14.2f}{full[key]:>16.2f}"
              f"{full[key] / empty[key] if empty[key] else float('inf'):>8.2f}")
    print("the old whole-queue `squeue --json`, for comparison:")
    for key, label in (("bytes_per_step", "bytes read"), ("wall_ms_per_step", "wall time (ms)"),
                       ("rpc_ms_per_step", "slurmctld RPC time (ms)")):
        print(f"{label:28}{empty_json[key]:>14.2f}{full_json[key]:>16.2f}"
              f"{full_json[key] / empty_json[key] if empty_json[key] else float('inf'):>8.2f}")
    over = {k: round(v, 2) for k, v in ratios.items() if v > MAX_RATIO}
    if over:
        print(f"FAIL: ratios over {MAX_RATIO}: {over}")
        return 1
    print(f"OK: every ratio at most {MAX_RATIO}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
