"""The benchmarks' HTTP load generator: OpenAI chat requests against one base URL, timed per request.

Responsible for: sending bursts (N requests at once, the seed paper's "N concurrent requests") and closed-loop
load (N users, each sending its next request when the last one ends) with aiohttp, one pooled keep-alive
connection per user; timing each request's end-to-end latency and, for streaming requests, its time to the
first SSE event (vLLM sends its first chunk with the first generated token). Not responsible for: where the
URL points (gateway or engine), or summarising beyond `Stats`.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import aiohttp

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Target:
    """Where requests go: an OpenAI base URL ending in /v1, and its key."""

    label: str
    base_url: str
    api_key: str


@dataclass
class Sample:
    start: float  # time.monotonic()
    end: float
    status: int  # HTTP status, 0 for a connection failure
    ttft: float = math.nan  # streaming only
    user: int = 0
    error: str = ""  # the exception's class for a connection failure, e.g. ServerDisconnectedError

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def ok(self) -> bool:
        return self.status == 200


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); NaN for no values."""
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class Stats:
    """Summary of a set of samples; throughput counts successful requests over the span they took."""

    requests: int
    errors: int
    mean: float
    p50: float
    p99: float
    ttft_mean: float
    ttft_p50: float
    ttft_p99: float
    throughput: float
    span: float
    error_kinds: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, samples: Sequence[Sample]) -> Stats:
        return cls.pooled([samples])

    @classmethod
    def pooled(cls, runs: Sequence[Sequence[Sample]]) -> Stats:
        """Several runs (bursts) as one: latencies pooled, throughput over the sum of their spans."""
        samples = [s for run in runs for s in run]
        ok = [s for s in samples if s.ok]
        lat = [s.latency for s in ok]
        ttft = [s.ttft for s in ok if not math.isnan(s.ttft)]
        span = sum(max(s.end for s in run) - min(s.start for s in run) for run in runs if run)
        kinds: dict[str, int] = {}
        for s in samples:
            if not s.ok:
                kind = str(s.status) if s.status else s.error or "connection"
                kinds[kind] = kinds.get(kind, 0) + 1
        return cls(requests=len(samples), errors=len(samples) - len(ok),
                   mean=sum(lat) / len(lat) if lat else math.nan, p50=percentile(lat, 0.5),
                   p99=percentile(lat, 0.99), ttft_mean=sum(ttft) / len(ttft) if ttft else math.nan,
                   ttft_p50=percentile(ttft, 0.5), ttft_p99=percentile(ttft, 0.99),
                   throughput=len(ok) / span if span > 0 else 0.0, span=span, error_kinds=kinds)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class LoadGenerator:
    """Sends chat requests for one model to one Target; `close()` when done."""

    def __init__(self, target: Target, model: str, max_tokens: int = 16, timeout_s: float = 600.0,
                 max_tokens_upto: int = 0) -> None:
        self.target = target
        self._model = model
        self._max_tokens = max_tokens
        # With max_tokens_upto, each request asks for a length drawn from [max_tokens, max_tokens_upto], so
        # closed-loop users do not finish in lockstep batches (a fixed length makes them move in waves).
        self._upto = max_tokens_upto
        self._rng = random.Random(0)
        self._url = target.base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Authorization": f"Bearer {target.api_key}", "Content-Type": "application/json"}
        # limit=0: as many connections as users; every user keeps its own alive between requests. Idle ones are
        # dropped after 2 s, before vLLM's server (uvicorn, 5 s) closes them: reusing a connection the server is
        # closing fails with ServerDisconnectedError, a client artefact rather than an engine failure.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0),
                                              timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def close(self) -> None:
        await self._session.close()

    def body(self, messages: Messages, stream: bool) -> bytes:
        tokens = self._rng.randint(self._max_tokens, self._upto) if self._upto > self._max_tokens \
            else self._max_tokens
        return json.dumps({"model": self._model, "messages": messages, "max_tokens": tokens,
                           "temperature": 0, "ignore_eos": True, "stream": stream}).encode()

    async def one(self, body: bytes, stream: bool, user: int = 0) -> Sample:
        start = time.monotonic()
        ttft = math.nan
        try:
            async with self._session.post(self._url, data=body, headers=self._headers) as response:
                if stream and response.status == 200:
                    async for line in response.content:
                        if math.isnan(ttft) and line.startswith(b"data:"):
                            ttft = time.monotonic() - start
                else:
                    await response.read()
                return Sample(start, time.monotonic(), response.status, ttft, user)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Sample(start, time.monotonic(), 0, ttft, user, type(exc).__name__)

    async def burst(self, n: int, messages: Callable[[int], Messages], stream: bool) -> list[Sample]:
        """n requests sent at once; returns when the last one has ended."""
        bodies = [self.body(messages(i), stream) for i in range(n)]
        return list(await asyncio.gather(*(self.one(b, stream, i) for i, b in enumerate(bodies))))

    async def through(self, bodies: Sequence[bytes], users: int, stream: bool) -> list[Sample]:
        """A fixed list of requests worked through by `users` users, each taking the next when it is free."""
        queue = list(reversed(bodies))
        out: list[Sample] = []

        async def user(u: int) -> None:
            while queue:
                out.append(await self.one(queue.pop(), stream, u))

        await asyncio.gather(*(user(u) for u in range(users)))
        return out

    async def closed_loop(self, users: int, messages: Callable[[int], Messages], stream: bool,
                          stop: asyncio.Event, into: list[Sample]) -> None:
        """`users` users, each sending its next request as soon as its last one ended, until `stop` is set;
        samples are appended to `into` as they complete (so a sampler can read them live)."""
        async def user(u: int) -> None:
            k = 0
            while not stop.is_set():
                sample = await self.one(self.body(messages(u * 100003 + k), stream), stream, u)
                into.append(sample)
                k += 1
                if not sample.ok:
                    await asyncio.sleep(0.2)  # a refused request is not retried in a tight loop

        await asyncio.gather(*(user(u) for u in range(users)))
