"""Benchmark part 2: the scaling timeline of a load step 0 -> N users -> 0, starting from zero replicas.

Responsible for: running the step through the gateway, sampling the controller every 0.5 s (`ControlSampler`),
and splitting each replica's time to READY into decision (load start -> the controller's sbatch, from its log),
Slurm queue (sbatch -> job start, from Slurm's submit/start times) and engine start (job start -> the agent's
READY). Not responsible for: the bed's lifecycle or plotting.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from bench.bedprobe import BedProbe
from bench.loadgen import LoadGenerator, Messages, Sample, Stats
from bench.samplers import ControlSampler

log = logging.getLogger("bench.scaling")
_SUBMITTED = re.compile(r"model=(\S+) submitted job (\d+)")
_DECISION = re.compile(r"-> (submit|cancel|drain)")


def _messages(i: int) -> Messages:
    return [{"role": "user", "content": f"Request {i}: explain what a Slurm partition is."}]


async def run(probe: BedProbe, users: int, max_tokens: int, hold_after_ready_s: float, up_timeout_s: float,
              down_timeout_s: float) -> dict[str, object]:
    offset = time.time() - time.monotonic()
    samples: list[Sample] = []
    offered = 0
    sampler = ControlSampler(probe, lambda: offered, samples, offset)
    gen = LoadGenerator(probe.gateway, probe.model, max_tokens=max_tokens)
    stop = asyncio.Event()
    sampler.start()
    began = time.time()
    try:
        await asyncio.sleep(3.0)  # a flat start on the plot
        load_start = time.time()
        offered = users
        log.info("load step: %d users through the gateway, from %d replicas", users,
                 (await probe.model_status()).ready)
        load = asyncio.create_task(gen.closed_loop(users, _messages, False, stop, samples))
        try:
            await probe.wait_replicas(2, up_timeout_s, idle_others=False)
            second_ready = time.time()
            log.info("2 replicas READY %.1fs after the load step; holding the load %.0fs more",
                     second_ready - load_start, hold_after_ready_s)
            await asyncio.sleep(hold_after_ready_s)
        finally:
            stop.set()
            offered = 0
            await load
        load_stop = time.time()
        log.info("load stopped after %.0fs (%d requests); waiting for the replicas to go", load_stop - load_start,
                 len(samples))
        gone_after = await probe.wait_no_jobs(down_timeout_s)
        await asyncio.sleep(3.0)
    finally:
        await sampler.stop()
        await gen.close()

    events = probe.controller_log(since=began - 1)
    submits = [(e.at, m.group(2)) for e in events if (m := _SUBMITTED.search(e.message)) and m.group(1) == probe.model]
    decisions = [{"t": e.at, "message": e.message} for e in events if _DECISION.search(e.message)]
    replicas = []
    for at, job_id in submits:
        seen = sampler.jobs.get(job_id)
        start = seen.start_time if seen else 0.0
        ready = seen.ready_at if seen else 0.0
        submit = seen.submit_time if seen else 0.0
        replicas.append({
            "job_id": job_id, "decision_s": at - load_start, "sbatch_at": at - load_start,
            "slurm_submit_at": (submit - load_start) if submit else None,
            # Both of Slurm's own times, whole seconds: the sbatch log line may fall either side of them.
            "queue_s": max(0.0, start - submit) if start and submit else None,
            "engine_start_s": (ready - max(start, at)) if start and ready else None,
            "ready_s": (ready - load_start) if ready else None,
            "states": seen.states if seen else [],
            "gone_s": (seen.gone_at - load_start) if seen and seen.gone_at else None,
        })
    readies = sorted(r["ready_s"] for r in replicas if r["ready_s"] is not None)
    first_ok = min((s.end for s in samples if s.ok), default=0.0) + offset
    return {
        "users": users, "max_tokens": max_tokens, "t0": began, "load_start": load_start, "load_stop": load_stop,
        "scale_to_zero_s": gone_after,
        "first_ready_s": readies[0] if readies else None,
        "second_ready_s": readies[1] if len(readies) > 1 else None,
        "first_answer_s": first_ok - load_start if first_ok > offset else None,
        "replicas": replicas, "decisions": decisions, "timeline": sampler.rows,
        "requests": Stats.of(samples).as_dict(),
    }
