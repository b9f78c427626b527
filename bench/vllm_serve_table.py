"""The seed paper's table measured with vLLM's own benchmark client (`vllm.benchmarks.serve`), through the
gateway and directly against the same engine, in one run.

Responsible for: bringing up a dev-cluster bed of its own (the gateway with its default admission, so that what
a site gets is what is measured), pinning `tiny` to one replica, and running vLLM's client at each concurrency
(100, 500, 1000 by default; as many prompts as twice the level, all at once, `--max-concurrency` the level) both
ways, alternating which path goes first so that drift in the shared machine's load favours neither; printing
throughput, mean and p99 TTFT, failures, and the ratios gateway / direct per level; a JSON and a plot.
Not responsible for: our own load generator's figures (bench/seedtable.py), or the gateway's CPU (relay_cost.py).

    .venv/bin/python bench/vllm_serve_table.py [--levels 100,500,1000] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bedprobe import BedProbe
from bench.loadgen import Target
from slinfer.dev import devcluster

log = logging.getLogger("bench.vllm_serve_table")
MODEL = "tiny"
# vLLM's client runs in a process of its own per measurement: its import takes ~7 s and it keeps global state
# (the tokenizer, aiohttp's connector) that must not carry from one path to the other.
_CHILD = ("import sys; from vllm.utils.argparse_utils import FlexibleArgumentParser; "
          "from vllm.benchmarks.serve import add_cli_args, main; p = FlexibleArgumentParser(); add_cli_args(p); "
          "main(p.parse_args(sys.argv[1:]))")
# Between runs, so that the next starts against an idle engine.
PAUSE_S = 2.0


def _client(target: Target, level: int, prompts: int, input_len: int, output_len: int, out: Path) -> dict:
    argv = [sys.executable, "-c", _CHILD, "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
            "--base-url", target.base_url.removesuffix("/v1"), "--model", MODEL,
            "--tokenizer", str(devcluster.tiny_model_path()), "--dataset-name", "random",
            "--random-input-len", str(input_len), "--random-output-len", str(output_len), "--ignore-eos",
            "--num-prompts", str(prompts), "--max-concurrency", str(level), "--request-rate", "inf",
            "--percentile-metrics", "ttft,itl,e2el", "--metric-percentiles", "50,99", "--disable-tqdm",
            "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    # The openai backends send $OPENAI_API_KEY as the bearer key: the gateway's client key, or the engine's own.
    env = {**os.environ, "OPENAI_API_KEY": target.api_key}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=1800)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"vLLM's benchmark client failed ({proc.returncode}) against {target.label}: "
                           f"{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    errors = [e for e in result.get("errors", []) if e]
    return {"completed": result["completed"], "failed": result.get("failed", 0),
            "request_throughput": result["request_throughput"], "output_throughput": result["output_throughput"],
            "mean_ttft_ms": result["mean_ttft_ms"], "p99_ttft_ms": result["p99_ttft_ms"],
            "mean_e2el_ms": result["mean_e2el_ms"], "p99_itl_ms": result["p99_itl_ms"],
            "first_error": errors[0][:300] if errors else ""}


async def _measure(bed: devcluster.Bed, args: argparse.Namespace, work: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    async with BedProbe(bed, MODEL) as probe:
        await probe.pin(1)
        await probe.wait_replicas(1, 420)
        await probe.wait_routable(1, 60)
        (engine,) = await probe.engines()
        direct = Target("direct", engine.target.base_url, engine.target.api_key)
        log.info("engine %s (job %s); gateway %s", engine.root, engine.job_id, probe.gateway.base_url)
        # Warm both paths (tokenizer caches, the engine's first batches) with a small run each.
        for target in (direct, probe.gateway):
            _client(target, 32, 64, args.input_len, args.output_len, work / f"warm-{target.label}.json")
        turn = 0
        for level in args.levels:
            for _ in range(args.repeats):
                order = (direct, probe.gateway) if turn % 2 == 0 else (probe.gateway, direct)
                turn += 1
                for target in order:
                    await asyncio.sleep(PAUSE_S)
                    began = time.time()
                    row = _client(target, level, level * args.prompts_per_level, args.input_len, args.output_len,
                                  work / f"{level}-{target.label}-{turn}.json")
                    row.update(level=level, path="gateway" if target is probe.gateway else "direct", t=began)
                    log.info("%s", row)
                    rows.append(row)
        await probe.pin(0)
    return rows


def summarise(rows: list[dict[str, object]]) -> list[dict[str, float]]:
    """Per level, the mean of each path's runs and the ratios gateway / direct."""
    out = []
    for level in sorted({int(r["level"]) for r in rows}):  # type: ignore[call-overload]
        def mean(path: str, key: str, level: int = level) -> float:
            vals = [float(r[key]) for r in rows if r["level"] == level and r["path"] == path]  # type: ignore[arg-type]
            return sum(vals) / len(vals)
        entry: dict[str, float] = {"level": level}
        for path in ("direct", "gateway"):
            for key in ("request_throughput", "output_throughput", "mean_ttft_ms", "p99_ttft_ms", "failed",
                        "completed"):
                entry[f"{path}_{key}"] = mean(path, key)
        entry["throughput_ratio"] = entry["gateway_output_throughput"] / entry["direct_output_throughput"]
        entry["ttft_ratio"] = entry["gateway_mean_ttft_ms"] / entry["direct_mean_ttft_ms"]
        entry["ttft_added_s"] = (entry["gateway_mean_ttft_ms"] - entry["direct_mean_ttft_ms"]) / 1000
        out.append(entry)
    return out


def markdown(summary: list[dict[str, float]]) -> str:
    lines = ["| concurrent | direct tok/s | gateway tok/s | ratio | direct mean TTFT ms | gateway mean TTFT ms | "
             "ratio | TTFT added s | failed direct / gateway |", "|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        lines.append(f"| {e['level']:.0f} | {e['direct_output_throughput']:.0f} | {e['gateway_output_throughput']:.0f}"
                     f" | {e['throughput_ratio']:.2f} | {e['direct_mean_ttft_ms']:.0f} | "
                     f"{e['gateway_mean_ttft_ms']:.0f} | {e['ttft_ratio']:.2f} | {e['ttft_added_s']:+.3f} | "
                     f"{e['direct_failed']:.0f} / {e['gateway_failed']:.0f} |")
    return "\n".join(lines)


def plot(summary: list[dict[str, float]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [e["level"] for e in summary]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in (("direct", "o-"), ("gateway", "s--")):
        left.plot(levels, [e[f"{name}_output_throughput"] for e in summary], style, label=name)
        right.plot(levels, [e[f"{name}_mean_ttft_ms"] / 1000 for e in summary], style, label=name)
    left.set(xlabel="concurrent requests", ylabel="output tokens/s", title="throughput (vLLM's client)")
    right.set(xlabel="concurrent requests", ylabel="mean TTFT (s)", title="time to first token")
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[100, 500, 1000])
    parser.add_argument("--repeats", type=int, default=2, help="runs per level and path (alternating order)")
    parser.add_argument("--prompts-per-level", type=int, default=2, help="prompts = level x this")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp/slinfer-vbench"))
    parser.add_argument("--port-base", type=int, default=54800)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    bed = devcluster.Bed(args.state_dir.resolve(), args.port_base)
    if devcluster.daemon_pid(bed, "slurmctld"):
        devcluster.down(bed)
    devcluster.up(bed)
    try:
        with tempfile.TemporaryDirectory() as work:
            rows = asyncio.run(_measure(bed, args, Path(work)))
    finally:
        left = devcluster.down(bed)
        if left:
            log.error("processes %s of the bed survived `down`", left)
    summary = summarise(rows)
    print(markdown(summary))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    if args.plot:
        plot(summary, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
