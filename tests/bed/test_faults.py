"""Faults on the real bed, each reporting requests sent / succeeded / failed: Slurm's daemons restarted under
load, the controller killed with SIGKILL under load, and a serving job cancelled or timed out mid-stream, where
every stream either completes or ends with an error event, never silently."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from slinfer import devcluster
from tests.slurmbed import SlurmBed, engine_pids, wait_no_engine

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "Write a long story about a cluster."}]
READY_TIMEOUT = 300


def _admin(bed: SlurmBed, *args: str) -> None:
    subprocess.run([f"{sys.prefix}/bin/slinfer", *args], env=bed.env(), check=True, capture_output=True,
                   timeout=30)


class DirectLoad:
    """Closed-loop chat requests straight to one engine from a few threads; counts every outcome."""

    def __init__(self, base_url: str, api_key: str, workers: int = 4) -> None:
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=60, max_retries=0)
        self.outcomes: Counter[str] = Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(workers)]

    def _loop(self) -> None:
        deadline = time.monotonic() + 300
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16)
                self.outcomes["ok"] += 1
            except openai.APIError as exc:
                self.outcomes[type(exc).__name__] += 1
                time.sleep(0.2)

    def __enter__(self) -> DirectLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)


def _stream(bed: SlurmBed, first_chunk: threading.Event | None = None, timeout: float = 120) -> str:
    """One long stream through the gateway: 'complete' (finish_reason length), 'cut: ...' (an error after the
    first chunk, or another finish_reason), 'refused: ...' (an error before it) or 'SILENTLY TRUNCATED' (ended
    without finish_reason or error)."""
    env = bed.bed.env()
    client = openai.OpenAI(base_url=env["SLINFER_GATEWAY_URL"], api_key=env["SLINFER_API_KEY"], timeout=timeout,
                           max_retries=0)
    finish, began = None, False
    try:
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=460, stream=True,
                                                extra_body={"ignore_eos": True})
        for chunk in stream:
            began = True
            if first_chunk is not None:
                first_chunk.set()
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
    except openai.APIError as exc:
        return f"{'cut' if began else 'refused'}: {type(exc).__name__}"
    if finish == "length":  # ignore_eos: a stream that was not cut runs to max_tokens
        return "complete"
    # An engine that aborts its requests as it stops says so in finish_reason: visible, not silent.
    return f"cut: finish_reason={finish}" if finish else "SILENTLY TRUNCATED"


@pytest.fixture(scope="module")
def bed(slurm_bed: SlurmBed) -> Iterator[SlurmBed]:
    slurm_bed.cleanup_jobs()
    # The autoscaler stays out of the way: these tests bring their own engines.
    _admin(slurm_bed, "scale", MODEL, "0")
    yield slurm_bed
    _admin(slurm_bed, "scale", MODEL, "auto")
    slurm_bed.cleanup_jobs()


def _serving_job(bed: SlurmBed, *args: str) -> str:
    job = bed.sbatch("--inference=tiny", "--gres=gpu:1", *args,
                     script=f"slinfer wait-ready --timeout {READY_TIMEOUT} && echo READY && sleep 900")
    bed.wait_output(job, r"READY", READY_TIMEOUT)
    return job


@pytest.mark.disruptive
def test_slurmctld_and_slurmd_restarted_mid_run_leave_the_engine_serving(bed: SlurmBed) -> None:
    job = _serving_job(bed)
    env = bed.env_file(job)
    with DirectLoad(env["OPENAI_BASE_URL"], env["OPENAI_API_KEY"]) as load:
        time.sleep(3)
        devcluster.stop_daemon(bed.bed, "slurmctld")
        time.sleep(2)
        devcluster.start_slurmctld(bed.bed)
        assert bed.state(job) == "RUNNING"
        devcluster.stop_daemon(bed.bed, "slurmd")
        time.sleep(2)
        devcluster.start_slurmd(bed.bed)
        time.sleep(3)
        assert bed.state(job) == "RUNNING"
    print(f"\nSlurm daemons restarted under load: {dict(load.outcomes)}")
    assert load.outcomes["ok"] > 20 and set(load.outcomes) == {"ok"}
    # The job's end still runs the epilog through the restarted slurmd, and the engine goes at once.
    cancelled = time.monotonic()
    bed.run("scancel", job)
    print(f"engine gone {wait_no_engine(job, None, 60):.1f}s after scancel")
    # After restarting both of its daemons Slurm sometimes keeps the finished job COMPLETING for minutes (seen
    # on 22.05.8 whatever slinfer does: the epilog had succeeded); slinfer's part is that the engine is gone
    # and the node is not drained.
    state = bed.wait_node_idle(timeout=90)
    print(f"node {state} {time.monotonic() - cancelled:.1f}s after scancel (job {bed.state(job)})")
    assert "drain" not in state and "down" not in state
    assert bed.state(job) == "CANCELLED"


def _cut_streams(bed: SlurmBed, cut: object, streams: int = 6) -> Counter[str]:
    with ThreadPoolExecutor(streams) as pool:
        started = [threading.Event() for _ in range(streams)]
        futures = [pool.submit(_stream, bed, event) for event in started]
        for event in started:
            assert event.wait(60), "a stream never began"
        cut()  # type: ignore[operator]
        return Counter(f.result(timeout=180) for f in futures)


def test_scancel_mid_stream_ends_each_stream_with_an_error_event(bed: SlurmBed) -> None:
    job = _serving_job(bed, "--inference-pool")
    _wait_routable(bed)
    # Forty-eight streams share the engine, so none can run to its end in the seconds the cut takes.
    outcomes = _cut_streams(bed, lambda: bed.run("scancel", job), streams=48)
    print(f"\nscancel mid-stream: {dict(outcomes)}")
    assert outcomes["SILENTLY TRUNCATED"] == 0
    # Whether streams are still running when the epilog stops the engine depends on timing: on a quiet machine
    # all 48 had finished (CI); where they had not, each cut one ended with an error event. None may end silently.
    wait_no_engine(job, None, 60)


@pytest.mark.disruptive  # Slurm sometimes keeps a job it timed out COMPLETING for minutes (seen: ~10 min)
def test_time_limit_mid_stream_ends_each_stream_with_an_error_event(bed: SlurmBed) -> None:
    job = _serving_job(bed, "--inference-pool", "--time=1")
    _wait_routable(bed)
    started = time.monotonic()
    outcomes: Counter[str] = Counter()

    def worker(offset: float) -> None:
        # Staggered back-to-back streams, so that some are always mid-way when Slurm's time limit (checked every
        # ~30 s) ends the job and its epilog stops the engine; later ones find no engine and are refused.
        time.sleep(offset)
        while engine_pids(job) and time.monotonic() - started < 180:
            outcomes[_stream(bed, timeout=20)] += 1

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(worker, [0.0, 0.7, 1.4, 2.1]))
    print(f"\ntime limit mid-stream: {dict(outcomes)}, job {bed.state(job)}")
    assert bed.wait_state(job, {"TIMEOUT"}, 60) == "TIMEOUT"
    assert outcomes["SILENTLY TRUNCATED"] == 0
    assert outcomes["complete"] > 0
    # Whether a stream is mid-way at the moment the epilog stops the engine depends on Slurm's timing (the
    # scancel test above forces that case); none may end silently, whichever way it went.
    wait_no_engine(job, None, 60)


def _wait_routable(bed: SlurmBed) -> None:
    env = bed.bed.env()
    client = openai.OpenAI(base_url=env["SLINFER_GATEWAY_URL"], api_key=env["SLINFER_API_KEY"], max_retries=0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        models = client.models.list().model_dump()["data"]
        if any(m["id"] == MODEL and m.get("ready_replicas", 0) >= 1 for m in models):
            return
        time.sleep(0.5)
    raise AssertionError("the gateway never saw the pool engine READY")
