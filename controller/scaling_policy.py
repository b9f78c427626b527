"""The autoscaler's plan, as pure functions: what one model's jobs are, what its replica count should be, and
which jobs to act on.

Responsible for: `classify`: a model's active jobs, with what the registry says of each engine, into groups by what
they mean for capacity (pending, starting, ready, expiring before the time limit, draining, failed, lost);
`decide`: its config, its load (the moving average over the window and the sample of this moment), its jobs by
group, its pin and the scale-up and scale-down timers into the desired count, one action (submit n, shrink by n,
wait, hold, steady) and the reason with its numbers; `expiring_drains`: which replicas near their time limit to
drain now; `shrink_victims`: which jobs a shrink cancels (pending, unlisted, starting) and which READY replicas it
drains, in order. None of them reads a clock, calls anything or logs, so each is tested as a table of cases.
Not responsible for: sampling the load, the registry's and Slurm's state, running the timers' clock, Slurm calls,
draining or logging (the Autoscaler actor in autoscaler.py does those, and carries out the plan).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from slinfer.config import ModelConfig
from slinfer.slurm.jobs import Job as SlurmJob

# Replacements for expiring jobs may overlap them, but never beyond this many jobs per desired replica.
MAX_JOBS_PER_REPLICA = 2


class Action(StrEnum):
    SUBMIT = "submit"
    SHRINK = "shrink"
    WAIT = "wait"
    HOLD = "hold"
    STEADY = "steady"


@dataclass(frozen=True)
class Load:
    """A model's load: the moving average over its window, and this step's sample (gateway or engines)."""

    average: float
    sample: float
    queued: int = 0


@dataclass(frozen=True)
class Jobs:
    """A model's jobs by what they mean for capacity."""

    # Pending, not yet listed, starting and READY: what serves or will serve.
    capacity: int
    # Capacity plus expiring, draining and lost jobs: what Slurm holds for the model.
    total: int


@dataclass(frozen=True)
class Timers:
    """When the load first asked for more (or fewer) replicas without pause, and until when sbatch backs off."""

    up_since: float | None = None
    down_since: float | None = None
    backoff_until: float = 0.0


@dataclass(frozen=True)
class Decision:
    desired: int
    action: Action
    # Jobs to submit (SUBMIT) or replicas to remove (SHRINK); 0 otherwise.
    count: int
    # Why: the outcome with its numbers ("wait scale-up delay (3/10s)"), or "submitted"/"shrunk".
    reason: str
    # Why no delay applied ("scale from zero", "below min"), or "".
    urgent: str
    timers: Timers


def replicas_for(load: float, cfg: ModelConfig) -> int:
    # Rounded first so that float noise (8.000001 / 8) does not add a replica.
    return math.ceil(round(load / cfg.target_outstanding, 6))


def decide(cfg: ModelConfig, load: Load, jobs: Jobs, timers: Timers, now: float, *, pinned: int | None = None,
           settled: bool = True) -> Decision:
    """The desired count and this step's action; `settled` is False while agents may still be re-registering."""
    urgent = ""
    if pinned is not None:
        desired = pinned
    else:
        desired = min(max(replicas_for(load.average, cfg), cfg.min_replicas), cfg.max_replicas)
        if load.queued > 0 and jobs.capacity == 0 and cfg.max_replicas > 0:
            # Scale from zero: a waiting request must not wait for the window or the delay.
            desired = max(desired, 1)
            urgent = "scale from zero"
        elif jobs.capacity < cfg.min_replicas:
            urgent = "below min"  # not a reaction to load, so no delay applies

    def result(action: Action, reason: str, count: int = 0, up: float | None = None,
               down: float | None = None) -> Decision:
        return Decision(desired, action, count, reason, urgent, Timers(up, down, timers.backoff_until))

    if desired > jobs.capacity:
        up_since = timers.up_since if timers.up_since is not None else now
        waited = now - up_since
        # The average lags: after a burst it still asks for replicas the load no longer needs, so a
        # scale-up must also be needed by the load of this very moment.
        needed_now = desired if pinned is not None else min(max(
            replicas_for(load.sample, cfg), cfg.min_replicas, 1 if urgent else 0), cfg.max_replicas)
        want = min(desired, needed_now) - jobs.capacity
        room = MAX_JOBS_PER_REPLICA * max(desired, 1) - jobs.total
        if not (urgent or pinned is not None or waited >= cfg.scale_up_delay_s):
            return result(Action.WAIT, f"wait scale-up delay ({waited:.0f}/{cfg.scale_up_delay_s:g}s)", up=up_since)
        if want <= 0:
            return result(Action.HOLD, f"hold: the load now ({load.sample:.0f}) needs only {needed_now}", up=up_since)
        if now < timers.backoff_until:
            return result(Action.WAIT, f"wait after sbatch failure ({timers.backoff_until - now:.0f}s left)",
                          up=up_since)
        if room <= 0:
            return result(Action.HOLD, f"hold: {jobs.total} jobs already (expiring ones not yet gone)", up=up_since)
        return result(Action.SUBMIT, "submitted", count=min(want, room), up=up_since)
    if desired < jobs.capacity:
        down_since = timers.down_since if timers.down_since is not None else now
        waited = now - down_since
        if pinned is None and waited < cfg.scale_down_delay_s:
            return result(Action.WAIT, f"wait scale-down delay ({waited:.0f}/{cfg.scale_down_delay_s:g}s)",
                          down=down_since)
        if not settled:
            return result(Action.WAIT, "wait for agents to re-register after start", down=down_since)
        return result(Action.SHRINK, "shrunk", count=jobs.capacity - desired, down=down_since)
    return result(Action.STEADY, "steady")


@dataclass(frozen=True)
class EngineView:
    """What the registry says of one job's engine, as `classify` needs it (None in its map: no report)."""

    # Marked draining in the registry (by hand, or by a controller before a restart).
    draining: bool = False
    failed: bool = False
    # STOPPING or STOPPED: ending on its own.
    ending: bool = False
    # READY: it serves.
    serving: bool = False
    # Its node's agent reports in time.
    agent_alive: bool = True


@dataclass
class Groups:
    """A model's active jobs by what they mean for capacity."""

    pending: list[SlurmJob] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)
    starting: list[SlurmJob] = field(default_factory=list)
    ready: list[SlurmJob] = field(default_factory=list)
    expiring: list[SlurmJob] = field(default_factory=list)
    draining: list[SlurmJob] = field(default_factory=list)
    failed: list[SlurmJob] = field(default_factory=list)
    lost: list[SlurmJob] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return len(self.pending) + len(self.unlisted) + len(self.starting) + len(self.ready)

    @property
    def total(self) -> int:
        return self.capacity + len(self.expiring) + len(self.draining) + len(self.lost)


@dataclass(frozen=True)
class Classified:
    groups: Groups
    # Jobs the registry marks draining that the autoscaler did not drain itself: it adopts their drain.
    adopt_drains: tuple[str, ...]
    # The jobs lost from now on (their agent fell silent), to remember until Slurm ends them or the agent returns.
    lost: frozenset[str]


def classify(active: Sequence[SlurmJob], engines: Mapping[str, EngineView | None], *, submitted: Collection[str],
             draining: Collection[str], cancelled: Collection[str], lost: Collection[str], lead_s: float,
             now: float) -> Classified:
    """Groups a model's active jobs (squeue's view), given each job's engine (`engines`, by job id), the jobs
    submitted but not listed yet, those being drained, cancelled and lost, and the replacement lead time."""
    g = Groups()
    listed = {j.job_id for j in active}
    g.unlisted = [job_id for job_id in submitted if job_id not in listed]
    adopt: list[str] = []
    lost_now = set(lost)
    for job in active:
        if job.job_id in cancelled:
            continue
        rep = engines.get(job.job_id)
        if job.job_id in draining:
            g.draining.append(job)
            continue
        if job.waiting:
            g.pending.append(job)
            continue
        if not job.running:
            continue  # SUSPENDED: neither capacity nor ours to act on
        if rep is not None and rep.draining:
            # Drained by hand through the Registry, or by a previous controller that restarted.
            adopt.append(job.job_id)
            g.draining.append(job)
            continue
        if rep is not None and rep.failed:
            g.failed.append(job)
            continue
        if rep is not None and rep.ending:
            continue  # ending on its own
        if rep is not None and not rep.agent_alive:
            lost_now.add(job.job_id)
            g.lost.append(job)
            continue
        if rep is None and job.job_id in lost_now:
            g.lost.append(job)
            continue
        lost_now.discard(job.job_id)
        serving = rep is not None and rep.serving
        # Only a serving replica is replaced before its limit; a starting one is capacity still. (With a lead
        # longer than a job's life after READY, as for a short time limit, a job expires the moment it serves
        # and its replacement is submitted then, not while it starts, which only doubled every start.)
        if serving and job.end_time > 0 and job.end_time - now <= lead_s:
            g.expiring.append(job)
        elif serving:
            g.ready.append(job)
        else:
            g.starting.append(job)
    return Classified(g, tuple(adopt), frozenset(lost_now))


def expiring_drains(expiring: Sequence[SlurmJob], ready: Sequence[SlurmJob], desired: int, now: float,
                    final_drain_s: float) -> list[tuple[SlurmJob, str]]:
    """The replicas near their time limit to drain now, soonest limit first, each with why.

    One leaves once enough READY replicas outlive it (its replacements: they may be near their own limit
    already, when the lead is longer than a job's life after READY), or at the latest `final_drain_s` before its
    limit. At least one must outlive it: a moment's desired=0 (the average of in-flight samples can read 0 under
    light steady traffic) is for scale-down and its delay to act on, not a replacement."""
    serving = [*ready, *expiring]
    out = []
    for job in sorted(expiring, key=lambda j: j.end_time):
        left = job.end_time - now
        outliving = sum(1 for j in serving if (j.end_time or math.inf) > job.end_time)
        if outliving >= max(desired, 1):
            out.append((job, "replacement ready"))
        elif left <= final_drain_s:
            out.append((job, "no replacement in time"))
    return out


@dataclass(frozen=True)
class Victims:
    # Jobs to cancel at once, each with its kind ("pending", "unlisted", "starting").
    cancel: tuple[tuple[str, str], ...]
    # READY replicas to drain (cancelled once idle).
    drain: tuple[SlurmJob, ...]


def shrink_victims(g: Groups, n: int, outstanding: Mapping[str, int]) -> Victims:
    """Which `n` jobs a shrink removes. First what serves nothing yet: PENDING jobs (newest first, as it is
    furthest back in the queue), jobs not yet listed (newest first), starting ones (latest start first). Then
    READY replicas: the one closest to its time limit, then the least busy (`outstanding` by job id)."""
    pending = sorted(g.pending, key=lambda j: j.submit_time, reverse=True)
    candidates = [(j.job_id, "pending") for j in pending]
    candidates += [(job_id, "unlisted") for job_id in reversed(g.unlisted)]
    candidates += [(j.job_id, "starting") for j in sorted(g.starting, key=lambda j: -j.start_time)]
    cancel = tuple(candidates[:n])
    left = n - len(cancel)
    if left <= 0:
        return Victims(cancel, ())

    def busy(job: SlurmJob) -> tuple[float, int]:
        return (job.end_time or math.inf, outstanding.get(job.job_id, 0))
    return Victims(cancel, tuple(sorted(g.ready, key=busy)[:left]))
