"""A job Slurm refuses at submit (issue 29.2) is a decision the autoscaler logs with Slurm's reason and retries
with backoff, and `/v1/models` and `slinfer models` show it as the model's state until a submit succeeds."""

from __future__ import annotations

import json
import logging

import pytest

from slinfer.cli.models import row
from slinfer.controller.modelstatus import ModelBoard
from slinfer.controller.registry import Registry
from slinfer.v1 import controller_pb2, engine_pb2
from tests.unit.test_autoscaler import Bed

REASON = "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified"


async def test_a_refused_submit_is_the_models_state_with_slurms_reason(caplog: pytest.LogCaptureFixture) -> None:
    bed = Bed(window_s=2.0, min_replicas=1)
    board = ModelBoard([bed.model], bed.registry, jobs=bed.scaler.job_table.jobs, clock=lambda: 1000.0,
                       refusals=bed.scaler.job_table.refusal)
    # Positive control: before any submit the model is offline.
    assert board.state("tiny", [])["state"] == "offline"
    bed.slurm.fail_submit = REASON
    with caplog.at_level(logging.ERROR, logger="slinfer.controller.autoscaler"):
        await bed.step()
    assert bed.scaler.decisions[("tiny", "submit_failed")] == 1
    assert any("sbatch failed (1 in a row)" in r.getMessage() and REASON in r.getMessage() for r in caplog.records)
    refusal = bed.scaler.job_table.refusal("tiny")
    assert refusal is not None and refusal.reason == REASON and refusal.failures == 1
    # The board reads the wall clock; the refusal's next try is the backoff's (5 s first) after it.
    board._clock = lambda: refusal.at  # type: ignore[method-assign]
    state = board.state("tiny", [])
    assert state == {"state": "refused", "reason": REASON, "failures": 1, "retry_in_s": pytest.approx(5.0, abs=0.5)}
    cells = row({"id": "tiny", "slinfer": state})
    assert cells[1] == "refused" and REASON in cells[4] and "1 in a row" in cells[4]
    # Backed off: no new sbatch within the backoff, then a second refusal counts 2.
    await bed.step(2)
    assert bed.scaler.decisions[("tiny", "submit_failed")] == 1
    await bed.step(5)
    assert bed.scaler.job_table.refusal("tiny").failures == 2  # type: ignore[union-attr]
    # Slurm accepts again: the refusal is gone and the model is no longer shown refused.
    bed.slurm.fail_submit = ""
    await bed.step(11)
    assert len(bed.slurm.submits) == 1
    assert bed.scaler.job_table.refusal("tiny") is None
    assert board.state("tiny", [])["state"] != "refused"


async def test_a_tier_worker_shows_the_refusal_the_controller_fed_it() -> None:
    """The gateway tier (the bed's and the packages' default) sees no Slurm job and no refusal: the controller's
    board sends what it holds (feed_states, absolute times) through the route feed, and a worker's board with
    `remote` shows it as the controller's own /v1/models does."""
    bed = Bed(window_s=2.0, min_replicas=1)
    board = ModelBoard([bed.model], bed.registry, jobs=bed.scaler.job_table.jobs, refusals=bed.scaler.job_table.refusal)
    assert board.feed_states() == {}  # nothing held before a submit
    fed: dict[str, str] = {}
    tier = ModelBoard([bed.model], Registry(), remote=lambda m: json.loads(fed[m]) if m in fed else None)
    # Positive control: without what the controller fed, the worker can only say offline.
    assert tier.state("tiny", [])["state"] == "offline"
    bed.slurm.fail_submit = REASON
    await bed.step()
    fed.update(board.feed_states())
    refusal = bed.scaler.job_table.refusal("tiny")
    assert refusal is not None
    tier._clock = board._clock = lambda: refusal.at  # type: ignore[method-assign]
    assert tier.state("tiny", []) == board.state("tiny", []) == {
        "state": "refused", "reason": REASON, "failures": 1, "retry_in_s": pytest.approx(5.0, abs=0.5)}
    # Unchanged between steps: the feed sends it once, not with every publication.
    assert board.feed_states() == fed


def test_feed_states_reads_no_job_while_every_model_serves() -> None:
    """Issue 35.4: the feed asks the board every publication; with a routable replica of every model there is
    nothing held to send, and the controller's jobs (40,000 at 5,000 nodes) are not read. The control: with none
    routable they are read."""
    bed = Bed(window_s=2.0, min_replicas=1)
    reads: list[int] = []

    def jobs() -> list:
        reads.append(1)
        return bed.scaler.job_table.jobs()

    board = ModelBoard([bed.model], bed.registry, jobs=jobs)
    assert board.feed_states() == {} and len(reads) == 1  # the control: nothing routes, the jobs are read
    bed.registry.report(controller_pb2.AgentReport(node="n", engines=[engine_pb2.Engine(
        job_id="1", model="tiny", state=engine_pb2.READY, base_url="http://a:1", pool=True)]))
    assert bed.registry.has_routable("tiny")
    assert board.feed_states() == {} and len(reads) == 1
