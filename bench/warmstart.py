"""The warm start against the cold ones, alternating in one run: a bare `python -m vllm.entrypoints.openai.api_server`
start, slinfer's cold path ([agent].warm_start = false) and slinfer's warm path, each to READY and to the first
answer from zero: `python bench/warmstart.py [--rounds N] [--model tiny --model smollm2]`.

Responsible for: a bed of its own (no controller), switching the agent between the two paths (a line in the
bed's [agent], an agent restart, the template's READY awaited outside the timing), timing `sbatch
--inference=MODEL` to the job's own `slinfer wait-ready` and to its first chat answer, timing the bare start of
the same engine command to /health and to a first answer, and printing every round and a summary (median).
Not responsible for: the gateway's scale from zero (bench/scaling.py).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `bench` is importable

from bench.bare_engine import bare_start
from slinfer.agent.processes import ProcessIdentity
from slinfer.dev import devcluster

# Generous on a busy 2-core machine: a cold tiny engine is ready in 35-50 s idle, minutes under load.
READY_TIMEOUT_S = 600.0
# The template's imports after an agent restart are not part of any job's start: waited for, not timed.
TEMPLATE_TIMEOUT_S = 300.0
ASK = (
    "import os, time; from openai import OpenAI; c = OpenAI(); "
    "r = c.chat.completions.create(model=os.environ['SLINFER_MODEL'], max_tokens=4, temperature=0, "
    "messages=[{'role': 'user', 'content': 'hello'}]); print('ANSWER_AT', time.time(), r.usage.completion_tokens)"
)


def set_warm(bed: devcluster.Bed, warm: bool) -> None:
    """Switches the bed's agent to one path and waits until it serves that way."""
    text = bed.config.read_text()
    text = re.sub(r"^warm_start = (true|false)\n", "", text, flags=re.M)
    text = text.replace("[agent]\n", f"[agent]\nwarm_start = {'true' if warm else 'false'}\n", 1)
    bed.config.write_text(text)
    log = bed.logs / "agent.log"
    offset = log.stat().st_size if log.exists() else 0
    devcluster.restart_agent(bed)
    if not warm:
        return
    deadline = time.monotonic() + TEMPLATE_TIMEOUT_S
    while time.monotonic() < deadline:
        with open(log, "rb") as f:
            f.seek(offset)
            if re.search(rb"engine template pid \d+ ready", f.read()):
                return
        time.sleep(0.5)
    raise RuntimeError("the engine template was not ready")


def slinfer_start(bed: devcluster.Bed, model: str) -> tuple[float, float]:
    """sbatch -> the job's `slinfer wait-ready`, and -> its first answer, in seconds."""
    out = bed.state / f"bench-{time.monotonic_ns()}.out"
    runner = devcluster.slurm_runner(bed)
    bin_dir = Path(sys.executable).parent
    began_wall, began = time.time(), time.monotonic()
    job = runner.run(["sbatch", "--parsable", f"--inference={model}", "--gres=gpu:1", f"--output={out}", "--wrap",
                      f"{bin_dir / 'slinfer'} wait-ready --timeout {READY_TIMEOUT_S:.0f} && echo READY_AT "
                      f"$(date +%s.%N) && {sys.executable} -c \"{ASK}\""]).strip().split(";")[0]
    try:
        while time.monotonic() - began < READY_TIMEOUT_S:
            text = out.read_text() if out.exists() else ""
            ready = re.search(r"^READY_AT ([0-9.]+)$", text, re.M)
            answer = re.search(r"^ANSWER_AT ([0-9.]+) [1-9]", text, re.M)
            if ready and answer:
                return float(ready.group(1)) - began_wall, float(answer.group(1)) - began_wall
            if "Error" in text or "FAILED" in text:
                raise RuntimeError(f"job {job}: {text[-2000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"job {job}: no answer within {READY_TIMEOUT_S:.0f} s")
    finally:
        runner.run(["scancel", job])
        _wait_job_gone(bed, job)


def _wait_job_gone(bed: devcluster.Bed, job: str) -> None:
    runner = devcluster.slurm_runner(bed)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if job not in runner.run(["squeue", "-h", "-o", "%i"]).split():
            return
        time.sleep(0.5)




def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", help="catalog model (default: tiny)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--state-dir", type=Path, default=Path("/tmp/slinfer-bench-warm"))
    ap.add_argument("--port-base", type=int, default=int(os.environ.get("SLINFER_BENCH_PORT_BASE", 15700)))
    args = ap.parse_args()
    models = args.model or ["tiny"]
    bed = devcluster.Bed(args.state_dir, args.port_base)
    devcluster.down(bed)
    shutil.rmtree(bed.state, ignore_errors=True)
    devcluster.up(bed, controller=False)
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        for round_no in range(1, args.rounds + 1):
            for model in models:
                for path in ("bare", "cold", "warm"):
                    if path == "bare":
                        figures = bare_start(bed, model, READY_TIMEOUT_S)
                    else:
                        set_warm(bed, path == "warm")
                        figures = slinfer_start(bed, model)
                    rows.setdefault((model, path), []).append(figures)
                    print(f"round {round_no} {model:8} {path:5}: READY {figures[0]:6.1f} s, first answer "
                          f"{figures[1]:6.1f} s", flush=True)
    finally:
        left = devcluster.down(bed)
        template = bed.run_dir / "warm-template.pid"
        if template.exists():
            pid_s, created_s = template.read_text().split()
            if ProcessIdentity(int(pid_s), float(created_s)).alive():
                os.kill(int(pid_s), signal.SIGKILL)
        if left:
            print(f"dev-cluster down left {left}", file=sys.stderr)
    print(f"\n{'model':10}{'start':8}{'READY s (median)':>18}{'first answer s':>16}{'rounds':>8}")
    for (model, path), figures in rows.items():
        print(f"{model:10}{path:8}{statistics.median(f[0] for f in figures):>18.1f}"
              f"{statistics.median(f[1] for f in figures):>16.1f}{len(figures):>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
