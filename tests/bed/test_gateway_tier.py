"""The gateway tier on the real bed: `slinfer-gateway --workers 2` beside the controller, real vLLM engines of
the controller's own Slurm jobs, the official `openai` client (keep-alive connections). In order: a scale from
zero through the separate gateway (and how long it takes the gateway to see a replica after its READY); 32-way
load that scales to two replicas, the controller killed with SIGKILL and started again, then the workers
restarted one by one (SIGHUP), all without a failed request; then the load stops and a scale-down works."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import openai
import pytest

from slinfer.dev import devcluster
from tests.fakes.slurmbed import SlurmBed, wait_until

pytestmark = pytest.mark.bed
MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "Tell me about Slurm and GPUs."}]
# The tier's port on the bed: clear of the bed's own (port_base + 17, 18, 80, 90, 1000-1999).
TIER_OFFSET = 82


def _tier_url(bed: SlurmBed) -> str:
    return f"http://127.0.0.1:{bed.bed.port_base + TIER_OFFSET}"


# The tier's own endpoints are down while a test restarts it or its controller: not yet, not a failure.
_wait = functools.partial(wait_until, tolerating=(OSError,))


def _get(url: str) -> dict[str, object]:
    key = devcluster.DEV_API_KEY
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)  # type: ignore[no-any-return]


def _ready(base: str) -> int:
    models = _get(f"{base}/v1/models")["data"]
    return int(next(m for m in models if m["id"] == MODEL)["ready_replicas"])  # type: ignore[index, call-overload]


@dataclass
class Load:
    """Closed-loop chat requests through the tier from a background thread, on keep-alive connections."""

    url: str
    concurrency: int
    key: str = devcluster.DEV_API_KEY
    max_tokens: int = 32
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        return self

    async def _run(self) -> None:
        client = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.key, timeout=240, max_retries=0)

        async def worker() -> None:
            while not self._stop.is_set():
                try:
                    await client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                         max_tokens=self.max_tokens)
                    outcome = "ok"
                except openai.APIStatusError as exc:
                    outcome = f"http {exc.status_code}"
                    self.errors.append(f"{exc.status_code}: {exc.message}")
                except openai.APIConnectionError as exc:
                    outcome = "connection"
                    self.errors.append(f"connection: {exc!r}")
                self.outcomes[outcome] += 1

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        await client.close()

    def stop(self) -> Counter[str]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=300)
        return self.outcomes


@pytest.fixture(scope="module")
def tier(slurm_bed: SlurmBed) -> Iterator[SlurmBed]:
    slurm_bed.cleanup_jobs()
    slurm_bed.run("scancel", "--name", f"slinfer-{MODEL}", check=False)
    _wait("no controller job", lambda: not slurm_bed.controller_jobs(), 120)
    devcluster.start_gateway(slurm_bed.bed, slurm_bed.bed.port_base + TIER_OFFSET, workers=2)
    try:
        yield slurm_bed
    finally:
        devcluster.stop_daemon(slurm_bed.bed, "gateway", grace=60)
        slurm_bed.retire_models(MODEL)


def test_scale_from_zero_through_a_separate_gateway(tier: SlurmBed) -> None:
    url = _tier_url(tier)
    health = _get(f"{url}/healthz")
    assert health["controller"] == "connected", health
    assert _ready(url) == 0 and not tier.controller_jobs()
    seen: dict[str, float] = {}
    stop = threading.Event()

    def watch() -> None:  # when the controller, then the tier, first lists a READY replica
        while not stop.is_set():
            for name, base in (("controller", f"http://127.0.0.1:{tier.bed.builtin_gateway_port}"), ("tier", url)):
                if name not in seen:
                    try:
                        if _ready(base) >= 1:
                            seen[name] = time.monotonic()
                    except OSError:
                        pass
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=devcluster.DEV_API_KEY, timeout=300, max_retries=0)
    began = time.monotonic()
    try:
        answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    finally:
        time.sleep(1.0)
        stop.set()
        watcher.join()
    assert answer.choices[0].message.content is not None
    assert len(tier.controller_jobs()) == 1, "the tier's queued request made the controller submit one job"
    lag = seen["tier"] - seen["controller"]
    print(f"\nscale from zero through slinfer-gateway: {time.monotonic() - began:.1f}s; the tier listed the "
          f"replica {lag * 1000:.0f} ms after the controller did (polled every 20 ms)")
    assert lag < 1.0


def test_controller_kill_and_rolling_worker_restart_under_load_fail_nothing_then_scale_down(tier: SlurmBed) -> None:
    url = _tier_url(tier)
    load = Load(url, concurrency=32).start()
    try:
        waited = _wait("a second READY replica", lambda: _ready(url) == 2, 400)
        print(f"\n32-way load through 2 workers: second replica READY after {waited:.1f}s")
        time.sleep(3)
        before_kill = Counter(load.outcomes)
        os.kill(devcluster.daemon_pid(tier.bed, "controller"), signal.SIGKILL)
        killed = time.monotonic()
        _wait("the tier saying the controller is away",
              lambda: _get(f"{url}/healthz")["controller"] == "unreachable", 10, 0.1)
        time.sleep(3)
        tier.bed.pidfile("controller").unlink(missing_ok=True)
        devcluster.start_controller(tier.bed)
        back = _wait("the tier connected again", lambda: _get(f"{url}/healthz")["controller"] == "connected",
                     90)
        print(f"controller down {time.monotonic() - killed - back:.1f}s, tier reconnected {back:.1f}s after "
              f"its start; served meanwhile: {load.outcomes['ok'] - before_kill['ok']}")
        time.sleep(5)
        after_restart = Counter(load.outcomes)
        pid = devcluster.daemon_pid(tier.bed, "gateway")
        os.kill(pid, signal.SIGHUP)
        log = tier.bed.logs / "gateway.out"
        _wait("both workers restarted", lambda: "gateway worker 1 restarted" in log.read_text(), 180)
        time.sleep(3)
    finally:
        outcomes = load.stop()
    rolled = outcomes - after_restart
    print(f"controller kill -9 and restart: {dict(after_restart)}; rolling restart of 2 workers: {dict(rolled)}; "
          f"errors {Counter(load.errors).most_common(3)}")
    assert set(outcomes) == {"ok"}, f"failed requests: {dict(outcomes)} {load.errors[:5]}"
    assert after_restart["ok"] > before_kill["ok"] and rolled["ok"] > 0
    # Scaling resumed after the restart: without load the controller drains and cancels the replicas (their
    # requests through the tier counted), down to the catalog's min of 0.
    jobs = set(tier.controller_jobs())
    assert len(jobs) == 2
    waited = _wait("a scale-down", lambda: len(tier.controller_jobs()) < 2, 240)
    print(f"scale-down after the load stopped: {waited:.1f}s")
    assert all(tier.state(job) in {"CANCELLED", ""} for job in jobs - set(tier.controller_jobs()))
