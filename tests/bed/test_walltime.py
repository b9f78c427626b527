"""One stable endpoint across walltime: a pool model whose Slurm jobs have a 2-minute time limit serves steady
load through the gateway for nearly 4 minutes, the autoscaler replacing each job before its limit (at least two
handovers), with zero failed requests and never a moment (sampled every 0.5 s) without a routable READY replica.

The bed's `tiny` gets `time_limit = "00:02:00"` for this test (the controller restarted on that config, and back
after it); nothing else changes. The lead time the controller used is printed, from `slinfer status`.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator

import openai
import pytest

from slinfer.controller.autoscaler import DEFAULT_START_LATENCY_S
from slinfer.dev import devcluster
from tests.fakes.slurmbed import SlurmBed

pytestmark = pytest.mark.bed

MODEL = "tiny"
# Slurm's time limit of each of the model's jobs: two minutes (Slurm's limits are whole minutes; one would leave a
# job no life after a start), so that the load below sees at least two handovers.
TIME_LIMIT = "00:02:00"
TIME_LIMIT_S = 120
# How long the steady load runs, from its first request (which scales the model from zero): the first job is
# drained about (120 s - lead) after it started and its replacement as long after that, so the second handover
# comes at about 2 x 95 s; 225 s leaves a margin of half a job's life (300 s was a third handover CI waited for).
LOAD_S = 225.0
# How often the gateway's view of routable replicas is sampled.
SAMPLE_S = 0.5
# Closed-loop users: steady load below one replica's target (8 outstanding), so handovers, not load, add jobs.
# (Paced users, a request each 0.5 s, made the autoscaler's sampled in-flight average read 0 at times.)
WORKERS = 3
MESSAGES = [{"role": "user", "content": "Say something about walltime."}]


def _status(bed: SlurmBed) -> dict[str, object]:
    out = bed.run(sys.executable, "-m", "slinfer.cli.main", "status", "--json", timeout=30).stdout
    return dict(json.loads(out))


def _routable(bed: SlurmBed) -> int:
    """Routable replicas of MODEL as the gateway's /v1/models reports them (READY, pooled, not draining)."""
    env = bed.bed.env()
    request = urllib.request.Request(f"{env['SLINFER_GATEWAY_URL']}/models",
                                     headers={"Authorization": f"Bearer {env['SLINFER_API_KEY']}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        models = json.load(response)["data"]
    state = next(m for m in models if m["id"] == MODEL)["slinfer"]
    return int(state["replicas"]) if state["state"] == "ready" else 0


@pytest.fixture
def walltime_bed(slurm_bed: SlurmBed) -> Iterator[SlurmBed]:
    bed = slurm_bed.bed
    slurm_bed.cleanup_jobs()
    original = bed.config.read_text()
    # tiny's block is the first [[models]] table; only its time limit changes.
    head, sep, rest = original.partition('[[models]]\nname = "tiny"\n')
    assert sep, "the bed's catalog has no tiny model"
    block, nxt, tail = rest.partition("\n[[models]]")
    assert re.search(r'^time_limit = "[^"]+"$', block, re.M), block
    block = re.sub(r'^time_limit = "[^"]+"$', f'time_limit = "{TIME_LIMIT}"', block, flags=re.M)
    bed.config.write_text(head + sep + block + nxt + tail)
    devcluster.stop_daemon(bed, "controller")
    devcluster.start_controller(bed)
    slurm_bed.admin("scale", MODEL, "auto")
    # Nothing else takes the node's two cores while tiny hands over.
    slurm_bed.admin("scale", "smollm2", "0")
    try:
        yield slurm_bed
    finally:
        bed.config.write_text(original)
        devcluster.stop_daemon(bed, "controller")
        devcluster.start_controller(bed)
        slurm_bed.admin("scale", "smollm2", "auto")
        slurm_bed.cleanup_jobs()


def test_a_pool_model_serves_across_walltime_handovers_without_a_failed_request(walltime_bed: SlurmBed) -> None:
    bed = walltime_bed
    env = bed.bed.env()
    client = openai.OpenAI(base_url=env["SLINFER_GATEWAY_URL"], api_key=env["SLINFER_API_KEY"], timeout=300,
                           max_retries=0)
    outcomes: Counter[str] = Counter()
    errors: list[str] = []
    stop = threading.Event()

    def user() -> None:
        while not stop.is_set():
            try:
                reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)  # type: ignore[arg-type]
                outcomes["ok" if reply.choices and reply.usage and reply.usage.completion_tokens else "empty"] += 1
            except openai.APIError as exc:
                outcomes[f"{type(exc).__name__} {getattr(exc, 'status_code', '')}"] += 1
                errors.append(str(exc)[:200])
                time.sleep(0.2)

    log_path = bed.bed.logs / "controller.out"
    log_offset = log_path.stat().st_size
    # Scale from zero: the first request waits in the gateway's queue until the first replica is READY.
    began = time.monotonic()
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)  # type: ignore[arg-type]
    assert first.choices
    print(f"\nfirst replica READY, first answer {time.monotonic() - began:.0f}s after the first request")

    samples: list[tuple[float, int]] = []
    ready_jobs: dict[str, float] = {}  # job id -> first seen READY (s since the load began)
    leads: list[float] = []
    users = [threading.Thread(target=user, daemon=True) for _ in range(WORKERS)]
    start = time.monotonic()
    end = began + LOAD_S
    for thread in users:
        thread.start()

    def watch_jobs() -> None:
        # The admin's view, more slowly (each sample is a CLI run): which jobs were READY, and the lead time.
        while not stop.is_set():
            try:
                status = _status(bed)
            except Exception as exc:  # a slow CLI run must not end the watch; it is retried
                errors.append(f"status: {exc}"[:200])
                continue
            for r in status.get("replicas", []):  # type: ignore[union-attr]
                if r.get("model") == MODEL and r.get("state") == "READY":
                    ready_jobs.setdefault(str(r["jobId"]), time.monotonic() - start)
            for m in status.get("models", []):  # type: ignore[union-attr]
                if m.get("name") == MODEL and m.get("leadS"):
                    leads.append(float(m["leadS"]))
            stop.wait(3.0)

    watcher = threading.Thread(target=watch_jobs, daemon=True)
    watcher.start()
    try:
        while time.monotonic() < end:
            at = time.monotonic() - start
            samples.append((at, _routable(bed)))
            time.sleep(max(0.0, SAMPLE_S - (time.monotonic() - start - at)))
    finally:
        stop.set()
        for thread in [*users, watcher]:
            thread.join(timeout=120)

    # The controller's own account of each handover: "-> drain JOB: time limit in Ns (lead Ms), replacement ready".
    with open(log_path, "rb") as log:
        log.seek(log_offset)
        text = log.read().decode(errors="replace")
    handovers = re.findall(r"model=tiny .* -> drain (\d+): time limit in (-?\d+)s \(lead (\d+)s\), ([a-z ]+)", text)
    for job, left, lead, why in handovers:
        print(f"handover: job {job} drained {left}s before its time limit (lead {lead}s), {why}")
    starts = [float(x) for x in re.findall(r"model=tiny job \d+ READY ([\d.]+)s after submit", text)]
    print(f"submit-to-READY of each job: {', '.join(f'{x:.0f}s' for x in starts)}")
    gaps = [at for at, n in samples if n == 0]
    both = sum(1 for _, n in samples if n >= 2)
    print(f"{len(samples)} samples over {end - start:.0f}s from the first READY: {both} with two routable replicas, "
          f"{len(gaps)} with none"
          f"{f' (first at {gaps[0]:.1f}s)' if gaps else ''}")
    print("replicas READY at (s into the load): "
          + ", ".join(f"{job} {at:.0f}s" for job, at in sorted(ready_jobs.items(), key=lambda kv: kv[1])))
    print(f"lead time the controller used: {leads[-1] if leads else float('nan'):.0f}s "
          f"(first {leads[0] if leads else float('nan'):.0f}s); requests: {dict(outcomes)}")
    assert len(samples) >= (end - start) / SAMPLE_S * 0.8, "the sampler fell behind: the gaps it saw prove little"
    # A replacement is submitted when the replica it replaces is READY (at most two jobs per replica), so two
    # consecutive starts must fit in the time limit less the final drain: a slower machine cannot pass.
    assert not gaps, (f"no routable {MODEL} replica at {gaps[:10]} s into the load; starts {starts} s "
                      f"(two in a row must fit in {TIME_LIMIT_S} - 30 s)")
    assert outcomes["ok"] > 100 and set(outcomes) == {"ok"}, f"{dict(outcomes)}; {errors[:5]}"
    # At least two replicas replaced before their time limit, each once its replacement was READY.
    assert len([h for h in handovers if h[3] == "replacement ready"]) >= 2, handovers
    assert all(h[3] == "replacement ready" for h in handovers), handovers
    assert len(ready_jobs) >= 3, f"only {len(ready_jobs)} READY jobs in {LOAD_S:.0f}s: {ready_jobs}"
    assert leads and leads[-1] != DEFAULT_START_LATENCY_S, f"the lead was never learned from a start: {leads[-3:]}"
