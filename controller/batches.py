"""`/v1/batches`: the OpenAI Batch API, each batch one Slurm job that runs slinfer/batchrun.py.

Responsible for: the batch objects (create, retrieve, list, cancel) and their states, kept in the spool
(`batches/<id>/batch.json`, beside the job's input, output and error files) so that every gateway worker
serves them; the controller's scheduler, which submits each new batch as `sbatch --inference=MODEL --requeue`
under the key's account (where the service's user has that association; else its own, said in the batch's
metadata) and the batch QOS, follows the job (`scontrol show job`), scancels a cancelled or expired one, and
finalises: the output and error files become Files of the batch's key, and their usage goes into the ledger
for the key's user and account.

Not responsible for: uploads and their validation (controller/files.py); answering the lines (batchrun.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shlex
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from aiohttp import web

from slinfer import batchrun
from slinfer.atomicfile import write_atomic
from slinfer.config import Config, ModelConfig
from slinfer.controller.files import BATCH_URLS, FileMeta, FileStore, spool_dir
from slinfer.controller.keys import KeyInfo
from slinfer.controller.slurm import JOB_ID, SlurmClient
from slinfer.controller.usage import Meter
from slinfer.slurm.jobs import Job
from slinfer.slurm.runner import SlurmError
from slinfer.slurm.states import Phase
from slinfer.waits import within

log = logging.getLogger(__name__)

# The states a batch ends in: the scheduler leaves these alone.
TERMINAL = frozenset({"completed", "failed", "cancelled", "expired"})
# completion_window: a number and a unit, as OpenAI writes it ("24h"); OpenAI accepts only 24h, a site may want
# shorter (and tests do).
_WINDOW = re.compile(r"^(\d{1,5})([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# The longest window: a week, beyond which a Slurm time limit says little.
MAX_WINDOW_S = 7 * 86400
# A batch id: `batch_` and this many random hex digits.
_ID_HEX = 24
_ID = re.compile(rf"^batch_[0-9a-f]{{{_ID_HEX}}}$")
# How often the controller's scheduler looks at the batches that are not over.
SCHEDULE_S = 1.0
# Lines of the list endpoint's page by default, and at most (OpenAI's).
LIST_LIMIT, LIST_MAX = 20, 100
# The ends after which the scheduler requeues the same job (`scontrol requeue`) rather than submitting another:
# the job failed on its own (its runner, or a step that found no engine) or its node failed. Slurm holds a
# requeued job for its credential lifetime (120 s by default) so that slurmd has forgotten it and runs the
# prolog, hence the engine, again: measured on the bed (22.05), a requeued job started at once
# (`scontrol update StartTime=now`) got "reissued job credential", no prolog and no extern step, so its step
# found no env file. A job ended on purpose (preempted, cancelled, out of time) is followed by a new job instead,
# which queues without that hold.
REQUEUE_AFTER = frozenset({"FAILED", "COMPLETED", "NODE_FAIL"})
# Tasks of one array at most: Slurm's default MaxArraySize (1001) allows indices 0-1000; a file that would need
# more gets longer slices instead.
MAX_TASKS = 1000


def window_seconds(window: object) -> int:
    """`completion_window` in seconds, or ValueError."""
    match = _WINDOW.match(window) if isinstance(window, str) else None
    if match is None:
        raise ValueError("completion_window must be a number and a unit: s, m, h or d (e.g. '24h')")
    seconds = int(match[1]) * _UNIT_S[match[2]]
    if not 60 <= seconds <= MAX_WINDOW_S:
        raise ValueError(f"completion_window must be between 1m and {MAX_WINDOW_S // 86400}d")
    return seconds


def slurm_time(seconds: int) -> str:
    """Seconds as a Slurm time limit, rounded up to the minute (D-HH:MM:SS)."""
    minutes = -(-seconds // 60)
    days, minutes = divmod(minutes, 1440)
    return f"{days}-{minutes // 60:02d}:{minutes % 60:02d}:00"


@dataclass
class Batch:
    """A batch's record: its OpenAI fields, whose it is, and its Slurm job."""

    id: str
    owner: str  # the key id
    key_name: str
    user: str
    account: str
    input_file_id: str
    endpoint: str
    completion_window: str
    model: str
    total: int
    created_at: int
    expires_at: int
    status: str = "validating"
    metadata: dict[str, str] | None = None
    job_id: str = ""
    jobs: list[str] = field(default_factory=list)  # every job submitted for it, the current one last
    requeues: int = 0  # how often the scheduler requeued the current job (each a run, like a new job)
    # A job array: its tasks (0 for one job) and the lines each answers; requeues per task ("3": 1).
    tasks: int = 0
    lines_per_task: int = 0
    task_requeues: dict[str, int] = field(default_factory=dict)
    slurm_state: str = ""
    slurm_account: str = ""  # the account Slurm charges the job to
    cancel_requested: bool = False
    scancelled: bool = False
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, object]] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)
    times: dict[str, int] = field(default_factory=dict)  # state -> unix time it began (in_progress_at, ...)

    def public(self, completed: int, failed: int) -> dict[str, object]:
        at = self.times
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": self.created_at, "in_progress_at": at.get("in_progress"), "expires_at": self.expires_at,
            "finalizing_at": at.get("finalizing"), "completed_at": at.get("completed"),
            "failed_at": at.get("failed"), "expired_at": at.get("expired"), "cancelling_at": at.get("cancelling"),
            "cancelled_at": at.get("cancelled"),
            "request_counts": {"total": self.total, "completed": completed, "failed": failed},
            "metadata": self.metadata, "model": self.model,
            # slinfer's own, beside OpenAI's: where the batch runs.
            "slurm": {"job_id": self.job_id or None, "state": self.slurm_state or None, "tasks": self.tasks or None,
                      "account": self.slurm_account or None, "jobs": self.jobs, "requeues": self.requeues},
        }

    def move(self, status: str, now: float) -> None:
        self.status = status
        self.times.setdefault(status, int(now))


class BatchStore:
    """The batches' folders in the spool: `batches/<id>/` with batch.json and the runner's files."""

    def __init__(self, spool: Path) -> None:
        self.root = spool / "batches"
        self.spool = spool

    def folder(self, batch_id: str) -> Path:
        if not _ID.match(batch_id):
            raise KeyError(batch_id)
        return self.root / batch_id

    @staticmethod
    def new_id() -> str:
        return "batch_" + secrets.token_hex(_ID_HEX // 2)

    def create(self, batch: Batch, input_path: Path) -> None:
        for folder in (self.spool, self.root):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        folder = self.folder(batch.id)
        folder.mkdir(mode=0o700)
        # A link, not a copy: the input stays the job's even if its File is deleted meanwhile.
        os.link(input_path, folder / batchrun.INPUT)
        self.save(batch)

    def save(self, batch: Batch) -> None:
        write_atomic(self.folder(batch.id) / "batch.json", json.dumps(asdict(batch)).encode())

    def load(self, batch_id: str) -> Batch | None:
        try:
            return Batch(**json.loads((self.folder(batch_id) / "batch.json").read_bytes()))
        except (KeyError, OSError, ValueError, TypeError):
            return None

    def get(self, batch_id: str, owner: str) -> Batch | None:
        batch = self.load(batch_id)
        return batch if batch is not None and secrets.compare_digest(batch.owner, owner) else None

    def all(self, skip: Collection[str] = ()) -> Iterator[Batch]:
        """Every batch, but those named in `skip` (not read at all)."""
        if not self.root.is_dir():
            return
        for entry in sorted(self.root.iterdir()):
            if entry.name in skip:
                continue
            batch = self.load(entry.name)
            if batch is not None:
                yield batch

    def counts(self, batch: Batch) -> tuple[int, int]:
        """(completed, failed) lines so far: the runner's output and error files (each task's), counted."""
        folder = self.folder(batch.id)
        if batch.tasks:
            names = [batchrun.task_names(k) for k in range(batch.tasks)]
            return (sum(_lines(folder / n[0]) for n in names), sum(_lines(folder / n[1]) for n in names))
        return tuple(_lines(folder / name) for name in (batchrun.OUTPUT, batchrun.ERRORS))  # type: ignore[return-value]

    def public(self, batch: Batch) -> dict[str, object]:
        return batch.public(*self.counts(batch))


def _lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def _error(status: int, message: str, code: str | None = None, param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                        "code": code}}, status=status)


class BatchesApi:
    """The `/v1/batches` routes, for a gateway's router: records only; the controller's scheduler runs them."""

    def __init__(self, batches: BatchStore, files: FileStore, key: Callable[[web.Request], Awaitable[KeyInfo | None]],
                 models: Collection[str], clock: Callable[[], float] = time.time) -> None:
        self.batches = batches
        self._files = files
        self._key = key
        self._models = frozenset(models)
        self._clock = clock

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/batches", self._create)
        router.add_get("/v1/batches", self._list)
        router.add_get("/v1/batches/{batch_id}", self._retrieve)
        router.add_post("/v1/batches/{batch_id}/cancel", self._cancel)

    def _unauthorized(self) -> web.Response:
        return web.json_response({"error": {"message": "Invalid or missing API key.", "type": "invalid_request_error",
                                            "param": None, "code": "invalid_api_key"}}, status=401)

    async def _create(self, request: web.Request) -> web.Response:
        key = await self._key(request)
        if key is None:
            return self._unauthorized()
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "The body must be a JSON object.")
        if not isinstance(body, dict):
            return _error(400, "The body must be a JSON object.")
        endpoint = body.get("endpoint")
        if endpoint not in BATCH_URLS:
            return _error(400, f"endpoint must be one of {', '.join(BATCH_URLS)}", param="endpoint")
        try:
            window = window_seconds(body.get("completion_window"))
        except ValueError as exc:
            return _error(400, str(exc), param="completion_window")
        metadata = body.get("metadata")
        if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                for k, v in metadata.items())):
            return _error(400, "metadata must be at most 16 string pairs", param="metadata")
        file_id = str(body.get("input_file_id", ""))
        meta: FileMeta | None = self._files.get(file_id, key.key_id)
        if meta is None:
            return _error(404, f"No such File object: {file_id[:64]}", "not_found", "input_file_id")
        if meta.purpose != "batch":
            return _error(400, "The input file's purpose is not batch.", param="input_file_id")
        wrong = _first_other_url(self._files.path(file_id), str(endpoint))
        if wrong:
            return _error(400, f"Line {wrong} of the input file names another url than the endpoint {endpoint}",
                          "invalid_batch_line", "input_file_id")
        if meta.model not in self._models:
            return _error(400, f"The file's model {meta.model!r} is no longer in the catalog.", param="input_file_id")
        now = self._clock()
        batch = Batch(id=BatchStore.new_id(), owner=key.key_id, key_name=key.name, user=key.user,
                      account=key.account, input_file_id=file_id, endpoint=str(endpoint),
                      completion_window=str(body["completion_window"]), model=meta.model, total=meta.lines,
                      created_at=int(now), expires_at=int(now + window), metadata=metadata)
        batch.times["validating"] = int(now)
        self.batches.create(batch, self._files.path(file_id))
        return web.json_response(self.batches.public(batch))

    async def _list(self, request: web.Request) -> web.Response:
        key = await self._key(request)
        if key is None:
            return self._unauthorized()
        try:
            limit = min(LIST_MAX, max(1, int(request.query.get("limit", LIST_LIMIT))))
        except ValueError:
            return _error(400, "limit must be an integer", param="limit")
        after = request.query.get("after")
        mine = sorted((b for b in self.batches.all() if secrets.compare_digest(b.owner, key.key_id)),
                      key=lambda b: (-b.created_at, b.id))
        if after:
            ids = [b.id for b in mine]
            mine = mine[ids.index(after) + 1:] if after in ids else []
        page = mine[:limit]
        return web.json_response({"object": "list", "data": [self.batches.public(b) for b in page],
                                  "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
                                  "has_more": len(mine) > limit})

    async def _own(self, request: web.Request) -> tuple[Batch | None, web.Response | None]:
        key = await self._key(request)
        if key is None:
            return None, self._unauthorized()
        batch_id = request.match_info["batch_id"]
        batch = self.batches.get(batch_id, key.key_id)
        if batch is None:
            return None, _error(404, f"No such Batch object: {batch_id[:64]}", "not_found", "batch_id")
        return batch, None

    async def _retrieve(self, request: web.Request) -> web.Response:
        batch, refused = await self._own(request)
        if batch is None:
            return refused or _error(404, "not found")
        return web.json_response(self.batches.public(batch))

    async def _cancel(self, request: web.Request) -> web.Response:
        batch, refused = await self._own(request)
        if batch is None:
            return refused or _error(404, "not found")
        if batch.status in TERMINAL:
            if batch.status != "cancelled":
                return _error(409, f"The batch is {batch.status}: it cannot be cancelled.")
        elif not batch.cancel_requested:
            # The scheduler scancels the job and finalises; this process only records the wish.
            batch.cancel_requested = True
            batch.move("cancelling", self._clock())
            self.batches.save(batch)
        return web.json_response(self.batches.public(batch))


def array_spec(tasks: list[int]) -> str:
    """Task indices as sbatch --array writes them: runs compressed ([0, 1, 2, 5] -> "0-2,5")."""
    parts: list[str] = []
    for task in sorted(tasks):
        if parts and "-" not in parts[-1].split(",")[-1] and int(parts[-1]) == task - 1:
            parts[-1] = f"{parts[-1]}-{task}"
        elif parts and "-" in parts[-1] and int(parts[-1].rpartition("-")[2]) == task - 1:
            parts[-1] = f"{parts[-1].rpartition('-')[0]}-{task}"
        else:
            parts.append(str(task))
    return ",".join(parts)


def _first_other_url(path: Path, endpoint: str) -> int:
    """The number of the first line whose url is not `endpoint`, 0 when none."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if raw.strip() and json.loads(raw).get("url") != endpoint:
                return number
    return 0


# ---- the controller's scheduler ----------------------------------------------------------------------------
class Slurm(Protocol):
    """What the scheduler needs of Slurm (controller/slurm.py's SlurmClient has it)."""

    async def submit_batch(self, argv: list[str], script: str) -> str: ...

    async def job(self, job_id: str) -> Job | None: ...

    async def cancel(self, job_id: str) -> None: ...

    async def requeue(self, job_id: str) -> None: ...

    async def records(self, job_id: str) -> list[Job]: ...


class Ledger(Protocol):
    def record(self, key_id: str, key_name: str, account: str, model: str, status: int, meter: Meter) -> None: ...


@dataclass
class Settings:
    """The parts of the config the scheduler reads."""

    qos: str
    partition: str
    runner: list[str]
    job_name_prefix: str
    # Runs one batch may take: a job that ends with lines left is requeued or followed by another, which resumes.
    max_attempts: int = 3
    # A file of more lines runs as a job array of tasks of this many lines.
    lines_per_task: int = 5000

    @classmethod
    def of(cls, config: Config) -> Settings:
        first = config.models[0] if config.models else None
        qos = config.batch.qos or (first.burst_qos if first else "")
        return cls(qos=qos, partition=config.batch.partition,
                   runner=list(config.batch.runner_command) or [sys.executable, "-m", "slinfer.batchrun"],
                   job_name_prefix=config.controller.job_name_prefix, max_attempts=config.batch.max_attempts,
                   lines_per_task=config.batch.lines_per_task)


class Scheduler:
    """Runs the batches in the spool as Slurm jobs and moves them through their states (controller only)."""

    def __init__(self, batches: BatchStore, files: FileStore, models: Collection[ModelConfig], slurm: Slurm,
                 ledger: Ledger | None, settings: Settings, clock: Callable[[], float] = time.time,
                 is_leader: Callable[[], bool] = lambda: True) -> None:
        self.batches = batches
        # With leader election only the leading controller submits, cancels and finalises; a standby would
        # submit each batch a second time.
        self._is_leader = is_leader
        self._files = files
        self._models = {m.name: m for m in models}
        self._slurm = slurm
        self._ledger = ledger
        self._settings = settings
        self._clock = clock
        self._over: set[str] = set()

    def submit_argv(self, batch: Batch, account: str, tasks: list[int] | None = None) -> list[str]:
        """sbatch's argv; for a job array, its tasks (all of them by default)."""
        model = self._models[batch.model]
        folder = self.batches.folder(batch.id)
        argv = ["sbatch", "--parsable", f"--inference={model.name}", "--requeue",
                f"--job-name={self._settings.job_name_prefix}-batch-{batch.id[6:18]}",
                f"--comment=slinfer-batch:{batch.id}",
                f"--output={folder / ('job-%a.log' if batch.tasks else 'job.log')}",
                # A requeued run appends: the log tells each run's story (how many lines it had left).
                "--open-mode=append",
                f"--time={slurm_time(max(60, batch.expires_at - int(self._clock())))}"]
        if batch.tasks:
            argv.append("--array=" + array_spec(tasks if tasks is not None else list(range(batch.tasks))))
        if model.gpus > 0:
            argv.append(f"--gres=gpu:{model.gpus}")
        partition = self._settings.partition or model.partition
        if partition:
            argv.append(f"--partition={partition}")
        if account:
            argv.append(f"--account={account}")
        qos = self._settings.qos or model.qos
        if qos:
            argv.append(f"--qos={qos}")
        return argv

    def script(self, batch: Batch) -> str:
        folder = self.batches.folder(batch.id)
        task = ["--lines-per-task", str(batch.lines_per_task)] if batch.tasks else []
        return "#!/bin/sh\nexec " + shlex.join([*self._settings.runner, "--dir", str(folder), *task]) + "\n"

    def split(self, batch: Batch) -> None:
        """Makes a batch of more lines than lines_per_task a job array (before its first submit)."""
        per = max(self._settings.lines_per_task, -(-batch.total // MAX_TASKS))
        if batch.total > per:
            batch.lines_per_task = per
            batch.tasks = -(-batch.total // per)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.step()
            except Exception:  # one bad round must not end the scheduler
                log.exception("batch scheduler round failed")
            await within(stop.wait(), SCHEDULE_S)

    async def step(self) -> None:
        if not self._is_leader():
            return
        # A batch that ended stays ended: its record is not read again (a spool keeps many).
        for batch in self.batches.all(skip=self._over):
            if batch.status in TERMINAL:
                self._over.add(batch.id)
            else:
                await self.advance(batch)

    async def advance(self, batch: Batch) -> None:
        """One look at a batch that is not over: submit, follow, cancel, expire or finalise it."""
        now = self._clock()
        folder = self.batches.folder(batch.id)
        if not batch.job_id:
            if batch.cancel_requested:
                await self._finish(batch, "cancelled")
                return
            self.split(batch)
            await self._submit(batch)
            return
        if batch.tasks:
            await self._advance_array(batch, now)
            return
        finished = (folder / batchrun.FINISHED).exists()
        job = await self._slurm.job(batch.job_id)
        if job is not None and job.job_state.name != batch.slurm_state:
            batch.slurm_state = job.job_state.name
            self.batches.save(batch)
        over = job is None or job.job_state.phase is Phase.OVER
        if finished and not batch.cancel_requested:
            await self._finish(batch, "completed")
        elif batch.cancel_requested or now >= batch.expires_at:
            await self._cancel_or_expire(batch, over)
        elif over:
            state = job.job_state.name if job is not None else "gone from Slurm"
            runs = len(batch.jobs) + batch.requeues
            if runs < self._settings.max_attempts and state in REQUEUE_AFTER:
                try:
                    await self._slurm.requeue(batch.job_id)
                except SlurmError as exc:
                    log.warning("batch %s: scontrol requeue %s refused (%s); a new job follows", batch.id,
                                batch.job_id, exc.stderr.strip())
                else:
                    batch.requeues += 1
                    self.batches.save(batch)
                    log.warning("batch %s: Slurm job %s ended (%s) with lines left; requeued it (run %d of %d): "
                                "it starts again once slurmd has forgotten its last run, and resumes", batch.id,
                                batch.job_id, state, runs + 1, self._settings.max_attempts)
                    return
            if runs < self._settings.max_attempts:
                # Preempted (CANCEL mode), its node lost, or its engine missing: the lines answered stay, and a
                # new job answers the rest.
                log.warning("batch %s: Slurm job %s ended (%s) with lines left; submitting it again (attempt %d "
                            "of %d)", batch.id, batch.job_id, state, len(batch.jobs) + 1, self._settings.max_attempts)
                # A job that Slurm could still requeue must not come back beside its successor.
                with contextlib.suppress(SlurmError):
                    await self._slurm.cancel(batch.job_id)
                await self._submit(batch)
                return
            batch.errors.append({"code": "job_failed", "message": f"Slurm job {batch.job_id} ended ({state}) "
                                 f"before every line was answered, {runs} runs tried; see "
                                 f"{folder / 'job.log'}", "param": None, "line": None})
            await self._finish(batch, "failed")

    async def _advance_array(self, batch: Batch, now: float) -> None:
        """A job array's look: each task resumes, is requeued or resubmitted on its own; the batch is completed
        once every task's marker is there, cancelled or expired as one job (scancel of the array)."""
        folder = self.batches.folder(batch.id)
        done = {k for k in range(batch.tasks) if (folder / batchrun.task_names(k)[2]).exists()}
        records = await self._slurm.records(batch.job_id)
        by_task = {int(r.job_id.rpartition("_")[2]): r for r in records if r.job_id.rpartition("_")[2].isdigit()}
        shown = Counter(r.job_state.name for r in records)
        summary = ", ".join(f"{n} {state}" for state, n in sorted(shown.items()))
        if summary != batch.slurm_state:
            batch.slurm_state = summary
            self.batches.save(batch)
        over = all(r.job_state.phase is Phase.OVER for r in records)
        if len(done) == batch.tasks and not batch.cancel_requested:
            await self._finish(batch, "completed")
            return
        if batch.cancel_requested or now >= batch.expires_at:
            await self._cancel_or_expire(batch, over)
            return
        requeued = set()
        for task, record in sorted(by_task.items()):
            state = record.job_state.name
            runs = len(batch.jobs) + batch.task_requeues.get(str(task), 0)
            if (task in done or record.job_state.phase is not Phase.OVER or state not in REQUEUE_AFTER
                    or runs >= self._settings.max_attempts):
                continue
            try:
                await self._slurm.requeue(record.job_id)
            except SlurmError as exc:
                log.warning("batch %s: scontrol requeue %s refused (%s)", batch.id, record.job_id, exc.stderr.strip())
                continue
            requeued.add(task)
            batch.task_requeues[str(task)] = batch.task_requeues.get(str(task), 0) + 1
            self.batches.save(batch)
            log.warning("batch %s: array task %s ended (%s) with lines left; requeued it (run %d of %d)", batch.id,
                        record.job_id, state, runs + 1, self._settings.max_attempts)
        if not over or requeued:
            return
        left = [k for k in range(batch.tasks) if k not in done]
        if len(batch.jobs) < self._settings.max_attempts:
            log.warning("batch %s: Slurm array job %s ended (%s) with tasks %s unfinished; submitting them again "
                        "(attempt %d of %d)", batch.id, batch.job_id, summary or "gone from Slurm", array_spec(left),
                        len(batch.jobs) + 1, self._settings.max_attempts)
            with contextlib.suppress(SlurmError):
                await self._slurm.cancel(batch.job_id)
            await self._submit(batch, left)
            return
        batch.errors.append({"code": "job_failed", "message": f"Slurm array job {batch.job_id} ended ({summary}) "
                             f"with tasks {array_spec(left)} unfinished, {len(batch.jobs)} jobs tried; see "
                             f"{folder}/job-N.log", "param": None, "line": None})
        await self._finish(batch, "failed")

    async def _submit(self, batch: Batch, tasks: list[int] | None = None) -> None:
        script = self.script(batch)
        account = batch.account
        try:
            job_id = await self._slurm.submit_batch(self.submit_argv(batch, account, tasks), script)
        except SlurmError as exc:
            if not account or "account" not in exc.stderr.lower():
                batch.errors.append({"code": "submit_failed", "message": exc.stderr.strip()[:500], "param": None,
                                     "line": None})
                await self._finish(batch, "failed")
                return
            # The service's user has no association in the key's account: its own default account pays, and
            # the ledger still charges the key's account.
            log.warning("batch %s: sbatch --account=%s refused (%s); submitting under the service's account",
                        batch.id, account, exc.stderr.strip())
            account = ""
            job_id = await self._slurm.submit_batch(self.submit_argv(batch, account, tasks), script)
        batch.job_id = job_id
        batch.jobs.append(job_id)
        batch.slurm_account = account or "(the service's default)"
        batch.move("in_progress", self._clock())
        self.batches.save(batch)
        log.info("batch %s (%d lines of %s for %s/%s) is Slurm job %s%s", batch.id, batch.total, batch.model,
                 batch.user or batch.key_name, batch.account or "-", job_id,
                 f" (array of {batch.tasks} tasks of {batch.lines_per_task} lines)" if batch.tasks else "")

    async def _cancel_or_expire(self, batch: Batch, over: bool) -> None:
        """A cancelled or expired batch: `scancel` its job (or array) once, and end it once Slurm has."""
        if not over and not batch.scancelled:
            await self._slurm.cancel(batch.job_id)
            batch.scancelled = True
            self.batches.save(batch)
        if over:
            await self._finish(batch, "cancelled" if batch.cancel_requested else "expired")

    async def _finish(self, batch: Batch, status: str) -> None:
        """finalizing: the output and error files become the key's Files, their usage goes to the ledger."""
        now = self._clock()
        batch.move("finalizing", now)
        folder = self.batches.folder(batch.id)
        if batch.tasks:
            batchrun.merge(folder, batch.tasks)
        for name in (batchrun.OUTPUT, batchrun.ERRORS):
            batchrun.cut_torn_tail(folder / name)
        outputs = list(batchrun.answered(folder / batchrun.OUTPUT))
        failures = list(batchrun.answered(folder / batchrun.ERRORS))
        batch.output_file_id = self._publish(batch, folder / batchrun.OUTPUT, "output", len(outputs))
        batch.error_file_id = self._publish(batch, folder / batchrun.ERRORS, "errors", len(failures))
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0}
        for line in (*outputs, *failures):
            response = line.get("response") or {}
            body = response.get("body") if isinstance(response, dict) else None
            counted = body.get("usage") if isinstance(body, dict) else None
            meter = Meter()
            if isinstance(counted, dict):
                meter.prompt_tokens = int(counted.get("prompt_tokens") or 0)
                meter.completion_tokens = int(counted.get("completion_tokens") or 0)
                meter.reported = True
            usage["prompt_tokens"] += meter.prompt_tokens
            usage["completion_tokens"] += meter.completion_tokens
            usage["requests"] += 1
            if self._ledger is not None:
                status_code = int(response.get("status_code") or 500) if isinstance(response, dict) else 500
                self._ledger.record(batch.owner, batch.key_name, batch.account, batch.model, status_code, meter)
        batch.usage = usage
        batch.move(status, now)
        self.batches.save(batch)
        log.info("batch %s %s: %d answered, %d refused, %d+%d tokens", batch.id, status, len(outputs),
                 len(failures), usage["prompt_tokens"], usage["completion_tokens"])

    def _publish(self, batch: Batch, path: Path, kind: str, lines: int) -> str | None:
        if not lines:
            return None
        meta = FileMeta(id=FileStore.new_id(), owner=batch.owner, filename=f"{batch.id}_{kind}.jsonl",
                        bytes=path.stat().st_size, created_at=int(self._clock()), purpose="batch_output",
                        lines=lines, model=batch.model)
        self._files.ensure()
        os.link(path, self._files.path(meta.id))
        self._files.put(meta)
        return meta.id


class SlurmAdapter:
    """The scheduler's Slurm, on the controller's SlurmClient (its Runner, scontrol and scancel)."""

    def __init__(self, client: SlurmClient) -> None:
        self._client = client

    async def submit_batch(self, argv: list[str], script: str) -> str:
        out = await self._client.runner.arun(argv, script)
        job_id = out.strip().split(";", 1)[0]  # --parsable: "JOBID" or "JOBID;CLUSTER"
        if not JOB_ID.match(job_id):
            raise SlurmError(argv, 0, f"unexpected sbatch output {out!r}")
        return job_id

    async def job(self, job_id: str) -> Job | None:
        found = await self._client.jobs_by_id([job_id])
        return found[0] if found else None

    async def cancel(self, job_id: str) -> None:
        await self._client.cancel(job_id)

    async def requeue(self, job_id: str) -> None:
        if not JOB_ID.match(job_id):
            raise ValueError(f"{job_id!r} is not a Slurm job id")
        await self._client.runner.arun(["scontrol", "requeue", job_id])

    async def records(self, job_id: str) -> list[Job]:
        """Every record Slurm shows for a job: an array's tasks (J_K), pending ones perhaps as one (J_[3-5])."""
        return await self._client.jobs_by_id([job_id])


def scheduler(config: Config, slurm: SlurmClient, ledger: Ledger | None,
              is_leader: Callable[[], bool] = lambda: True) -> Scheduler:
    """The controller's batch scheduler on [batch].spool."""
    spool = spool_dir(config)
    return Scheduler(BatchStore(spool), FileStore(spool), config.models, SlurmAdapter(slurm), ledger,
                     Settings.of(config), is_leader=is_leader)
