"""The one table of Slurm job states: a base state plus flags, and what each state means to slinfer.

Responsible for: turning what any release prints (`RUNNING`, `["RUNNING", "CONFIGURING"]`, `PENDING,REQUEUED`,
`CANCELLED by 0`) into a JobState, naming it as Slurm's own text output does, and classifying it (waiting,
starting, running, ending, over) in one table that the agent, the controller, the bed and the benchmarks share.
Not responsible for: reading Slurm (parse.py) or acting on a state (the autoscaler, the agent).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from enum import Enum


class Phase(Enum):
    WAITING = "waiting"  # queued for resources: no engine yet
    STARTING = "starting"  # allocated, prolog or node boot still running
    RUNNING = "running"  # holds its allocation and runs
    SUSPENDED = "suspended"  # holds its allocation, stopped
    ENDING = "ending"  # over, epilog and cleanup still on the node
    OVER = "over"  # gone from its node; Slurm lists it for MinJobAge


# The flags that Slurm's job_state_string() prints in place of the base state, in its order of precedence:
# text output (squeue %T, scontrol JobState=) shows only this word, JSON from v0.0.40 lists base and flags.
SHOWN_FLAGS = ("COMPLETING", "STAGE_OUT", "CONFIGURING", "RESIZING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
               "SPECIAL_EXIT", "STOPPED", "REVOKED", "RESV_DEL_HOLD", "SIGNALING")
# What each shown word means to slinfer; a word missing here (a future release's) counts as OVER, so nothing
# routes to or waits for a job in a state nobody understood.
PHASES: dict[str, Phase] = {
    "PENDING": Phase.WAITING, "REQUEUED": Phase.WAITING, "REQUEUE_FED": Phase.WAITING,
    "REQUEUE_HOLD": Phase.WAITING, "SPECIAL_EXIT": Phase.WAITING, "RESV_DEL_HOLD": Phase.WAITING,
    "CONFIGURING": Phase.STARTING,
    "RUNNING": Phase.RUNNING, "RESIZING": Phase.RUNNING, "SIGNALING": Phase.RUNNING,
    "SUSPENDED": Phase.SUSPENDED, "STOPPED": Phase.SUSPENDED,
    "COMPLETING": Phase.ENDING, "STAGE_OUT": Phase.ENDING,
    "COMPLETED": Phase.OVER, "CANCELLED": Phase.OVER, "FAILED": Phase.OVER, "TIMEOUT": Phase.OVER,
    "NODE_FAIL": Phase.OVER, "PREEMPTED": Phase.OVER, "BOOT_FAIL": Phase.OVER, "DEADLINE": Phase.OVER,
    "OUT_OF_MEMORY": Phase.OVER, "REVOKED": Phase.OVER,
}
_BASES = frozenset(PHASES) - frozenset(SHOWN_FLAGS)
_WORD = re.compile(r"[A-Z_]+")


@dataclass(frozen=True)
class JobState:
    """A job's base state and its flags; `base` is empty where Slurm printed only a flag (text output)."""

    base: str
    flags: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, value: object) -> JobState:
        """From a JSON list (v0.0.40+), a string (v0.0.38/39, squeue %T, scontrol JobState=)."""
        if isinstance(value, list):
            words = [str(w).upper() for w in value]
        else:
            # scontrol prints "CANCELLED by 0": the words after "by" are not states.
            words = _WORD.findall(str(value or "").split(" by ")[0].upper())
        bases = [w for w in words if w in _BASES]
        flags = frozenset(w for w in words if w not in _BASES)
        if not bases and not flags:
            return cls("UNKNOWN")
        return cls(bases[0] if bases else "", flags)

    @functools.cached_property  # immutable, and read several times a job per autoscaler step
    def name(self) -> str:
        """The one word Slurm's text output shows for this state."""
        for flag in SHOWN_FLAGS:
            if flag in self.flags:
                return flag
        return self.base or min(self.flags, default="UNKNOWN")

    @functools.cached_property  # immutable, and read several times a job per autoscaler step
    def phase(self) -> Phase:
        return PHASES.get(self.name, Phase.OVER)

    @property
    def waiting(self) -> bool:
        """Queued or still starting: capacity on the way, no engine yet."""
        return self.phase in (Phase.WAITING, Phase.STARTING)

    @property
    def running(self) -> bool:
        return self.phase is Phase.RUNNING

    @property
    def active(self) -> bool:
        """Waits for or holds an allocation and is not ending."""
        return self.phase in (Phase.WAITING, Phase.STARTING, Phase.RUNNING, Phase.SUSPENDED)

    @property
    def on_node(self) -> bool:
        """Allocated and live on its node, prolog included: may have an engine."""
        return self.phase in (Phase.STARTING, Phase.RUNNING)

    @property
    def holds_node(self) -> bool:
        """Not over yet: active, or its epilog and cleanup still run."""
        return self.active or self.phase is Phase.ENDING

    def __str__(self) -> str:
        return self.name
