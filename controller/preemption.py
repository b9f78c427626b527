"""Two tiers of capacity: which QOS each new replica goes to, and how long the burst tier waits after Slurm
took one of its replicas back.

Responsible for: the tier of each submit (the guaranteed replicas, `min_replicas`, in the model's `qos`; those
beyond in its `burst_qos`); noticing that Slurm preempts one of a model's jobs (`PreemptTime` set in its
record, squeue's listing or `scontrol show job`, from the grace start on, or its state PREEMPTED after its end)
and the backoff before the burst tier is asked again, with the decision's numbers. The autoscaler drains a
noticed replica.
Not responsible for: how many replicas a model wants (scaling_policy.decide), submitting (the autoscaler),
draining a preempted replica (the gateway stops routing to an engine that is gone; see
docs/admin/preemption.md for what Slurm does to the engine at the grace start).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from slinfer.backoff import Backoff, BackoffPolicy
from slinfer.config import ModelConfig
from slinfer.slurm.jobs import Job as SlurmJob

log = logging.getLogger("slinfer.controller.autoscaler")

# After a preemption the batch work that took the GPUs usually holds them for minutes to hours: resubmitting at
# once would queue a scavenger job behind it (harmless) or, on another node, be preempted again by the next
# waiting high job. One minute, doubling per preemption in a row, up to half an hour (a typical batch job).
PREEMPT_BACKOFF = BackoffPolicy(initial_s=60.0, max_s=1800.0)
# A burst submit that succeeds and serves this long without being preempted ends the preemptions in a row.
CALM_S = 600.0
# The job state Slurm gives a job that preemption ended (CANCEL mode; REQUEUE puts it back to PENDING with
# a restart count, and `sacct --duplicates` shows the first run PREEMPTED).
PREEMPTED = "PREEMPTED"


# Why squeue says a requeued job waits until Slurm's hold after a requeue is over (its credential's lifetime,
# 120 s by default): slinfer submits pool jobs without --begin, so only a requeue gives one this reason.
REQUEUE_REASON = "BeginTime"


def noticed(job: SlurmJob) -> bool:
    """Slurm preempts this job: its grace time began (PreemptTime) or it ended PREEMPTED."""
    return job.preempt_time > 0 or job.job_state.base == PREEMPTED


def requeued(job: SlurmJob, ran: bool) -> bool:
    """The job waits again after it ran (`ran`: seen on a node by this controller) or waits for the hold Slurm
    puts on a requeued job: PreemptMode=REQUEUE after the grace time, or an administrator's `scontrol requeue`.
    Its engine is gone, and it would start again only after that hold and a place in the queue."""
    return job.waiting and (ran or job.reason == REQUEUE_REASON)


def tiers(cfg: ModelConfig, guaranteed: int, n: int) -> list[str]:
    """The QOS of each of n new jobs, given `guaranteed` active jobs in the model's own `qos`: the first ones
    refill min_replicas in `qos`, the rest go to `burst_qos` (to `qos` where the model names none)."""
    missing = max(cfg.min_replicas - guaranteed, 0)
    burst = cfg.burst_qos or cfg.qos
    return [cfg.qos if i < missing else burst for i in range(n)]


@dataclass
class BurstTier:
    """One model's burst tier: its jobs, the preemptions seen, and the backoff they set."""

    jobs: set[str] = field(default_factory=set)
    preempted: set[str] = field(default_factory=set)
    ran: set[str] = field(default_factory=set)  # jobs seen on a node: waiting again means requeued
    backoff: Backoff = field(default_factory=lambda: Backoff.of(PREEMPT_BACKOFF))
    last_preempted_at: float = 0.0
    deferred_logged: bool = False

    def guaranteed(self, job_ids: Iterable[str]) -> int:
        """How many of these (active or just submitted) jobs are in the guaranteed tier."""
        return sum(1 for j in job_ids if j not in self.jobs)

    def observe(self, model: str, jobs: Iterable[SlurmJob], now: float) -> list[str]:
        """Notes each job of the model newly under Slurm's preemption notice (or PREEMPTED) and backs the burst
        tier off; returns their ids."""
        jobs = list(jobs)
        back = [j for j in jobs if j.job_id not in self.preempted and requeued(j, j.job_id in self.ran)]
        # A job already over counts by its PreemptTime only if this controller saw it on a node (a grace shorter
        # than a step): a restarted controller's listing shows ended jobs with the notice a previous one handled.
        new = [j for j in jobs if noticed(j) and j.job_id not in self.preempted and (
            j.active or j.job_id in self.ran or j.job_state.base == PREEMPTED)] + [
            j for j in back if not noticed(j)]
        self.ran |= {j.job_id for j in jobs if j.on_node}
        if not new and self.backoff.failures and now - self.last_preempted_at > CALM_S:
            self.backoff.succeeded()
        for job in new:
            self.preempted.add(job.job_id)
            tier = "burst" if job.job_id in self.jobs else "guaranteed"
            delay = self.backoff.failed(now, f"job {job.job_id} preempted")
            self.last_preempted_at = now
            self.deferred_logged = False
            if job in back:
                # Not counted as capacity (drained, then cancelled: it has no engine); its tier is refilled
                # as after any preemption: a new job queues at once, this one would wait out the hold first.
                log.warning("model=%s job %s (%s tier) was requeued by Slurm (pending again, reason %s, submitted "
                            "%.0fs ago; preemption in REQUEUE mode or scontrol requeue; %d in a row) -> not "
                            "capacity: cancel it, no burst submit for %.0fs, guaranteed replicas are resubmitted "
                            "at once", model, job.job_id, tier, job.reason or "-", now - job.submit_time,
                            self.backoff.failures, delay)
                continue
            notice = f"notice {now - job.preempt_time:.1f}s ago" if job.preempt_time else "seen ended"
            log.warning("model=%s job %s (%s tier) is preempted by Slurm (%s, %d in a row) -> drain it, no burst "
                        "submit for %.0fs, guaranteed replicas are resubmitted at once",
                        model, job.job_id, tier, notice, self.backoff.failures, delay)
        return [j.job_id for j in new]

    def restore(self, cfg: ModelConfig, jobs: Iterable[SlurmJob]) -> list[str]:
        """Sets each job's tier from its QOS where Slurm said it (squeue or `scontrol show job`): a job in the model's
        `burst_qos` is in the burst tier, one in another QOS is not. A restarted controller adopts its jobs
        without knowing which tier it had put them in; their QOS says. Returns the ids newly in the burst tier."""
        if not cfg.burst_qos or cfg.burst_qos == cfg.qos:
            return []
        added = []
        for job in jobs:
            if not job.qos:
                continue
            if job.qos == cfg.burst_qos:
                if job.job_id not in self.jobs:
                    self.jobs.add(job.job_id)
                    added.append(job.job_id)
            else:
                self.jobs.discard(job.job_id)
        return added

    def waiting(self, now: float) -> float:
        """Seconds until the burst tier may be asked again; 0 when it may now."""
        return max(self.backoff.retry_at - now, 0.0) if self.backoff.failures else 0.0

    def forget(self, listed: set[str]) -> None:
        """Drops ids Slurm no longer lists, so the sets do not grow forever."""
        self.jobs &= listed
        self.preempted &= listed
        self.ran &= listed
