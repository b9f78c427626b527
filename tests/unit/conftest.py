"""Fixtures for the controller's gateway and registry tests: real aiohttp and gRPC servers on ephemeral ports.

The upstream "engines" are `bench/standin_engine.py` stand-ins (real HTTP servers, not vLLM); the Registry is
fed through a real gRPC Report stream by `ReportClient`, the way an agent feeds it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
import grpc
import pytest

from slinfer.config import GatewayConfig, ModelConfig
from slinfer.controller.balancer import Balancer
from slinfer.controller.gateway import Gateway
from slinfer.controller.keys import KeyStore
from slinfer.controller.proxy import Proxy
from slinfer.controller.queue import for_gateway as queue_for_gateway
from slinfer.controller.registry import Registry, RegistryService
from slinfer.v1 import controller_pb2, controller_pb2_grpc, engine_pb2

ROOT = Path(__file__).resolve().parents[2]


def _load_standin():
    spec = importlib.util.spec_from_file_location("standin_engine", ROOT / "bench" / "standin_engine.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["standin_engine"] = module
    spec.loader.exec_module(module)
    return module


standin_engine = _load_standin()
StandinEngine = standin_engine.StandinEngine

CLIENT_KEY = "client-key-for-tests"


@pytest.fixture
async def standins() -> AsyncIterator[Callable[..., Awaitable[StandinEngine]]]:
    """Starts stand-in engines on ephemeral ports; all are stopped at the end."""
    started: list[StandinEngine] = []

    async def make(**kwargs: object) -> StandinEngine:
        engine = StandinEngine(**kwargs)
        await engine.start()
        started.append(engine)
        return engine

    yield make
    for engine in started:
        await engine.stop()


def _engine_pb(job_id: str, model: str, base_url: str, api_key: str = "", state: int = engine_pb2.READY,
              pool: bool = True, running: float = 0.0, user: str = "slinfer") -> engine_pb2.Engine:
    """A pool engine is the service's (the default [controller].user): the pool takes no other user's."""
    return engine_pb2.Engine(job_id=job_id, model=model, state=state, base_url=base_url, api_key=api_key,
                             pool=pool, started_at=time.time(), load=engine_pb2.EngineLoad(running=running),
                             user=user)


@pytest.fixture
def engine_pb() -> Callable[..., engine_pb2.Engine]:
    """Builds an Engine message as an agent reports it."""
    return _engine_pb


@dataclass
class ReportClient:
    """Sends AgentReports over a real gRPC Report stream, as a node agent does."""

    channel: grpc.aio.Channel
    node: str
    token: str = ""
    engines: list[engine_pb2.Engine] = field(default_factory=list)
    _queue: asyncio.Queue[controller_pb2.AgentReport | None] = field(default_factory=asyncio.Queue)
    _call: object | None = None
    acks: list[controller_pb2.ReportAck] = field(default_factory=list)

    async def open(self) -> None:
        stub = controller_pb2_grpc.RegistryStub(self.channel)

        async def requests() -> AsyncIterator[controller_pb2.AgentReport]:
            while (report := await self._queue.get()) is not None:
                yield report

        self._call = stub.Report(requests())

    async def send(self, engines: list[engine_pb2.Engine] | None = None) -> controller_pb2.ReportAck:
        """Sends one report and waits for its ack (so the Registry has applied it)."""
        if engines is not None:
            self.engines = engines
        await self._queue.put(controller_pb2.AgentReport(
            node=self.node, address="127.0.0.1", agent_id=f"agent-{self.node}", engines=self.engines,
            sent_at=time.time(), token=self.token, want_ack=True))
        ack = await self._call.read()  # type: ignore[union-attr]
        if ack is grpc.aio.EOF:
            raise ConnectionError("the registry closed the stream")
        self.acks.append(ack)
        return ack

    async def close(self) -> None:
        await self._queue.put(None)
        if self._call is not None:
            self._call.cancel()  # type: ignore[union-attr]


@dataclass
class Controller:
    """A Registry behind a real gRPC server and a Gateway on real ports."""

    registry: Registry
    gateway: Gateway
    keys: KeyStore
    grpc_port: int
    url: str
    channel: grpc.aio.Channel
    server: grpc.aio.Server
    clients: list[ReportClient] = field(default_factory=list)
    client_key: str = CLIENT_KEY

    async def agent(self, node: str = "node1", token: str = "") -> ReportClient:
        client = ReportClient(self.channel, node, token)
        await client.open()
        self.clients.append(client)
        return client

    def headers(self, key: str = CLIENT_KEY) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def controller_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Controller]]]:
    made: list[Controller] = []

    async def make(models: list[ModelConfig] | None = None, token: str = "", agent_timeout_s: float = 6.0,
                   scaled_to_zero: Callable[[str], bool] | None = None, **gateway_fields: object) -> Controller:
        registry = Registry(agent_timeout_s=agent_timeout_s)
        server = grpc.aio.server()
        controller_pb2_grpc.add_RegistryServicer_to_server(RegistryService(registry, token, 0.5), server)
        grpc_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        config = replace(GatewayConfig(api_keys=[CLIENT_KEY]), **gateway_fields)  # type: ignore[arg-type]
        keys = KeyStore(tmp_path / f"keys{len(made)}.json", config.api_keys)
        gateway = Gateway(config, models if models is not None else [ModelConfig(name="m", source="/x")],
                          registry, keys, Proxy(config.connect_timeout_s, config.read_timeout_s,
                                                config.client_timeout_s), Balancer(), queue_for_gateway(config),
                          scaled_to_zero=scaled_to_zero)
        port = await gateway.start("127.0.0.1", 0)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
        controller = Controller(registry, gateway, keys, grpc_port, f"http://127.0.0.1:{port}", channel, server)
        made.append(controller)
        return controller

    yield make
    for c in made:
        for client in c.clients:
            await client.close()
        await c.channel.close()
        await c.gateway.stop()
        await c.server.stop(None)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
