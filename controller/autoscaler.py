"""The autoscaler: keeps each catalog model's Slurm jobs between its min and max replicas, following the load.

Responsible for: sampling each model's load (the gateway's in-flight plus queued requests, or the engines' own
running plus waiting where larger) into a moving average; asking the pure plan (scaling_policy.py) how its jobs
group, the desired replica count and this step's action, which expiring replicas to drain and which jobs a shrink
removes; carrying that out through Slurm (submit; cancel; drain a READY replica and cancel it once idle); learning
the replacement lead time from observed submit-to-READY latency; adopting its own jobs again after a restart
(recognised by job name and comment); writing its jobs into the JobTable; logging every decision with its numbers.
Not responsible for: routing or counting requests (the gateway), knowing engine state (the Registry), holding
pins (controller/pins.py: it reads them), or running Slurm's commands (SlurmClient). It manages only the jobs it
submitted: a user's own pool jobs add engine load but are never cancelled or counted as its replicas.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from slinfer.backoff import AGENT_RECONNECT, Backoff, BackoffPolicy
from slinfer.config import ModelConfig
from slinfer.controller import metrics
from slinfer.controller.jobtable import JobTable, Refusal
from slinfer.controller.movingaverage import MovingAverage
from slinfer.controller.nodedrain import LeavingNodes, Nodes, with_handover_limit
from slinfer.controller.pins import Pins
from slinfer.controller.preemption import BurstTier, tiers
from slinfer.controller.registry import Registry, Replica
from slinfer.controller.scaling_policy import (
    Action,
    EngineView,
    Groups,
    Jobs,
    Load,
    Timers,
    classify,
    decide,
    expiring_drains,
    shrink_victims,
)
from slinfer.controller.slurm import SlurmError, SlurmJob
from slinfer.v1 import engine_pb2

log = logging.getLogger(__name__)

# A step over more jobs than this lets the event loop run before each model (a model's part of a step over
# 1,000 jobs is a few ms; at 40,000 the whole step held the loop 0.6-1.9 s, bench/control_plane_scale.py).
SHARE_ABOVE_JOBS = 1000
# Engine states as _classify reads them, bound once (a step reads them for every active job).
_READY, _FAILED = engine_pb2.READY, engine_pb2.FAILED
_ENDING = frozenset((engine_pb2.STOPPING, engine_pb2.STOPPED))


@functools.lru_cache(maxsize=64)
def _view(draining: bool, state: int, agent_alive: bool) -> EngineView:
    """The (immutable) view of an engine, one shared object per distinct value: a step over 40,000 jobs made
    40,000 of them, and their garbage fed the collector's full collections (bench/control_plane_scale.py
    --slurm-standin: 2.5 s of full collections while 30 changes were timed at 5,000 nodes)."""
    return EngineView(draining=draining, failed=state == _FAILED, ending=state in _ENDING, serving=state == _READY,
                      agent_alive=agent_alive)

# Between steps, the burst tier's running jobs are asked about this often: a preemption's notice drains the replica
# within it (plus one `scontrol show job` and the feed), inside issue 29's second.
PREEMPT_PROBE_S = 0.5
# ... at most this many a probe (one slurmctld RPC each, REQUEST_JOB_INFO_SINGLE), the rest in the next probes.
PREEMPT_PROBE_MAX = 16
# The comment of every job the autoscaler submits; with the job name it tells a restarted controller its jobs.
COMMENT_MARK = "slinfer:autoscaler"
# Before any replica was seen starting, assume this submit-to-READY latency for replacement lead time.
DEFAULT_START_LATENCY_S = 300.0
# Margin on the slowest recent start: queue waits vary more than engine load times.
LEAD_FACTOR = 1.5
# ... and at least this many seconds of it: a warm start's 4 s doubled in one busy moment on the bed (4.4 s, then
# 8.8 s), which half of 4 s of margin cannot absorb; a second's queue wait alone is a quarter of it.
MIN_START_MARGIN_S = 15.0
# Requests still running when Slurm kills a job at its limit fail; drain at the latest this long before it.
FINAL_DRAIN_S = 30.0
# A job sbatch accepted but squeue does not list yet counts as pending for this long.
SUBMIT_VISIBILITY_S = 60.0
# After a failed sbatch, wait this long (doubling per failure, up to the cap) before trying again.
SUBMIT_BACKOFF = BackoffPolicy(initial_s=5.0, max_s=300.0)
# After a (re)start, running jobs whose agents have not reported yet look like starting engines; nothing is
# cancelled until every agent had three reconnect tries at its backoff's cap to re-register.
SETTLE_S = 3 * AGENT_RECONNECT.max_s


class Demand(Protocol):
    """What the gateway knows of a model's load (gateway.Demand)."""

    @property
    def in_flight(self) -> int: ...
    @property
    def queued(self) -> int: ...


class Slurm(Protocol):
    """The part of SlurmClient the autoscaler uses."""

    async def submit(self, model: ModelConfig, job_name: str, comment: str) -> str: ...
    async def jobs(self, names: Sequence[str] = ()) -> list[SlurmJob]: ...
    async def cancel(self, job_id: str) -> None: ...
    async def jobs_by_id(self, job_ids: Sequence[str]) -> list[SlurmJob]: ...


@dataclass
class ModelStatus:
    """One model's state as of the last step, for `slinfer status`."""

    name: str
    min_replicas: int
    max_replicas: int
    target: float
    window_s: float
    pinned: int | None = None
    desired: int = 0
    load: float = 0.0
    in_flight: int = 0
    queued: int = 0
    ready: int = 0
    starting: int = 0
    pending: int = 0
    draining: int = 0
    expiring: int = 0
    lost: int = 0
    lead_s: float = DEFAULT_START_LATENCY_S
    last_decision: str = ""
    last_decision_at: float = 0.0


@dataclass
class _Model:
    config: ModelConfig
    average: MovingAverage
    status: ModelStatus
    # The pin as of the last step: a change restarts the scale-up and scale-down delays.
    last_pin: int | None = None
    up_since: float | None = None
    down_since: float | None = None
    # Submitted by this process and not yet listed by squeue: job id -> submit time.
    submitted: dict[str, float] = field(default_factory=dict)
    # Draining replicas: job id -> when draining began.
    draining: dict[str, float] = field(default_factory=dict)
    # Cancelled and not yet gone from squeue's active states: job id -> when.
    cancelled: dict[str, float] = field(default_factory=dict)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=8))
    seen_ready: set[str] = field(default_factory=set)
    adopted: set[str] = field(default_factory=set)
    # Jobs whose node's agent fell silent: lost until Slurm ends them or the agent reports them again, even after
    # the Registry has forgotten that agent (else the still-RUNNING job would read as a starting replica, and the
    # replacement for it be cancelled).
    lost: set[str] = field(default_factory=set)
    backoff: Backoff = field(default_factory=lambda: Backoff.of(SUBMIT_BACKOFF))
    last_outcome: str = ""
    # The replicas beyond min_replicas, in the model's burst_qos, and the preemptions seen (preemption.py).
    burst: BurstTier = field(default_factory=BurstTier)
    probe_turn: int = 0  # where the next preemption probe starts among the burst tier's running jobs
    active_ids: set[str] = field(default_factory=set)
    # Running jobs on a node Slurm is emptying (drain, reboot ASAP): job id -> when first seen there.
    leaving: dict[str, float] = field(default_factory=dict)


class Autoscaler:
    """Grows and shrinks each catalog model's Slurm jobs with its load; see the module docstring."""

    def __init__(self, models: Sequence[ModelConfig], registry: Registry, demand: Callable[[str], Demand],
                 slurm: Slurm, clock: Callable[[], float] = time.time, job_name_prefix: str = "slinfer",
                 settle_s: float = SETTLE_S, is_leader: Callable[[], bool] = lambda: True,
                 outstanding_elsewhere: Callable[[str, float], int] | None = None, pins: Pins | None = None,
                 job_table: JobTable | None = None, nodes: Nodes | None = None) -> None:
        self._registry = registry
        # Which nodes of the running jobs Slurm empties (nodedrain.py); none asked without `nodes`.
        self._leaving = LeavingNodes(nodes, clock)
        # The administrator's pins, read at each step (controller/pins.py owns them; the autoscaler never writes).
        self.pins = pins if pins is not None else Pins(models)
        # This autoscaler's jobs as of its last squeue; it is their one writer.
        self.job_table = job_table if job_table is not None else JobTable()
        # Requests other gateways (the gateway tier) have in flight on a job's engine, given its drain's start.
        self._elsewhere = outstanding_elsewhere
        # With leader election only the leading controller submits and cancels; a standby watches.
        self._is_leader = is_leader
        self._leading = True
        self._demand = demand
        self._slurm = slurm
        self._clock = clock
        self._prefix = job_name_prefix
        self._settle_s = settle_s
        self._started = clock()
        self._interval = 2.0
        self._models: dict[str, _Model] = {}
        for m in models:
            status = ModelStatus(name=m.name, min_replicas=m.min_replicas, max_replicas=m.max_replicas,
                                 target=m.target_outstanding, window_s=m.window_s)
            self._models[m.name] = _Model(config=m, average=MovingAverage(m.window_s, clock), status=status)
        self.squeue_ok = False
        # Decisions acted on, by (model, action); mirrored in metrics.SCALING_DECISIONS.
        self.decisions: dict[tuple[str, str], int] = {}
        # How often a step let the event loop run before a model (read by the tests).
        self.yields = 0
        # Whether each node's agent is alive, asked once per node a step: a node's 8 engines are often of 8
        # models, so a memo per model asked every node once per model (40,000 asks at 5,000 nodes).
        self._alive: dict[str, bool] = {}

    def update_catalog(self, models: Sequence[ModelConfig]) -> None:
        """A reloaded catalog (controller/reload.py: the same models): replica bounds and adapters apply from the
        next step; the jobs, the load's average and the decisions so far stay."""
        for config in models:
            m = self._models[config.name]
            m.config = config
            m.status.min_replicas, m.status.max_replicas = config.min_replicas, config.max_replicas

    # ---- admin --------------------------------------------------------------------------------------
    def job_name(self, model: str) -> str:
        return f"{self._prefix}-{model}"

    def comment(self, model: str) -> str:
        return f"{COMMENT_MARK} model={model}"

    def owner(self, job: SlurmJob) -> str | None:
        """The catalog model whose autoscaler job this is, or None for any other job."""
        for name in self._models:
            if job.name == self.job_name(name) and job.comment == self.comment(name):
                return name
        return None

    def drain(self, job_id: str) -> str:
        """Drains one of the autoscaler's jobs (it is cancelled once idle); returns its model."""
        found = self.job_table.get(job_id)
        if found is None or not found[1].active:
            raise KeyError(f"job {job_id} is not an active job of this controller")
        model, _ = found
        m = self._models[model]
        if job_id not in m.draining and job_id not in m.cancelled:
            self._start_drain(m, job_id, "admin request")
            self._count(model, "drain_admin")
        return model

    def status(self) -> list[ModelStatus]:
        for name, m in self._models.items():
            m.status.pinned = self.pins.get(name)  # a pin made since the last step shows at once
        return [m.status for m in self._models.values()]

    def jobs(self) -> list[tuple[str, SlurmJob]]:
        """The autoscaler's jobs as of the last squeue: (model, job)."""
        return self.job_table.jobs()

    def lead_time(self, model: str) -> float:
        """How long before a job's time limit its replacement is submitted: the slowest recent start with its
        margin (LEAD_FACTOR of it, MIN_START_MARGIN_S at least), plus the final drain (an expiring replica is
        drained FINAL_DRAIN_S before its limit whether or not the replacement is READY, so the replacement must be
        READY by then), plus two steps of lag."""
        m = self._models[model]
        if not m.latencies:
            return DEFAULT_START_LATENCY_S
        slowest = max(m.latencies)
        margin = max(slowest * (LEAD_FACTOR - 1), MIN_START_MARGIN_S)
        return slowest + margin + FINAL_DRAIN_S + 2 * self._interval

    # ---- loop ---------------------------------------------------------------------------------------
    async def run(self, interval: float) -> None:
        self._interval = interval
        probe = asyncio.create_task(self.watch_preemptions(), name="preemption-probe")
        try:
            while True:
                try:
                    await self.step()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("autoscaler step failed")
                await asyncio.sleep(interval)
        finally:
            probe.cancel()

    async def watch_preemptions(self, interval_s: float = PREEMPT_PROBE_S) -> None:
        """Runs probe_preemptions every interval_s, between the steps."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.probe_preemptions()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the step's listing sees the preemption anyway, and warns of an outage
                log.debug("preemption probe failed: %s", exc)

    async def probe_preemptions(self) -> list[str]:
        """Asks Slurm about the burst tier's running replicas alone (one `scontrol show job` each, at most
        PREEMPT_PROBE_MAX a probe, in turns) and drains each that Slurm's preemption notice reached; returns
        their ids. A step lists the queue every autoscale_interval_s (2 s): a notice waited for it, and left
        routing 2.2 s after it through the gateway tier (issue 29's bound is 1 s)."""
        if not self._is_leader():
            return []
        drained: list[str] = []
        for m in self._models.values():
            running = sorted((m.burst.jobs & m.burst.ran & m.active_ids) - m.burst.preempted - m.draining.keys()
                             - m.cancelled.keys())
            if not running:
                continue
            start = m.probe_turn % len(running)
            asked = (running[start:] + running[:start])[:PREEMPT_PROBE_MAX]
            m.probe_turn = start + len(asked)
            jobs = await self._slurm.jobs_by_id(asked)
            for job_id in m.burst.observe(m.config.name, jobs, self._clock()):
                if job_id in m.active_ids and job_id not in m.draining and job_id not in m.cancelled:
                    self._start_drain(m, job_id, "preempted by Slurm")
                    self._count(m.config.name, "drain_preempted")
                    drained.append(job_id)
        return drained

    async def step(self) -> None:
        leading = self._is_leader()
        if leading != self._leading:
            log.info("autoscaler %s", "leads now: scaling" if leading else "is on standby: another controller leads")
            self._leading = leading
            # A new leader first lets the agents' reports and the queue settle, as after a restart.
            self._started = self._clock()
        if not leading:
            return
        try:
            # Only this controller's user's jobs of its job names: Slurm's cost stays flat as the queue grows.
            jobs = await self._slurm.jobs([self.job_name(name) for name in self._models])
        except SlurmError as exc:
            # Acting on a stale or missing view of the queue could submit duplicates.
            log.warning("squeue failed, no scaling this step: %s", exc)
            self.squeue_ok = False
            return
        self.squeue_ok = True
        now = self._clock()
        self._alive = {}
        by_model: dict[str, list[SlurmJob]] = {name: [] for name in self._models}
        mine: dict[str, tuple[str, SlurmJob]] = {}
        # One lookup a job (owner() scans the catalog: jobs x models a step), by name then comment (no key tuple
        # made per job).
        owners: dict[str, dict[str, str]] = {}
        for name in self._models:
            owners.setdefault(self.job_name(name), {})[self.comment(name)] = name
        no_owner: dict[str, str] = {}
        for job in jobs:
            owner = owners.get(job.name, no_owner).get(job.comment)
            if owner is not None:
                by_model[owner].append(job)
                mine[job.job_id] = (owner, job)
        self.job_table.replace(mine)
        metrics.SLURM_JOBS.clear()
        for model, model_jobs in by_model.items():
            states: dict[str, int] = {}
            for job in model_jobs:
                states[job.state] = states.get(job.state, 0) + 1
            for state, n in states.items():
                metrics.SLURM_JOBS.labels(model, state).set(n)
        await self._leaving.refresh([job for _, job in mine.values()])
        share = len(mine) > SHARE_ABOVE_JOBS
        for name, m in self._models.items():
            if share:
                # The loop runs before each model: at 5,000 nodes a step over 40,000 jobs held it 0.6-1.9 s in one
                # piece, and the gateways' feed, the agents' reports and admin calls waited behind it; a model's
                # part is its own jobs'. Its own state is the model's; the job table and `now` are the step's.
                self.yields += 1
                await asyncio.sleep(0)
            await self._step_model(m, by_model[name], now)

    # ---- one model ----------------------------------------------------------------------------------
    async def _step_model(self, m: _Model, jobs: list[SlurmJob], now: float) -> None:
        cfg = m.config
        pinned = self.pins.get(cfg.name)
        if pinned != m.last_pin:
            # The delays count from the pin's change, as they would from a change of load.
            m.last_pin = pinned
            m.up_since = m.down_since = None
        listed = {j.job_id for j in jobs}
        active = [j for j in jobs if j.active]
        active_ids = {j.job_id for j in active}
        for job_id, at in list(m.submitted.items()):
            if job_id in listed or now - at > SUBMIT_VISIBILITY_S:
                del m.submitted[job_id]
        for table in (m.draining, m.cancelled):
            for job_id in [j for j in table if j not in active_ids]:
                del table[job_id]
        self._adopt(m, active)
        self._track_tiers(m, jobs, active_ids, now)
        settled = now - self._started >= self._settle_s

        active = self._leaving_nodes(m, active, now)
        groups = self._classify(m, active, now)
        lead = self.lead_time(cfg.name)  # with any start _classify saw just now

        demand = self._demand(cfg.name)
        # Only the service's own engines: a user's private engine of the same model is that job's, and its
        # requests (or a report its dead agent left behind) must not make the service take a GPU.
        engines = sum(r.running + r.waiting for r in self._registry.replicas(cfg.name)
                      if r.state == engine_pb2.READY and r.pool)
        sample = max(float(demand.in_flight + demand.queued), engines)
        m.average.add(sample)
        load = m.average.value()

        d = decide(cfg, Load(load, sample, demand.queued), Jobs(groups.capacity, groups.total),
                   Timers(m.up_since, m.down_since, m.backoff.retry_at), now, pinned=pinned, settled=settled)
        desired = d.desired
        m.up_since, m.down_since = d.timers.up_since, d.timers.down_since

        st = m.status
        st.pinned, st.desired, st.load = pinned, desired, load
        st.in_flight, st.queued = demand.in_flight, demand.queued
        st.ready, st.starting = len(groups.ready), len(groups.starting)
        st.pending = len(groups.pending) + len(groups.unlisted)
        st.draining, st.expiring, st.lost = len(groups.draining), len(groups.expiring), len(groups.lost)
        st.lead_s = lead

        def numbers() -> str:
            return (f"model={cfg.name} desired={desired} current={groups.capacity} (ready={len(groups.ready)} "
                    f"starting={len(groups.starting)} pending={st.pending} draining={len(groups.draining)} "
                    f"expiring={len(groups.expiring)}) load={load:.1f} "
                    f"(in_flight={demand.in_flight} queued={demand.queued} engines={engines:.0f}) "
                    f"target={cfg.target_outstanding:g} window={cfg.window_s:g}s"
                    + (f" pinned={pinned}" if pinned is not None else ""))

        for job in groups.failed if settled else ():
            rep = self._registry.get(job.job_id)
            reason = rep.reason if rep is not None else ""
            await self._cancel(m, job.job_id, f"{numbers()} -> cancel {job.job_id}: engine failed ({reason})",
                               "cancel_failed")

        outcome = d.reason
        if d.action is Action.SUBMIT:
            await self._submit(m, d.count, f"{numbers()} -> submit {d.count}" + (f" ({d.urgent})" if d.urgent else ""))
        elif d.action is Action.SHRINK:
            await self._shrink(m, groups, d.count, numbers())

        # Replicas near their time limit leave once READY replicas outlive them (scaling_policy.expiring_drains).
        for job, why in expiring_drains(groups.expiring, groups.ready, desired, now, FINAL_DRAIN_S) if settled else ():
            node = job.job_id in m.leaving
            log.info("%s -> drain %s: %s in %.0fs (lead %.0fs), %s", numbers(), job.job_id,
                     "its node's handover limit" if node else "time limit", job.end_time - now, lead, why)
            self._start_drain(m, job.job_id, "node emptied by Slurm" if node else "time limit")
            self._count(cfg.name, "drain_node_leaving" if node else "drain_time_limit")

        await self._finish_drains(m, now, settled, numbers)

        # Once per change of outcome at INFO (a waiting count ticking up is not a change).
        kind = outcome.split(" (")[0]
        if kind != m.last_outcome and outcome not in ("submitted", "shrunk"):
            log.info("%s -> %s", numbers(), outcome)
        else:
            log.debug("%s -> %s", numbers(), outcome)
        m.last_outcome = kind

    def _adopt(self, m: _Model, active: list[SlurmJob]) -> None:
        for job in active:
            if job.job_id in m.adopted:
                continue
            m.adopted.add(job.job_id)
            if job.job_id not in m.submitted:
                log.info("model=%s adopted job %s (%s%s), found in squeue", m.config.name, job.job_id, job.state,
                         f" on {job.node}" if job.node else "")
        # Forget ids of jobs that are gone, so the set does not grow forever.
        active_ids = {j.job_id for j in active}
        m.adopted &= active_ids | set(m.submitted)
        m.seen_ready &= active_ids
        m.lost &= active_ids

    def _classify(self, m: _Model, active: list[SlurmJob], now: float) -> Groups:
        """Learns the start latency of each newly serving replica, then groups the jobs (scaling_policy.classify)
        with the lead time that includes them, and takes over the drains and lost jobs the plan names."""
        engines: dict[str, EngineView | None] = {}
        alive, get, agent_alive = self._alive, self._registry.get, self._registry.agent_alive
        for job in active:
            rep = get(job.job_id)
            if rep is None:
                engines[job.job_id] = None
                continue
            node_alive = alive.get(rep.node)
            if node_alive is None:
                node_alive = alive[rep.node] = agent_alive(rep.node)
            view = engines[job.job_id] = _view(rep.draining, rep.state, node_alive)
            if (view.serving and not view.draining and node_alive and job.job_id not in m.seen_ready
                    and job.running and job.job_id not in m.cancelled and job.job_id not in m.draining):
                self._learn(m, job, rep)
        plan = classify(active, engines, submitted=m.submitted, draining=m.draining, cancelled=m.cancelled,
                        lost=m.lost, lead_s=self.lead_time(m.config.name), now=now)
        for job_id in plan.adopt_drains:
            m.draining[job_id] = now
        m.lost = set(plan.lost)
        return plan.groups

    def _leaving_nodes(self, m: _Model, active: list[SlurmJob], now: float) -> list[SlurmJob]:
        """The active jobs, those on a node Slurm empties (drain, reboot ASAP) with their handover limit
        (nodedrain.with_handover_limit): replaced elsewhere, then drained, within the lead."""
        lead = self.lead_time(m.config.name)
        if not self._leaving.leaving:
            # No node is being emptied: no job is on one, and none is any longer (what the loop below finds).
            m.leaving.clear()
            return list(active)
        out = []
        for job in active:
            why = self._leaving.why(job)
            if not why:
                m.leaving.pop(job.job_id, None)  # not (or no longer: the drain was undone) on such a node
            if not why or job.job_id in m.draining or job.job_id in m.cancelled:
                out.append(job)
                continue
            if job.job_id not in m.leaving:
                m.leaving[job.job_id] = now
                log.info("model=%s job %s: Slurm empties its node (%s): replaced elsewhere, then drained, within "
                         "%.0fs (the lead)", m.config.name, job.job_id, why, lead)
                self._note(m, f"job {job.job_id} leaves its node ({why})")
            out.append(with_handover_limit(job, m.leaving[job.job_id], lead))
        active_ids = {job.job_id for job in active}
        for job_id in [j for j in m.leaving if j not in active_ids]:
            del m.leaving[job_id]
        return out

    def _learn(self, m: _Model, job: SlurmJob, rep: Replica) -> None:
        if job.job_id in m.seen_ready or rep.ready_at <= 0 or job.submit_time <= 0:
            return
        m.seen_ready.add(job.job_id)
        latency = rep.ready_at - job.submit_time
        if latency > 0:
            m.latencies.append(latency)
            log.info("model=%s job %s READY %.1fs after submit (queue %.1fs); lead time now %.0fs",
                     m.config.name, job.job_id, latency,
                     max(job.start_time - job.submit_time, 0.0), self.lead_time(m.config.name))

    def _track_tiers(self, m: _Model, jobs: list[SlurmJob], active_ids: set[str], now: float) -> None:
        """Notes preemptions (burst tier backoff) and which active jobs are guaranteed (preemption.py)."""
        for job_id in m.burst.restore(m.config, [j for j in jobs if j.job_id in active_ids]):
            log.info("model=%s job %s is in the burst tier (its QOS is %s): it does not count toward min_replicas "
                     "%d", m.config.name, job_id, m.config.burst_qos, m.config.min_replicas)
        for job_id in m.burst.observe(m.config.name, jobs, now):
            if job_id in active_ids and job_id not in m.draining and job_id not in m.cancelled:
                # No new request goes to it; its requests finish within the grace, and it is cancelled once
                # idle, which gives batch work its GPUs before the grace ends.
                self._start_drain(m, job_id, "preempted by Slurm")
                self._count(m.config.name, "drain_preempted")
        m.burst.forget({j.job_id for j in jobs} | set(m.submitted))
        m.active_ids = (active_ids - set(m.cancelled) - set(m.draining)) | set(m.submitted)

    def _tiers(self, m: _Model, n: int, why: str) -> list[tuple[str, bool]]:
        """(QOS, in the burst tier) of each of n submits; burst submits are left out while the tier backs off."""
        cfg = m.config
        guaranteed = m.burst.guaranteed(m.active_ids)
        missing = max(cfg.min_replicas - guaranteed, 0)
        planned = [(q, bool(cfg.burst_qos) and i >= missing) for i, q in enumerate(tiers(cfg, guaranteed, n))]
        if cfg.burst_qos:
            log.info("model=%s tiers: %d of min_replicas %d active in %s (jobs %s, burst %s) -> %s", cfg.name,
                     guaranteed, cfg.min_replicas, cfg.qos or "the default QOS", ",".join(sorted(m.active_ids)),
                     ",".join(sorted(m.burst.jobs)) or "none", ", ".join(q for q, _ in planned))
        wait = m.burst.waiting(self._clock())
        if not cfg.burst_qos or not wait:
            return planned
        kept = planned[:missing]
        if len(kept) < n and not m.burst.deferred_logged:
            log.info("%s -> %d burst submit(s) in %s deferred %.0fs: a replica was preempted %.0fs ago "
                     "(%d in a row); %d guaranteed submit(s) go ahead", why, n - len(kept), cfg.burst_qos, wait,
                     self._clock() - m.burst.last_preempted_at, m.burst.backoff.failures, len(kept))
            m.burst.deferred_logged = True
        return kept

    async def _submit(self, m: _Model, n: int, why: str) -> None:
        name = m.config.name
        planned = self._tiers(m, n, why)
        if not planned:
            return
        log.info("%s", why)
        for tier, burst in planned:
            config = replace(m.config, qos=tier) if tier != m.config.qos else m.config
            try:
                job_id = await self._slurm.submit(config, self.job_name(name), self.comment(name))
            except SlurmError as exc:
                backoff = m.backoff.failed(self._clock(), str(exc))
                log.error("model=%s sbatch failed (%d in a row), next try in %.0fs: %s",
                          name, m.backoff.failures, backoff, exc)
                self._count(name, "submit_failed")
                # /v1/models shows it as the model's state, with Slurm's own words.
                self.job_table.refused(name, Refusal(exc.stderr.strip() or str(exc), m.backoff.failures,
                                                     time.time(), time.time() + backoff))
                return
            m.backoff.succeeded()
            self.job_table.refused(name, None)
            m.submitted[job_id] = self._clock()
            if burst:
                m.burst.jobs.add(job_id)
            m.active_ids.add(job_id)
            log.info("model=%s submitted job %s%s", name, job_id, f" (burst tier, qos {tier})" if burst else "")
            self._count(name, "submit")
            self._note(m, f"submitted job {job_id}")

    async def _shrink(self, m: _Model, g: Groups, n: int, numbers: str) -> None:
        name = m.config.name
        outstanding = {j.job_id: rep.outstanding for j in g.ready if (rep := self._registry.get(j.job_id))}
        victims = shrink_victims(g, n, outstanding)
        for job_id, kind in victims.cancel:
            await self._cancel(m, job_id, f"{numbers} -> cancel {kind} job {job_id}", f"cancel_{kind}")
        for job in victims.drain:
            log.info("%s -> drain %s", numbers, job.job_id)
            self._start_drain(m, job.job_id, "scale down")
            self._count(name, "drain")

    def _start_drain(self, m: _Model, job_id: str, why: str) -> None:
        m.draining.setdefault(job_id, self._clock())
        self._registry.set_draining(job_id, True)
        self._note(m, f"draining job {job_id} ({why})")

    async def _finish_drains(self, m: _Model, now: float, settled: bool, numbers: Callable[[], str]) -> None:
        for job_id, since in list(m.draining.items()):
            if job_id in m.cancelled:
                continue
            rep = self._registry.get(job_id)
            if rep is not None and not rep.draining:
                self._registry.set_draining(job_id, True)  # the replica re-appeared after an agent restart
            if rep is None and not settled:
                continue  # its agent may not have re-registered yet: it could still be serving
            outstanding = rep.outstanding if rep is not None else 0
            if self._elsewhere is not None:
                outstanding += self._elsewhere(job_id, since)
            waited = now - since
            if outstanding == 0:
                await self._cancel(m, job_id, f"{numbers()} -> cancel drained job {job_id} after {waited:.0f}s",
                                   "cancel_drained")
            elif waited >= m.config.drain_timeout_s:
                await self._cancel(m, job_id, f"{numbers()} -> cancel job {job_id}: still {outstanding} "
                                   f"outstanding after drain timeout {m.config.drain_timeout_s:g}s",
                                   "cancel_drain_timeout")

    async def _cancel(self, m: _Model, job_id: str, why: str, action: str) -> None:
        log.info("%s", why)
        try:
            await self._slurm.cancel(job_id)
        except SlurmError as exc:
            log.error("model=%s scancel %s failed, retrying next step: %s", m.config.name, job_id, exc)
            self._count(m.config.name, "cancel_failed")
            return
        m.cancelled[job_id] = self._clock()
        m.submitted.pop(job_id, None)
        self._count(m.config.name, action)
        self._note(m, f"cancelled job {job_id}")

    def _count(self, model: str, action: str) -> None:
        self.decisions[(model, action)] = self.decisions.get((model, action), 0) + 1
        metrics.SCALING_DECISIONS.labels(model, action).inc()

    def _note(self, m: _Model, decision: str) -> None:
        m.status.last_decision = decision
        m.status.last_decision_at = self._clock()
