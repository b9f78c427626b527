"""Benchmark part 4: engine busy fraction under peak load, the bed's stand-in for GPU utilisation.

Responsible for: holding a closed-loop load of many users through the gateway on every READY replica, and
reading each engine's `vllm:num_requests_running` every 0.1 s (`BusySampler`); an engine is busy in a sample
when it has at least one running request. The share of busy samples is compared with the seed paper's "over
85 % GPU utilisation". Not responsible for: the replica count (run_all pins it) or plotting.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

from bench.bedprobe import BedProbe
from bench.loadgen import LoadGenerator, Messages, Sample, Stats
from bench.samplers import BusySampler

log = logging.getLogger("bench.peakbusy")
SEED_GPU_UTILISATION = 0.85


def _messages(i: int) -> Messages:
    return [{"role": "user", "content": f"Peak {i}: summarise the queue of partition gpu."}]


async def run(probe: BedProbe, users: int, duration_s: float, warmup_s: float, max_tokens: int,
              max_tokens_upto: int) -> dict[str, object]:
    engines = await probe.engines()
    gen = LoadGenerator(probe.gateway, probe.model, max_tokens=max_tokens, max_tokens_upto=max_tokens_upto)
    busy = BusySampler(probe, engines)
    samples: list[Sample] = []
    stop = asyncio.Event()
    busy.start()
    try:
        load = asyncio.create_task(gen.closed_loop(users, _messages, False, stop, samples))
        await asyncio.sleep(warmup_s)
        start = time.time()
        offset = start - time.monotonic()
        await asyncio.sleep(duration_s)
        end = time.time()
        stop.set()
        await load
    finally:
        await busy.stop()
        await gen.close()
    window = [s for s in samples if start <= s.start + offset and s.end + offset <= end]
    stats = Stats.of(window)
    per_engine = busy.busy(start, end)
    fractions = [e["busy_fraction"] for e in per_engine.values()]
    mean_busy = sum(fractions) / len(fractions) if fractions else float("nan")
    log.info("peak load %d users, %d engines: busy %s (mean %.1f%% vs the seed's %.0f%%), %.1f req/s, %d errors",
             users, len(engines), {j: f"{100 * e['busy_fraction']:.1f}%" for j, e in per_engine.items()},
             100 * mean_busy, 100 * SEED_GPU_UTILISATION, stats.throughput, stats.errors)
    gaps: list[float] = []
    for job in per_engine:
        times = [r[0] for r in busy.rows if r[1] == job and start <= r[0] <= end]
        gaps += [b - a for a, b in itertools.pairwise(times)]
    gaps.sort()
    return {"users": users, "duration_s": duration_s, "max_tokens": max_tokens, "max_tokens_upto": max_tokens_upto,
            "start": start, "end": end,
            "sample_gap_median_s": gaps[len(gaps) // 2] if gaps else float("nan"),
            "sample_gap_max_s": gaps[-1] if gaps else float("nan"),
            "engines": per_engine, "mean_busy_fraction": mean_busy, "seed": SEED_GPU_UTILISATION,
            "requests": stats.as_dict(), "sample_misses": busy.misses,
            "trace": [r for r in busy.rows if start - 2 <= r[0] <= end + 2]}
