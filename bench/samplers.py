"""Background samplers of the bed's state while load runs: the controller's view, and the engines' busy state.

`ControlSampler` reads, every `interval` (0.5 s), the gateway's /metrics (queued and in-flight requests) and
the controller's Admin status (replicas by state, Slurm jobs with their submit/start times, engines' READY
times), plus the load generator's own samples (offered users, completions, rolling p99). `BusySampler` reads
every engine's `vllm:num_requests_running` and `..._waiting` every 0.1 s. Neither decides or summarises beyond
the raw rows; the benchmark phases do.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp
import grpc

from bench.bedprobe import BedProbe, Engine, metric_sum
from bench.loadgen import Sample, percentile
from slinfer.slurm.states import JobState

# The rolling window for the timeline's p99: long enough to hold a few hundred requests on the bed.
P99_WINDOW_S = 5.0


class _Background:
    """A sampler's loop as a task: `start()` runs `_run()` in the background, `stop()` cancels it."""

    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        raise NotImplementedError


@dataclass
class JobSeen:
    """What the Admin status said of one controller job, first and latest."""

    job_id: str
    submit_time: float = 0.0
    start_time: float = 0.0
    ready_at: float = 0.0
    first_seen: float = 0.0
    gone_at: float = 0.0
    states: list[str] = field(default_factory=list)


class ControlSampler(_Background):
    """Samples the controller and gateway every `interval`; `rows` and `jobs` fill as it runs."""

    def __init__(self, probe: BedProbe, users: Callable[[], int], samples: Sequence[Sample],
                 clock_offset: float, interval: float = 0.5) -> None:
        self._probe = probe
        self._users = users
        self._samples = samples
        self._offset = clock_offset  # time.time() - time.monotonic(): load samples are monotonic
        self._interval = interval
        self.rows: list[dict[str, float]] = []
        self.jobs: dict[str, JobSeen] = {}

    async def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            try:
                await self._tick()
            except (aiohttp.ClientError, grpc.aio.AioRpcError, OSError, TimeoutError):
                pass  # a missed sample shows as a gap; the controller may be busy
            next_at += self._interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def _tick(self) -> None:
        now_m = time.monotonic()
        metrics, reply = await asyncio.gather(self._probe.gateway_metrics(), self._probe.status())
        now = now_m + self._offset
        model = self._probe.model
        m = next(x for x in reply.models if x.name == model)
        pending = sum(1 for j in reply.jobs if j.model == model and JobState.parse(j.state).waiting)
        done = [s for s in self._samples if s.end >= now_m - P99_WINDOW_S]
        ok = [s for s in done if s.ok]
        self.rows.append({
            "t": now, "users": float(self._users()),
            "queued": metric_sum(metrics, "slinfer_gateway_queue_depth", model=model),
            "in_flight": metric_sum(metrics, "slinfer_gateway_in_flight", model=model),
            "pending": float(pending), "starting": float(m.starting), "ready": float(m.ready),
            "draining": float(m.draining), "desired": float(m.desired), "load": m.load,
            "p99": percentile([s.latency for s in ok], 0.99),
            "rate": len([s for s in ok if s.end >= now_m - 1.0]) / 1.0,
            "errors": float(len(done) - len(ok)),
        })
        listed = set()
        for j in reply.jobs:
            if j.model != model:
                continue
            if JobState.parse(j.state).holds_node:
                listed.add(j.job_id)
            seen = self.jobs.setdefault(j.job_id, JobSeen(j.job_id, first_seen=now))
            seen.submit_time = j.submit_time or seen.submit_time
            seen.start_time = j.start_time or seen.start_time
            if not seen.states or seen.states[-1] != j.state:
                seen.states.append(j.state)
        for r in reply.replicas:
            seen = self.jobs.get(r.job_id)
            if seen is not None and r.ready_at:
                seen.ready_at = r.ready_at
        for seen in self.jobs.values():
            if seen.job_id not in listed and not seen.gone_at:  # ended, or gone from squeue
                seen.gone_at = now


class BusySampler(_Background):
    """Samples running/waiting requests of each engine every `interval` (0.1 s); rows are
    (unix time, job id, running, waiting)."""

    def __init__(self, probe: BedProbe, engines: Sequence[Engine], interval: float = 0.1) -> None:
        self._probe = probe
        self._engines = list(engines)
        self._interval = interval
        self.rows: list[tuple[float, str, float, float]] = []
        self.misses = 0

    async def _one(self, engine: Engine) -> None:
        try:
            values = await self._probe.engine_metrics(engine)
        except (aiohttp.ClientError, OSError, TimeoutError):
            self.misses += 1
            return
        self.rows.append((time.time(), engine.job_id, metric_sum(values, "vllm:num_requests_running"),
                          metric_sum(values, "vllm:num_requests_waiting")))

    async def _run(self) -> None:
        # One loop per engine, so that an engine slow to answer /metrics does not delay the other's samples.
        await asyncio.gather(*(self._loop(e) for e in self._engines))

    async def _loop(self, engine: Engine) -> None:
        next_at = time.monotonic()
        while True:
            await self._one(engine)
            next_at += self._interval
            delay = next_at - time.monotonic()
            if delay < 0:
                next_at = time.monotonic()  # a slow scrape under load: sample as often as we can
            await asyncio.sleep(max(0.0, delay))

    def busy(self, start: float, end: float) -> dict[str, dict[str, float]]:
        """Per engine, within [start, end] (unix seconds): the share of time with >= 1 running request (each
        sample holds until the next one: scrapes come late when the engine is busiest, so counting samples
        alone would under-weigh busy spells), the plain share of samples, mean running and waiting, and the
        number of samples."""
        out: dict[str, dict[str, float]] = {}
        for e in self._engines:
            rows = [r for r in self.rows if r[1] == e.job_id and start <= r[0] <= end]
            n = len(rows)
            held = [(b[0] - a[0], a[2]) for a, b in zip(rows, [*rows[1:], (end, "", 0.0, 0.0)], strict=True)]
            span = sum(d for d, _ in held)
            out[e.job_id] = {
                "samples": float(n),
                "busy_fraction": sum(d for d, running in held if running >= 1) / span if span > 0 else float("nan"),
                "busy_sample_share": sum(1 for r in rows if r[2] >= 1) / n if n else float("nan"),
                "mean_running": sum(r[2] for r in rows) / n if n else float("nan"),
                "mean_waiting": sum(r[3] for r in rows) / n if n else float("nan"),
            }
        return out
