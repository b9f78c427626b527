"""The agent's local gRPC API (StartEngine, StopEngine, ListEngines) on a root-only unix socket.

Responsible for: the socket's permissions, one agent per socket (its lock), and translating calls to the engine
manager. Not responsible for:
deciding anything about engines.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

import grpc

from slinfer.agent.engines import EngineManager
from slinfer.agent.jobfiles import SLURM_JOB_ID
from slinfer.v1 import agent_pb2 as pb
from slinfer.v1 import agent_pb2_grpc

log = logging.getLogger(__name__)


class AgentService(agent_pb2_grpc.AgentServicer):
    def __init__(self, engines: EngineManager) -> None:
        self.engines = engines

    async def StartEngine(self, request: pb.StartEngineRequest, context: grpc.aio.ServicerContext) -> object:
        if not SLURM_JOB_ID.fullmatch(request.job.job_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "job.job_id must be a Slurm job id")
        return await self.engines.start(request.job)

    async def StopEngine(self, request: pb.StopEngineRequest, context: grpc.aio.ServicerContext) -> object:
        if not SLURM_JOB_ID.fullmatch(request.job_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "job_id must be a Slurm job id")
        result = await self.engines.stop(request.job_id)
        return pb.StopEngineResponse(found=result.found, clean=result.clean, leftover_pids=result.leftover_pids,
                                     engine=result.engine)

    async def ListEngines(self, request: pb.ListEnginesRequest, context: grpc.aio.ServicerContext) -> object:
        return pb.ListEnginesResponse(engines=self.engines.engines())


def single_agent_lock(socket_path: Path) -> int:
    """One agent per socket: an exclusive flock on SOCKET.lock, held (by the returned fd) for the agent's life and
    released by the kernel when it dies. A second agent (the hook and a job's other hook, or systemd, starting one
    at the same moment) exits here, before it adopts, stops or unlinks anything of the first one's."""
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = socket_path.with_name(socket_path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"slinfer-agent: another agent holds {lock_path}; this one exits") from None
    return fd


async def serve(engines: EngineManager, socket_path: Path) -> grpc.aio.Server:
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServicer_to_server(AgentService(engines), server)
    # The socket must never exist with wider permissions, not even for a moment.
    old_umask = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix:{socket_path}")
        await server.start()
    finally:
        os.umask(old_umask)
    os.chmod(socket_path, 0o600)
    log.info("listening on unix:%s (mode 0600)", socket_path)
    return server
