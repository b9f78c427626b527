"""SlurmClient against a real slurmctld/slurmd.

The Slurm comes from SLINFER_TEST_SLURM_CONF (a running cluster's slurm.conf, node with gpu:4). The jobs here
run a plain command instead of `slinfer hold`, so no engine is involved.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from slinfer.controller.slurm import SlurmClient, SlurmError, SlurmJob

from slinfer.config import ModelConfig

pytestmark = pytest.mark.bed

CONF = os.environ.get("SLINFER_TEST_SLURM_CONF", "")
if not CONF:
    pytest.skip("SLINFER_TEST_SLURM_CONF is not set: no Slurm to test against", allow_module_level=True)

ENV = {**os.environ, "SLURM_CONF": CONF}
# Without the slinfer SPANK plugin sbatch does not know --inference; these tests are about the client.
NO_PLUGIN = os.environ.get("SLINFER_TEST_SLURM_PLUGIN", "1") == "0"


def client(**kw: object) -> SlurmClient:
    if NO_PLUGIN:
        kw.setdefault("serve_flags", lambda m: [])
    return SlurmClient("", ENV, **kw)  # type: ignore[arg-type]


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


async def test_submit_lists_and_cancels(cleanup: list[str], tmp_path: Path) -> None:
    slurm = client(job_command=["sleep", "120"])
    model = ModelConfig(name="tiny", source="/x", gpus=1, time_limit="00:07:00")
    comment = "slinfer:test model=tiny; quotes ' \" and $(no shell)"
    before = time.time()
    job_id = await slurm.submit(model, "slinfer-test-tiny", comment)
    cleanup.append(job_id)
    assert job_id.isdigit()

    job = await wait_state(slurm, job_id, {"RUNNING"})
    assert job.name == "slinfer-test-tiny"
    assert job.comment == comment
    assert job.active
    assert job.node
    assert before - 2 <= job.submit_time <= time.time() + 2
    assert job.start_time >= job.submit_time
    assert job.end_time == job.start_time + 7 * 60

    await slurm.cancel(job_id)
    job = await wait_state(slurm, job_id, {"CANCELLED"})
    assert not job.active


async def test_batch_script_runs_job_command(cleanup: list[str], tmp_path: Path) -> None:
    out = tmp_path / "hold.out"
    slurm = client(job_command=["/bin/echo", "held with spaces", "$HOME"], job_output=str(out))
    model = ModelConfig(name="tiny", source="/x", gpus=0, time_limit="1")
    job_id = await slurm.submit(model, "slinfer-t", "c")
    cleanup.append(job_id)
    await wait_state(slurm, job_id, {"COMPLETED"})
    # Arguments reach the command verbatim: the script quotes them.
    assert out.read_text() == "held with spaces $HOME\n"


async def test_gpu_request_slurm_cannot_satisfy_carries_stderr() -> None:
    slurm = client(job_command=["true"])
    with pytest.raises(SlurmError) as err:
        await slurm.submit(ModelConfig(name="tiny", source="/x", gpus=64), "slinfer-t", "c")
    assert err.value.returncode not in (0, None)
    assert "node configuration is not available" in err.value.stderr


async def test_unknown_partition_fails_with_stderr() -> None:
    slurm = client(job_command=["true"])
    with pytest.raises(SlurmError) as err:
        await slurm.submit(ModelConfig(name="tiny", source="/x", gpus=0, partition="nope"), "slinfer-t", "c")
    assert "partition" in str(err.value).lower()


async def test_pending_job_has_no_node_and_counts_active(cleanup: list[str]) -> None:
    slurm = client(job_command=["sleep", "60"])
    # Four GPUs on the node: the second job of 4 waits for the first.
    model = ModelConfig(name="tiny", source="/x", gpus=4, time_limit="2")
    first = await slurm.submit(model, "slinfer-t", "c")
    cleanup.append(first)
    second = await slurm.submit(model, "slinfer-t", "c")
    cleanup.append(second)
    await wait_state(slurm, first, {"RUNNING"})
    job = await wait_state(slurm, second, {"PENDING"})
    assert job.active
    assert job.node == ""
    assert job.start_time == 0 or job.start_time > time.time()
    assert job.reason


async def test_missing_binaries_raise_slurm_error(tmp_path: Path) -> None:
    slurm = SlurmClient(str(tmp_path), ENV)
    with pytest.raises(SlurmError) as err:
        await slurm.jobs()
    assert err.value.returncode == 127


async def test_cancel_rejects_non_ids() -> None:
    with pytest.raises(ValueError):
        await client().cancel("--signal=KILL")
