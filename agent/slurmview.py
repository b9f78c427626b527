"""What Slurm says about this node and one job at a time, through the shared Slurm layer (slinfer.slurm).

It confirms that a job asking for an engine really runs on this node for that user: the hook is root and the
socket root-only, so this is defence in depth, but a stale or forged request (a replayed prolog, a wrong job
id) must not get an engine with someone's GPUs. Each check asks about that one job (`scontrol show job ID`,
answered by slurmctld without packing the queue). It also tells the node's partitions and GPU count, which
the Kubernetes Node shows. Not responsible for deciding what the agent does with any of it.
"""

from __future__ import annotations

import logging
import os

from slinfer.slurm import parse, queries
from slinfer.slurm.runner import Query, Runner, SlurmError, T
from slinfer.v1 import engine_pb2

log = logging.getLogger(__name__)


class SlurmView:
    def __init__(self, node_name: str, slurm_conf: str = "", scontrol: str = "scontrol",
                 timeout_s: float = 10.0) -> None:
        self.node_name = node_name
        env = {**os.environ, **({"SLURM_CONF": slurm_conf} if slurm_conf else {})}
        # `scontrol` may be a path (a site's, or a release root's wrapper); the runner runs it as given.
        self._runner = Runner(os.path.dirname(scontrol), env, timeout_s=timeout_s)
        self._scontrol = os.path.basename(scontrol)

    async def _ask(self, query: Query[T]) -> T:
        return await self._runner.aget(Query((self._scontrol, *query.argv[1:]), query.parse))

    async def _nodes(self, nodelist: str) -> list[str]:
        if "[" not in nodelist:
            return nodelist.split(",")
        try:
            return await self._ask(queries.hostnames(nodelist))
        except SlurmError:
            return []

    async def hostnames(self, nodelist: str) -> list[str]:
        """A job's node list expanded, in Slurm's order."""
        return await self._nodes(nodelist)

    async def job_nodes(self, job_id: str) -> list[str] | None:
        """The job's nodes in Slurm's order (the prolog's environment has no SLURM_JOB_NODELIST on 22.05);
        None when Slurm does not answer."""
        try:
            found = await self._ask(queries.job(job_id))
        except SlurmError:
            return None
        return await self._nodes(found[0].nodes) if found and found[0].nodes else None

    async def node_address(self, name: str) -> str:
        """A node's NodeAddr as Slurm knows it; empty when Slurm does not answer."""
        try:
            fields = await self._ask(queries.node(name))
        except SlurmError:
            return ""
        return fields.get("NodeAddr", "")

    async def refusal(self, job: engine_pb2.JobSpec) -> str:
        """Empty when Slurm confirms the job; otherwise why the engine is refused."""
        try:
            found = await self._ask(queries.job(job.job_id))
        except SlurmError as exc:
            return f"Slurm could not confirm job {job.job_id}: {exc.stderr.strip() or exc}"
        if not found:
            return f"Slurm could not confirm job {job.job_id}: scontrol listed no such job"
        info = found[0]
        nodes = await self._nodes(info.nodes)
        if not info.on_node:
            return f"Slurm reports job {job.job_id} as {info.state or 'unknown'}, not running"
        if info.uid != job.uid:
            return f"Slurm reports job {job.job_id} as belonging to uid {info.uid}, not {job.uid}"
        if self.node_name not in nodes:
            return f"Slurm does not place job {job.job_id} on node {self.node_name} (NodeList={info.nodes})"
        return ""

    async def job_over(self, job_id: str) -> bool:
        """True only when Slurm answers that the job no longer runs on this node (ended, purged, or elsewhere).
        False while it runs here, and when Slurm cannot be asked: an engine is not given up on a guess."""
        try:
            found = await self._ask(queries.job(job_id))
        except SlurmError as exc:
            return "Invalid job id" in exc.stderr
        if not found:
            return True
        info = found[0]
        return not info.on_node or self.node_name not in await self._nodes(info.nodes)

    async def node_facts(self) -> tuple[list[str], int]:
        """This node's partitions and its number of GPUs in gres (empty and 0 when Slurm does not answer)."""
        try:
            fields = await self._ask(queries.node(self.node_name))
        except SlurmError:
            return [], 0
        partitions = [p for p in fields.get("Partitions", "").split(",") if p]
        return partitions, parse.gpu_count(fields.get("Gres", ""))
