"""Benchmark part 1: the seed paper's table on the bed — N concurrent chat requests through the gateway and
directly to the same engine, in one run.

Responsible for: with the replica count pinned to one, sending bursts of 100, 500 and 1000 requests at once,
each level both ways, alternating which path goes first so that drift in the shared machine's load does not
favour one; non-streaming bursts give latency and throughput, streaming bursts give TTFT; the engine's busy
fraction is sampled during every burst. Not responsible for: pinning (run_all does) or plotting.
"""

from __future__ import annotations

import asyncio
import logging
import time

from bench.bedprobe import BedProbe
from bench.loadgen import LoadGenerator, Messages, Sample, Stats
from bench.samplers import BusySampler

log = logging.getLogger("bench.seedtable")
# The seed paper's figures (7B model, GPUs, Kubernetes + Slurm): mean latency per concurrency, and overhead.
SEED_MEAN_LATENCY_S = {100: 1.2, 500: 1.4, 1000: 1.6}
SEED_OVERHEAD_S = 0.5
# Between bursts, so that the next one starts against an idle engine.
PAUSE_S = 1.5


def _messages(i: int) -> Messages:
    return [{"role": "user", "content": f"Question {i}: what does the scheduler do with a pending job?"}]


async def run(probe: BedProbe, levels: list[int], max_tokens: int, repeats: int = 2,
              warmup: int = 100) -> dict[str, object]:
    (engine,) = await probe.engines()
    log.info("seed table against engine %s (job %s) and the gateway, levels %s", engine.root, engine.job_id, levels)
    gateway = LoadGenerator(probe.gateway, probe.model, max_tokens=max_tokens)
    direct = LoadGenerator(engine.target, probe.model, max_tokens=max_tokens)
    busy = BusySampler(probe, [engine])
    busy.start()
    rows: list[dict[str, object]] = []
    runs: dict[tuple[int, str, bool], list[list[Sample]]] = {}
    try:
        for gen in (direct, gateway):
            await gen.burst(warmup, _messages, False)
        await asyncio.sleep(PAUSE_S)
        turn = 0
        for level in levels:
            for stream in (False, True):
                for _ in range(repeats):
                    order = (direct, gateway) if turn % 2 == 0 else (gateway, direct)
                    turn += 1
                    for gen in order:
                        began = time.time()
                        samples = await gen.burst(level, _messages, stream)
                        ended = time.time()
                        stats = Stats.of(samples)
                        b = busy.busy(began, ended)[engine.job_id]
                        path = "gateway" if gen is gateway else "direct"
                        runs.setdefault((level, path, stream), []).append(samples)
                        rows.append({"level": level, "path": path, "stream": stream, "t": began,
                                     **stats.as_dict(), "engine_busy_fraction": b["busy_fraction"],
                                     "engine_mean_running": b["mean_running"]})
                        log.info("%4d %-7s %s: mean %.3fs p50 %.3fs p99 %.3fs ttft p50 %.3fs, %.0f req/s, "
                                 "%d errors, engine busy %.0f%%", level, path, "stream" if stream else "plain",
                                 stats.mean, stats.p50, stats.p99, stats.ttft_p50, stats.throughput, stats.errors,
                                 100 * b["busy_fraction"])
                        await asyncio.sleep(PAUSE_S)
    finally:
        await busy.stop()
        await gateway.close()
        await direct.close()
    return {"engine_job": engine.job_id, "levels": levels, "max_tokens": max_tokens, "repeats": repeats,
            "rows": rows, "table": _table(runs, levels)}


def _table(runs: dict[tuple[int, str, bool], list[list[Sample]]], levels: list[int]) -> list[dict[str, float]]:
    """One line per level: latency (plain bursts) and TTFT (streaming bursts) both ways, each pooled over its
    repeats, and the overhead."""
    def pick(level: int, path: str, stream: bool) -> dict[str, object]:
        return Stats.pooled(runs[(level, path, stream)]).as_dict()

    table = []
    for level in levels:
        d, g = pick(level, "direct", False), pick(level, "gateway", False)
        ds, gs = pick(level, "direct", True), pick(level, "gateway", True)
        line = {"level": float(level)}
        for name, r in (("direct", d), ("gateway", g)):
            for key in ("mean", "p50", "p99", "throughput", "errors"):
                line[f"{name}_{key}"] = float(r[key])  # type: ignore[arg-type]
        for name, r in (("direct", ds), ("gateway", gs)):
            for key in ("ttft_mean", "ttft_p50", "ttft_p99"):
                line[f"{name}_{key}"] = float(r[key])  # type: ignore[arg-type]
        line["overhead_mean"] = line["gateway_mean"] - line["direct_mean"]
        line["overhead_p50"] = line["gateway_p50"] - line["direct_p50"]
        line["overhead_p99"] = line["gateway_p99"] - line["direct_p99"]
        line["overhead_ttft_p50"] = line["gateway_ttft_p50"] - line["direct_ttft_p50"]
        line["overhead_vs_seed"] = line["overhead_mean"] / SEED_OVERHEAD_S
        line["seed_mean"] = SEED_MEAN_LATENCY_S.get(level, float("nan"))
        table.append(line)
    return table
