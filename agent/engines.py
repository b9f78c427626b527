"""The engine manager: each job's vLLM engine from start to the last process gone.

Responsible for: refusing a job's mistakes with a reason (unknown model, too few GPUs), running the catalog's
engine command as the job's user on exactly the job's GPUs with a fresh API key and a free port, watching
`/health` (STARTING -> READY), reading load from `/metrics`, restarting a crashed engine a bounded number of
times, stopping it (SIGTERM, SIGKILL after a grace, then a check that nothing is left), and re-adopting engines
that outlived an agent restart. Not responsible for: talking to the hook, the controller or Kubernetes; those
learn of every change through `add_listener`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from slinfer.agent import jobfiles
from slinfer.agent.gpu import Gpus
from slinfer.agent.processes import (
    ENGINE_MARKER,
    ProcessIdentity,
    engine_tag,
    spawn_as_user,
    terminate_engine,
    user_home,
)
from slinfer.agent.records import EngineRecord, RecordStore
from slinfer.agent.slurmview import SlurmView
from slinfer.config import MODEL_NAME, Config, ModelConfig
from slinfer.v1 import engine_pb2 as pb

log = logging.getLogger(__name__)

STATE_NAMES = {v: k for k, v in pb.EngineState.items()}
LOAD_METRICS = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
}


@dataclass
class StopResult:
    found: bool
    clean: bool
    leftover_pids: list[int] = field(default_factory=list)
    engine: pb.Engine | None = None


@dataclass
class _Running:
    record: EngineRecord
    identity: ProcessIdentity
    popen: subprocess.Popen[bytes] | None
    log_path: Path
    load: dict[str, float] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    health_failures: int = 0


class EngineManager:
    def __init__(self, config: Config, store: RecordStore, http: aiohttp.ClientSession, gpus: Gpus,
                 checker: SlurmView | None = None, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.checker = checker
        self.store = store
        self.http = http
        self.gpus = gpus
        self.clock = clock
        self.run_dir = Path(config.agent.run_dir)
        self.logs_dir = self.run_dir / "logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.logs_dir, 0o711)
        jobfiles.jobs_dir(self.run_dir)
        self.address = config.agent.address or _host_address()
        self._engines: dict[str, _Running] = {}
        self._listeners: list[Callable[[], None]] = []
        self._lock = asyncio.Lock()

    def _tag(self, job_id: str) -> str:
        return engine_tag(job_id, str(self.run_dir))

    # -- observers -------------------------------------------------------------------------------------------

    def add_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def _changed(self, running: _Running) -> None:
        rec = running.record
        self.store.save(rec)
        path = jobfiles.status_path(self.run_dir, rec.job_id)
        try:
            jobfiles.write_status(path, STATE_NAMES[rec.state], rec.reason, rec.base_url, rec.model, rec.uid, rec.gid)
        except OSError as exc:
            log.error("job %s: cannot write status file %s: %s", rec.job_id, path, exc)
        for callback in self._listeners:
            callback()

    def engines(self) -> list[pb.Engine]:
        return [self._to_proto(r) for r in self._engines.values()]

    def _to_proto(self, running: _Running) -> pb.Engine:
        rec = running.record
        return pb.Engine(
            job_id=rec.job_id, model=rec.model, state=rec.state, reason=rec.reason, base_url=rec.base_url,
            api_key=rec.api_key, gpus=rec.gpus, pool=rec.pool, pid=rec.pid, uid=rec.uid, user=rec.user,
            started_at=rec.started_at, ready_at=rec.ready_at, restarts=rec.restarts, partition=rec.partition,
            load=pb.EngineLoad(**running.load),
        )

    # -- start -----------------------------------------------------------------------------------------------

    def _refusal(self, job: pb.JobSpec) -> str:
        """The job's own mistake, if any, in words the user will read in the job's output."""
        if not MODEL_NAME.match(job.model):
            return f"invalid model name {job.model[:40]!r}"
        model = self.config.model(job.model)
        if model is None:
            known = ", ".join(m.name for m in self.config.models) or "none"
            return f"model '{job.model}' is not in this cluster's catalog (known: {known})"
        if len(job.gpus) < model.gpus:
            return (f"model '{job.model}' needs {model.gpus} GPU(s) but the job has {len(job.gpus)} "
                    f"(submit with --gres=gpu:{model.gpus})")
        return ""

    async def start(self, job: pb.JobSpec) -> pb.Engine:
        async with self._lock:
            existing = self._engines.get(job.job_id)
            if existing is not None:
                return self._to_proto(existing)
            refusal = self._refusal(job)
            if not refusal and self.checker is not None:
                refusal = await self.checker.refusal(job)
            if refusal:
                log.warning("job %s: refused: %s", job.job_id, refusal)
                return pb.Engine(job_id=job.job_id, model=job.model, state=pb.FAILED, reason=refusal)
            model = self.config.model(job.model)
            assert model is not None
            record = EngineRecord(
                job_id=job.job_id, model=job.model, uid=job.uid, gid=job.gid, user=job.user, gpus=list(job.gpus),
                pool=job.pool, partition=job.partition, work_dir=job.work_dir, host=self.address,
                port=self._free_port(), api_key=secrets.token_urlsafe(32), state=pb.STARTING,
                started_at=self.clock(),
            )
            running = self._spawn(record, model)
            self._engines[job.job_id] = running
            self._changed(running)
            running.task = asyncio.create_task(self._supervise(running, model))
            log.info("job %s: started %s for %s (uid %d) on GPUs [%s] at %s, pid %d", job.job_id, job.model,
                     job.user, job.uid, ",".join(job.gpus), record.base_url, record.pid)
            return self._to_proto(running)

    def _free_port(self) -> int:
        low, high = self.config.agent.port_range
        taken = {r.record.port for r in self._engines.values()}
        start = secrets.randbelow(high - low + 1)
        for offset in range(high - low + 1):
            port = low + (start + offset) % (high - low + 1)
            if port in taken:
                continue
            with socket.socket(socket.AF_INET6 if ":" in self.address else socket.AF_INET) as probe:
                try:
                    probe.bind((self.address, port))
                except OSError:
                    continue
            return port
        raise RuntimeError(f"no free port in {low}-{high} on {self.address}")

    def _argv(self, record: EngineRecord, model: ModelConfig) -> list[str]:
        template = model.engine_command or self.config.agent.engine_command
        values = {"{python}": self.config.agent.python, "{source}": model.source, "{model}": model.name,
                  "{host}": record.host, "{port}": str(record.port), "{gpus}": str(len(record.gpus)),
                  "{job_id}": record.job_id}
        argv = []
        for part in template:
            for key, value in values.items():
                part = part.replace(key, value)
            argv.append(part)
        return argv + list(model.engine_args)

    def _spawn(self, record: EngineRecord, model: ModelConfig) -> _Running:
        home = user_home(record.user, record.uid)
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOME": home if home and os.path.isdir(home) else self._scratch_home(record),
            "USER": record.user, "LOGNAME": record.user,
            # Exactly the job's GPUs; an empty value hides every GPU from an engine that was given none.
            "CUDA_VISIBLE_DEVICES": ",".join(record.gpus),
            # The key goes in the environment, not argv, where every user on the node could read it.
            "VLLM_API_KEY": record.api_key,
            ENGINE_MARKER: self._tag(record.job_id),
            "SLURM_JOB_ID": record.job_id,
        }
        env.update(self.config.agent.engine_env)
        env.update(model.engine_env)
        cwd = record.work_dir if record.work_dir and os.path.isdir(record.work_dir) else env["HOME"]
        log_path = self.logs_dir / f"{record.job_id}.log"
        argv = self._argv(record, model)
        popen, identity = spawn_as_user(argv, uid=record.uid, gid=record.gid, user=record.user, env=env, cwd=cwd,
                                        log_path=log_path)
        record.argv = argv
        record.pid, record.create_time, record.session_id = identity.pid, identity.create_time, identity.pid
        return _Running(record=record, identity=identity, popen=popen, log_path=log_path)

    def _scratch_home(self, record: EngineRecord) -> str:
        home = self.run_dir / "homes" / record.job_id
        home.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(home, record.uid, record.gid)
        return str(home)

    # -- supervision -----------------------------------------------------------------------------------------

    async def _supervise(self, running: _Running, model: ModelConfig | None) -> None:
        rec = running.record
        interval = self.config.agent.health_interval_s
        while rec.state in (pb.STARTING, pb.READY):
            await asyncio.sleep(interval)
            if not self._alive(running):
                await self._on_exit(running, model)
                continue
            healthy = await self._healthy(running)
            if rec.state == pb.STARTING:
                if healthy:
                    rec.state, rec.ready_at, rec.reason = pb.READY, self.clock(), ""
                    log.info("job %s: engine READY %.1fs after start", rec.job_id, rec.ready_at - rec.started_at)
                    self._changed(running)
                elif self.clock() - rec.started_at > self.config.agent.ready_timeout_s:
                    await self._fail(running, f"engine not ready after {self.config.agent.ready_timeout_s:.0f}s"
                                              f"{self._log_tail(running)}")
            elif rec.state == pb.READY:
                await self._read_load(running)

    def _alive(self, running: _Running) -> bool:
        if running.popen is not None:
            return running.popen.poll() is None
        return running.identity.alive()

    async def _on_exit(self, running: _Running, model: ModelConfig | None) -> None:
        rec = running.record
        code = running.popen.returncode if running.popen is not None else None
        reason = f"engine exited{f' with code {code}' if code is not None else ''}{self._log_tail(running)}"
        # Children of the dead engine (vLLM's workers) must not outlive it, nor hold the port.
        await asyncio.to_thread(terminate_engine, self._tag(rec.job_id), rec.session_id, 2.0)
        if model is None:
            model = self.config.model(rec.model)
        if model is None or rec.restarts >= self.config.agent.max_restarts:
            await self._fail(running, reason)
            return
        rec.restarts += 1
        log.warning("job %s: %s; restart %d of %d", rec.job_id, reason, rec.restarts, self.config.agent.max_restarts)
        fresh = self._spawn(rec, model)
        running.popen, running.identity, running.log_path = fresh.popen, fresh.identity, fresh.log_path
        rec.state, rec.reason, rec.started_at, rec.ready_at = pb.STARTING, reason, self.clock(), 0.0
        running.load = {}
        self._changed(running)

    async def _fail(self, running: _Running, reason: str) -> None:
        rec = running.record
        rec.state, rec.reason = pb.FAILED, reason
        running.load = {}
        log.error("job %s: engine FAILED: %s", rec.job_id, reason)
        await asyncio.to_thread(terminate_engine, self._tag(rec.job_id), rec.session_id,
                                self.config.agent.stop_grace_s)
        self._changed(running)

    def _log_tail(self, running: _Running, lines: int = 3) -> str:
        try:
            with open(running.log_path, "rb") as log_file:
                log_file.seek(max(0, log_file.seek(0, os.SEEK_END) - 4096))
                tail = log_file.read().decode(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return ""
        return ": " + " | ".join(line.strip()[:300] for line in tail) if tail else ""

    async def _healthy(self, running: _Running) -> bool:
        try:
            async with self.http.get(f"{running.record.base_url}/health",
                                     timeout=aiohttp.ClientTimeout(total=2)) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _read_load(self, running: _Running) -> None:
        try:
            async with self.http.get(f"{running.record.base_url}/metrics",
                                     timeout=aiohttp.ClientTimeout(total=2)) as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return
        load = dict.fromkeys(LOAD_METRICS.values(), 0.0)
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in LOAD_METRICS:
                with contextlib.suppress(ValueError):
                    load[LOAD_METRICS[name]] += float(line.rsplit(" ", 1)[1])
        if load != running.load:
            running.load = load
            for callback in self._listeners:
                callback()

    # -- stop and adopt --------------------------------------------------------------------------------------

    async def stop(self, job_id: str) -> StopResult:
        async with self._lock:
            running = self._engines.get(job_id)
            if running is None:
                # No record, but make sure nothing marked with this job survives (a lost record, a crash).
                leftovers = await asyncio.to_thread(terminate_engine, self._tag(job_id), 0,
                                                    self.config.agent.stop_grace_s)
                return StopResult(found=False, clean=not leftovers, leftover_pids=leftovers)
            rec = running.record
            rec.state = pb.STOPPING
            self._changed(running)
            if running.task is not None:
                running.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running.task
            began = time.monotonic()
            leftovers = await asyncio.to_thread(terminate_engine, self._tag(job_id), rec.session_id,
                                                self.config.agent.stop_grace_s)
            if running.popen is not None:
                running.popen.poll()
            busy = self.gpus.busy_pids(rec.gpus)
            if busy:
                log.error("job %s: GPUs [%s] still used by pids %s", job_id, ",".join(rec.gpus), busy)
            leftovers = sorted(set(leftovers) | set(busy))
            rec.state = pb.STOPPED
            engine = self._to_proto(running)
            del self._engines[job_id]
            self.store.delete(job_id)
            jobfiles.status_path(self.run_dir, job_id).unlink(missing_ok=True)
            for callback in self._listeners:
                callback()
            log.info("job %s: engine stopped in %.2fs, %s", job_id, time.monotonic() - began,
                     f"leftover pids {leftovers}" if leftovers else "nothing left")
            return StopResult(found=True, clean=not leftovers, leftover_pids=leftovers, engine=engine)

    async def adopt_all(self) -> None:
        """Takes over the engines a previous agent recorded; dead ones are handled as crashes."""
        for rec in self.store.load_all():
            identity = ProcessIdentity(rec.pid, rec.create_time)
            running = _Running(record=rec, identity=identity, popen=None,
                               log_path=self.logs_dir / f"{rec.job_id}.log")
            self._engines[rec.job_id] = running
            alive = identity.alive()
            log.info("job %s: re-adopting %s engine pid %d (%s)", rec.job_id, STATE_NAMES.get(rec.state, "?"),
                     rec.pid, "alive" if alive else "gone")
            if rec.state in (pb.STARTING, pb.READY):
                running.task = asyncio.create_task(self._supervise(running, None))
            elif rec.state == pb.STOPPING:
                rec.state = pb.FAILED
                rec.reason = rec.reason or "agent restarted while stopping the engine"
            self._changed(running)

    async def close(self) -> None:
        """Stops supervising without touching the engines: a restarted agent re-adopts them."""
        for running in self._engines.values():
            if running.task is not None:
                running.task.cancel()
        await asyncio.gather(*(r.task for r in self._engines.values() if r.task), return_exceptions=True)


def _host_address() -> str:
    hostname = socket.gethostname()
    try:
        return socket.gethostbyname(hostname)
    except OSError:
        return "127.0.0.1"
