"""The agent's local gRPC API (StartEngine, StopEngine, ListEngines) on a root-only unix socket.

Responsible for: the socket's permissions and translating calls to the engine manager. Not responsible for:
deciding anything about engines.
"""

from __future__ import annotations

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
