"""A job Slurm refuses at submit (issue 29.2) is a decision the autoscaler logs with Slurm's reason and retries
with backoff, and `/v1/models` and `slinfer models` show it as the model's state until a submit succeeds."""

from __future__ import annotations

import logging

import pytest

from slinfer.cli.models import row
from slinfer.controller.modelstatus import ModelBoard
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
