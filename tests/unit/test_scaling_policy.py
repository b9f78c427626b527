"""The autoscaler's pure policy (controller/scaling_policy.py) as a table: inputs -> desired, action, count, reason."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from slinfer.config import ModelConfig
from slinfer.controller.scaling_policy import Action, Jobs, Load, Timers, decide

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
