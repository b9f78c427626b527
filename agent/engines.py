"""The engine manager: each job's vLLM engine from start to the last process gone.

Responsible for: carrying out the launch plan (`launch.py` decides the refusal, the argv, the layout) by
running the engine as the job's user on exactly the job's GPUs with a fresh API key and a free port, warm or
cold; containing it in the job's cgroups; watching it through `probes.py` (STARTING -> READY, its load);
restarting a crashed engine a bounded number of times, stopping it (SIGTERM, SIGKILL after a grace, then a
check that nothing is left), and re-adopting engines that outlived an agent restart. Not responsible for:
talking to the hook, the controller or Kubernetes; those learn of every change through `add_listener`.
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
from typing import Any, Protocol

import aiohttp
import psutil

from slinfer.agent import jobfiles, launch, lorafiles, preemption, probes, stepd
from slinfer.agent.cgroups import Hierarchy, JobCgroups
from slinfer.agent.gpu import Gpus
from slinfer.agent.pagecache import PageCacheWarmer, ReadAhead
from slinfer.agent.processes import (
    ENGINE_MARKER,
    ProcessIdentity,
    engine_processes,
    engine_tag,
    spawn_as_user,
    terminate_engine,
    user_home,
)
from slinfer.agent.records import EngineRecord, RecordStore
from slinfer.agent.slurmview import SlurmView
from slinfer.agent.warmstart import EngineTemplate, TemplateError, WarmProcess, stock_args, warm_refusal
from slinfer.config import Config, ModelConfig
from slinfer.v1 import engine_pb2 as pb

log = logging.getLogger(__name__)

STATE_NAMES = {v: k for k, v in pb.EngineState.items()}
# After the engine joined its job's cgroups, look once more this much later for any that came late.
CONTAIN_RECHECK_S = 5.0
# How often the extern step's slurmstepd is asked to poll an adopted engine's usage (stepd.poll): slurmstepd reads
# it from /proc while the process exists (every JobAcctGatherFrequency, 30 s by default, and once more when it
# sees the pid gone); a killed engine reaped before that last read keeps what the previous poll saw. Each poll
# costs the stepd a read of the step's /proc entries and cgroup files (milliseconds).
STEPD_POLL_S = 2.0
# An adopted engine that ended is reaped only once its extern step's slurmstepd has exited (stepd.py: a stepd up to
# 25.05 segfaults when its watcher of the pid sees it gone during the step's teardown), checked this often, and at
# most this long after its end (a stepd that outlives the job by more is not tearing down: reaped then anyway).
ZOMBIE_HOLD_POLL_S = 0.5
ZOMBIE_HOLD_MAX_S = 120.0
# How often a STARTING engine's /health is asked (a refused connection costs a millisecond): a warm start is READY
# in about 3 s, and health_interval_s (0.5 s on the bed) added 0.25 s on average to it (bench/warmstart.py).
STARTING_PROBE_S = 0.1
# What starting a job's engine may raise: an interpreter the job's user may not execute, a missing binary, a
# failed setuid or chdir in the child, no free port. Each is that job's failure, reported, never a prolog error.
SPAWN_ERRORS = (OSError, subprocess.SubprocessError, RuntimeError)


class EngineProcess(Protocol):
    """What the manager uses of the process it started: a cold engine's Popen, or a warm engine's handle."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...


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
    popen: EngineProcess | None
    log_path: Path
    load: dict[str, float] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    health_failures: int = 0
    # The job's extern-step cgroups the engine was moved into, and their OOM kills before it started.
    cgroups: list[Hierarchy] = field(default_factory=list)
    oom_kills: int = 0
    containing: asyncio.Task[None] | None = None
    # Placed in its job's cgroups (or known not to be placeable): only then may it become READY, so that no engine
    # serves outside its job (a warm pool engine was READY before its batch step existed, 0.6 s outside the job).
    placed: bool = True
    # The socket of the extern step's slurmstepd that adopted the engine (None: written into its cgroups by hand),
    # and when it was last asked to poll the engine's usage.
    stepd_socket: Path | None = None
    polled_at: float = 0.0
    # An adopted engine's exit code read without reaping it, and the task that reaps it once its stepd is gone.
    exit_code: int | None = None
    reaping: asyncio.Task[None] | None = None
    # A warm engine's template keeps its zombie until asked for its exit (WarmProcess.hold).
    held: bool = False
    # The read-ahead of the model's files that runs beside the engine's own start.
    reading: asyncio.Task[ReadAhead | None] | None = None


class EngineManager:
    def __init__(self, config: Config, store: RecordStore, http: aiohttp.ClientSession, gpus: Gpus,
                 checker: SlurmView | None = None, clock: Callable[[], float] = time.time,
                 cgroups: JobCgroups | None = None, template: EngineTemplate | None = None,
                 pagecache: PageCacheWarmer | None = None) -> None:
        self.config = config
        # The warm start's template; None means every engine starts cold.
        self.template = template
        # Reads a `readahead` model's files while its engine starts; None reads nothing ahead.
        self.pagecache = pagecache
        self.checker = checker
        self.cgroups = cgroups
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
        self.node_name = config.agent.node_name or socket.gethostname().split(".")[0]
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
            jobfiles.write_status(path, STATE_NAMES[rec.state], rec.reason, rec.base_url if rec.rank == 0 else "",
                                  rec.model, rec.uid, rec.gid)
        except OSError as exc:
            log.error("job %s: cannot write status file %s: %s", rec.job_id, path, exc)
        for callback in self._listeners:
            callback()

    def engines(self) -> list[pb.Engine]:
        return [self._to_proto(r) for r in self._engines.values()]

    def endpoints(self) -> list[pb.Engine]:
        """The engines this node serves: a rank above 0 of an engine across nodes is not one (rank 0 serves it)."""
        return [self._to_proto(r) for r in self._engines.values() if r.record.rank == 0]

    def _to_proto(self, running: _Running) -> pb.Engine:
        rec = running.record
        return pb.Engine(
            job_id=rec.job_id, model=rec.model, state=rec.state, reason=rec.reason,
            base_url=rec.base_url if rec.rank == 0 else "",
            api_key=rec.api_key, gpus=rec.gpus, pool=rec.pool, pid=rec.pid, uid=rec.uid, user=rec.user,
            started_at=rec.started_at, ready_at=rec.ready_at, restarts=rec.restarts, partition=rec.partition,
            load=pb.EngineLoad(**running.load), rank=rec.rank,
        )

    # -- start -----------------------------------------------------------------------------------------------

    def _refusal(self, job: pb.JobSpec, nodes: list[str] | None = None) -> str:
        return launch.refusal(self.config, job, self.node_name, nodes)

    async def _job_nodes(self, job: pb.JobSpec) -> list[str] | None:
        """The job's nodes in Slurm's order, expanded (node[1-2] -> node1, node2): from the hook's node list, else
        from Slurm; None when neither tells."""
        if self.checker is not None:
            if job.node_list:
                return await self.checker.hostnames(job.node_list)
            return await self.checker.job_nodes(job.job_id)
        return [n for n in job.node_list.split(",") if n] if job.node_list else None

    async def _node_address(self, node: str) -> str:
        """Where another node of the job is reached: Slurm's NodeAddr, else its name resolved."""
        if self.checker is not None:
            address = await self.checker.node_address(node)
            if address:
                return address
        return await asyncio.to_thread(socket.gethostbyname, node)

    async def start(self, job: pb.JobSpec) -> pb.Engine:
        async with self._lock:
            existing = self._engines.get(job.job_id)
            if existing is not None:
                return self._to_proto(existing)
            nodes = await self._job_nodes(job)
            model = self.config.model(job.model)
            if nodes is None and model is not None and model.nodes > 1:
                nodes = []
            refusal = self._refusal(job, nodes)
            if not refusal and self.checker is not None:
                refusal = await self.checker.refusal(job)
            loras = [(a.name, a.path) for a in job.loras]
            if not refusal and loras:
                # Read as the job's user, never as root: a user must not serve a folder she cannot read.
                refusal = await asyncio.to_thread(lorafiles.unreadable, loras, python=self.config.agent.python,
                                                  uid=job.uid, gid=job.gid, user=job.user)
            if refusal:
                log.warning("job %s: refused: %s", job.job_id, refusal)
                return pb.Engine(job_id=job.job_id, model=job.model, state=pb.FAILED, reason=refusal)
            assert model is not None
            try:
                layout = await self._layout(job, model, nodes or [])
                record = EngineRecord(
                    job_id=job.job_id, model=job.model, uid=job.uid, gid=job.gid, user=job.user,
                    gpus=list(job.gpus), pool=job.pool, partition=job.partition, work_dir=job.work_dir,
                    host=self.address, port=0 if layout.get("rank") else self._free_port(layout.get("master_port")),
                    api_key=secrets.token_urlsafe(32), state=pb.STARTING, started_at=self.clock(),
                    scheme="https" if self.config.agent.engine_tls_cert else "http",
                    loras=[list(pair) for pair in loras], **layout,
                )
                running = self._spawn(record, model)
            except SPAWN_ERRORS as exc:
                # The engine could not be started as the job's user (permissions, a missing binary, no free
                # port): that fails the job, never the prolog, which would drain the node.
                reason = f"engine could not be started as {job.user or job.uid}: {exc}"
                log.error("job %s: engine FAILED: %s", job.job_id, reason)
                return pb.Engine(job_id=job.job_id, model=job.model, state=pb.FAILED, reason=reason)
            self._engines[job.job_id] = running
            self._changed(running)
            running.task = asyncio.create_task(self._supervise(running, model))
            # Slurm creates the job's extern step only after this prolog returns: contain the engine once it is.
            running.placed = False
            running.containing = asyncio.create_task(self._contain(running))
            if model.readahead and self.pagecache is not None:
                # Beside the engine's own start (imports, fork, engine core), not before it: the prolog waits
                # for none of it, and pages read while the engine starts are pages its weight load skips.
                running.reading = asyncio.create_task(self.pagecache.read_ahead(model, f"job {job.job_id}"))
            log.info("job %s: started %s for %s (uid %d) on GPUs [%s] at %s, pid %d", job.job_id, job.model,
                     job.user, job.uid, ",".join(job.gpus), record.base_url, record.pid)
            return self._to_proto(running)

    async def _layout(self, job: pb.JobSpec, model: ModelConfig, nodes: list[str]) -> dict[str, Any]:
        """The EngineRecord fields of a rank of an engine across nodes; none for an engine of one node."""
        if model.nodes <= 1:
            return {}
        rank = nodes.index(self.node_name)
        head = self.address if rank == 0 else await self._node_address(nodes[0])
        peers = [await self._node_address(n) for n in nodes[1:]] if rank == 0 else []
        return {"rank": rank, "nnodes": len(nodes), "head": head,
                "master_port": launch.master_port(self.config, job.job_id), "peers": peers}

    def _free_port(self, avoid: int | None = None) -> int:
        low, high = self.config.agent.port_range
        taken = {r.record.port for r in self._engines.values()} | {r.record.master_port for r in self._engines.values()}
        if avoid:
            taken.add(avoid)
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
        argv = launch.engine_command(self.config, model, record.host, record.port, len(record.gpus),
                                     record.job_id, record.rank, [(n, p) for n, p in record.loras]
                                     ) + launch.rank_args(record)
        return argv if record.rank > 0 else argv + self._ssl_args(record)

    def _ssl_args(self, record: EngineRecord) -> list[str]:
        """vLLM's HTTPS flags, with a copy of the node's key that only the job's user (the engine) can read:
        the engine runs as that user, and the node's own key file stays root's."""
        a = self.config.agent
        if record.scheme != "https":
            return []
        folder = self.run_dir / "engine-tls"
        folder.mkdir(exist_ok=True)
        os.chmod(folder, 0o711)
        copies = []
        for source, suffix in ((a.engine_tls_cert, "pem"), (a.engine_tls_key, "key")):
            target = folder / f"{record.job_id}.{suffix}"
            target.unlink(missing_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as out:
                out.write(Path(source).read_bytes())
            if os.geteuid() == 0:
                os.chown(target, record.uid, record.gid)
            copies.append(str(target))
        return ["--ssl-certfile", copies[0], "--ssl-keyfile", copies[1]]

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
        env.update(launch.rank_env(record, self.address, psutil.net_if_addrs()))
        env.update(launch.lora_env(model))
        env.update(self.config.agent.engine_env)
        env.update(model.engine_env)
        # Entered as the job's user (never probed or entered by root): its folder, else its home.
        cwd = record.work_dir or env["HOME"]
        log_path = self.logs_dir / f"{record.job_id}.log"
        argv = self._argv(record, model)
        popen: EngineProcess
        warm = self._warm_spawn(record, model, argv, env, cwd, log_path)
        if warm is not None:
            popen, identity, record.start_path = warm, warm.identity, "warm"
        else:
            popen, identity = spawn_as_user(argv, uid=record.uid, gid=record.gid, user=record.user, env=env,
                                            cwd=cwd, fallback_cwd=env["HOME"], log_path=log_path)
            record.start_path = "cold"
        record.argv = argv
        record.pid, record.create_time, record.session_id = identity.pid, identity.create_time, identity.pid
        return _Running(record=record, identity=identity, popen=popen, log_path=log_path)

    def _warm_spawn(self, record: EngineRecord, model: ModelConfig, argv: list[str], env: dict[str, str], cwd: str,
                    log_path: Path) -> WarmProcess | None:
        """The engine forked from the template, or None (logged, with the reason) for a cold start."""
        template = self.template
        status = template.status if template is not None else None
        reason = warm_refusal(self.config, model, status is not None and status.ready,
                              status.state if status is not None else "no template")
        args = stock_args(argv, self.config.agent.python)
        if not reason and args is None:
            reason = "the engine argv is not the stock vLLM command"
        if not reason:
            assert template is not None and args is not None
            groups = [record.gid]
            if os.geteuid() == 0 and record.user:
                with contextlib.suppress(OSError, KeyError):
                    groups = os.getgrouplist(record.user, record.gid)
            # vLLM's EngineCore and workers then fork from the warm child too, inheriting its imports.
            warm_env = {**env, "VLLM_WORKER_MULTIPROC_METHOD": "fork"}
            try:
                process = template.spawn(args, uid=record.uid, gid=record.gid, groups=groups, env=warm_env,
                                         cwd=cwd, log_path=log_path)
            except TemplateError as exc:
                reason = str(exc)
            else:
                log.info("job %s: warm start: engine pid %d forked from the engine template", record.job_id,
                         process.pid)
                return process
        log.info("job %s: cold start: %s", record.job_id, reason)
        return None

    async def _contain(self, running: _Running) -> None:
        """Moves the engine into its job's extern-step cgroups, so that Slurm's limits, accounting and cleanup
        cover it. A refused move kills the engine and fails the job: an engine outside its job's limits is what
        containment exists to prevent."""
        if self.cgroups is None:
            running.placed = True
            return
        try:
            recheck, in_batch = await self._place(running)
        finally:
            running.placed = True
        if recheck:
            await self._recheck(running, in_batch)

    async def _place(self, running: _Running) -> tuple[bool, bool]:
        """The move itself (_contain's first part): sets running.cgroups; returns whether the hierarchies are to
        be looked at again later, and whether the engine went to the batch step."""
        assert self.cgroups is not None
        rec = running.record
        try:
            # A pool engine goes to its job's batch step, which Slurm leaves alone at a preemption's grace start
            # (agent/preemption.py); any other, or one whose batch step is not here, to the extern step.
            targets = (await preemption.wait_for_batch(self.cgroups, rec.job_id)
                       if rec.pool and rec.rank == 0 else [])
            in_batch, adopted = bool(targets), False
            if in_batch:
                targets = await asyncio.to_thread(self.cgroups.contain, rec.job_id, rec.pid, targets)
            else:
                # The extern step's slurmstepd adopts the engine (so 24.11 and 26.05 account for it too), else the
                # pids are written into the step's cgroups (cgroups.JobCgroups.contain_extern).
                targets, running.stepd_socket = await asyncio.to_thread(
                    self.cgroups.contain_extern, rec.job_id, rec.pid, await self.cgroups.wait_for_job(rec.job_id))
                adopted = running.stepd_socket is not None
        except OSError as exc:
            if rec.state in (pb.STARTING, pb.READY) and self._alive(running):
                await self._fail(running, f"could not move the engine into job {rec.job_id}'s cgroups: {exc}")
            return False, False
        running.cgroups, running.oom_kills = targets, self.cgroups.oom_kills(targets)
        if not targets:
            log.warning("job %s: no extern step cgroup on this node (Slurm without PrologFlags=Contain and "
                        "proctrack/cgroup?): the engine is not contained by the job's limits", rec.job_id)
            return False, False
        if adopted and isinstance(running.popen, WarmProcess):
            running.held = await asyncio.to_thread(running.popen.hold)
        if adopted:
            # slurmstepd's plugins put the engine into every hierarchy of the step at once; a second look would
            # compare it with the extern task's cgroups and could move it out of the task Slurm accounts.
            return False, in_batch
        return True, in_batch

    async def _recheck(self, running: _Running, in_batch: bool) -> None:
        """A hierarchy that Slurm gives the step later still (a slow node) is joined too, once."""
        assert self.cgroups is not None
        rec, targets = running.record, running.cgroups
        await asyncio.sleep(CONTAIN_RECHECK_S)
        try:
            # The same step again (the batch step's cgroups for an engine placed there), by hierarchy.
            again = await asyncio.to_thread(preemption.batch_cgroups if in_batch else JobCgroups.of_job,
                                            self.cgroups, rec.job_id)
            # A hierarchy that came late, or one where the step's task went deeper (task_0) after the move.
            known = {t.mountpoint: t.path for t in targets}
            late = [h for h in again if known.get(h.mountpoint) != h.path]
            if late and self._alive(running):
                log.warning("job %s: the job's cgroups in %s came late or moved: joining them", rec.job_id,
                            ", ".join(h.mountpoint.name for h in late))
                kept = [t for t in targets if t.mountpoint not in {h.mountpoint for h in late}]
                running.cgroups = kept + await asyncio.to_thread(self.cgroups.contain, rec.job_id, rec.pid, late)
        except OSError as exc:
            if rec.state in (pb.STARTING, pb.READY) and self._alive(running):
                await self._fail(running, f"could not move the engine into job {rec.job_id}'s cgroups: {exc}")

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
            await asyncio.sleep(min(interval, STARTING_PROBE_S) if rec.state == pb.STARTING else interval)
            if not self._alive(running):
                await self._on_exit(running, model)
                continue
            healthy = await self._healthy(running) if rec.rank == 0 else True
            lost = await asyncio.to_thread(self._lost_ranks, running) if rec.nnodes > 1 else ""
            if lost and rec.state == pb.READY:
                await self._fail(running, lost)
                continue
            # Not READY before every rank has joined (vLLM's rank 0 does not serve before, either).
            healthy = healthy and not lost
            if rec.state == pb.STARTING:
                if healthy and running.placed:
                    rec.state, rec.ready_at, rec.reason = pb.READY, self.clock(), ""
                    running.polled_at = 0.0  # its start-up is most of a short job's CPU: have Slurm poll it now
                    log.info("job %s: engine READY %.1fs after start", rec.job_id, rec.ready_at - rec.started_at)
                    self._changed(running)
                elif self.clock() - rec.started_at > self.config.agent.ready_timeout_s:
                    await self._fail(running, f"engine not ready after {self.config.agent.ready_timeout_s:.0f}s"
                                              f"{self._log_tail(running)}")
            elif rec.state == pb.READY and rec.rank == 0:
                await self._read_load(running)
            await self._poll_usage(running)

    async def _poll_usage(self, running: _Running) -> None:
        """Asks the slurmstepd that adopted the engine to poll its usage, every STEPD_POLL_S and when it has just
        become READY (its start-up is most of a short job's CPU). A failure is no error: the step ends with the job."""
        path, now = running.stepd_socket, time.monotonic()
        if path is None or now - running.polled_at < STEPD_POLL_S:
            return
        running.polled_at = now
        try:
            await asyncio.to_thread(stepd.poll, path, running.record.job_id)
        except stepd.StepdError as exc:
            log.debug("%s", exc)

    def _lost_ranks(self, running: _Running) -> str:
        """Which ranks of an engine across nodes are not connected to this one, in words; empty when all are.
        Rank 0 holds torch.distributed and gloo connections to every other rank's node, and each other rank to
        rank 0's, for the engine's life: vLLM's rank 0 keeps answering /health after a remote rank died, until
        a request reaches the dead rank, so the agent watches those connections itself."""
        rec = running.record
        remote: set[str] = set()
        for proc in engine_processes(self._tag(rec.job_id), rec.session_id):
            with contextlib.suppress(psutil.Error):
                remote.update(c.raddr.ip.removeprefix("::ffff:") for c in proc.net_connections("tcp")
                              if c.status == psutil.CONN_ESTABLISHED and c.raddr)
        if rec.rank > 0:
            return "" if rec.head in remote else f"rank {rec.rank} has no connection to rank 0 at {rec.head}"
        gone = [f"rank {i} at {peer}" for i, peer in enumerate(rec.peers, start=1) if peer not in remote]
        return f"{', '.join(gone)} left the engine (no connection to rank 0)" if gone else ""

    def _alive(self, running: _Running) -> bool:
        if running.popen is not None:
            if running.stepd_socket is not None and isinstance(running.popen, subprocess.Popen):
                return self._alive_unreaped(running, running.popen)
            if running.held and isinstance(running.popen, WarmProcess) and running.popen.returncode is None:
                # A zombie is not alive (ProcessIdentity.alive); its template reaps it only when poll() asks.
                if running.identity.alive():
                    return True
                if running.reaping is None:
                    ended, running.exit_code = running.popen.peek()
                    if not ended:
                        return True
                    running.reaping = asyncio.get_running_loop().create_task(
                        self._reap_after_stepd(running, running.popen))
                return False
            return running.popen.poll() is None
        return running.identity.alive()

    def _alive_unreaped(self, running: _Running, popen: subprocess.Popen[Any]) -> bool:
        """_alive for an engine the extern step's stepd adopted: its end is read without reaping it, and the zombie
        is reaped by _reap_after_stepd (stepd.py says why)."""
        if popen.returncode is not None:
            return False
        try:
            code = stepd.exit_status_unreaped(popen.pid)
        except ChildProcessError:
            return popen.poll() is None
        if code is None:
            return True
        running.exit_code = code
        if running.reaping is None:
            running.reaping = asyncio.get_running_loop().create_task(self._reap_after_stepd(running, popen))
        return False

    async def _reap_after_stepd(self, running: _Running, popen: EngineProcess) -> None:
        """Reaps an adopted engine once the slurmstepd that adopted it has exited, or ZOMBIE_HOLD_MAX_S after its
        end; until then kill(pid, 0) succeeds, so that stepd's watcher of the pid sleeps through its teardown."""
        rec, path, began = running.record, running.stepd_socket, time.monotonic()
        owner = await asyncio.to_thread(stepd.socket_owner, path, rec.job_id) if path is not None else None
        for _ in range(int(ZOMBIE_HOLD_MAX_S / ZOMBIE_HOLD_POLL_S)):
            if owner is None or not psutil.pid_exists(owner):
                break
            await asyncio.sleep(ZOMBIE_HOLD_POLL_S)
        await asyncio.to_thread(popen.poll)
        log.info("job %s: engine pid %d reaped %.1fs after its end, %s", rec.job_id, popen.pid,
                 time.monotonic() - began,
                 "its extern step's slurmstepd was gone already" if owner is None
                 else f"once its extern step's slurmstepd (pid {owner}) had exited" if not psutil.pid_exists(owner)
                 else f"its extern step's slurmstepd (pid {owner}) still running after {ZOMBIE_HOLD_MAX_S:.0f}s")

    async def _on_exit(self, running: _Running, model: ModelConfig | None) -> None:
        rec = running.record
        code = running.popen.returncode if running.popen is not None else None
        code = running.exit_code if code is None else code
        reason = f"engine exited{f' with code {code}' if code is not None else ''}{self._log_tail(running)}"
        if self.cgroups is not None and self.cgroups.oom_kills(running.cgroups) > running.oom_kills:
            reason = (f"engine killed by the job's memory limit (out of memory in its cgroup; ask for more with "
                      f"--mem): {reason}")
        # Children of the dead engine (vLLM's workers) must not outlive it, nor hold the port.
        await asyncio.to_thread(terminate_engine, self._tag(rec.job_id), rec.session_id, 2.0)
        if model is None:
            model = self.config.model(rec.model)
        if model is None:
            await self._fail(running, reason)
            return
        if self.checker is not None and await self.checker.job_over(rec.job_id):
            # The job's end killed it (Slurm's cleanup of a contained job comes before the epilog's StopEngine), or
            # its job ended while no agent ran: a restart would be an engine for a job that is gone.
            await self._forget_ended(running, reason)
            return
        if rec.nnodes > 1:
            # One rank cannot rejoin the others' torch.distributed group: the engine across nodes fails whole.
            await self._fail(running, f"rank {rec.rank} of {rec.nnodes}: {reason} (an engine across nodes is not "
                                      "restarted)")
            return
        if rec.restarts >= self.config.agent.max_restarts:
            await self._fail(running, f"{reason} (after {rec.restarts} restarts; agent.max_restarts is "
                                      f"{self.config.agent.max_restarts})")
            return
        rec.restarts += 1
        log.warning("job %s: %s; restart %d of %d", rec.job_id, reason, rec.restarts, self.config.agent.max_restarts)
        try:
            fresh = self._spawn(rec, model)
            running.popen, running.identity, running.log_path = fresh.popen, fresh.identity, fresh.log_path
            running.exit_code, running.reaping, running.held = None, None, False
        except SPAWN_ERRORS as exc:
            await self._fail(running, f"{reason}; restart failed: {exc}")
            return
        rec.state, rec.reason, rec.started_at, rec.ready_at = pb.STARTING, reason, self.clock(), 0.0
        running.load = {}
        self._changed(running)
        await self._contain(running)

    async def _forget_ended(self, running: _Running, reason: str) -> None:
        rec = running.record
        log.warning("job %s: %s; not restarted: Slurm no longer runs the job on this node", rec.job_id, reason)
        rec.state = pb.STOPPED
        self._engines.pop(rec.job_id, None)
        self.store.delete(rec.job_id)
        jobfiles.status_path(self.run_dir, rec.job_id).unlink(missing_ok=True)
        for callback in self._listeners:
            callback()

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
        return await probes.healthy(self.http, running.record.base_url)

    async def _read_load(self, running: _Running) -> None:
        load = await probes.load(self.http, running.record.base_url)
        if load is not None and load != running.load:
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
            for suffix in ("pem", "key"):
                (self.run_dir / "engine-tls" / f"{job_id}.{suffix}").unlink(missing_ok=True)
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
        tasks = [t for r in self._engines.values() for t in (r.task, r.containing, r.reading) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _host_address() -> str:
    hostname = socket.gethostname()
    try:
        return socket.gethostbyname(hostname)
    except OSError:
        return "127.0.0.1"
