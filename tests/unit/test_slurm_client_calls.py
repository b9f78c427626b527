"""SlurmClient.jobs asks Slurm a bounded number of times a step, whatever the number of its jobs (issue 35.7).

A stand-in runner answers squeue and scontrol from a table of jobs in each release's real output format (the
listing's lines as tests/fixtures/slurm/*/squeue-user.txt shows them) and counts the calls. The old behaviour, one
`scontrol show job` per known job (by_id_max unbounded), is the control.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from slinfer.controller.slurm import BY_ID_MAX, STALE_S, SlurmClient
from slinfer.slurm import parse
from slinfer.slurm.runner import Query, SlurmError

USER = "svc"
NAME = "slinfer-tiny"
COMMENT = "slinfer:autoscaler model=tiny"


@dataclass
class FakeJob:
    state: str = "RUNNING"
    qos: str = "normal"
    preempt: str = "N/A"


@dataclass
class StandInRunner:
    """Answers the client's queries from `jobs` as Slurm's clients print them; counts calls per command."""

    jobs: dict[str, FakeJob] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def argv(self, argv: tuple[str, ...] | list[str]) -> list[str]:
        return list(argv)

    async def aget(self, query: Query[object]) -> object:
        argv = query.argv
        self.calls.append(argv[0])
        if argv[0] == "squeue":
            assert f"--user={USER}" in argv and any(a.startswith("--Format=") for a in argv)
            return query.parse("".join(self._squeue_line(i, j) for i, j in self.jobs.items()))
        assert argv[:4] == ("scontrol", "-o", "show", "job")
        job_id = argv[4]
        if job_id not in self.jobs:
            raise SlurmError(list(argv), 1, "slurm_load_jobs error: Invalid job id specified")
        j = self.jobs[job_id]
        return query.parse(
            f"JobId={job_id} JobName={NAME} UserId={USER}(1000) QOS={j.qos} JobState={j.state} Reason=None "
            f"SubmitTime=1796644113 StartTime=1796644113 EndTime=Unknown PreemptTime={j.preempt} "
            f"NodeList=n1 BatchHost=n1 Comment={COMMENT} \n")

    @staticmethod
    def _squeue_line(job_id: str, j: FakeJob) -> str:
        fields = [job_id, j.state, USER, "1000", "n1", "n1", "1796644113", "1796644113", "NONE", "None", j.qos,
                  j.preempt, NAME, COMMENT]
        return "".join(f + parse.SEP for f in fields) + "\n"


def client(n: int, *, by_id_max: int | None = None) -> tuple[SlurmClient, StandInRunner, list[float]]:
    clock = [0.0]
    slurm = SlurmClient("", {}, user=USER, clock=lambda: clock[0])
    runner = StandInRunner({str(1000 + i): FakeJob() for i in range(n)})
    slurm.runner = runner  # type: ignore[assignment]
    if by_id_max is not None:
        slurm.by_id_max = by_id_max
    return slurm, runner, clock


async def calls_per_step(slurm: SlurmClient, runner: StandInRunner, clock: list[float], steps: int = 3) -> list[int]:
    counts = []
    for _ in range(steps):
        clock[0] += 2.0  # the autoscaler's interval
        before = len(runner.calls)
        await slurm.jobs([NAME])
        counts.append(len(runner.calls) - before)
    return counts


@pytest.mark.parametrize("n", [1, BY_ID_MAX, BY_ID_MAX + 1, 200, 5000])
async def test_a_step_asks_slurm_at_most_by_id_max_times_whatever_the_jobs(n: int) -> None:
    slurm, runner, clock = client(n)
    assert len(await slurm.jobs([NAME])) == n and runner.calls == ["squeue"]  # the first step lists
    counts = await calls_per_step(slurm, runner, clock)
    assert all(c <= BY_ID_MAX for c in counts), counts
    # Few jobs: each by id (no walk of slurmctld's queue); more: one listing a step.
    assert counts == ([n] * 3 if n <= BY_ID_MAX else [1] * 3)
    assert runner.calls[-1] == ("scontrol" if n <= BY_ID_MAX else "squeue")


@pytest.mark.parametrize("n", [200, 5000])
async def test_control_the_old_step_asks_once_per_job(n: int) -> None:
    slurm, runner, clock = client(n, by_id_max=10**9)
    await slurm.jobs([NAME])
    assert await calls_per_step(slurm, runner, clock, steps=1) == [n]
    assert set(runner.calls[1:]) == {"scontrol"}


async def test_the_listing_carries_qos_and_the_preemption_notice() -> None:
    # What the autoscaler's preemption and tier restore read, now from the one listing (no scontrol per job).
    slurm, runner, clock = client(BY_ID_MAX + 3)
    await slurm.jobs([NAME])
    runner.jobs["1002"] = FakeJob(qos="scavenger", preempt="1796644119")
    clock[0] += 2.0
    before = len(runner.calls)
    found = {j.job_id: j for j in await slurm.jobs([NAME])}
    assert runner.calls[before:] == ["squeue"]
    assert (found["1002"].qos, found["1002"].preempt_time) == ("scavenger", 1796644119.0)
    assert (found["1001"].qos, found["1001"].preempt_time) == ("normal", 0.0)


async def test_back_to_asking_by_id_once_few_jobs_remain_and_listing_again_when_many() -> None:
    slurm, runner, clock = client(BY_ID_MAX + 2)
    await slurm.jobs([NAME])
    for job_id in ("1000", "1001"):
        runner.jobs[job_id] = FakeJob(state="CANCELLED")
    # This listing still counts BY_ID_MAX + 2 known jobs; it shows two ended, so the next step asks by id.
    assert await calls_per_step(slurm, runner, clock, steps=2) == [1, BY_ID_MAX]
    assert runner.calls[-1] == "scontrol"
    # Another controller's or a submit's jobs are found again by the listing after STALE_S, as before.
    for i in range(10):
        runner.jobs[str(2000 + i)] = FakeJob()
    clock[0] += STALE_S + 1
    await slurm.jobs([NAME])
    assert runner.calls[-1] == "squeue"
    assert await calls_per_step(slurm, runner, clock, steps=2) == [1, 1]
