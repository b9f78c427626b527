"""What one autoscaler step's Slurm query (SlurmClient.jobs) costs the controller at N of its own jobs, before and
after issue 35.7: the calls it makes, its CPU (the controller's own and its clients'), and its wall time.

`python bench/slurm_step_cost.py [--jobs 10,100,1000,5000,40000] [--old-max 5000] [--steps 3]`

Responsible for: running the real SlurmClient against stand-in `squeue` and `scontrol` clients (small /bin/sh
scripts in a temporary folder, so that every call is a real fork and exec as in production) that print each
release's real output format for N running jobs; timing the step in the old mode (one `scontrol show job` per
known job: by_id_max unbounded) and the new (one `squeue --Format` listing beyond BY_ID_MAX jobs).
Not responsible for: slurmctld's side (no daemon here: bench/slurm_polling.py measures it on the bed), or a real
client's own start-up cost (a real scontrol costs 0.54 ms CPU and 2.5 ms wall a call on the bed, more than the
stand-in's shell: the old figures here are a lower bound).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import tempfile
import time
from pathlib import Path

from slinfer.controller.slurm import BY_ID_MAX, SlurmClient
from slinfer.slurm import parse

USER = "svc"
NAME = "slinfer-tiny"
COMMENT = "slinfer:autoscaler model=tiny"
# A real `scontrol -o show job` record's length (tests/fixtures/slurm/22.05/scontrol-job-running.txt is ~1 KB).
PAD = "X" * 800


def _stubs(folder: Path, n: int) -> None:
    listing = folder / "listing.txt"
    with listing.open("w") as out:
        for i in range(n):
            fields = [str(100000 + i), "RUNNING", USER, "1000", f"n{i // 8}", f"n{i // 8}", "1796644113",
                      "1796644113", "1796730513", "None", "normal", "N/A", NAME, COMMENT]
            out.write("".join(f + parse.SEP for f in fields) + "\n")
    (folder / "squeue").write_text(f"#!/bin/sh\nexec cat {listing}\n")
    (folder / "scontrol").write_text(
        "#!/bin/sh\n"
        f"printf 'JobId=%s JobName={NAME} UserId={USER}(1000) QOS=normal JobState=RUNNING Reason=None "
        "SubmitTime=1796644113 StartTime=1796644113 EndTime=1796730513 PreemptTime=None NodeList=n1 BatchHost=n1 "
        f"Extra={PAD} Comment={COMMENT} \\n' \"$4\"\n")
    for name in ("squeue", "scontrol"):
        (folder / name).chmod(0o755)


def step_cost(n: int, old: bool, steps: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _stubs(folder, n)
        clock = [0.0]
        slurm = SlurmClient(str(folder), {"PATH": "/usr/bin:/bin"}, user=USER, clock=lambda: clock[0])
        if old:
            slurm.by_id_max = 10**9
        asyncio.run(slurm.jobs([NAME]))  # the first step lists in both modes
        calls, own, children, wall = [], [], [], []
        for _ in range(steps):
            clock[0] += 2.0
            c0, p0, k0, w0 = slurm.runner.calls, time.process_time(), _children(), time.perf_counter()
            found = asyncio.run(slurm.jobs([NAME]))
            calls.append(slurm.runner.calls - c0)
            own.append(time.process_time() - p0)
            children.append(_children() - k0)
            wall.append(time.perf_counter() - w0)
            assert len(found) == n, (len(found), n)
    return {"jobs": n, "calls": statistics.median(calls), "own_ms": 1e3 * statistics.median(own),
            "clients_ms": 1e3 * statistics.median(children), "wall_ms": 1e3 * statistics.median(wall)}


def _children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", default="10,100,1000,5000,40000")
    ap.add_argument("--old-max", type=int, default=5000, help="largest N to run the old per-job step at")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    print(f"BY_ID_MAX={BY_ID_MAX}; medians of {args.steps} steps after the first listing")
    print(f"{'mode':5} {'jobs':>6} {'calls':>6} {'controller CPU ms':>18} {'clients CPU ms':>15} {'wall ms':>9}")
    for n in (int(x) for x in args.jobs.split(",")):
        for old in (True, False):
            if old and n > args.old_max:
                continue
            r = step_cost(n, old, args.steps if not old or n <= 1000 else 1)
            print(f"{'old' if old else 'new':5} {n:>6} {r['calls']:>6.0f} {r['own_ms']:>18.1f} "
                  f"{r['clients_ms']:>15.1f} {r['wall_ms']:>9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
