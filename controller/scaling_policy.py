"""The autoscaler's decision, as a pure function: what one model's replica count should be and what to do now.

Responsible for: turning a model's config, its load (the moving average over the window and the sample of this
moment), its jobs by state, its pin, and the scale-up and scale-down timers into the desired count, one action
(submit n, shrink by n, wait, hold, steady) and the reason with its numbers. `decide` reads no clock, calls
nothing and logs nothing, so it is tested as a table of cases.
Not responsible for: sampling the load, classifying jobs, running the timers' clock, Slurm calls, draining,
time-limit replacement or logging (the Autoscaler actor in autoscaler.py does those).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from slinfer.config import ModelConfig

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
