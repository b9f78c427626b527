"""Two tiers of capacity under Slurm's preemption (issue 29.3-29.5), on the bed's real Slurm with slurmdbd and
real vLLM engines of `tiny`: one guaranteed replica (QOS normal) and one burst replica (QOS scavenger); a `high`
batch job of another user takes the burst replica's GPUs. The module turns the bed's `tiny` into a two-tier
model (min_replicas 1, burst_qos scavenger) for its own time and restores it after.

Measured and printed (the note's figures): Slurm's notice (PreemptTime) to the replica out of the gateway's
routing; requests failed, split into not-started and in-flight; the batch job's wait for its GPUs.

The scavenger QOS runs the bed's PreemptMode=CANCEL (CI); SLINFER_TEST_PREEMPT_MODE=requeue runs the module
under REQUEUE by hand. An administrator's `scontrol requeue` of the burst replica runs in both.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from slinfer.dev import devcluster
from slinfer.slurm import parse
from tests.fakes.slurmbed import SlurmBed, engine_pids, wait_until

pytestmark = pytest.mark.bed
READY_TIMEOUT = 300
TINY = "tiny"
# The load of the issue: sixteen clients streaming at once, each a new stream as soon as the last ended.
STREAMS = 16
# Long enough that every stream is mid-way for a while (tiny streams ~20 tokens/s on the bed's CPU), short
# enough that the load keeps starting new requests through the preemption.
TOKENS = 48
# The scavenger QOS's GraceTime (slinfer/dev/accounting.py) and the most slurmctld adds before it acts on its
# end: the grace is checked every 30 s, and the job's kill takes KillWait (5 s) more (docs/architecture/facts.md).
GRACE_S = 30.0
MARGIN_S = 40.0
# The batch job holds its GPUs this long, then the burst capacity may come back.
BATCH_S = 20
MESSAGES = [{"role": "user", "content": "count"}]
# The scavenger QOS's PreemptMode for this module: the bed's `cancel` (what CI runs and the docs recommend), or
# `requeue` by hand (SLINFER_TEST_PREEMPT_MODE=requeue), to show that the controller serves that mode as well.
PREEMPT_MODE = os.environ.get("SLINFER_TEST_PREEMPT_MODE", "cancel").lower()
COMPLETE, CUT = "complete", "cut: engine_failed"


def _gateway(bed: SlurmBed, timeout: float) -> openai.OpenAI:
    env = bed.bed.env()
    return openai.OpenAI(base_url=env["SLINFER_GATEWAY_URL"], api_key=env["SLINFER_API_KEY"], timeout=timeout,
                         max_retries=0)


def _stream(client: openai.OpenAI) -> str:
    """One stream and how it ended: complete (finish_reason length), 'cut: CODE' (an error event after the
    first chunk), 'refused: ...' (an error before any chunk: a request that had not started failed), or a
    failure of slinfer's promise ('SILENTLY TRUNCATED', another finish_reason)."""
    finish, began = None, False
    try:
        stream = client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=TOKENS, stream=True,
                                                extra_body={"ignore_eos": True})
        for chunk in stream:
            began = True
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
    except openai.APIStatusError as exc:
        return f"refused: {exc.status_code} {exc.code}"
    except openai.APIError as exc:
        if began:
            return f"cut: {exc.code}" if exc.code else f"cut without error event: {type(exc).__name__}"
        return f"refused: {type(exc).__name__} {exc.code}"
    if finish == "length":
        return COMPLETE
    return f"ended with finish_reason={finish}" if finish else "SILENTLY TRUNCATED"


class StreamLoad:
    """STREAMS closed-loop streaming clients through the gateway; every outcome with its start time."""

    def __init__(self, bed: SlurmBed) -> None:
        self.client = _gateway(bed, 300)
        self.stop = threading.Event()
        self.log: list[tuple[float, float, str]] = []  # (began, ended, outcome)
        self.pool = ThreadPoolExecutor(STREAMS)

    def _loop(self) -> None:
        while not self.stop.is_set():
            began = time.time()
            outcome = _stream(self.client)
            self.log.append((began, time.time(), outcome))

    def __enter__(self) -> StreamLoad:
        self.futures = [self.pool.submit(self._loop) for _ in range(STREAMS)]
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for future in self.futures:
            future.result(timeout=300)
        self.pool.shutdown()

    def outcomes(self, since: float = 0.0) -> Counter[str]:
        return Counter(o for began, _, o in self.log if began >= since)


def _restart_controller(bed: SlurmBed) -> None:
    # With the tier (the bed's default), once it follows the new controller: the gateway's /v1/models until then
    # still counts the replicas the previous test retired (CI: "two READY replicas" at once, then no job).
    devcluster.restart_controller(bed.bed)


def _two_tier_catalog(bed: SlurmBed, original: str, min_replicas: int) -> None:
    """The bed's catalog with `tiny` growing in scavenger beyond min_replicas, and the controller running it."""
    tiny = 'name = "tiny"\n'
    head, _, rest = original.partition(tiny)
    assert rest.startswith("source"), "the bed's catalog no longer starts tiny as this module expects"
    block = rest.replace("min_replicas = 0\n", f'min_replicas = {min_replicas}\nburst_qos = "scavenger"\n', 1)
    assert block != rest
    offset = (bed.bed.logs / "controller.out").stat().st_size
    bed.bed.config.write_text(head + tiny + block)
    _restart_controller(bed)
    # The restarted controller checked the burst tier's QOS too: it runs the two-tier catalog.
    wait_until("the controller's start check", lambda: "tiny: slinfer/debug/normal,scavenger" in
               (bed.bed.logs / "controller.out").read_text()[offset:], 30)


@pytest.fixture(scope="module")
def two_tiers(slurm_bed: SlurmBed) -> Iterator[SlurmBed]:
    """`tiny` with one guaranteed replica in normal and its growth in scavenger, for this module."""
    config = slurm_bed.bed.config
    original = config.read_text()
    # The service's user may use the burst tier's QOS (the bed's catalog names none).
    grant = ["sacctmgr", "-i", "modify", "user", "root", "where", "account=slinfer", "set"]
    slurm_bed.run(*grant, "qos+=scavenger")
    mode = ["sacctmgr", "-i", "modify", "qos", "scavenger", "set"]
    if PREEMPT_MODE != "cancel":
        slurm_bed.run(*mode, f"PreemptMode={PREEMPT_MODE}")
    shown = slurm_bed.run("sacctmgr", "-n", "-P", "show", "qos", "scavenger", "format=PreemptMode").stdout.strip()
    assert shown == PREEMPT_MODE, f"scavenger's PreemptMode is {shown!r}, not {PREEMPT_MODE!r}"
    _two_tier_catalog(slurm_bed, original, 1)
    slurm_bed.original_catalog = original  # type: ignore[attr-defined]
    try:
        yield slurm_bed
    finally:
        config.write_text(original)
        _restart_controller(slurm_bed)
        slurm_bed.retire_models(TINY)
        slurm_bed.run(*grant, "qos-=scavenger", check=False)
        if PREEMPT_MODE != "cancel":
            slurm_bed.run(*mode, "PreemptMode=cancel", check=False)
        slurm_bed.cleanup_jobs()


def _freezer(pid: int) -> str:
    for line in open(f"/proc/{pid}/cgroup").read().splitlines():
        _, controllers, path = line.split(":", 2)
        if "freezer" in controllers.split(","):
            return path
    return ""


def _qos(bed: SlurmBed, job: str) -> str:
    return bed.run("squeue", "-h", "-j", job, "-o", "%q").stdout.strip()


def _preempt_time(bed: SlurmBed, job: str) -> float:
    out = bed.run("scontrol", "-o", "show", "job", job, check=False).stdout
    return next((j.preempt_time for j in parse.scontrol_jobs(out)), 0.0)


def _start_time(bed: SlurmBed, job: str) -> float:
    out = bed.run("scontrol", "-o", "show", "job", job, check=False).stdout
    found = parse.scontrol_jobs(out)
    return found[0].start_time if found and found[0].state != "PENDING" else 0.0


def test_preemption_under_load_costs_no_request_that_had_not_started(two_tiers: SlurmBed) -> None:
    bed = two_tiers
    log_at = (bed.bed.logs / "controller.out").stat().st_size
    bed.admin("scale", TINY, "2")
    wait_until("two READY replicas of tiny", lambda: bed.ready_replicas(TINY) >= 2, READY_TIMEOUT)
    jobs = {_qos(bed, j): j for j in bed.controller_jobs(TINY)}
    assert set(jobs) == {"normal", "scavenger"}, jobs
    guaranteed, burst = jobs["normal"], jobs["scavenger"]
    # The pool's engines live in their job's batch step (agent/preemption.py), which the notice leaves alone.
    for job in (guaranteed, burst):
        pids = engine_pids(job)
        assert pids and all(f"/job_{job}/step_batch" in _freezer(pid) for pid in pids), (
            job, {pid: _freezer(pid) for pid in pids})
    # Bob's high job needs every GPU but the guaranteed replica's: only the burst replica's can make room.
    gpus = bed.bed.gpus - 1
    with StreamLoad(bed) as load:
        wait_until("streams completing through both replicas", lambda: load.outcomes()[COMPLETE] >= STREAMS, 120)
        submitted = time.time()
        batch = bed.sbatch("--account=chem", "--qos=high", f"--gres=gpu:{gpus}", "--job-name=batch-high",
                           script=f"sleep {BATCH_S}", user="slinfer-bob")
        notice = unrouted = started = 0.0
        deadline = time.monotonic() + GRACE_S + MARGIN_S + 60
        while time.monotonic() < deadline and not (notice and unrouted and started):
            notice = notice or _preempt_time(bed, burst)
            if not unrouted and bed.ready_replicas(TINY) < 2:
                unrouted = time.time()
            started = started or _start_time(bed, batch)
            time.sleep(0.1)
        # The model keeps answering from the guaranteed replica after the burst one left.
        after = time.time()
        wait_until("streams completing after the preemption", lambda: load.outcomes(after)[COMPLETE] >= STREAMS, 120)
    outcomes = load.outcomes()
    not_started = sum(n for o, n in outcomes.items() if o.startswith("refused"))
    in_flight = sum(n for o, n in outcomes.items() if o.startswith("cut"))
    print(f"\npreemption of {burst} by {batch}: notice {notice - submitted:+.1f}s after the submit, out of routing "
          f"{unrouted - notice:+.1f}s after the notice (at most {unrouted - max(notice, submitted):.1f}s after it: "
          f"PreemptTime has whole seconds, and the notice came after the submit), batch job started "
          f"{started - submitted:.1f}s after its submit; requests {dict(outcomes)}: failed not-started "
          f"{not_started}, in-flight {in_flight}")
    assert notice, f"Slurm never gave {burst} its preemption notice"
    assert started, f"the batch job {batch} never started"
    assert unrouted, "the burst replica stayed in the gateway's routing"
    assert not_started == 0, outcomes
    # Every stream that was cut ends with the OpenAI-shaped error event; nothing else goes wrong. And none
    # was cut here: the engine outlives the notice, its streams (a few seconds) finish well within the grace.
    assert set(outcomes) <= {COMPLETE, CUT}, outcomes
    assert in_flight == 0, outcomes
    assert started - submitted <= GRACE_S + MARGIN_S, started - submitted
    assert bed.state(guaranteed) == "RUNNING"
    # The burst capacity comes back once the batch job is over (after the burst tier's backoff).
    bed.wait_state(batch, {"COMPLETED"}, BATCH_S + 60)
    wait_until("the burst replica back", lambda: bed.ready_replicas(TINY) >= 2, 60 + READY_TIMEOUT)
    back = {_qos(bed, j): j for j in bed.controller_jobs(TINY)}
    assert back.get("normal") == guaranteed and back.get("scavenger") not in (None, burst), back
    print(f"burst capacity back {time.time() - submitted:.0f}s after the batch submit")
    _cancelled_by_the_controller(bed, burst, log_at)


def _runs(bed: SlurmBed, job: str) -> list[list[str]]:
    """Each run of a job in the accounting (a requeued job has one row per run): [state, elapsed]. A job
    cancelled while pending has a row too, with its Start set to its end: 00:00:00 elapsed."""
    out = bed.run("sacct", "-j", job, "--duplicates", "-X", "-n", "-P", "-o", "State,Elapsed").stdout
    return [line.split("|") for line in out.splitlines() if line.strip()]


def _cancelled_by_the_controller(bed: SlurmBed, burst: str, log_at: int) -> None:
    """The preempted burst job was a decision of the controller, logged with its numbers, that took it out of the
    capacity (drained at the notice, or not capacity once requeued) and cancelled it; it ran once and cannot run
    again by itself (CANCELLED is final; under PreemptMode=REQUEUE Slurm would otherwise start it again after
    its BeginTime hold, two minutes on)."""
    said = (bed.bed.logs / "controller.out").read_text(errors="replace")[log_at:].splitlines()
    decided = [line for line in said if f"job {burst} (" in line and ("is preempted by Slurm" in line or
                                                                      "was requeued by Slurm" in line)]
    cancelled = [line for line in said if f"-> cancel drained job {burst} " in line or f"cancel job {burst}" in line]
    print(f"PreemptMode={PREEMPT_MODE}: the controller's decisions on {burst}:", *decided, *cancelled, sep="\n  ")
    assert decided, f"no preemption decision on {burst} in the controller's log"
    assert cancelled, f"the controller never cancelled {burst}"
    # Out of the capacity before it was cancelled: drained at the notice, or not capacity once requeued.
    assert any("-> drain it" in line or "-> not capacity" in line for line in decided), decided
    wait_until(f"{burst} final in the accounting", lambda: _runs(bed, burst)[-1][0].startswith("CANCELLED"), 30)
    runs = _runs(bed, burst)
    started = [run for run in runs if run[1] != "00:00:00"]
    print(f"{burst} in sacct --duplicates: {runs}")
    assert len(started) == 1, runs
    assert bed.state(burst) not in ("PENDING", "RUNNING"), bed.state(burst)


def test_an_admins_scancel_of_a_replica_under_load_fails_no_request_that_had_not_started(two_tiers: SlurmBed) -> None:
    """The same path without a grace: an administrator's scancel of the burst replica. Its streams are cut (with
    the error event); requests that had not started go to the guaranteed replica; the replica comes back."""
    bed = two_tiers
    bed.admin("scale", TINY, "2")
    wait_until("two READY replicas of tiny", lambda: bed.ready_replicas(TINY) >= 2, READY_TIMEOUT)
    jobs = {_qos(bed, j): j for j in bed.controller_jobs(TINY)}
    burst = jobs["scavenger"]
    with StreamLoad(bed) as load:
        wait_until("streams completing through both replicas", lambda: load.outcomes()[COMPLETE] >= STREAMS, 120)
        cancelled = time.time()
        bed.run("scancel", burst)
        unrouted = 0.0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not unrouted:
            if bed.ready_replicas(TINY) < 2:
                unrouted = time.time()
            time.sleep(0.1)
        after = time.time()
        wait_until("streams completing after the scancel", lambda: load.outcomes(after)[COMPLETE] >= STREAMS, 120)
    outcomes = load.outcomes()
    not_started = sum(n for o, n in outcomes.items() if o.startswith("refused"))
    in_flight = sum(n for o, n in outcomes.items() if o.startswith("cut"))
    print(f"\nscancel of {burst} under load: out of routing {unrouted - cancelled:+.1f}s after the scancel; requests "
          f"{dict(outcomes)}: failed not-started {not_started}, in-flight {in_flight}")
    assert unrouted, "the cancelled replica stayed in the gateway's routing"
    assert not_started == 0, outcomes
    assert set(outcomes) <= {COMPLETE, CUT}, outcomes
    wait_until("the replica replaced", lambda: bed.ready_replicas(TINY) >= 2, READY_TIMEOUT)


def test_everything_preempted_holds_requests_and_answers_them_when_capacity_returns(two_tiers: SlurmBed) -> None:
    """Both replicas in the burst tier (min_replicas 0) and both preempted: requests are held, as in a scale from
    zero, and answered once the batch job is over and the burst tier's backoff has passed, within the gateway's
    wait (the bed's queue_timeout_s, 240 s)."""
    bed = two_tiers
    # The catalog first: retired under min_replicas 1, `scale auto` would submit a guaranteed replica at once.
    _two_tier_catalog(bed, bed.original_catalog, 0)  # type: ignore[attr-defined]
    bed.retire_models(TINY)
    try:
        bed.admin("scale", TINY, "2")
        wait_until("two READY replicas of tiny", lambda: bed.ready_replicas(TINY) >= 2, READY_TIMEOUT)
        jobs = bed.controller_jobs(TINY)
        assert sorted(_qos(bed, j) for j in jobs) == ["scavenger", "scavenger"], jobs
        submitted = time.time()
        batch = bed.sbatch("--account=chem", "--qos=high", f"--gres=gpu:{bed.bed.gpus}", "--job-name=batch-all",
                           script=f"sleep {BATCH_S}", user="slinfer-bob")
        wait_until("no replica of tiny routed", lambda: bed.ready_replicas(TINY) == 0, GRACE_S + MARGIN_S)
        gone = time.time()
        client = _gateway(bed, 300)

        def ask() -> tuple[str, float]:
            began = time.time()
            try:
                client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=4)
                return "ok", time.time() - began
            except openai.APIError as exc:
                return f"failed: {type(exc).__name__} {getattr(exc, 'code', '')}", time.time() - began

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: ask(), range(4)))
        started = _start_time(bed, batch)
        print(f"\neverything preempted: replicas out of routing {gone - submitted:.1f}s after the batch submit, "
              f"batch job started {started - submitted:.1f}s after its submit; held requests {answers}")
        assert started and started - submitted <= GRACE_S + MARGIN_S, started - submitted
        assert [a for a, _ in answers] == ["ok"] * 4, answers
        # Held, not answered by an engine that was there all along.
        assert min(t for _, t in answers) > BATCH_S / 2, answers
    finally:
        bed.retire_models(TINY)
        _two_tier_catalog(bed, bed.original_catalog, 1)  # type: ignore[attr-defined]


def test_a_requeued_replica_is_not_capacity_and_is_cancelled(two_tiers: SlurmBed) -> None:
    """An administrator's `scontrol requeue` of the burst replica under load: the job is PENDING again (Slurm's
    BeginTime hold) after it ran, with no engine. The controller counts it as no capacity, cancels it (the
    decision logged with its numbers), and the job never runs again; requests that had not started fail none.
    The same job state as REQUEUE's past the grace, in any PreemptMode. Last in the module: the burst tier's
    backoff it sets would hold up the next test's burst replica (90 s in CI); the test before it ends with a
    controller restart, so its two replicas start at once."""
    bed = two_tiers
    bed.admin("scale", TINY, "2")
    wait_until("two READY replicas of tiny", lambda: bed.ready_replicas(TINY) >= 2, 60 + READY_TIMEOUT)
    burst = {_qos(bed, j): j for j in bed.controller_jobs(TINY)}["scavenger"]
    log_at = (bed.bed.logs / "controller.out").stat().st_size

    def said() -> list[str]:
        return [line for line in (bed.bed.logs / "controller.out").read_text(errors="replace")[log_at:].splitlines()
                if burst in line]

    with StreamLoad(bed) as load:
        wait_until("streams completing through both replicas", lambda: load.outcomes()[COMPLETE] >= STREAMS, 120)
        requeued = time.time()
        bed.run("scontrol", "requeue", burst)
        wait_until(f"{burst} pending again", lambda: bed.state(burst) in ("PENDING", "CANCELLED"), 30)
        wait_until("the controller's decision", lambda: any("was requeued by Slurm" in line for line in said()), 30)
        decided = time.time()
        wait_until(f"{burst} cancelled", lambda: bed.state(burst) in ("CANCELLED", ""), 30)
        after = time.time()
        wait_until("streams completing after the requeue", lambda: load.outcomes(after)[COMPLETE] >= STREAMS, 120)
    outcomes = load.outcomes()
    print(f"\nscontrol requeue of {burst} under load: the controller's decision {decided - requeued:.1f}s after it; "
          f"requests {dict(outcomes)}", *said(), sep="\n  ")
    assert sum(n for o, n in outcomes.items() if o.startswith("refused")) == 0, outcomes
    assert set(outcomes) <= {COMPLETE, CUT}, outcomes
    _cancelled_by_the_controller(bed, burst, log_at)
