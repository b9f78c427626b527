"""The warm start against the cold ones, alternating in one run: a bare `python -m vllm.entrypoints.openai.api_server`
start, slinfer's cold path ([agent].warm_start = false) and slinfer's warm path, each to READY and to the first
answer from zero: `python bench/warmstart.py [--rounds N] [--model tiny --model smollm2] [--path warm]`.
Each slinfer start is broken down into where its seconds went (Slurm, the agent, vLLM's phases, the probes).

Responsible for: a bed of its own (no controller), switching the agent between the two paths (a line in the
bed's [agent], an agent restart, the template's READY awaited outside the timing), timing `sbatch
--inference=MODEL` to the job's own `slinfer wait-ready` and to its first chat answer, timing the bare start of
the same engine command to /health and to a first answer, and printing every round and a summary (median).
Not responsible for: the gateway's scale from zero (bench/scaling.py).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
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


# How often the log watcher reads the engine's log: a phase's moment is known to within this.
WATCH_INTERVAL_S = 0.02
# vLLM's lines that end each phase of an engine's start, in order: (the phase that ends there, its pattern).
ENGINE_MARKS = (
    ("imports, arguments", rb"non-default args"),
    ("config (args, model info, platform)", rb"Initializing a V1 LLM engine"),
    ("EngineCore and worker processes", rb"Starting to load model"),
    ("model load (weights, dtype)", rb"Loading weights took|Model loading took"),
    ("after-load processing, profile run", rb"KV cache size"),
    ("KV cache allocation, warm-up", rb"init engine \(profile"),
    ("API server (tokenizer, routes, uvicorn)", rb"Application startup complete"),
)
# vLLM's own figures for the steps inside those phases.
ENGINE_FIGURES = (
    ("weights", rb"Loading weights took ([0-9.]+) s"),
    ("model loading", rb"Model loading took [0-9.]+ [GM]i?B(?: memory)? and ([0-9.]+) s"),
    ("init engine", rb"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+) s"),
)


def _log_time(line: str, pattern: str, fmt: str) -> float | None:
    """The wall time a Slurm or slinfer log line carries (local time, milliseconds)."""
    match = re.search(pattern, line)
    if not match:
        return None
    return datetime.datetime.strptime(match.group(1), fmt).timestamp()


@dataclass
class EngineLogWatch:
    """Notes the moment each of ENGINE_MARKS first reaches a job's engine log, from a thread of its own."""

    path: Path
    seen: dict[str, float] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    first_byte: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        data = b""
        while not self._stop.is_set():
            try:
                with open(self.path, "rb") as f:
                    f.seek(len(data))
                    new = f.read()
            except OSError:
                new = b""
            now = time.time()
            if new:
                self.first_byte = self.first_byte or now
                data += new
                for name, pattern in ENGINE_MARKS:
                    if name not in self.seen and re.search(pattern, data):
                        self.seen[name] = now
                for name, pattern in ENGINE_FIGURES:
                    if name not in self.figures and (match := re.search(pattern, data)):
                        self.figures[name] = float(match.group(1))
            self._stop.wait(WATCH_INTERVAL_S)


def breakdown(bed: devcluster.Bed, job: str, sbatch_at: float, watch: EngineLogWatch, ready_at: float,
              answer_at: float) -> list[tuple[str, float]]:
    """Where one start's seconds went: consecutive phases from sbatch to the first answer, each a (name,
    seconds) pair; a phase whose end was not seen is folded into the next."""
    marks: list[tuple[str, float | None]] = [("sbatch -> Slurm allocates", None)]
    ctld = (bed.logs / "slurmctld.log").read_text(errors="replace")
    for line in ctld.splitlines():
        if f"Allocate JobId={job} " in line:
            marks[0] = (marks[0][0], _log_time(line, r"^\[([0-9T:.-]+)\]", "%Y-%m-%dT%H:%M:%S.%f"))
    agent_log = (bed.logs / "agent.log").read_text(errors="replace")
    started = ready = None
    for line in agent_log.splitlines():
        if f"job {job}: started " in line:
            started = _log_time(line, r"^([0-9-]+ [0-9:]+,[0-9]+)", "%Y-%m-%d %H:%M:%S,%f")
        elif f"job {job}: engine READY" in line:
            ready = _log_time(line, r"^([0-9-]+ [0-9:]+,[0-9]+)", "%Y-%m-%d %H:%M:%S,%f")
    marks.append(("prolog -> agent starts the engine", started))
    marks.append(("engine's first log line", watch.first_byte or None))
    marks += [(name, watch.seen.get(name)) for name, _ in ENGINE_MARKS]
    marks.append(("agent's probe -> READY", ready))
    marks.append(("job's wait-ready sees it", ready_at))
    marks.append(("first answer", answer_at))
    phases, last, pending = [], sbatch_at, ""
    for name, at in marks:
        if at is None:
            pending = f"{pending} + {name}" if pending else name
            continue
        phases.append((f"{pending} + {name}" if pending else name, at - last))
        last, pending = at, ""
    return phases


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


def slinfer_start(bed: devcluster.Bed, model: str) -> tuple[float, float, list[tuple[str, float]], dict[str, float]]:
    """sbatch -> the job's `slinfer wait-ready`, and -> its first answer, in seconds; the start's phases and
    vLLM's own figures."""
    out = bed.state / f"bench-{time.monotonic_ns()}.out"
    runner = devcluster.slurm_runner(bed)
    bin_dir = Path(sys.executable).parent
    began_wall, began = time.time(), time.monotonic()
    job = runner.run(["sbatch", "--parsable", f"--inference={model}", "--gres=gpu:1", f"--output={out}", "--wrap",
                      f"{bin_dir / 'slinfer'} wait-ready --timeout {READY_TIMEOUT_S:.0f} && echo READY_AT "
                      f"$(date +%s.%N) && {sys.executable} -c \"{ASK}\""]).strip().split(";")[0]
    watch = EngineLogWatch(bed.run_dir / "logs" / f"{job}.log")
    watch.start()
    try:
        while time.monotonic() - began < READY_TIMEOUT_S:
            text = out.read_text() if out.exists() else ""
            ready = re.search(r"^READY_AT ([0-9.]+)$", text, re.M)
            answer = re.search(r"^ANSWER_AT ([0-9.]+) [1-9]", text, re.M)
            if ready and answer:
                watch.stop()
                ready_at, answer_at = float(ready.group(1)), float(answer.group(1))
                phases = breakdown(bed, job, began_wall, watch, ready_at, answer_at)
                return ready_at - began_wall, answer_at - began_wall, phases, watch.figures
            if "Error" in text or "FAILED" in text:
                raise RuntimeError(f"job {job}: {text[-2000:]}")
            time.sleep(0.2)
        raise RuntimeError(f"job {job}: no answer within {READY_TIMEOUT_S:.0f} s")
    finally:
        watch.stop()
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
    ap.add_argument("--path", action="append", choices=("bare", "cold", "warm"),
                    help="which starts to time (default: all three)")
    ap.add_argument("--state-dir", type=Path, default=Path("/tmp/slinfer-bench-warm"))
    ap.add_argument("--port-base", type=int, default=int(os.environ.get("SLINFER_BENCH_PORT_BASE", 15700)))
    args = ap.parse_args()
    models = args.model or ["tiny"]
    paths = args.path or ["bare", "cold", "warm"]
    bed = devcluster.Bed(args.state_dir, args.port_base)
    devcluster.down(bed)
    shutil.rmtree(bed.state, ignore_errors=True)
    devcluster.up(bed, controller=False)
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    phase_rows: dict[tuple[str, str], list[list[tuple[str, float]]]] = {}
    try:
        for round_no in range(1, args.rounds + 1):
            for model in models:
                for path in paths:
                    if path == "bare":
                        figures = bare_start(bed, model, READY_TIMEOUT_S)
                    else:
                        set_warm(bed, path == "warm")
                        ready, answer, phases, vllm_figures = slinfer_start(bed, model)
                        figures = (ready, answer)
                        phase_rows.setdefault((model, path), []).append(phases)
                    rows.setdefault((model, path), []).append(figures)
                    print(f"round {round_no} {model:8} {path:5}: READY {figures[0]:6.1f} s, first answer "
                          f"{figures[1]:6.1f} s", flush=True)
                    if path != "bare":
                        for name, seconds in phases:
                            print(f"    {seconds:6.2f} s  {name}", flush=True)
                        print("    vLLM's own: " + ", ".join(f"{k} {v:.2f} s" for k, v in vllm_figures.items()),
                              flush=True)
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
    for (model, path), runs in phase_rows.items():
        print(f"\n{model} {path}: phases, median s over {len(runs)} round(s)")
        for name in dict.fromkeys(n for run in runs for n, _ in run):
            values = [s for run in runs for n, s in run if n == name]
            print(f"  {statistics.median(values):6.2f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
