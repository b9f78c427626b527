"""SlurmClient against the real bed's slurmctld/slurmd (with the slinfer SPANK plugin).

The jobs run a plain command instead of `slinfer hold` and ask for a model the catalog does not have, so the
agent refuses the engine (the job keeps running) and no vLLM starts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from slinfer.config import ModelConfig
from slinfer.controller.slurm import STALE_S, SlurmClient, SlurmError, SlurmJob
from slinfer.dev import devcluster
from slinfer.slurm import queries
from tests.fakes.slurmbed import SlurmBed

pytestmark = pytest.mark.bed

MODEL = "not-in-catalog"
ENV: dict[str, str] = {}


@pytest.fixture(autouse=True)
def bed_env(slurm_bed: SlurmBed) -> None:
    ENV.clear()
    ENV.update(slurm_bed.env())


def client(**kw: object) -> SlurmClient:
    return SlurmClient("", ENV, **kw)  # type: ignore[arg-type]


def model(**kw: object) -> ModelConfig:
    return ModelConfig(name=MODEL, source="/x", **kw)  # type: ignore[arg-type]


@pytest.fixture
async def cleanup() -> AsyncIterator[list[str]]:
    ids: list[str] = []
    yield ids
    for job_id in ids:
        try:
            await SlurmClient("", ENV).cancel(job_id)
        except SlurmError:
            pass


async def wait_state(slurm: SlurmClient, job_id: str, states: set[str], within_s: float = 30) -> SlurmJob:
    deadline = time.monotonic() + within_s
    while True:
        found = [j for j in await slurm.jobs() if j.job_id == job_id]
        if found and found[0].state in states:
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} not in {states}: {found}")
        await asyncio.sleep(0.5)


async def test_submit_passes_inference_flags_and_lists_the_job(cleanup: list[str], tmp_path: Path) -> None:
    out = tmp_path / "job.out"
    slurm = client(job_command=["sleep", "120"], job_output=str(out))
    comment = "slinfer:test model=x; quotes ' \" and $(no shell)"
    before = time.time()
    job_id = await slurm.submit(model(gpus=1, time_limit="00:07:00"), "slinfer-test-x", comment)
    cleanup.append(job_id)
    assert job_id.isdigit()
    # The plugin got --inference=MODEL at the prolog: the agent refused the model by name, failing the job.
    job = await wait_state(slurm, job_id, {"FAILED"})
    assert f"model '{MODEL}' is not in this cluster's catalog" in out.read_text()
    assert job.name == "slinfer-test-x"
    assert job.comment == comment
    assert not job.active
    assert job.node == "slinfer-dev"
    assert before - 2 <= job.submit_time <= job.start_time <= time.time() + 2


async def test_batch_script_runs_job_command(cleanup: list[str], tmp_path: Path) -> None:
    out = tmp_path / "hold.out"
    slurm = client(job_command=["/bin/echo", "held with spaces", "$HOME"], job_output=str(out))
    # A catalog model, so the job runs; the engine the prolog starts is stopped when the echo ends the job.
    job_id = await slurm.submit(ModelConfig(name="tiny", source="/x", gpus=1, time_limit="2"), "slinfer-t", "c")
    cleanup.append(job_id)
    await wait_state(slurm, job_id, {"COMPLETED"}, within_s=60)
    # Arguments reach the command verbatim: the script quotes them.
    assert out.read_text() == "held with spaces $HOME\n"


async def test_running_and_pending_jobs_then_cancel(cleanup: list[str], slurm_bed: SlurmBed) -> None:
    slurm = client(job_command=["sleep", "60"])
    # A plain job takes all four GPUs (no --inference, so no engine); ours must wait for it.
    # Submitted as the controller's own user: its client lists only that user's jobs.
    blocker = slurm_bed.sbatch("--gres=gpu:4", "--time=2", "--job-name=blocker", script="sleep 120",
                               user="root")
    cleanup.append(blocker)
    running = await wait_state(slurm, blocker, {"RUNNING"})
    assert running.active and running.node == "slinfer-dev"
    assert running.end_time == running.start_time + 2 * 60
    job_id = await slurm.submit(model(gpus=4, time_limit="2"), "slinfer-t", "c")
    cleanup.append(job_id)
    job = await wait_state(slurm, job_id, {"PENDING"})
    for _ in range(30):  # no reason (squeue's "None") until the scheduler has looked at the job
        if job.reason:
            break
        await asyncio.sleep(1)
        job = await wait_state(slurm, job_id, {"PENDING"})
    assert job.active
    assert job.node == ""
    assert job.reason == "Resources"
    await slurm.cancel(job_id)
    job = await wait_state(slurm, job_id, {"CANCELLED"})
    assert not job.active


async def test_gpu_request_slurm_cannot_satisfy_carries_stderr() -> None:
    slurm = client(job_command=["true"])
    with pytest.raises(SlurmError) as err:
        await slurm.submit(model(gpus=64), "slinfer-t", "c")
    assert err.value.returncode not in (0, None)
    assert "node configuration is not available" in err.value.stderr


async def test_unknown_partition_fails_with_stderr() -> None:
    slurm = client(job_command=["true"])
    with pytest.raises(SlurmError) as err:
        await slurm.submit(model(gpus=0, partition="nope"), "slinfer-t", "c")
    assert "partition" in str(err.value).lower()


async def test_missing_binaries_raise_slurm_error(tmp_path: Path) -> None:
    slurm = SlurmClient(str(tmp_path), ENV)
    with pytest.raises(SlurmError) as err:
        await slurm.jobs()
    assert err.value.returncode == 127


async def test_cancel_rejects_non_ids() -> None:
    with pytest.raises(ValueError):
        await client().cancel("--signal=KILL")


async def test_asks_only_about_its_own_jobs(cleanup: list[str], slurm_bed: SlurmBed) -> None:
    # Another user's held job: the bed's munge socket is open to users, as a site's is. A bed user, since
    # slurmdbd refuses a user without an association (nobody has none).
    done = await asyncio.to_thread(devcluster.run_as, slurm_bed.bed, devcluster.BED_USERS[1], [
        "sbatch", "--parsable", "--hold", "--output=/dev/null", "--job-name=slinfer-t", "--wrap", "true"])
    other = done.stdout.strip()
    cleanup.append(other)
    clock = [0.0]
    slurm = SlurmClient("", ENV, job_command=["sleep", "60"], clock=lambda: clock[0])
    mine = await slurm.submit(model(gpus=4, time_limit="2"), "slinfer-t", "c")
    cleanup.append(mine)
    listed = {j.job_id: j for j in await slurm.jobs(["slinfer-t"])}
    # The first call lists the user's jobs of that name: its own, not the other user's of the same name.
    assert mine in listed and other not in listed
    assert slurm.listings == 1 and "--user=root" in slurm.runner.argv(queries.user_jobs("root").argv)
    calls = slurm.runner.calls
    clock[0] += 2
    again = await slurm.jobs(["slinfer-t"])
    # Later steps ask about each known job by id: one scontrol call, no listing.
    assert [j.job_id for j in again] == [mine] and slurm.listings == 1
    assert slurm.runner.calls == calls + 1
    await slurm.cancel(mine)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        clock[0] += 2
        seen = await slurm.jobs(["slinfer-t"])
        if not seen:
            break
        assert [j.job_id for j in seen] == [mine]
        await asyncio.sleep(0.5)
    # Once reported over, the job is forgotten: no more calls about it until the next listing.
    assert seen == []
    calls = slurm.runner.calls
    assert await slurm.jobs(["slinfer-t"]) == [] and slurm.runner.calls == calls
    # A pause longer than STALE_S (a standby leading again) lists again; so does a failed sbatch.
    clock[0] += STALE_S + 1
    await slurm.jobs(["slinfer-t"])
    assert slurm.listings == 2
    with pytest.raises(SlurmError):
        await slurm.submit(model(gpus=64), "slinfer-t", "c")
    clock[0] += 2
    await slurm.jobs(["slinfer-t"])
    assert slurm.listings == 3


async def test_many_jobs_one_listing_a_step_with_qos_from_squeue(cleanup: list[str]) -> None:
    # More known jobs than BY_ID_MAX (forced to 0 here, so one held job is enough): every step is one squeue on
    # the real Slurm, no scontrol, and the listing says the job's QOS (what scontrol said before).
    slurm = SlurmClient("", ENV, job_command=["sleep", "60"])
    slurm.by_id_max = 0
    mine = await slurm.submit(model(gpus=4, time_limit="2", sbatch_args=["--hold"]), "slinfer-t", "c")
    cleanup.append(mine)
    for step in range(3):
        calls, listings = slurm.runner.calls, slurm.listings
        found = {j.job_id: j for j in await slurm.jobs(["slinfer-t"])}
        assert slurm.runner.calls == calls + 1 and slurm.listings == listings + 1, step
        assert found[mine].waiting and found[mine].qos == "normal" and found[mine].preempt_time == 0.0
