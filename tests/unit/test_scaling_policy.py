"""The autoscaler's pure plan (controller/scaling_policy.py) as tables of cases: `decide` (inputs -> desired, action,
count, reason), `classify` (jobs and engines -> groups), `expiring_drains` and `shrink_victims` (which jobs)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from slinfer.config import ModelConfig
from slinfer.controller.scaling_policy import (
    Action,
    EngineView,
    Groups,
    Jobs,
    Load,
    Timers,
    classify,
    decide,
    expiring_drains,
    shrink_victims,
)
from slinfer.slurm.jobs import Job

NOW = 1000.0
BASE = ModelConfig(name="tiny", source="/m", min_replicas=0, max_replicas=3, target_outstanding=4.0,
                   scale_up_delay_s=10.0, scale_down_delay_s=60.0)


@dataclass(frozen=True)
class Case:
    name: str
    load: Load
    jobs: Jobs
    desired: int
    action: Action
    count: int = 0
    reason: str = ""
    timers: Timers = field(default_factory=Timers)
    pinned: int | None = None
    settled: bool = True
    model: dict[str, object] = field(default_factory=dict)
    urgent: str = ""
    up_since: float | None = None
    down_since: float | None = None


CASES = [
    Case("idle at zero stays steady", Load(0, 0), Jobs(0, 0), 0, Action.STEADY, reason="steady"),
    Case("load starts the scale-up delay", Load(8, 8), Jobs(1, 1), 2, Action.WAIT,
         reason="wait scale-up delay (0/10s)", up_since=NOW),
    Case("delay counting", Load(8, 8), Jobs(1, 1), 2, Action.WAIT, timers=Timers(up_since=NOW - 4),
         reason="wait scale-up delay (4/10s)", up_since=NOW - 4),
    Case("delay over: submit the difference", Load(12, 12), Jobs(1, 1), 3, Action.SUBMIT, count=2,
         timers=Timers(up_since=NOW - 10), reason="submitted", up_since=NOW - 10),
    Case("float noise adds no replica", Load(8.000001, 8.000001), Jobs(2, 2), 2, Action.STEADY, reason="steady"),
    Case("clamped to max_replicas", Load(400, 400), Jobs(3, 3), 3, Action.STEADY, reason="steady"),
    Case("scale from zero skips window and delay", Load(0, 1, queued=1), Jobs(0, 0), 1, Action.SUBMIT, count=1,
         reason="submitted", urgent="scale from zero", up_since=NOW),
    Case("below min needs no delay", Load(0, 0), Jobs(0, 0), 1, Action.SUBMIT, count=1, model={"min_replicas": 1},
         reason="submitted", urgent="below min", up_since=NOW),
    Case("the average lags after a burst: hold", Load(12, 2), Jobs(1, 1), 3, Action.HOLD,
         timers=Timers(up_since=NOW - 20), reason="hold: the load now (2) needs only 1", up_since=NOW - 20),
    Case("sbatch backing off", Load(12, 12), Jobs(1, 1), 3, Action.WAIT,
         timers=Timers(up_since=NOW - 20, backoff_until=NOW + 7), reason="wait after sbatch failure (7s left)",
         up_since=NOW - 20),
    Case("expiring jobs fill the room", Load(8, 8), Jobs(1, 4), 2, Action.HOLD, timers=Timers(up_since=NOW - 20),
         reason="hold: 4 jobs already (expiring ones not yet gone)", up_since=NOW - 20),
    Case("room caps the submit", Load(12, 12), Jobs(0, 5), 3, Action.SUBMIT, count=1,
         timers=Timers(up_since=NOW - 20), reason="submitted", up_since=NOW - 20),
    Case("less load starts the scale-down delay", Load(1, 1), Jobs(3, 3), 1, Action.WAIT,
         timers=Timers(up_since=NOW - 5), reason="wait scale-down delay (0/60s)", down_since=NOW),
    Case("scale-down delay over: shrink", Load(1, 1), Jobs(3, 3), 1, Action.SHRINK, count=2,
         timers=Timers(down_since=NOW - 60), reason="shrunk", down_since=NOW - 60),
    Case("not settled: no shrink yet", Load(1, 1), Jobs(3, 3), 1, Action.WAIT, settled=False,
         timers=Timers(down_since=NOW - 60), reason="wait for agents to re-register after start",
         down_since=NOW - 60),
    Case("pinned up ignores delay and the load now", Load(0, 0), Jobs(0, 0), 2, Action.SUBMIT, count=2, pinned=2,
         reason="submitted", up_since=NOW),
    Case("pinned down ignores the delay", Load(20, 20), Jobs(3, 3), 0, Action.SHRINK, count=3, pinned=0,
         reason="shrunk", down_since=NOW),
    Case("at the count: timers reset", Load(8, 8), Jobs(2, 2), 2, Action.STEADY,
         timers=Timers(up_since=NOW - 3, down_since=NOW - 3), reason="steady"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decide(case: Case) -> None:
    cfg = ModelConfig(**{**BASE.__dict__, **case.model})  # type: ignore[arg-type]
    d = decide(cfg, case.load, case.jobs, case.timers, NOW, pinned=case.pinned, settled=case.settled)
    assert (d.desired, d.action, d.count, d.reason, d.urgent) == (
        case.desired, case.action, case.count, case.reason, case.urgent)
    assert (d.timers.up_since, d.timers.down_since) == (case.up_since, case.down_since)
    assert d.timers.backoff_until == case.timers.backoff_until


def job(job_id: str, state: str = "RUNNING", submit: float = 0.0, start: float = 0.0, end: float = 0.0) -> Job:
    return Job(job_id=job_id, name="slinfer-tiny", comment="", state=state, node="n1" if state != "PENDING" else "",
               submit_time=submit, start_time=start, end_time=end)


READY = EngineView(serving=True)
LEAD = 100.0


@dataclass(frozen=True)
class ClassifyCase:
    name: str
    jobs: tuple[Job, ...]
    engines: dict[str, EngineView | None]
    # Group name -> job ids expected in it; unnamed groups must be empty.
    expected: dict[str, list[str]]
    submitted: tuple[str, ...] = ()
    draining: tuple[str, ...] = ()
    cancelled: tuple[str, ...] = ()
    lost: tuple[str, ...] = ()
    adopt_drains: tuple[str, ...] = ()
    lost_after: frozenset[str] = frozenset()


CLASSIFY = [
    ClassifyCase("pending job", (job("1", "PENDING"),), {}, {"pending": ["1"]}),
    ClassifyCase("submitted, not yet listed", (), {}, {"unlisted": ["9"]}, submitted=("9",)),
    ClassifyCase("submitted and listed is not unlisted", (job("9", "PENDING"),), {}, {"pending": ["9"]},
                 submitted=("9",)),
    ClassifyCase("running, no report yet: starting", (job("1"),), {"1": None}, {"starting": ["1"]}),
    ClassifyCase("running, engine loading: starting", (job("1"),), {"1": EngineView()}, {"starting": ["1"]}),
    ClassifyCase("serving, far from its limit: ready", (job("1", end=NOW + 1000),), {"1": READY}, {"ready": ["1"]}),
    ClassifyCase("serving, no time limit: ready", (job("1", end=0.0),), {"1": READY}, {"ready": ["1"]}),
    ClassifyCase("serving, within the lead of its limit: expiring", (job("1", end=NOW + LEAD),), {"1": READY},
                 {"expiring": ["1"]}),
    ClassifyCase("starting within the lead is not expiring", (job("1", end=NOW + 10),), {"1": EngineView()},
                 {"starting": ["1"]}),
    ClassifyCase("drained by this autoscaler", (job("1"),), {"1": READY}, {"draining": ["1"]}, draining=("1",)),
    ClassifyCase("drained in the registry: adopted", (job("1"),), {"1": EngineView(serving=True, draining=True)},
                 {"draining": ["1"]}, adopt_drains=("1",)),
    ClassifyCase("cancelled: in no group", (job("1"),), {"1": READY}, {}, cancelled=("1",)),
    ClassifyCase("suspended: in no group", (job("1", "SUSPENDED"),), {"1": READY}, {}),
    ClassifyCase("failed engine", (job("1"),), {"1": EngineView(failed=True)}, {"failed": ["1"]}),
    ClassifyCase("engine ending on its own: in no group", (job("1"),), {"1": EngineView(ending=True)}, {}),
    ClassifyCase("agent silent: lost, and remembered", (job("1"),), {"1": EngineView(serving=True, agent_alive=False)},
                 {"lost": ["1"]}, lost_after=frozenset({"1"})),
    ClassifyCase("lost, agent forgotten: still lost", (job("1"),), {"1": None}, {"lost": ["1"]}, lost=("1",),
                 lost_after=frozenset({"1"})),
    ClassifyCase("lost, agent back: ready again", (job("1", end=NOW + 1000),), {"1": READY}, {"ready": ["1"]},
                 lost=("1",)),
    ClassifyCase("a mix", (job("1", "PENDING"), job("2"), job("3", end=NOW + 1000), job("4", end=NOW + 5)),
                 {"2": None, "3": READY, "4": READY},
                 {"pending": ["1"], "starting": ["2"], "ready": ["3"], "expiring": ["4"]}),
]
GROUPS = ("pending", "unlisted", "starting", "ready", "expiring", "draining", "failed", "lost")


@pytest.mark.parametrize("case", CLASSIFY, ids=[c.name for c in CLASSIFY])
def test_classify(case: ClassifyCase) -> None:
    c = classify(case.jobs, case.engines, submitted=case.submitted, draining=case.draining,
                 cancelled=case.cancelled, lost=case.lost, lead_s=LEAD, now=NOW)
    got = {name: [j if isinstance(j, str) else j.job_id for j in getattr(c.groups, name)] for name in GROUPS}
    assert got == {name: case.expected.get(name, []) for name in GROUPS}
    assert c.adopt_drains == case.adopt_drains
    assert c.lost == case.lost_after


def test_capacity_and_total_count_what_they_say() -> None:
    g = Groups(pending=[job("1", "PENDING")], unlisted=["2"], starting=[job("3")], ready=[job("4")],
               expiring=[job("5")], draining=[job("6")], failed=[job("7")], lost=[job("8")])
    assert (g.capacity, g.total) == (4, 7)  # failed jobs are neither: they are cancelled


@dataclass(frozen=True)
class ExpiringCase:
    name: str
    expiring: tuple[Job, ...]
    ready: tuple[Job, ...]
    desired: int
    expected: list[tuple[str, str]]


EXPIRING = [
    ExpiringCase("no replacement yet, time left: stays", (job("1", end=NOW + 60),), (), 1, []),
    ExpiringCase("replacement READY and outliving it: drain", (job("1", end=NOW + 60),),
                 (job("2", end=NOW + 3600),), 1, [("1", "replacement ready")]),
    ExpiringCase("replacement with no time limit outlives it", (job("1", end=NOW + 60),), (job("2", end=0.0),), 1,
                 [("1", "replacement ready")]),
    ExpiringCase("final drain time reached without replacement", (job("1", end=NOW + 30),), (), 1,
                 [("1", "no replacement in time")]),
    ExpiringCase("desired 0 still needs one replacement", (job("1", end=NOW + 60),), (), 0, []),
    ExpiringCase("desired 2, one outliving: stays", (job("1", end=NOW + 60),), (job("2", end=NOW + 3600),), 2, []),
    ExpiringCase("two expiring: the later one outlives the sooner", (job("1", end=NOW + 60), job("2", end=NOW + 90)),
                 (), 1, [("1", "replacement ready")]),
    ExpiringCase("soonest limit first", (job("2", end=NOW + 90), job("1", end=NOW + 20)),
                 (job("3", end=NOW + 3600),), 1, [("1", "replacement ready"), ("2", "replacement ready")]),
]


@pytest.mark.parametrize("case", EXPIRING, ids=[c.name for c in EXPIRING])
def test_expiring_drains(case: ExpiringCase) -> None:
    got = expiring_drains(case.expiring, case.ready, case.desired, NOW, final_drain_s=30.0)
    assert [(j.job_id, why) for j, why in got] == case.expected


@dataclass(frozen=True)
class ShrinkCase:
    name: str
    groups: Groups
    n: int
    cancel: list[tuple[str, str]]
    drain: list[str]
    outstanding: dict[str, int] = field(default_factory=dict)


SHRINK = [
    ShrinkCase("pending newest first", Groups(pending=[job("1", "PENDING", submit=1), job("2", "PENDING", submit=2)]),
               1, [("2", "pending")], []),
    ShrinkCase("pending, then unlisted newest first, then starting latest first",
               Groups(pending=[job("1", "PENDING")], unlisted=["2", "3"],
                      starting=[job("4", start=10), job("5", start=20)]),
               5, [("1", "pending"), ("3", "unlisted"), ("2", "unlisted"), ("5", "starting"), ("4", "starting")], []),
    ShrinkCase("nothing waiting: READY closest to its limit first",
               Groups(ready=[job("1", end=NOW + 900), job("2", end=NOW + 100), job("3", end=0.0)]), 2, [], ["2", "1"]),
    ShrinkCase("same limit: the least busy first", Groups(ready=[job("1", end=NOW + 900), job("2", end=NOW + 900)]),
               1, [], ["2"], outstanding={"1": 5, "2": 1}),
    ShrinkCase("no time limits: the least busy", Groups(ready=[job("1"), job("2")]), 1, [], ["1"],
               outstanding={"2": 3}),
    ShrinkCase("waiting jobs go before any READY one",
               Groups(starting=[job("1", start=5)], ready=[job("2", end=NOW + 10)]), 2, [("1", "starting")], ["2"]),
    ShrinkCase("never more than n", Groups(pending=[job("1", "PENDING")], ready=[job("2")]), 1, [("1", "pending")],
               []),
    ShrinkCase("expiring, draining and failed jobs are not victims",
               Groups(expiring=[job("1")], draining=[job("2")], failed=[job("3")], ready=[job("4")]), 3, [], ["4"]),
]


@pytest.mark.parametrize("case", SHRINK, ids=[c.name for c in SHRINK])
def test_shrink_victims(case: ShrinkCase) -> None:
    v = shrink_victims(case.groups, case.n, case.outstanding)
    assert list(v.cancel) == case.cancel
    assert [j.job_id for j in v.drain] == case.drain
