"""Two tiers of capacity (controller/preemption.py) and the autoscaler carrying them out: the guaranteed
replicas in the model's qos, growth in its burst_qos, and the burst tier's backoff after Slurm preempted one of
its jobs. The autoscaler runs against the in-memory SlurmDouble (the bed test drives real Slurm)."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from slinfer.config import ModelConfig
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
        assert f"job {burst} (burst tier) was preempted by Slurm (1 in a row)" in caplog.text
        assert "no burst submit for 60s" in caplog.text
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
