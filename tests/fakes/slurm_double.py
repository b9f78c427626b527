"""Doubles shared by the autoscaler and admin unit tests: a settable clock, the gateway's Demand, and
SlurmDouble, an in-memory recording double of SlurmClient (SlurmClient itself is tested on real Slurm)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from slinfer.config import ModelConfig
from slinfer.controller.slurm import SlurmError, SlurmJob
from slinfer.slurm.parse import hostnames


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Demand:
    in_flight: int = 0
    queued: int = 0


class SlurmDouble:
    """An in-memory recording double of SlurmClient: a queue of jobs that tests start and end by hand."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.jobs_: dict[str, SlurmJob] = {}
        self.submits: list[tuple[str, str, str]] = []
        self.cancels: list[str] = []
        self.next_id = 100
        self.fail_submit = ""
        self.fail_squeue = False
        self.names_asked: list[list[str]] = []
        self.ids_asked: list[list[str]] = []
        self.limit_s = 3600.0
        # The QOS each job was submitted in (job id -> --qos), for the two tiers of capacity.
        self.qos: dict[str, str] = {}
        # Nodes Slurm is emptying (name -> state and reason), as `scontrol show node` would say; the lists asked.
        self.leaving: dict[str, str] = {}
        self.nodes_asked: list[list[str]] = []

    async def submit(self, model: ModelConfig, job_name: str, comment: str) -> str:
        if self.fail_submit:
            raise SlurmError(["sbatch"], 1, self.fail_submit)
        self.next_id += 1
        job_id = str(self.next_id)
        self.submits.append((model.name, job_name, comment))
        self.qos[job_id] = model.qos
        self.jobs_[job_id] = SlurmJob(job_id, job_name, comment, "PENDING", "", self.clock.now, 0, 0, "Resources")
        return job_id

    async def jobs(self, names: Sequence[str] = ()) -> list[SlurmJob]:
        """The queue's jobs of these names, as squeue --name answers; the names asked are recorded."""
        self.names_asked.append(list(names))
        if self.fail_squeue:
            raise SlurmError(["squeue"], 1, "slurm_load_jobs error: Unable to contact slurm controller")
        return [j for j in self.jobs_.values() if not names or j.name in names]

    async def leaving_nodes(self, nodelists: Sequence[str]) -> dict[str, str]:
        self.nodes_asked.append(list(nodelists))
        names = {n for nodelist in nodelists for n in hostnames(nodelist)}
        return {n: why for n, why in self.leaving.items() if n in names}

    async def jobs_by_id(self, job_ids: Sequence[str]) -> list[SlurmJob]:
        """These jobs, as `scontrol show job ID` answers each (an unknown id left out); the ids asked recorded."""
        self.ids_asked.append(list(job_ids))
        if self.fail_squeue:
            raise SlurmError(["scontrol"], 1, "slurm_load_jobs error: Unable to contact slurm controller")
        return [self.jobs_[j] for j in job_ids if j in self.jobs_]

    async def cancel(self, job_id: str) -> None:
        self.cancels.append(job_id)
        self.jobs_[job_id] = replace(self.jobs_[job_id], state="CANCELLED")

    def start(self, job_id: str, node: str = "n1") -> None:
        self.jobs_[job_id] = replace(self.jobs_[job_id], state="RUNNING", node=node, start_time=self.clock.now,
                                     end_time=self.clock.now + self.limit_s)

    def add(self, job: SlurmJob) -> None:
        self.jobs_[job.job_id] = job

    def active(self) -> list[str]:
        return [j.job_id for j in self.jobs_.values() if j.active]


