"""What Slurm says about this node and its jobs, through `scontrol` (argv, never a shell).

It confirms that a job asking for an engine really runs on this node for that user: the hook is root and the
socket root-only, so this is defence in depth, but a stale or forged request (a replayed prolog, a wrong job
id) must not get an engine with someone's GPUs. It also tells the node's partitions and GPU count, which the
Kubernetes Node shows. Not responsible for deciding what the agent does with any of it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re

from slinfer.v1 import engine_pb2

log = logging.getLogger(__name__)

# With PrologFlags=Alloc the prolog runs while the job is CONFIGURING; Slurm reports it as RUNNING or
# CONFIGURING depending on the moment.
LIVE_STATES = {"RUNNING", "CONFIGURING"}


class SlurmView:
    def __init__(self, node_name: str, slurm_conf: str = "", scontrol: str = "scontrol",
                 timeout_s: float = 10.0) -> None:
        self.node_name = node_name
        self.scontrol = scontrol
        self.timeout_s = timeout_s
        self.env = {**os.environ, **({"SLURM_CONF": slurm_conf} if slurm_conf else {})}

    async def _run(self, *args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(self.scontrol, *args, env=self.env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return 1, "", f"scontrol did not answer within {self.timeout_s:.0f}s"
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    async def _nodes(self, nodelist: str) -> list[str]:
        if "[" not in nodelist:
            return nodelist.split(",")
        code, out, _ = await self._run("show", "hostnames", nodelist)
        return out.split() if code == 0 else []

    async def refusal(self, job: engine_pb2.JobSpec) -> str:
        """Empty when Slurm confirms the job; otherwise why the engine is refused."""
        code, out, err = await self._run("-o", "show", "job", job.job_id)
        if code != 0:
            return f"Slurm could not confirm job {job.job_id}: {err.strip() or 'scontrol failed'}"
        fields = dict(re.findall(r"(\w+)=(\S*)", out))
        state = fields.get("JobState", "")
        uid_match = re.search(r"\((\d+)\)", fields.get("UserId", ""))
        uid = int(uid_match.group(1)) if uid_match else -1
        nodes = await self._nodes(fields.get("NodeList", ""))
        if state not in LIVE_STATES:
            return f"Slurm reports job {job.job_id} as {state or 'unknown'}, not running"
        if uid != job.uid:
            return f"Slurm reports job {job.job_id} as belonging to uid {uid}, not {job.uid}"
        if self.node_name not in nodes:
            return f"Slurm does not place job {job.job_id} on node {self.node_name} (NodeList={fields.get('NodeList')})"
        return ""

    async def node_facts(self) -> tuple[list[str], int]:
        """This node's partitions and its number of GPUs in gres (empty and 0 when Slurm does not answer)."""
        code, out, _ = await self._run("-o", "show", "node", self.node_name)
        if code != 0:
            return [], 0
        fields = dict(re.findall(r"(\w+)=(\S*)", out))
        partitions = [p for p in fields.get("Partitions", "").split(",") if p]
        gpus = sum(int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", fields.get("Gres", "")))
        return partitions, gpus
