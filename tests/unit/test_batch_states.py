"""`/v1/batches` (controller/batches.py) through the openai client, and its scheduler against a fake Slurm whose
"job" runs the real batch runner on a stand-in engine: submit flags, states, cancel, expiry, failure, usage."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from pathlib import Path

import openai
import pytest
from aiohttp import web

from slinfer import batchrun
from slinfer.cli import batches as cli_batches
from slinfer.config import ModelConfig
from slinfer.controller.batches import BatchesApi, BatchStore, Scheduler, Settings, slurm_time, window_seconds
from slinfer.controller.files import FilesApi, FileStore
from slinfer.controller.keys import KeyStore
from slinfer.controller.usage import Meter
from slinfer.slurm.jobs import Job
from slinfer.slurm.runner import SlurmError

MODEL = ModelConfig(name="tiny", source="/x", gpus=1, burst_qos="scavenger", partition="gpu")


class FakeSlurm:
    """sbatch, scontrol show job and scancel, as the scheduler sees them; the test plays the job."""

    def __init__(self) -> None:
        self.submitted: list[tuple[list[str], str]] = []
        self.states: dict[str, str] = {}
        self.cancelled: list[str] = []
        self.requeued: list[str] = []
        self.refuse_accounts = False
        self.refuse_requeue = False

    async def submit_batch(self, argv: list[str], script: str) -> str:
        if self.refuse_accounts and any(a.startswith("--account=") for a in argv):
            raise SlurmError(argv, 1, "sbatch: error: Batch job submission failed: Invalid account or "
                             "account/partition combination specified")
        self.submitted.append((argv, script))
        job_id = str(100 + len(self.submitted))
        array = [a.split("=", 1)[1] for a in argv if a.startswith("--array=")]
        if not array:
            self.states[job_id] = "PENDING"
        for part in array[0].split(",") if array else ():
            first, _, last = part.partition("-")
            for task in range(int(first), int(last or first) + 1):
                self.states[f"{job_id}_{task}"] = "PENDING"
        return job_id

    async def records(self, job_id: str) -> list[Job]:
        return [Job(k, "", "", v, "", 0, 0, 0) for k, v in self.states.items() if k.startswith(f"{job_id}_")]

    async def job(self, job_id: str) -> Job | None:
        state = self.states.get(job_id)
        return None if state is None else Job(job_id, "", "", state, "", 0, 0, 0)

    async def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)
        for key in [k for k in self.states if k == job_id or k.startswith(f"{job_id}_")]:
            if self.states[key] not in ("COMPLETED", "FAILED", "PREEMPTED"):
                self.states[key] = "CANCELLED"

    async def requeue(self, job_id: str) -> None:
        if self.refuse_requeue:
            raise SlurmError(["scontrol", "requeue", job_id], 1, "Requested operation is presently disabled")
        self.requeued.append(job_id)
        self.states[job_id] = "PENDING"


class FakeLedger:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, int, int, int]] = []

    def record(self, key_id: str, key_name: str, account: str, model: str, status: int, meter: Meter) -> None:
        self.rows.append((key_id, account, model, status, meter.prompt_tokens, meter.completion_tokens))


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def lines(n: int) -> bytes:
    return b"".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "tiny", "messages": [{"role": "user", "content": str(i)}],
                                         "max_tokens": 4}}).encode() + b"\n" for i in range(n))


@pytest.fixture
async def bed(tmp_path: Path, unused_tcp_port: int):
    keys = KeyStore(tmp_path / "keys.json")
    alice_id, alice = keys.create("alice-key", account="physics", user="slinfer-alice")
    _, bob = keys.create("bob-key", account="chem", user="slinfer-bob")
    spool = tmp_path / "spool"
    clock = Clock()
    files = FilesApi(FileStore(spool), keys.verify, ["tiny"], 1 << 20, 1000)
    api = BatchesApi(BatchStore(spool), files.store, files.key, ["tiny"], clock=clock)
    app = web.Application()
    files.register(app.router)
    api.register(app.router)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    slurm, ledger = FakeSlurm(), FakeLedger()
    scheduler = Scheduler(BatchStore(spool), FileStore(spool), [MODEL], slurm, ledger,
                          Settings(qos="scavenger", partition="", runner=["python3", "-m", "slinfer.batchrun"],
                                   job_name_prefix="slinfer"), clock=clock)
    base = f"http://127.0.0.1:{unused_tcp_port}/v1"

    class Bed:
        pass

    b = Bed()
    b.alice = openai.AsyncOpenAI(base_url=base, api_key=alice, max_retries=0)  # type: ignore[attr-defined]
    b.bob = openai.AsyncOpenAI(base_url=base, api_key=bob, max_retries=0)  # type: ignore[attr-defined]
    b.alice_id, b.slurm, b.ledger, b.scheduler, b.clock, b.spool = (  # type: ignore[attr-defined]
        alice_id, slurm, ledger, scheduler, clock, spool)
    yield b
    await runner.cleanup()


async def create(b, n: int = 12, window: str = "24h"):
    f = await b.alice.files.create(file=("in.jsonl", lines(n)), purpose="batch")
    return await b.alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                        completion_window=window, metadata={"run": "t"})


def test_windows_and_time_limits():
    assert window_seconds("24h") == 86400 and window_seconds("90m") == 5400
    for bad in ("24", "0h", "30s", "8d", 24, None):
        with pytest.raises(ValueError, match="completion_window"):
            window_seconds(bad)
    assert slurm_time(86400) == "1-00:00:00" and slurm_time(5401) == "0-01:31:00"


async def test_a_batch_runs_as_a_job_and_completes_with_every_line_once(bed, standins):
    b = bed
    batch = await create(b)
    assert (batch.status, batch.request_counts.total, batch.metadata) == ("validating", 12, {"run": "t"})
    await b.scheduler.step()
    argv, script = b.slurm.submitted[0]
    assert {"--inference=tiny", "--requeue", "--account=physics", "--qos=scavenger", "--partition=gpu",
            "--gres=gpu:1", "--time=1-00:00:00"} <= set(argv)
    assert script.endswith(f"--dir {b.spool}/batches/{batch.id}\n")
    assert (await b.alice.batches.retrieve(batch.id)).status == "in_progress"
    # The job: RUNNING, the runner answers every line on an engine, then COMPLETED.
    b.slurm.states["101"] = "RUNNING"
    engine = await standins(api_key="k")
    folder = b.spool / "batches" / batch.id
    await batchrun.run(folder, engine.base_url + "/v1", "k", concurrency=4, wait_s=5)
    running = await b.alice.batches.retrieve(batch.id)
    assert running.request_counts.completed == 12 and running.status == "in_progress"
    (folder / batchrun.FINISHED).write_text("{}")
    b.slurm.states["101"] = "COMPLETED"
    await b.scheduler.step()
    done = await b.alice.batches.retrieve(batch.id)
    assert done.status == "completed" and done.completed_at and done.error_file_id is None
    content = (await b.alice.files.content(done.output_file_id)).content
    ids = Counter(json.loads(x)["custom_id"] for x in content.splitlines())
    assert ids == Counter(f"r{i}" for i in range(12))
    # An ended batch's record is read once more by the scheduler, then never again.
    loaded: list[str] = []
    load = b.scheduler.batches.load
    b.scheduler.batches.load = lambda batch_id: loaded.append(batch_id) or load(batch_id)
    for _ in range(3):
        await b.scheduler.step()
    assert loaded == [batch.id]
    # Usage: one ledger row per line, for alice's key and account, the engine's counts.
    assert len(b.ledger.rows) == 12
    assert {(r[0], r[1], r[2], r[3]) for r in b.ledger.rows} == {(b.alice_id, "physics", "tiny", 200)}
    assert sum(r[5] for r in b.ledger.rows) == 12 * engine.tokens
    # Another key sees neither the batch nor its output.
    with pytest.raises(openai.NotFoundError):
        await b.bob.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        await b.bob.files.content(done.output_file_id)
    assert (await b.bob.batches.list()).data == []
    assert [x.id for x in (await b.alice.batches.list()).data] == [batch.id]
    # `slinfer batches` (the user's key, the gateway's list): the row with its counts and Slurm state.
    listed = cli_batches.table(await asyncio.to_thread(cli_batches.fetch, str(b.alice.base_url).rstrip("/"),
                                                       b.alice.api_key))
    assert re.search(rf"{batch.id}\s+completed\s+12/12\s+0\s+101\s+COMPLETED\s+tiny", listed), listed
    with pytest.raises(openai.APIStatusError) as caught:
        await b.alice.batches.cancel(batch.id)
    assert caught.value.status_code == 409


async def test_cancel_scancels_and_keeps_the_answers_made(bed):
    b = bed
    batch = await create(b)
    await b.scheduler.step()
    b.slurm.states["101"] = "RUNNING"
    folder = b.spool / "batches" / batch.id
    (folder / batchrun.OUTPUT).write_bytes(b"".join(
        batchrun.result_line({"custom_id": f"r{i}"}, 200, {"usage": {"prompt_tokens": 3, "completion_tokens": 2}})
        for i in range(5)))
    cancelling = await b.alice.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    await b.scheduler.step()
    assert b.slurm.cancelled == ["101"]
    await b.scheduler.step()
    ended = await b.alice.batches.retrieve(batch.id)
    assert ended.status == "cancelled" and ended.request_counts.completed == 5
    assert len((await b.alice.files.content(ended.output_file_id)).content.splitlines()) == 5
    assert sum(r[4] for r in b.ledger.rows) == 15
    assert b.slurm.cancelled == ["101"]  # once


async def test_a_batch_cancelled_before_its_job_never_submits(bed):
    b = bed
    batch = await create(b)
    await b.alice.batches.cancel(batch.id)
    await b.scheduler.step()
    assert b.slurm.submitted == [] and (await b.alice.batches.retrieve(batch.id)).status == "cancelled"


async def test_a_standby_controller_submits_nothing_until_it_leads(bed):
    # Two controllers with leader election share the spool: only the leader may submit, or each batch would run
    # twice. Positive control: the same scheduler submits once it leads.
    b = bed
    batch = await create(b)
    leading = [False]
    b.scheduler._is_leader = lambda: leading[0]
    await b.scheduler.step()
    assert b.slurm.submitted == [] and (await b.alice.batches.retrieve(batch.id)).status == "validating"
    leading[0] = True
    await b.scheduler.step()
    assert len(b.slurm.submitted) == 1


async def test_past_its_window_a_batch_is_expired_with_its_partial_output(bed):
    b = bed
    batch = await create(b, window="10m")
    await b.scheduler.step()
    assert "--time=0-00:10:00" in b.slurm.submitted[0][0]
    b.slurm.states["101"] = "RUNNING"
    (b.spool / "batches" / batch.id / batchrun.OUTPUT).write_bytes(batchrun.result_line({"custom_id": "r0"}, 200, {}))
    await b.scheduler.step()
    assert b.slurm.cancelled == []  # control: within its window
    b.clock.now += 601
    await b.scheduler.step()
    await b.scheduler.step()
    ended = await b.alice.batches.retrieve(batch.id)
    assert (ended.status, ended.request_counts.completed, b.slurm.cancelled) == ("expired", 1, ["101"])


async def test_a_job_that_ends_with_lines_left_is_followed_by_another_then_the_batch_fails(bed):
    b = bed
    batch = await create(b)
    await b.scheduler.step()
    b.slurm.states["101"] = "REQUEUED"  # a requeue is not an end
    await b.scheduler.step()
    assert (await b.alice.batches.retrieve(batch.id)).status == "in_progress"
    # Each job ended on purpose with lines left is followed by another (it resumes), up to max_attempts (3).
    for job_id in ("101", "102"):
        b.slurm.states[job_id] = "PREEMPTED" if job_id == "101" else "TIMEOUT"
        await b.scheduler.step()
        again = await b.alice.batches.retrieve(batch.id)
        assert again.status == "in_progress" and again.model_extra["slurm"]["job_id"] == str(int(job_id) + 1)
    assert len(b.slurm.submitted) == 3 and b.slurm.requeued == []
    b.slurm.states["103"] = "CANCELLED"
    await b.scheduler.step()
    ended = await b.alice.batches.retrieve(batch.id)
    assert ended.status == "failed" and "CANCELLED" in ended.errors.data[0].message
    assert ended.model_extra["slurm"]["jobs"] == ["101", "102", "103"] and len(b.slurm.submitted) == 3


async def test_a_requeued_job_restarted_without_its_engine_is_requeued_and_the_same_job_finishes(bed, standins):
    """The order seen on the bed (22.05): `scontrol requeue` mid-way, the job started again at once
    (StartTime=now), slurmd ran no prolog for it ("reissued job credential"), its step found no env file and the
    job FAILED with lines left. The scheduler requeues the same job (Slurm holds it until slurmd forgot it, and
    the prolog runs), and that job's next run finishes the batch: no second job."""
    b = bed
    batch = await create(b)
    await b.scheduler.step()
    folder = b.spool / "batches" / batch.id
    b.slurm.states["101"] = "RUNNING"
    first = b"".join(batchrun.result_line({"custom_id": f"r{i}"}, 200, {}) for i in range(5))
    (folder / batchrun.OUTPUT).write_bytes(first)
    await b.scheduler.step()
    for state in ("REQUEUED", "PENDING", "RUNNING"):  # the admin's requeue and the restart at once: no end
        b.slurm.states["101"] = state
        await b.scheduler.step()
    b.slurm.states["101"] = "FAILED"  # the restart without its engine
    await b.scheduler.step()
    assert b.slurm.requeued == ["101"] and len(b.slurm.submitted) == 1
    again = await b.alice.batches.retrieve(batch.id)
    assert again.status == "in_progress" and again.model_extra["slurm"]["jobs"] == ["101"]
    # Its next run, with its engine: resumes and finishes.
    b.slurm.states["101"] = "RUNNING"
    await b.scheduler.step()
    engine = await standins(api_key="k")
    counts = await batchrun.run(folder, engine.base_url + "/v1", "k", concurrency=4, wait_s=5)
    assert counts["asked"] == 7
    (folder / batchrun.FINISHED).write_text("{}")
    b.slurm.states["101"] = "COMPLETED"
    await b.scheduler.step()
    done = await b.alice.batches.retrieve(batch.id)
    assert done.status == "completed" and done.model_extra["slurm"]["jobs"] == ["101"]
    assert len(b.slurm.submitted) == 1 and b.slurm.requeued == ["101"]
    ids = Counter(json.loads(x)["custom_id"] for x in (await b.alice.files.content(done.output_file_id)).content
                  .splitlines())
    assert ids == Counter(f"r{i}" for i in range(12))


async def test_requeues_count_as_runs_and_a_refused_requeue_falls_back_to_a_new_job(bed):
    b = bed
    batch = await create(b)
    await b.scheduler.step()
    b.slurm.states["101"] = "FAILED"
    await b.scheduler.step()
    b.slurm.states["101"] = "NODE_FAIL"
    await b.scheduler.step()
    assert b.slurm.requeued == ["101", "101"] and len(b.slurm.submitted) == 1
    b.slurm.states["101"] = "FAILED"  # the third run failed too: max_attempts (3) reached
    await b.scheduler.step()
    ended = await b.alice.batches.retrieve(batch.id)
    assert ended.status == "failed" and "3 runs tried" in ended.errors.data[0].message
    assert b.slurm.requeued == ["101", "101"] and len(b.slurm.submitted) == 1
    # A job Slurm will not requeue (purged, or not requeueable) is followed by a new one.
    b.slurm.refuse_requeue = True
    other = await create(b)
    await b.scheduler.step()
    b.slurm.states["102"] = "FAILED"
    await b.scheduler.step()
    got = await b.alice.batches.retrieve(other.id)
    assert got.status == "in_progress" and got.model_extra["slurm"]["jobs"] == ["102", "103"]


async def test_an_account_the_service_may_not_use_falls_back_to_its_own(bed):
    b = bed
    b.slurm.refuse_accounts = True
    batch = await create(b)
    await b.scheduler.step()
    assert not any(a.startswith("--account=") for a in b.slurm.submitted[0][0])
    got = await b.alice.batches.retrieve(batch.id)
    assert got.status == "in_progress" and got.model_extra["slurm"]["account"] == "(the service's default)"


async def test_create_refuses_another_keys_file_and_a_wrong_endpoint(bed):
    b = bed
    f = await b.alice.files.create(file=("in.jsonl", lines(2)), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        await b.bob.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="Line 1"):
        await b.alice.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        await b.alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1y")


async def test_a_file_above_lines_per_task_runs_as_a_job_array_merged_in_the_files_order(bed, standins):
    b = bed
    b.scheduler._settings.lines_per_task = 4
    batch = await create(b, n=10)
    await b.scheduler.step()
    ((argv, script),) = b.slurm.submitted
    assert "--array=0-2" in argv and any(a.endswith("/job-%a.log") for a in argv)
    assert script.endswith(f"--dir {b.spool}/batches/{batch.id} --lines-per-task 4\n")
    got = await b.alice.batches.retrieve(batch.id)
    assert got.model_extra["slurm"]["tasks"] == 3
    folder = b.spool / "batches" / batch.id
    engine = await standins(api_key="k")
    asked = {}
    for task in (2, 0, 1):  # the tasks run in any order, each its own slice
        b.slurm.states[f"101_{task}"] = "RUNNING"
        counts = await batchrun.run(folder, engine.base_url + "/v1", "k", concurrency=3, wait_s=5, task=task,
                                    per_task=4)
        asked[task] = counts["asked"]
        ids = [json.loads(x)["custom_id"] for x in (folder / f"output.{task}.jsonl").read_text().splitlines()]
        assert sorted(ids, key=lambda c: int(c[1:])) == [f"r{i}" for i in range(4 * task, min(10, 4 * task + 4))]
        await b.scheduler.step()
        assert (await b.alice.batches.retrieve(batch.id)).status == "in_progress"
    assert asked == {2: 2, 0: 4, 1: 4}
    assert (await b.alice.batches.retrieve(batch.id)).request_counts.completed == 10
    for task in range(3):
        (folder / f"finished.{task}").write_text("{}")
        if task < 2:
            await b.scheduler.step()
            assert (await b.alice.batches.retrieve(batch.id)).status == "in_progress", "completed before every task"
    await b.scheduler.step()
    done = await b.alice.batches.retrieve(batch.id)
    assert done.status == "completed" and done.request_counts.completed == 10
    content = (await b.alice.files.content(done.output_file_id)).content
    assert [json.loads(x)["custom_id"] for x in content.splitlines()] == [f"r{i}" for i in range(10)]
    assert len(b.ledger.rows) == 10 and len(b.slurm.submitted) == 1


async def test_array_tasks_are_requeued_resubmitted_and_cancelled_each_on_its_own(bed):
    b = bed
    b.scheduler._settings.lines_per_task = 4
    batch = await create(b, n=10)
    await b.scheduler.step()
    folder = b.spool / "batches" / batch.id
    b.slurm.states.update({"101_0": "RUNNING", "101_1": "FAILED", "101_2": "RUNNING"})
    await b.scheduler.step()
    assert b.slurm.requeued == ["101_1"] and len(b.slurm.submitted) == 1  # only the failed task, the same job
    # Task 0 finishes; task 1 is preempted; task 2 finishes: the array is over with task 1 left.
    (folder / "finished.0").write_text("{}")
    (folder / "finished.2").write_text("{}")
    b.slurm.states.update({"101_0": "COMPLETED", "101_1": "PREEMPTED", "101_2": "COMPLETED"})
    await b.scheduler.step()
    assert len(b.slurm.submitted) == 2 and "--array=1" in b.slurm.submitted[1][0]
    got = await b.alice.batches.retrieve(batch.id)
    assert got.status == "in_progress" and got.model_extra["slurm"]["jobs"] == ["101", "102"]
    # Cancel: the array's scancel, then cancelled with what was answered.
    b.slurm.states["102_1"] = "RUNNING"
    await b.alice.batches.cancel(batch.id)
    await b.scheduler.step()
    assert b.slurm.cancelled[-1] == "102" and b.slurm.states["102_1"] == "CANCELLED"
    await b.scheduler.step()
    assert (await b.alice.batches.retrieve(batch.id)).status == "cancelled"


def test_a_file_of_at_most_lines_per_task_stays_one_job_and_huge_files_keep_under_max_tasks(bed):
    from slinfer.controller.batches import MAX_TASKS, Batch, array_spec
    b = bed
    b.scheduler._settings.lines_per_task = 4
    one = Batch(id="batch_" + "0" * 24, owner="k", key_name="", user="", account="", input_file_id="f",
                endpoint="/v1/chat/completions", completion_window="24h", model="tiny", total=4, created_at=0,
                expires_at=0)
    b.scheduler.split(one)
    assert (one.tasks, one.lines_per_task) == (0, 0)
    one.total = 5
    b.scheduler.split(one)
    assert (one.tasks, one.lines_per_task) == (2, 4)
    one.total, one.tasks = 4 * MAX_TASKS * 3, 0
    b.scheduler.split(one)
    assert one.tasks <= MAX_TASKS and one.tasks * one.lines_per_task >= one.total
    assert array_spec([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and array_spec([3]) == "3"
