"""Per Slurm release: the plugin's build time, the bed's start, and `sbatch --inference=tiny` -> READY, each
beside a bare vLLM start of the same model measured in the same run:
`python bench/release_start.py [--slurm ROOT ...]` ("" is the system's Slurm; default: system, 24.11, 26.05).

Responsible for: timing `make -C spank SLURM_ROOT=...` from clean (inside the root), `dev-cluster up` (without the
controller), a private engine job from sbatch to the job's own `slinfer wait-ready`, and then the engine command
the agent would run, started bare (no Slurm, no agent) until its /health answers; printing one row per release
with the ratio of the two starts. Not responsible for: the controller (bench/scaling.py).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `bench` is importable

from bench.bare_engine import bare_start
from slinfer.dev import devcluster

REPO = Path(__file__).resolve().parents[1]
# Generous on a busy 2-core machine: a tiny engine is ready in 35 s idle, minutes under load.
READY_TIMEOUT_S = 600.0


def build_plugin(root: str) -> float:
    if not root:
        return float("nan")  # the system's plugin is `make spank`'s, shared with the other beds: not rebuilt
    shutil.rmtree(REPO / "spank" / "build" / Path(root).name, ignore_errors=True)
    began = time.monotonic()
    subprocess.run(["make", "-s", "-C", str(REPO / "spank"), f"SLURM_ROOT={root}", f"PYTHON={sys.executable}"],
                   check=True, capture_output=True)
    return time.monotonic() - began


def sbatch_to_ready(bed: devcluster.Bed) -> float:
    out = bed.state / "ready.out"
    out.unlink(missing_ok=True)
    runner = devcluster.slurm_runner(bed)
    began = time.monotonic()
    runner.run(["sbatch", "--parsable", "--inference=tiny", "--gres=gpu:1", f"--output={out}", "--wrap",
                f"{Path(sys.executable).parent / 'slinfer'} wait-ready --timeout {READY_TIMEOUT_S:.0f} "
                "&& echo READY"])
    while time.monotonic() - began < READY_TIMEOUT_S:
        if out.exists() and re.search(r"^READY$", out.read_text(), re.M):
            return time.monotonic() - began
        time.sleep(0.2)
    raise RuntimeError(f"no READY within {READY_TIMEOUT_S:.0f} s: {out.read_text() if out.exists() else ''}")




def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slurm", action="append", help="a release root; '' for the system's Slurm")
    ap.add_argument("--state-dir", type=Path, default=Path("/tmp/slinfer-bench-release"))
    ap.add_argument("--port-base", type=int, default=int(os.environ.get("SLINFER_BENCH_PORT_BASE", 15900)))
    args = ap.parse_args()
    roots = args.slurm if args.slurm is not None else ["", "/opt/slurm/24.11", "/opt/slurm/26.05"]
    rows = []
    for root in roots:
        bed = devcluster.Bed(args.state_dir, args.port_base, slurm=root)
        devcluster.down(bed)
        shutil.rmtree(bed.state, ignore_errors=True)
        build_s = build_plugin(root)
        began = time.monotonic()
        devcluster.up(bed, controller=False)
        try:
            up_s = time.monotonic() - began
            release = bed.release()
            ready_s = sbatch_to_ready(bed)
            devcluster.slurm_runner(bed).run(["scancel", "--full", "--user=root"])
        finally:
            devcluster.down(bed)
        bare_s = bare_start(bed, "tiny", READY_TIMEOUT_S)[0]
        rows.append((release, build_s, up_s, ready_s, bare_s))
        print(f"Slurm {release}: plugin build {build_s:.1f} s, bed up {up_s:.1f} s, sbatch -> READY {ready_s:.1f} s, "
              f"bare vLLM start {bare_s:.1f} s", flush=True)
    print(f"{'release':10}{'build s':>10}{'bed up s':>10}{'sbatch->READY s':>18}{'bare vLLM s':>14}{'ratio':>8}")
    for release, build_s, up_s, ready_s, bare_s in rows:
        print(f"{release:10}{build_s:>10.1f}{up_s:>10.1f}{ready_s:>18.1f}{bare_s:>14.1f}{ready_s / bare_s:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
