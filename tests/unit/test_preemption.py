"""Two tiers of capacity (controller/preemption.py) and the autoscaler carrying them out: the guaranteed
replicas in the model's qos, growth in its burst_qos, and the burst tier's backoff after Slurm preempted one of
its jobs. The autoscaler runs against the in-memory SlurmDouble (the bed test drives real Slurm)."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from slinfer.config import ModelConfig
from slinfer.controller import autoscaler
from slinfer.controller.preemption import PREEMPT_BACKOFF, BurstTier, tiers
from tests.unit.test_autoscaler import Bed

TWO_TIERS = {"min_replicas": 1, "max_replicas": 3, "qos": "normal", "burst_qos": "scavenger"}


def test_tiers_refill_the_guaranteed_replicas_first_then_burst() -> None:
    cfg = ModelConfig(name="m", source="/m", **TWO_TIERS)  # type: ignore[arg-type]
    assert tiers(cfg, guaranteed=0, n=3) == ["normal", "scavenger", "scavenger"]
    assert tiers(cfg, guaranteed=1, n=2) == ["scavenger", "scavenger"]
    # Without a burst_qos every replica is in qos, as before.
    assert tiers(replace(cfg, burst_qos=""), guaranteed=1, n=2) == ["normal", "normal"]
    assert tiers(replace(cfg, min_replicas=2), guaranteed=0, n=2) == ["normal", "normal"]


async def test_a_pin_above_the_minimum_is_served_from_the_burst_tier() -> None:
    bed = Bed(**TWO_TIERS)
    bed.scaler.pins.set("tiny", 3)
    await bed.step()
    jobs = bed.slurm.active()
    assert [bed.slurm.qos[j] for j in jobs] == ["normal", "scavenger", "scavenger"]


async def test_a_lost_guaranteed_replica_is_replaced_in_the_guaranteed_qos() -> None:
    bed = Bed(**TWO_TIERS)
    bed.scaler.pins.set("tiny", 2)
    await bed.step()
    guaranteed, burst = bed.slurm.active()
    bed.ready(guaranteed)
    bed.ready(burst)
    await bed.step()
    bed.slurm.jobs_[guaranteed] = replace(bed.slurm.jobs_[guaranteed], state="NODE_FAIL")
    await bed.step()
    (new,) = [j for j in bed.slurm.active() if j not in (guaranteed, burst)]
    assert bed.slurm.qos[new] == "normal"


async def test_after_a_preemption_the_burst_tier_backs_off_and_logs_its_numbers(
        caplog: pytest.LogCaptureFixture) -> None:
    bed = Bed(**TWO_TIERS)
    bed.scaler.pins.set("tiny", 2)
    await bed.step()
    guaranteed, burst = bed.slurm.active()
    bed.ready(guaranteed)
    bed.ready(burst)
    await bed.step()
    bed.slurm.jobs_[burst] = replace(bed.slurm.jobs_[burst], state="PREEMPTED")
    del bed.engines["n1"][burst]
    with caplog.at_level(logging.INFO, "slinfer.controller.autoscaler"):
        await bed.step()
        assert f"job {burst} (burst tier) is preempted by Slurm (seen ended, 1 in a row)" in caplog.text
        assert "drain it, no burst submit for 60s" in caplog.text
        for _ in range(10):  # 20 s: within the backoff
            await bed.step()
    assert len(bed.slurm.submits) == 2, "resubmitted into the QOS that was just preempted"
    assert "1 burst submit(s) in scavenger deferred" in caplog.text
    assert caplog.text.count("burst submit(s) in scavenger deferred") == 1, "logged once, not every step"
    # Positive control: after the backoff the burst replica is asked for again, in the burst tier.
    for _ in range(25):
        await bed.step()
    (again,) = [j for j in bed.slurm.active() if j not in (guaranteed, burst)]
    assert bed.slurm.qos[again] == "scavenger"
    assert PREEMPT_BACKOFF.initial_s <= bed.clock.now - bed.scaler._models["tiny"].burst.last_preempted_at


async def test_a_preempted_guaranteed_replica_is_replaced_at_once() -> None:
    bed = Bed(**TWO_TIERS)
    bed.scaler.pins.set("tiny", 2)
    await bed.step()
    guaranteed, burst = bed.slurm.active()
    bed.ready(guaranteed)
    bed.ready(burst)
    await bed.step()
    bed.slurm.jobs_[guaranteed] = replace(bed.slurm.jobs_[guaranteed], state="PREEMPTED")
    del bed.engines["n1"][guaranteed]
    await bed.step()
    (new,) = [j for j in bed.slurm.active() if j not in (guaranteed, burst)]
    assert bed.slurm.qos[new] == "normal"


def test_the_backoff_doubles_per_preemption_in_a_row_and_ends_after_calm() -> None:
    from slinfer.controller.slurm import SlurmJob
    tier = BurstTier()

    def preempted(job_id: str) -> SlurmJob:
        return SlurmJob(job_id, "n", "c", "PREEMPTED", "n1", 0.0, 0.0, 0.0)

    assert tier.observe("m", [preempted("1")], 1000.0) == ["1"]
    assert tier.waiting(1000.0) == 60.0
    # The same job listed again is not a second preemption.
    assert tier.observe("m", [preempted("1")], 1001.0) == []
    assert tier.observe("m", [preempted("2")], 1100.0) == ["2"]
    assert tier.waiting(1100.0) == 120.0
    tier.observe("m", [], 1100.0 + 601.0)
    assert tier.waiting(1701.0) == 0.0 and tier.backoff.failures == 0


async def test_the_notice_drains_the_replica_at_once_and_backs_the_burst_tier_off() -> None:
    bed = Bed(**TWO_TIERS)
    bed.scaler.pins.set("tiny", 2)
    await bed.step()
    guaranteed, burst = bed.slurm.active()
    bed.ready(guaranteed)
    bed.ready(burst)
    await bed.step()
    assert {r.job_id for r in bed.registry.routable("tiny")} == {guaranteed, burst}
    # The grace begins: scontrol shows PreemptTime, the job still RUNNING and its engine still serving.
    bed.registry.get(burst).outstanding = 2  # type: ignore[union-attr]
    bed.slurm.jobs_[burst] = replace(bed.slurm.jobs_[burst], preempt_time=bed.clock.now + 1.0)
    await bed.step()
    assert [r.job_id for r in bed.registry.routable("tiny")] == [guaranteed], "still routed after the notice"
    assert bed.scaler.decisions[("tiny", "drain_preempted")] == 1
    assert bed.slurm.cancels == [], "cancelled with requests in flight"
    assert len(bed.slurm.submits) == 2, "a burst replacement while the tier backs off"
    # Its requests finish: it is cancelled, its GPUs go to the batch job before the grace ends.
    bed.registry.get(burst).outstanding = 0  # type: ignore[union-attr]
    await bed.step()
    assert bed.slurm.cancels == [burst]
    assert bed.scaler._models["tiny"].burst.waiting(bed.clock.now) > 50


async def test_the_notice_of_a_guaranteed_replica_replaces_it_in_the_guaranteed_qos() -> None:
    bed = Bed(**TWO_TIERS)
    bed.scaler.pins.set("tiny", 2)
    await bed.step()
    guaranteed, burst = bed.slurm.active()
    bed.ready(guaranteed)
    bed.ready(burst)
    await bed.step()
    bed.slurm.jobs_[guaranteed] = replace(bed.slurm.jobs_[guaranteed], preempt_time=bed.clock.now)
    await bed.step()
    (new,) = [j for j in bed.slurm.active() if j not in (guaranteed, burst)]
    assert bed.slurm.qos[new] == "normal"


def test_scontrol_preempt_time_is_parsed() -> None:
    from slinfer.slurm import parse
    line = ("JobId=7 JobName=slinfer-tiny UserId=root(0) JobState=RUNNING Reason=None SubmitTime=1800000000 "
            "StartTime=1800000010 EndTime=1800003610 PreemptTime=1800000100 BatchHost=n1 NodeList=n1")
    (job,) = parse.scontrol_jobs(line)
    assert job.preempt_time == 1800000100.0
    (unset,) = parse.scontrol_jobs(line.replace("PreemptTime=1800000100", "PreemptTime=None"))
    assert unset.preempt_time == 0.0


def test_the_beds_qos_preempt_scavenger_after_a_grace(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    from collections.abc import Sequence

    from slinfer.dev import accounting, devcluster
    config = tmp_path / "slinfer.toml"
    config.write_text('[[models]]\nname = "a"\naccount = "slinfer"\nqos = "normal"\n')
    calls: list[list[str]] = []

    def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        calls.append(list(argv))
        return subprocess.CompletedProcess(list(argv), 0, "done\n", "")

    accounting.create_order(run, "c", config, service_user="svc")
    modified = [c[2:] for c in calls if c[2] == "modify"]
    assert ["modify", "qos", "scavenger", "set", "GraceTime=30", "PreemptMode=cancel"] in modified
    assert ["modify", "qos", "high", "set", "Preempt=scavenger"] in modified
    conf = devcluster._slurm_conf(devcluster.Bed(tmp_path, 29900, slurm=""), "host")
    assert "PreemptType=preempt/qos\nPreemptMode=CANCEL\n" in conf


@pytest.mark.parametrize("qos_known", [True, False])
async def test_a_restarted_controller_restores_adopted_jobs_tiers_from_their_qos(
        qos_known: bool, caplog: pytest.LogCaptureFixture) -> None:
    bed = Bed(**TWO_TIERS)
    bed.scaler.pins.set("tiny", 2)
    await bed.step()
    guaranteed, burst = bed.slurm.active()
    bed.ready(guaranteed)
    bed.ready(burst)
    await bed.step()
    # The controller restarts: the new one adopts both jobs; Slurm's record says each one's QOS (without it,
    # qos_known=False, the control).
    if qos_known:
        for job_id in (guaranteed, burst):
            bed.slurm.jobs_[job_id] = replace(bed.slurm.jobs_[job_id], qos=bed.slurm.qos[job_id])
    bed.scaler = bed.new_scaler(settle_s=0.0)
    bed.scaler.pins.set("tiny", 2)
    with caplog.at_level(logging.INFO, "slinfer.controller.autoscaler"):
        await bed.step()
        await bed.step()
    assert len(bed.slurm.submits) == 2, "the adopted jobs were not adopted"
    # The guaranteed replica's node fails: its replacement goes to the guaranteed QOS only where the adopted
    # burst job is known to be burst (else it counts toward min_replicas and the replacement is burst).
    bed.slurm.jobs_[guaranteed] = replace(bed.slurm.jobs_[guaranteed], state="NODE_FAIL")
    await bed.step()
    (new,) = [j for j in bed.slurm.active() if j not in (guaranteed, burst)]
    assert bed.slurm.qos[new] == ("normal" if qos_known else "scavenger")
    restored = f"job {burst} is in the burst tier (its QOS is scavenger)"
    assert (restored in caplog.text) is qos_known
    assert (f"job {guaranteed} is in the burst tier" in caplog.text) is False


def test_scontrol_qos_is_parsed() -> None:
    from slinfer.slurm import parse
    line = ("JobId=7 JobName=slinfer-tiny UserId=root(0) JobState=RUNNING Reason=None SubmitTime=1800000000 "
            "QOS=scavenger StartTime=1800000010 EndTime=1800003610 BatchHost=n1 NodeList=n1")
    (job,) = parse.scontrol_jobs(line)
    assert job.qos == "scavenger"
    (unset,) = parse.scontrol_jobs(line.replace("QOS=scavenger", "QOS=(null)"))
    assert unset.qos == ""


@pytest.mark.parametrize("tier", ["guaranteed", "burst"])
async def test_a_job_requeued_without_a_notice_seen_is_not_capacity_and_is_cancelled(
        tier: str, caplog: pytest.LogCaptureFixture) -> None:
    """PreemptMode=REQUEUE (or `scontrol requeue`) without the grace's notice seen: the job waits again, with
    Slurm's hold after a requeue (reason BeginTime, about 2 minutes) before its queue. Before, it counted as
    pending capacity all that time and a lost guaranteed replica was not replaced."""
    bed = Bed(**TWO_TIERS)
    bed.scaler.pins.set("tiny", 2)
    await bed.step()
    guaranteed, burst = bed.slurm.active()
    bed.ready(guaranteed)
    bed.ready(burst)
    await bed.step()
    job = guaranteed if tier == "guaranteed" else burst
    bed.slurm.jobs_[job] = replace(bed.slurm.jobs_[job], state="PENDING", node="", start_time=0, end_time=0,
                                   reason="BeginTime")
    del bed.engines["n1"][job]
    with caplog.at_level(logging.INFO, "slinfer.controller.autoscaler"):
        await bed.step()
        await bed.step()
    assert f"job {job} ({tier} tier) was requeued by Slurm (pending again, reason BeginTime" in caplog.text
    assert bed.slurm.cancels == [job]
    st = bed.scaler._models["tiny"].status
    assert st.pending == (1 if tier == "guaranteed" else 0), "the requeued job counted as pending capacity"
    new = [j for j in bed.slurm.active() if j not in (guaranteed, burst)]
    # The guaranteed tier is refilled at once, the burst tier after its backoff, as after any preemption.
    assert [bed.slurm.qos[j] for j in new] == (["normal"] if tier == "guaranteed" else [])


async def test_a_waiting_job_that_never_ran_is_capacity_and_a_fresh_controller_knows_a_requeued_one() -> None:
    bed = Bed(**TWO_TIERS)
    bed.scaler.pins.set("tiny", 2)
    await bed.step()
    guaranteed, burst = bed.slurm.active()
    bed.ready(guaranteed)
    for _ in range(5):  # the burst job waits for resources and never ran: capacity on its way (control)
        await bed.step()
    assert bed.slurm.cancels == [] and len(bed.slurm.submits) == 2
    # A restarted controller meets a job already requeued (it never saw it run): Slurm's reason says so.
    bed.slurm.jobs_[burst] = replace(bed.slurm.jobs_[burst], reason="BeginTime")
    bed.scaler = bed.new_scaler(settle_s=0.0)
    bed.scaler.pins.set("tiny", 2)
    await bed.step()
    await bed.step()
    assert bed.slurm.cancels == [burst]


def test_a_restarted_controller_does_not_count_the_old_notice_of_an_ended_job() -> None:
    # squeue's listing carries PreemptTime (issue 35.7): after a restart it shows jobs that ended under a notice
    # the previous controller already handled. Counting them would back the burst tier off again (the bed's
    # everything-preempted test waited 240 s instead of 60 s).
    from slinfer.slurm.jobs import Job
    ended = Job(job_id="7", name="slinfer-tiny", comment="c", state="CANCELLED", node="n1", submit_time=1.0,
                start_time=2.0, end_time=3.0, preempt_time=2.5)
    restarted = BurstTier()
    assert restarted.observe("tiny", [ended], now=100.0) == [] and not restarted.backoff.failures
    # Controls: a job this controller saw on a node that ended under a notice (a grace shorter than a step)
    # counts; so does a job under notice still running, seen for the first time; so does a PREEMPTED end.
    live = BurstTier()
    assert live.observe("tiny", [replace(ended, state="RUNNING", preempt_time=0.0)], now=10.0) == []
    assert live.observe("tiny", [ended], now=12.0) == ["7"] and live.backoff.failures == 1
    assert BurstTier().observe("tiny", [replace(ended, state="RUNNING")], now=5.0) == ["7"]
    assert BurstTier().observe("tiny", [replace(ended, state="PREEMPTED")], now=5.0) == ["7"]


async def test_between_steps_the_probe_asks_about_the_burst_tier_alone_and_drains_a_replica_under_notice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    bed = Bed(**{**TWO_TIERS, "min_replicas": 1, "max_replicas": 4})
    bed.scaler.pins.set("tiny", 3)
    await bed.step()
    guaranteed, burst1, burst2 = bed.slurm.active()
    for job in (guaranteed, burst1, burst2):
        bed.ready(job)
    await bed.step()
    # Control: no notice, nothing drained; only the burst tier's running jobs are asked about.
    assert await bed.scaler.probe_preemptions() == []
    assert bed.slurm.ids_asked == [[burst1, burst2]]
    assert not any(r.draining for r in bed.registry.replicas())
    # Slurm's notice at the grace start: the job still RUNNING, with its PreemptTime.
    bed.slurm.jobs_[burst2] = replace(bed.slurm.jobs_[burst2], preempt_time=bed.clock.now)
    assert await bed.scaler.probe_preemptions() == [burst2]
    assert [r.job_id for r in bed.registry.replicas() if r.draining] == [burst2]
    assert bed.scaler.decisions[("tiny", "drain_preempted")] == 1
    # Drained once: the next probe asks about the other burst job alone, and the step does not drain it again.
    assert await bed.scaler.probe_preemptions() == [] and bed.slurm.ids_asked[-1] == [burst1]
    await bed.step()
    assert [r.job_id for r in bed.registry.replicas() if r.draining] == [burst2]
    bed.scaler._is_leader = lambda: False  # a standby asks nothing
    before = len(bed.slurm.ids_asked)
    assert await bed.scaler.probe_preemptions() == [] and len(bed.slurm.ids_asked) == before


async def test_a_bounded_probe_takes_the_burst_jobs_in_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(autoscaler, "PREEMPT_PROBE_MAX", 2)
    bed = Bed(**{**TWO_TIERS, "min_replicas": 1, "max_replicas": 4})
    bed.scaler.pins.set("tiny", 4)
    await bed.step()
    guaranteed, *burst = bed.slurm.active()
    for job in (guaranteed, *burst):
        bed.ready(job)
    await bed.step()
    for _ in range(3):
        await bed.scaler.probe_preemptions()
    b1, b2, b3 = burst
    assert bed.slurm.ids_asked == [[b1, b2], [b3, b1], [b2, b3]]
