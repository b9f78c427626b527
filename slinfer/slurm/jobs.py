"""The job model every part of slinfer reads Slurm into.

Responsible for: one job's identity, owner, placement, times and state (base plus flags, classified by
states.py). Not responsible for: reading it from Slurm (parse.py, queries.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from slinfer.slurm.states import JobState


@functools.lru_cache(maxsize=256)
def _parsed(state: str) -> JobState:
    """A state word parsed once: an autoscaler step reads each of its jobs' states several times, and parsing
    was half of a step's CPU at 8,000 jobs (bench/control_plane_scale.py); Slurm prints few distinct words."""
    return JobState.parse(state)


@dataclass(frozen=True)
class Job:
    job_id: str
    name: str
    comment: str
    state: str  # the word squeue shows: PENDING, RUNNING, COMPLETING, CANCELLED, ...
    node: str  # the batch host; empty while pending
    submit_time: float  # unix seconds
    start_time: float  # unix seconds; 0 while pending
    end_time: float  # unix seconds: the time limit's end while running, 0 while pending
    reason: str = ""  # why it is pending, as squeue says
    user: str = ""  # the owner's name
    uid: int = -1  # the owner's uid, where Slurm printed it
    nodes: str = ""  # the allocation's node list, compressed (node[1-3])
    flags: frozenset[str] = frozenset()  # flags beside the base state, where the output listed them
    # When Slurm's preemption notice (the grace time) began, unix seconds; 0 when none.
    preempt_time: float = 0.0
    # The job's QOS (squeue's listing and `scontrol show job` both say it); empty where Slurm printed none.
    qos: str = ""

    @property
    def job_state(self) -> JobState:
        parsed = _parsed(self.state)
        return JobState(parsed.base, parsed.flags | self.flags) if self.flags else parsed

    @property
    def active(self) -> bool:
        return self.job_state.active

    @property
    def waiting(self) -> bool:
        return self.job_state.waiting

    @property
    def running(self) -> bool:
        return self.job_state.running

    @property
    def on_node(self) -> bool:
        return self.job_state.on_node

    @property
    def holds_node(self) -> bool:
        return self.job_state.holds_node
