"""Replicas on nodes that Slurm is emptying: an administrator's drain, or `scontrol reboot ASAP`.

Responsible for: asking Slurm which nodes of the controller's running jobs are to be emptied (at most every
NODE_CHECK_S, one `scontrol show node` for all of them), and giving a job on such a node a time limit of its own,
the replacement lead from when it was first seen there, so that the walltime handover (scaling_policy.classify
and expiring_drains) replaces it elsewhere first and then drains it: no request lost, and the node empty within
the lead.
Not responsible for: the handover itself (the autoscaler with scaling_policy), or the node's reboot (Slurm does
it once the node is empty; Slurm never starts the replacement on a draining node).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

from slinfer.slurm.jobs import Job as SlurmJob
from slinfer.slurm.parse import hostnames
from slinfer.slurm.runner import SlurmError

log = logging.getLogger("slinfer.controller.autoscaler")

# Drains and reboots are an administrator's work of minutes: asking every 10 s costs slurmctld one node-table
# read per 10 s (not one per autoscaler step), and delays a handover by at most that.
NODE_CHECK_S = 10.0


class Nodes(Protocol):
    """The part of SlurmClient that reads nodes' states."""

    async def leaving_nodes(self, nodelists: Sequence[str]) -> dict[str, str]: ...


class LeavingNodes:
    """Which nodes of the running jobs Slurm is emptying, refreshed at most every NODE_CHECK_S."""

    def __init__(self, nodes: Nodes | None, clock: Callable[[], float]) -> None:
        self._nodes = nodes
        self._clock = clock
        self._asked_at = -math.inf
        self.leaving: dict[str, str] = {}

    async def refresh(self, jobs: Sequence[SlurmJob]) -> None:
        if self._nodes is None or self._clock() - self._asked_at < NODE_CHECK_S:
            return
        self._asked_at = self._clock()
        lists = sorted({j.nodes or j.node for j in jobs if j.running and (j.nodes or j.node)})
        try:
            self.leaving = await self._nodes.leaving_nodes(lists) if lists else {}
        except (SlurmError, ValueError) as exc:
            # Keep the last answer: a node that was leaving still is, most likely.
            log.warning("scontrol show node failed; the nodes Slurm empties are as of the last answer: %s", exc)

    def why(self, job: SlurmJob) -> str:
        """Why this job's node is being emptied ("NODE: STATE (reason)"), or "" where none of its nodes is."""
        if not job.running or not self.leaving:
            return ""
        try:
            names = hostnames(job.nodes or job.node)
        except ValueError:
            return ""
        return "; ".join(f"{n}: {self.leaving[n]}" for n in names if n in self.leaving)


def with_handover_limit(job: SlurmJob, since: float, lead_s: float) -> SlurmJob:
    """The job as the handover sees it: its time limit brought forward to `since + lead_s`, so that it counts as
    expiring at once (a replacement is asked for) and is drained once that is READY, or FINAL_DRAIN_S before."""
    limit = since + lead_s
    return replace(job, end_time=min(job.end_time, limit) if job.end_time > 0 else limit)
