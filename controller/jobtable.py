"""The autoscaler's Slurm jobs as of its last squeue, for those who read them.

Responsible for: holding (model, job) by job id; the autoscaler writes it once a step (its one writer), and the
model board (`/v1/models`: a pending job's reason, a starting job's start time) and the admin API read it. It is
built before both, so neither needs the other to exist first.
Not responsible for: asking Slurm (the autoscaler does, through SlurmClient), or deciding anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from slinfer.controller.slurm import SlurmJob


@dataclass(frozen=True)
class Refusal:
    """Slurm refused a model's job at submit: its reason, how many in a row, and when the next try is (wall)."""

    reason: str
    failures: int
    at: float
    retry_at: float


class JobTable:
    """(model, job) by job id, replaced as a whole by the autoscaler's step."""

    def __init__(self) -> None:
        self._jobs: dict[str, tuple[str, SlurmJob]] = {}
        # model -> Slurm's refusal of its last submit (an association, a QOS limit), until a submit succeeds.
        self._refusals: dict[str, Refusal] = {}

    def refused(self, model: str, refusal: Refusal | None) -> None:
        """The autoscaler's last submit of `model`: refused (with Slurm's reason), or None once one succeeds."""
        if refusal is None:
            self._refusals.pop(model, None)
        else:
            self._refusals[model] = refusal

    def refusal(self, model: str) -> Refusal | None:
        return self._refusals.get(model)

    def replace(self, jobs: dict[str, tuple[str, SlurmJob]]) -> None:
        self._jobs = dict(jobs)

    def get(self, job_id: str) -> tuple[str, SlurmJob] | None:
        return self._jobs.get(job_id)

    def jobs(self) -> list[tuple[str, SlurmJob]]:
        """Every (model, job) of the last step."""
        return list(self._jobs.values())
