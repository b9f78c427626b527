"""Reports this node's engines and telemetry to the controller over one long-lived gRPC stream.

Responsible for: sending a report every heartbeat and at once on a change, reconnecting with backoff.
Not responsible for: engine state (the engine manager's) or anything the controller decides.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
import psutil

from slinfer import tls
from slinfer.agent.gpu import Gpus
from slinfer.backoff import AGENT_RECONNECT, Backoff
from slinfer.config import Config
from slinfer.v1 import controller_pb2 as pb
from slinfer.v1 import controller_pb2_grpc, engine_pb2
from slinfer.waits import within

log = logging.getLogger(__name__)


class Reporter:
    def __init__(self, controller: str, node: str, address: str, engines: Callable[[], list[engine_pb2.Engine]],
                 gpus: Gpus, heartbeat_s: float, token: str = "", config: Config | None = None) -> None:
        # The TLS settings of the channel (`[controller].tls_*`, `[agent].tls_*`); None means plaintext.
        self.config = config
        self.controller = controller
        self.node = node
        self.address = address
        self.engines = engines
        self.gpus = gpus
        self.heartbeat_s = heartbeat_s
        self.token = token
        self.agent_id = uuid.uuid4().hex
        self.connected = False
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self._changed.set()

    def report(self) -> pb.AgentReport:
        memory = psutil.virtual_memory()
        return pb.AgentReport(
            node=self.node, address=self.address, agent_id=self.agent_id, engines=self.engines(),
            host=pb.HostTelemetry(load1=os.getloadavg()[0], cpu_percent=psutil.cpu_percent(),
                                  memory_used_bytes=memory.total - memory.available,
                                  memory_total_bytes=memory.total),
            gpus=[pb.GpuTelemetry(index=g.index, name=g.name, utilization=g.utilization,
                                  memory_used_bytes=g.memory_used_bytes, memory_total_bytes=g.memory_total_bytes)
                  for g in self.gpus.samples()],
            sent_at=time.time(), token=self.token,
        )

    async def _reports(self) -> AsyncIterator[pb.AgentReport]:
        while True:
            yield self.report()
            self._changed.clear()
            await within(self._changed.wait(), self.heartbeat_s)

    async def run(self) -> None:
        backoff = Backoff.of(AGENT_RECONNECT)
        while True:
            try:
                channel_of = (tls.aio_channel(self.controller, self.config) if self.config is not None
                              else grpc.aio.insecure_channel(self.controller))
                async with channel_of as channel:
                    stub = controller_pb2_grpc.RegistryStub(channel)
                    call = stub.Report(self._reports())
                    async for ack in call:
                        if not self.connected:
                            log.info("reporting to controller %s", self.controller)
                        self.connected = True
                        backoff.succeeded()
                        if ack.heartbeat_interval > 0:
                            self.heartbeat_s = ack.heartbeat_interval
            except grpc.aio.AioRpcError as exc:
                delay = backoff.failed(time.monotonic(), exc.code().name)
                log.log(logging.WARNING if self.connected else logging.DEBUG,
                        "controller %s: %s; retrying in %.1fs", self.controller, exc.code().name, delay)
            else:
                delay = backoff.failed(time.monotonic(), "stream ended")
            self.connected = False
            await asyncio.sleep(delay)
