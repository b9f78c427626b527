"""The autoscaler's decisions, driven by an injected clock.

The Registry is the real one, fed with agent reports as agents send them. Slurm is `SlurmDouble`, an in-memory
recording double of SlurmClient (SlurmClient itself is tested against real Slurm in tests/bed/); the gateway's
demand is a dict.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from slinfer.config import ModelConfig
from slinfer.controller.autoscaler import (
    COMMENT_MARK,
    DEFAULT_START_LATENCY_S,
    FINAL_DRAIN_S,
    MIN_START_MARGIN_S,
    Autoscaler,
)
from slinfer.controller.registry import Registry
from slinfer.controller.slurm import SlurmJob
from slinfer.v1 import controller_pb2, engine_pb2
from tests.fakes.slurm_double import Clock, Demand, SlurmDouble


class Bed:
    def __init__(self, **model_kw: object) -> None:
        self.clock = Clock()
        self.registry = Registry(agent_timeout_s=6.0, clock=self.clock)
        self.slurm = SlurmDouble(self.clock)
        kw: dict[str, object] = {"min_replicas": 0, "max_replicas": 3, "target_outstanding": 4.0,
                                 "window_s": 10.0, "scale_up_delay_s": 0.0, "scale_down_delay_s": 0.0}
        kw.update(model_kw)
        self.model = ModelConfig(name="tiny", source="/m", **kw)  # type: ignore[arg-type]
        self.demand: dict[str, Demand] = {}
        self.engines: dict[str, dict[str, engine_pb2.Engine]] = {}  # node -> job id -> engine
        self.scaler = self.new_scaler(settle_s=0.0)

    def new_scaler(self, settle_s: float) -> Autoscaler:
        return Autoscaler([self.model], self.registry, lambda m: self.demand.get(m, Demand()), self.slurm,
                          clock=self.clock, settle_s=settle_s)

    async def step(self, advance: float = 2.0) -> None:
        self.clock.now += advance
        self.heartbeat()
        await self.scaler.step()

    def engine(self, job_id: str, state: int = engine_pb2.READY, node: str = "n1", running: float = 0,
               waiting: float = 0, reason: str = "", pool: bool = True) -> None:
        self.engines.setdefault(node, {})[job_id] = engine_pb2.Engine(
            job_id=job_id, model="tiny", state=state, base_url=f"http://{node}:2000{job_id[-1]}", pool=pool,
            started_at=self.clock.now, ready_at=self.clock.now if state == engine_pb2.READY else 0,
            load=engine_pb2.EngineLoad(running=running, waiting=waiting), reason=reason)

    def heartbeat(self, nodes: list[str] | None = None) -> None:
        for node, engines in self.engines.items():
            if nodes is None or node in nodes:
                self.registry.report(controller_pb2.AgentReport(node=node, address=node, agent_id="a",
                                                                engines=list(engines.values())))

    def ready(self, job_id: str, node: str = "n1") -> None:
        """The job starts and its engine is READY at once."""
        self.slurm.start(job_id, node)
        self.engine(job_id, node=node)
        self.heartbeat()


def ours(job_id: str, state: str = "RUNNING", **kw: object) -> SlurmJob:
    fields: dict[str, object] = {"node": "n1", "submit_time": 1_799_999_000.0, "start_time": 1_799_999_100.0,
                                 "end_time": 1_800_003_600.0}
    fields.update(kw)
    return SlurmJob(job_id, "slinfer-tiny", f"{COMMENT_MARK} model=tiny", state, **fields)  # type: ignore[arg-type]


async def test_scale_from_zero_submits_at_once_despite_window_and_delay(caplog: pytest.LogCaptureFixture) -> None:
    bed = Bed(window_s=300.0, scale_up_delay_s=600.0, target_outstanding=100.0)
    await bed.step()
    assert bed.slurm.submits == []
    bed.demand["tiny"] = Demand(queued=1)
    with caplog.at_level(logging.INFO, "slinfer.controller.autoscaler"):
        await bed.step()
    assert bed.slurm.submits == [("tiny", "slinfer-tiny", f"{COMMENT_MARK} model=tiny")]
    assert "scale from zero" in caplog.text
    # The pending job is capacity on the way: no second job while the request still waits.
    await bed.step()
    await bed.step()
    assert len(bed.slurm.submits) == 1
    assert bed.scaler.decisions[("tiny", "submit")] == 1


async def test_no_submit_until_squeue_succeeds() -> None:
    bed = Bed()
    bed.demand["tiny"] = Demand(queued=3)
    bed.slurm.fail_squeue = True
    await bed.step()
    await bed.step()
    assert bed.slurm.submits == []
    assert not bed.scaler.squeue_ok
    bed.slurm.fail_squeue = False
    await bed.step()
    assert len(bed.slurm.submits) == 1


async def test_desired_is_ceil_of_average_load_over_target(caplog: pytest.LogCaptureFixture) -> None:
    bed = Bed(target_outstanding=4.0, max_replicas=5)
    await bed.step()
    (job,) = [await bed.slurm.submit(bed.model, "slinfer-tiny", f"{COMMENT_MARK} model=tiny")]
    bed.slurm.submits.clear()
    bed.ready(job)
    bed.demand["tiny"] = Demand(in_flight=10, queued=3)
    with caplog.at_level(logging.INFO, "slinfer.controller.autoscaler"):
        await bed.step()
    # The window began with this sample (the earlier steps held 0 load for 2 s): average of 0 and 13.
    with caplog.at_level(logging.INFO, "slinfer.controller.autoscaler"):
        for _ in range(10):
            await bed.step()
    # 13 / 4 -> 4 replicas: 1 ready, 3 submitted.
    assert len(bed.slurm.submits) == 3
    assert "desired=4" in caplog.text and "target=4" in caplog.text and "load=13.0" in caplog.text
    assert "-> submit" in caplog.text


async def test_engine_load_counts_where_larger_than_gateway() -> None:
    bed = Bed(target_outstanding=4.0, max_replicas=3, window_s=2.0)
    job = await bed.slurm.submit(bed.model, "slinfer-tiny", f"{COMMENT_MARK} model=tiny")
    bed.slurm.submits.clear()
    bed.ready(job)
    bed.engine(job, running=5, waiting=4)  # a user bypassing the gateway, or requests the gateway lost track of
    await bed.step()
    await bed.step()
    assert len(bed.slurm.submits) == 3 - 1  # ceil(9/4) = 3, one exists


async def test_a_users_private_engine_of_the_model_never_scales_the_service(
        caplog: pytest.LogCaptureFixture) -> None:
    # A user's own `sbatch --inference=tiny` job (not --inference-pool), busy with its user's requests: its
    # load is that job's, not the service's. Seen on the bed: a private engine's last report before its agent
    # was killed said running=1, and the service submitted a pool job onto the node whose agent was gone.
    bed = Bed(target_outstanding=4.0, max_replicas=3, window_s=2.0)
    bed.engine("700", running=5, waiting=4, pool=False)
    with caplog.at_level(logging.INFO, "slinfer.controller.autoscaler"):
        for _ in range(5):
            await bed.step()
    assert bed.slurm.submits == [], caplog.text
    # The same load on a pooled engine does scale: the filter is the pool flag, not the load.
    job = await bed.slurm.submit(bed.model, "slinfer-tiny", f"{COMMENT_MARK} model=tiny")
    bed.slurm.submits.clear()
    bed.ready(job)
    bed.engine(job, running=5, waiting=4)
    await bed.step()
    await bed.step()
    assert len(bed.slurm.submits) == 3 - 1


async def test_desired_clamped_to_max_and_min() -> None:
    bed = Bed(min_replicas=1, max_replicas=2, window_s=2.0)
    await bed.step()
    assert len(bed.slurm.submits) == 1  # min 1 with no load
    bed.demand["tiny"] = Demand(in_flight=1000)
    await bed.step()
    await bed.step()
    assert len(bed.slurm.submits) == 2


async def test_scale_up_delay() -> None:
    bed = Bed(scale_up_delay_s=10.0, window_s=2.0, min_replicas=1)
    await bed.step()
    (first,) = bed.slurm.active()
    bed.ready(first)
    bed.slurm.submits.clear()
    bed.demand["tiny"] = Demand(in_flight=8)
    await bed.step()
    await bed.step(4)
    assert bed.slurm.submits == []
    await bed.step(6)
    assert len(bed.slurm.submits) == 1


async def test_scale_down_cancels_pending_first_then_drains_ready(caplog: pytest.LogCaptureFixture) -> None:
    bed = Bed(window_s=2.0, max_replicas=3)
    bed.demand["tiny"] = Demand(in_flight=12)
    await bed.step()
    a, b, c = bed.slurm.active()
    bed.ready(a)
    bed.ready(b)
    bed.registry.get(a).outstanding = 3  # type: ignore[union-attr]
    bed.registry.get(b).outstanding = 1  # type: ignore[union-attr]
    bed.demand["tiny"] = Demand(in_flight=4)
    with caplog.at_level(logging.INFO, "slinfer.controller.autoscaler"):
        await bed.step(5)
    # Desired 1 of 3: the PENDING one is cancelled, and the less busy READY one drained, not cancelled yet.
    assert bed.slurm.cancels == [c]
    assert "cancel pending job" in caplog.text
    assert bed.registry.get(b).draining  # type: ignore[union-attr]
    assert [r.job_id for r in bed.registry.routable("tiny")] == [a]
    await bed.step()
    assert bed.slurm.cancels == [c]  # b still has a request in flight
    bed.registry.get(b).outstanding = 0  # type: ignore[union-attr]
    await bed.step()
    assert bed.slurm.cancels == [c, b]
    assert bed.scaler.decisions[("tiny", "cancel_pending")] == 1
    assert bed.scaler.decisions[("tiny", "drain")] == 1
    assert bed.scaler.decisions[("tiny", "cancel_drained")] == 1
    # The cancelled jobs do not count, and are not replaced.
    await bed.step()
    await bed.step()
    assert len(bed.slurm.submits) == 3 and bed.slurm.cancels == [c, b]


async def test_drain_is_bounded_by_drain_timeout() -> None:
    bed = Bed(window_s=2.0, drain_timeout_s=30.0)
    bed.demand["tiny"] = Demand(in_flight=4)
    await bed.step()
    (a,) = bed.slurm.active()
    bed.ready(a)
    bed.registry.get(a).outstanding = 2  # type: ignore[union-attr]
    bed.demand["tiny"] = Demand()
    await bed.step(5)
    assert bed.registry.get(a).draining  # type: ignore[union-attr]
    await bed.step(20)
    assert bed.slurm.cancels == []
    await bed.step(11)
    assert bed.slurm.cancels == [a]
    assert bed.scaler.decisions[("tiny", "cancel_drain_timeout")] == 1


async def test_scale_down_delay() -> None:
    bed = Bed(window_s=2.0, scale_down_delay_s=60.0)
    bed.demand["tiny"] = Demand(in_flight=4)
    await bed.step()
    (a,) = bed.slurm.active()
    bed.ready(a)
    bed.demand["tiny"] = Demand()
    await bed.step(5)
    await bed.step(30)
    assert not bed.registry.get(a).draining  # type: ignore[union-attr]
    # Load comes back within the delay: the clock restarts.
    bed.demand["tiny"] = Demand(in_flight=2)
    await bed.step(5)
    bed.demand["tiny"] = Demand()
    await bed.step(5)
    await bed.step(50)
    assert not bed.registry.get(a).draining  # type: ignore[union-attr]
    await bed.step(15)
    assert bed.registry.get(a).draining  # type: ignore[union-attr]


async def test_restart_adopts_jobs_without_duplicates_or_cancels() -> None:
    bed = Bed(window_s=2.0, min_replicas=1)
    bed.slurm.add(ours("7"))
    bed.slurm.add(ours("8", state="PENDING", node="", start_time=0, end_time=0))
    # Someone else's jobs: a user's job of the same name without the mark, and another controller prefix.
    bed.slurm.add(SlurmJob("9", "slinfer-tiny", "my own", "RUNNING", "n2", 1.0, 2.0, 1_900_000_000.0))
    bed.slurm.add(replace(ours("10"), name="other-tiny"))
    bed.scaler = bed.new_scaler(settle_s=10.0)
    # The agents have not re-registered: job 7 looks like a starting engine, still capacity.
    await bed.step()
    await bed.step()
    assert bed.slurm.submits == [] and bed.slurm.cancels == []
    assert sorted(j.job_id for _, j in bed.scaler.jobs()) == ["7", "8"]
    # It asks Slurm only for its own job names (squeue --name, beside --user), not the whole queue.
    assert bed.slurm.names_asked[-1] == ["slinfer-tiny"]
    # The agent reports job 7 READY; desired is 1 (min), so the PENDING extra goes, after the settle time.
    bed.engine("7")
    await bed.step(3)
    await bed.step(3)
    assert bed.slurm.cancels == ["8"]
    await bed.step(5)
    assert bed.slurm.submits == [] and bed.slurm.active() == ["7", "9", "10"]


async def test_no_cancel_of_unreported_running_job_during_settle() -> None:
    bed = Bed(window_s=2.0, min_replicas=0)
    bed.slurm.add(ours("7"))
    bed.scaler = bed.new_scaler(settle_s=10.0)
    await bed.step()
    await bed.step()
    await bed.step()
    assert bed.slurm.cancels == []
    # The agent is gone for good: after settling the idle job is let go.
    await bed.step(10)
    await bed.step()
    assert bed.slurm.cancels == ["7"]


async def test_replacement_before_time_limit_with_learned_lead() -> None:
    bed = Bed(window_s=2.0, min_replicas=1)
    bed.slurm.limit_s = 600.0
    await bed.step()
    (a,) = bed.slurm.active()
    assert bed.scaler.lead_time("tiny") == DEFAULT_START_LATENCY_S
    bed.clock.now += 38
    bed.ready(a)  # READY 38 s after submit
    await bed.step(0)
    lead = bed.scaler.lead_time("tiny")
    assert lead == pytest.approx(38 * 1.5 + FINAL_DRAIN_S + 2 * 2.0)
    # Until the job is within the lead of its limit, nothing happens.
    await bed.step(600 - lead - 5)
    assert len(bed.slurm.submits) == 1
    await bed.step(5)
    assert len(bed.slurm.submits) == 2
    b = bed.slurm.active()[-1]
    # The old one keeps serving while the replacement starts.
    assert not bed.registry.get(a).draining  # type: ignore[union-attr]
    await bed.step()
    assert len(bed.slurm.submits) == 2
    bed.ready(b)
    await bed.step()
    assert bed.registry.get(a).draining  # type: ignore[union-attr]
    assert bed.slurm.cancels == [a]  # idle, so cancelled in the same step
    assert bed.scaler.decisions[("tiny", "drain_time_limit")] == 1


async def test_a_replacement_as_slow_as_the_learned_start_is_ready_before_the_final_drain() -> None:
    # The walltime promise: a replacement that starts exactly as slowly as the slowest start seen so far is READY
    # while the old replica still serves, never after the old one was drained at FINAL_DRAIN_S before its limit.
    # (The lead was once 1.5 x 20 s + 4 s: the replacement came READY 14 s before the limit, 16 s after the
    # old one's final drain, and for those 16 s nothing served.)
    bed = Bed(window_s=2.0, min_replicas=1)
    bed.slurm.limit_s = 180.0
    await bed.step()
    (a,) = bed.slurm.active()
    latency = 20.0
    bed.clock.now += latency
    bed.ready(a)
    await bed.step(0)
    # Its own start taught the lead at once: no replacement while it has longer than that to live.
    assert bed.slurm.active() == [a] and len(bed.slurm.submits) == 1
    submits = len(bed.slurm.submits)
    bed.registry.get(a).outstanding = 1  # type: ignore[union-attr]
    # Step by step, as the controller does, until the replacement is submitted.
    while len(bed.slurm.submits) == submits:
        await bed.step(2.0)
        assert not bed.registry.get(a).draining  # type: ignore[union-attr]
    b = bed.slurm.active()[-1]
    left_at_submit = bed.slurm.jobs_[a].end_time - bed.clock.now
    for _ in range(int(latency / 2.0)):
        await bed.step(2.0)
        assert not bed.registry.get(a).draining, (  # type: ignore[union-attr]
            f"drained {bed.slurm.jobs_[a].end_time - bed.clock.now:.0f}s before its limit, replacement not READY")
    bed.ready(b)
    await bed.step(0)
    assert bed.registry.get(a).draining  # type: ignore[union-attr]
    left = bed.slurm.jobs_[a].end_time - bed.clock.now
    print(f"replacement submitted {left_at_submit:.0f}s before the limit, READY {left:.0f}s before it")
    assert left > FINAL_DRAIN_S
    assert bed.scaler.decisions[("tiny", "drain_time_limit")] == 1


async def test_a_warm_start_twice_as_slow_as_the_first_is_still_ready_before_the_final_drain() -> None:
    # Seen on the bed with warm starts: the first job READY 4.4 s after submit gave a lead of 4.4 x 1.5 + 30 + 2 s;
    # the replacement took 8.8 s and the old replica was drained "no replacement in time" a second before it was
    # READY. The margin has a floor, so the replacement is READY before the old one's final drain.
    bed = Bed(window_s=2.0, min_replicas=1)
    bed.slurm.limit_s = 180.0
    await bed.step()
    (a,) = bed.slurm.active()
    bed.clock.now += 4.4
    bed.ready(a)
    await bed.step(0)
    assert bed.scaler.lead_time("tiny") == pytest.approx(4.4 + MIN_START_MARGIN_S + FINAL_DRAIN_S + 2 * 2.0)
    while len(bed.slurm.submits) == 1:
        await bed.step(1.0)
    (b,) = [job for job in bed.slurm.active() if job != a]
    bed.slurm.start(b)
    # The replacement's engine is READY 11 s after its submit: the bed's 8.8 s with this bed's longer step (2 s,
    # the bed's 1 s) added, two and a half times the first start.
    for _ in range(11):
        assert not bed.registry.get(a).draining, "drained before its replacement could be READY"  # type: ignore[union-attr]
        await bed.step(1.0)
    bed.ready(b)
    await bed.step(0)
    assert bed.registry.get(a).draining  # type: ignore[union-attr]
    assert bed.slurm.jobs_[a].end_time - bed.clock.now > FINAL_DRAIN_S
    assert bed.scaler.decisions[("tiny", "drain_time_limit")] == 1


async def test_a_time_limit_shorter_than_the_lead_plus_a_start_hands_over_without_a_gap() -> None:
    # The bed's walltime test: 3-minute jobs whose engines take 68 s to be READY, so the lead (68 x 1.5 + 30 + 4 =
    # 136 s) is longer than a job's 112 s after READY: each job is "expiring" the moment it serves. Its
    # replacement, READY in turn, is expiring too; it must still count as the replacement (it outlives the old
    # one), and a starting job must not be replaced while it starts. Seen on the bed before the fix: two jobs
    # submitted at once for the first replica, then both drained "no replacement in time", nothing serving.
    bed = Bed(window_s=2.0, min_replicas=1, max_replicas=2)
    bed.slurm.limit_s = 180.0
    latency = 68.0
    submitted_at: dict[str, float] = {}
    served: list[str] = []
    gaps: list[float] = []
    t0 = bed.clock.now
    while bed.clock.now - t0 < 900:
        await bed.step(1.0)
        for job in bed.slurm.active():
            j = bed.slurm.jobs_[job]
            if j.state == "PENDING":  # an idle cluster: it runs at once, its engine READY `latency` later
                bed.slurm.start(job)
                submitted_at[job] = bed.clock.now
            elif job not in served and bed.clock.now - submitted_at[job] >= latency:
                bed.engine(job)
                served.append(job)
            assert j.end_time == 0 or bed.clock.now < j.end_time, f"job {job} reached its time limit"
        for job in list(bed.engines.get("n1", {})):
            if job not in bed.slurm.active():
                del bed.engines["n1"][job]  # cancelled: its engine is gone
        bed.heartbeat()
        if served and not bed.registry.routable("tiny"):
            gaps.append(bed.clock.now - t0)
        # Never more than the one serving replica and its replacement.
        assert len(bed.slurm.active()) <= 2
    assert bed.scaler.lead_time("tiny") == pytest.approx(latency * 1.5 + FINAL_DRAIN_S + 2 * 2.0)
    assert not gaps, f"nothing routable at {gaps[:5]}"
    # 900 s of 3-minute jobs, each replaced 112 - 44 = 68 s after it served: at least six handovers.
    assert bed.scaler.decisions[("tiny", "drain_time_limit")] >= 6
    # No job was submitted in vain: each one served, or is the replacement starting as the run ends.
    starting = [j for j in bed.slurm.active() if j not in served]
    assert len(starting) <= 1 and len(served) + len(starting) == len(bed.slurm.submits)
    assert bed.slurm.cancels == served[:len(bed.slurm.cancels)]  # each cancelled after it served, oldest first


async def test_a_moment_of_no_load_does_not_drain_an_expiring_replica_early() -> None:
    # Seen on the bed: light steady traffic whose sampled in-flight average read 0 for a window made desired 0, and
    # "0 READY replicas outlive it >= desired 0" drained the only replica 84 s before its limit, with requests
    # still arriving. Scale-down has its own delay for that; the expiry drain waits for a replacement.
    bed = Bed(window_s=2.0, min_replicas=0, scale_down_delay_s=1000.0)  # scale-down stays out of it
    bed.slurm.limit_s = 600.0
    bed.demand["tiny"] = Demand(in_flight=3)
    await bed.step()
    (a,) = bed.slurm.active()
    bed.clock.now += 30
    bed.ready(a)
    await bed.step(0)
    bed.demand["tiny"] = Demand(in_flight=0)
    while bed.slurm.jobs_[a].end_time - bed.clock.now > FINAL_DRAIN_S + 2:
        await bed.step(2.0)
        assert not bed.registry.get(a).draining, (  # type: ignore[union-attr]
            f"drained {bed.slurm.jobs_[a].end_time - bed.clock.now:.0f}s before its limit without a replacement")
    await bed.step(4.0)
    assert bed.registry.get(a).draining  # type: ignore[union-attr]


async def test_expiring_replica_drained_before_limit_without_replacement() -> None:
    bed = Bed(window_s=2.0, min_replicas=1)
    bed.slurm.limit_s = 600.0
    await bed.step()
    (a,) = bed.slurm.active()
    bed.ready(a)
    bed.registry.get(a).outstanding = 1  # type: ignore[union-attr]
    await bed.step(600 - FINAL_DRAIN_S - 10)
    assert not bed.registry.get(a).draining  # type: ignore[union-attr]
    await bed.step(10)
    assert bed.registry.get(a).draining  # type: ignore[union-attr]


async def test_pin_overrides_load_and_delays() -> None:
    bed = Bed(window_s=2.0, scale_up_delay_s=300.0, scale_down_delay_s=300.0)
    bed.scaler.pins.set("tiny", 2)
    await bed.step()
    assert len(bed.slurm.submits) == 2
    a, b = bed.slurm.active()
    bed.ready(a)
    bed.ready(b)
    bed.demand["tiny"] = Demand(in_flight=12)
    await bed.step()
    await bed.step()
    assert len(bed.slurm.submits) == 2
    bed.scaler.pins.set("tiny", 1)
    await bed.step()
    assert sum(r.draining for r in bed.registry.replicas("tiny")) == 1
    bed.scaler.pins.set("tiny", None)
    assert bed.scaler.status()[0].pinned is None
    with pytest.raises(ValueError, match="max_replicas"):
        bed.scaler.pins.set("tiny", 4)
    with pytest.raises(KeyError):
        bed.scaler.pins.set("nope", 1)


async def test_admin_drain_replaces_and_cancels_when_idle() -> None:
    bed = Bed(window_s=2.0, min_replicas=1)
    await bed.step()
    (a,) = bed.slurm.active()
    bed.ready(a)
    await bed.step()
    bed.registry.get(a).outstanding = 1  # type: ignore[union-attr]
    assert bed.scaler.drain(a) == "tiny"
    assert bed.registry.routable("tiny") == []
    await bed.step()
    # min 1 is kept: a new job, while the drained one finishes its request.
    assert len(bed.slurm.submits) == 2 and bed.slurm.cancels == []
    bed.registry.get(a).outstanding = 0  # type: ignore[union-attr]
    await bed.step()
    assert bed.slurm.cancels == [a]
    with pytest.raises(KeyError):
        bed.scaler.drain("12345")


async def test_sbatch_failure_backs_off() -> None:
    bed = Bed(window_s=2.0, min_replicas=1)
    bed.slurm.fail_submit = "sbatch: error: invalid partition specified: gpu"
    await bed.step()
    await bed.step()
    await bed.step()
    assert bed.scaler.decisions[("tiny", "submit_failed")] == 1
    await bed.step(5)
    assert bed.scaler.decisions[("tiny", "submit_failed")] == 2
    await bed.step(5)  # second backoff is 10 s
    assert bed.scaler.decisions[("tiny", "submit_failed")] == 2
    bed.slurm.fail_submit = ""
    await bed.step(6)
    assert len(bed.slurm.submits) == 1


async def test_failed_engine_is_cancelled_and_replaced() -> None:
    bed = Bed(window_s=2.0, min_replicas=1)
    await bed.step()
    (a,) = bed.slurm.active()
    bed.slurm.start(a)
    bed.engine(a, state=engine_pb2.FAILED, reason="model not found")
    await bed.step()
    assert bed.slurm.cancels == [a]
    assert len(bed.slurm.submits) == 2


async def test_silent_agent_replicas_are_replaced() -> None:
    bed = Bed(window_s=2.0, min_replicas=1)
    await bed.step()
    (a,) = bed.slurm.active()
    bed.ready(a)
    await bed.step()
    assert len(bed.slurm.submits) == 1
    bed.engines.clear()  # the node stops reporting
    await bed.step(7)
    assert len(bed.slurm.submits) == 2
    assert bed.scaler.status()[0].lost == 1


async def test_a_lost_replica_stays_lost_after_the_registry_forgets_its_agent() -> None:
    bed = Bed(window_s=2.0, min_replicas=1)
    await bed.step()
    (a,) = bed.slurm.active()
    bed.ready(a)
    await bed.step()
    bed.engines.clear()  # the node stops reporting; Slurm still lists its job RUNNING
    await bed.step(7)
    (b,) = [j for j in bed.slurm.active() if j != a]
    bed.ready(b, node="n2")
    for _ in range(40):  # well past the Registry's forget_after (60 s here)
        await bed.step()
        bed.registry.sweep()
    assert bed.registry.get(a) is None, "the Registry should have forgotten the silent agent's replica"
    assert b not in bed.slurm.cancels, "the replacement was cancelled: the lost job read as a starting replica"
    assert sorted(bed.slurm.active()) == sorted([a, b])
    assert len(bed.slurm.submits) == 2
    assert bed.scaler.status()[0].lost == 1
    # Slurm ends the lost job at last (its node DOWN): nothing more is submitted for it.
    bed.slurm.jobs_[a] = replace(bed.slurm.jobs_[a], state="NODE_FAIL")
    await bed.step()
    assert bed.scaler.status()[0].lost == 0 and len(bed.slurm.submits) == 2


async def test_status_reports_counts() -> None:
    bed = Bed(window_s=2.0, max_replicas=3)
    bed.demand["tiny"] = Demand(in_flight=9, queued=2)
    await bed.step()
    a, _b, _c = bed.slurm.active()
    bed.ready(a)
    await bed.step()
    (st,) = bed.scaler.status()
    assert (st.ready, st.pending, st.starting, st.desired, st.in_flight, st.queued) == (1, 2, 0, 3, 9, 2)
    assert st.last_decision.startswith("submitted job")


async def test_lagging_average_does_not_scale_up_for_load_that_is_gone(caplog: pytest.LogCaptureFixture) -> None:
    bed = Bed(window_s=30.0, target_outstanding=8.0, max_replicas=2)
    bed.demand["tiny"] = Demand(in_flight=20)
    await bed.step()
    a, b = bed.slurm.active()
    bed.ready(a)
    bed.ready(b)
    await bed.step(20)
    # Both jobs end (killed, or cancelled by hand) just as the load stops; the 30 s average is still high.
    await bed.slurm.cancel(a)
    await bed.slurm.cancel(b)
    bed.engines.clear()
    bed.demand["tiny"] = Demand()
    with caplog.at_level(logging.INFO, "slinfer.controller.autoscaler"):
        await bed.step()
        await bed.step()
    assert bed.scaler.status()[0].desired == 2
    assert len(bed.slurm.submits) == 2
    assert "hold: the load now (0) needs only 0" in caplog.text
    # The load comes back: the average and the moment agree again.
    bed.demand["tiny"] = Demand(in_flight=9)
    await bed.step()
    assert len(bed.slurm.submits) == 4


async def test_waiting_is_logged_once_not_every_step(caplog: pytest.LogCaptureFixture) -> None:
    bed = Bed(window_s=2.0, scale_down_delay_s=60.0)
    bed.demand["tiny"] = Demand(in_flight=4)
    await bed.step()
    (a,) = bed.slurm.active()
    bed.ready(a)
    bed.demand["tiny"] = Demand()
    with caplog.at_level(logging.INFO, "slinfer.controller.autoscaler"):
        for _ in range(10):
            await bed.step()
    assert caplog.text.count("wait scale-down delay") == 1



async def test_a_standby_controller_never_submits_until_it_leads() -> None:
    bed = Bed()
    leading = False
    bed.scaler = Autoscaler([bed.model], bed.registry, lambda m: bed.demand.get(m, Demand()), bed.slurm,
                            clock=bed.clock, settle_s=0.0, is_leader=lambda: leading)
    bed.demand["tiny"] = Demand(queued=3)
    await bed.step()
    await bed.step()
    assert bed.slurm.submits == [], "a standby must not submit"
    leading = True
    await bed.step()
    assert bed.slurm.submits == [("tiny", "slinfer-tiny", f"{COMMENT_MARK} model=tiny")]


async def test_a_drain_waits_for_requests_the_gateway_tier_has_on_the_engine() -> None:
    bed = Bed(window_s=2.0, drain_timeout_s=30.0)
    elsewhere: dict[str, int] = {}
    asked: list[tuple[str, float]] = []

    def outstanding_elsewhere(job_id: str, since: float) -> int:
        asked.append((job_id, since))
        return elsewhere.get(job_id, 0)

    bed.scaler = Autoscaler([bed.model], bed.registry, lambda m: bed.demand.get(m, Demand()), bed.slurm,
                            clock=bed.clock, settle_s=0.0, outstanding_elsewhere=outstanding_elsewhere)
    bed.demand["tiny"] = Demand(in_flight=4)
    await bed.step()
    (a,) = bed.slurm.active()
    bed.ready(a)
    elsewhere[a] = 3  # none here, three through slinfer-gateway workers
    bed.demand["tiny"] = Demand()
    await bed.step(5)
    assert bed.registry.get(a).draining  # type: ignore[union-attr]
    await bed.step()
    assert bed.slurm.cancels == []
    assert asked and asked[-1][0] == a and asked[-1][1] <= bed.clock.now  # the drain's start, on its clock
    elsewhere[a] = 0
    await bed.step()
    assert bed.slurm.cancels == [a]
