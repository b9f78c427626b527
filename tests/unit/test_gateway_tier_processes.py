"""`slinfer-gateway --workers 2` as processes beside a `slinfer-controller` process, with a stand-in engine that a
fake agent reports over the real Registry stream: the controller killed with SIGKILL under 32-way load and
started again, and a rolling restart of the workers (SIGHUP) under load, both without a failed request."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import psutil

from slinfer.v1 import controller_pb2, controller_pb2_grpc, engine_pb2

TOKEN = "tier-token"
CLIENT_KEY = "tier-client-key"
CONCURRENCY = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _agent(grpc_port: int, engine: engine_pb2.Engine, stop: asyncio.Event) -> None:
    """A node agent's reporting, reduced to its reconnect loop (agent/reporter.py's shape)."""
    while not stop.is_set():
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                stub = controller_pb2_grpc.RegistryStub(channel)

                async def reports() -> AsyncIterator[controller_pb2.AgentReport]:
                    while not stop.is_set():
                        yield controller_pb2.AgentReport(node="n1", address="127.0.0.1", agent_id="a1",
                                                         engines=[engine], sent_at=time.time(), token=TOKEN)
                        await asyncio.sleep(0.5)

                async for _ack in stub.Report(reports()):
                    pass
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.3)


@dataclass
class Load:
    """CONCURRENCY clients, each on its own keep-alive connection, sending chat requests back to back."""

    url: str
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def _client(self) -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
            while not self._stop.is_set():
                try:
                    async with http.post(f"{self.url}/v1/chat/completions",
                                         headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                                         json={"model": "m", "messages": [{"role": "user", "content": "x"}]}) as r:
                        body = await r.read()
                        if r.status == 200:
                            self.ok += 1
                        else:
                            self.failures.append(f"{r.status} {body[:200]!r}")
                except aiohttp.ClientError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")

    def start(self) -> None:
        self._stop.clear()
        self._tasks = [asyncio.create_task(self._client()) for _ in range(CONCURRENCY)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def _health(http: aiohttp.ClientSession, url: str) -> dict[str, object]:
    async with http.get(f"{url}/healthz") as resp:
        return await resp.json()  # type: ignore[no-any-return]


async def _until(what: str, check: Callable[[], Awaitable[bool]], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            if await check():
                return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} not within {within_s:.0f} s")


async def test_controller_kill_and_rolling_worker_restart_fail_no_request(tmp_path: Path, standins) -> None:
    engine = await standins(model="m", api_key="ek", delay_s=0.02)
    grpc_port, builtin_port, gw_port = _free_port(), _free_port(), _free_port()
    config = tmp_path / "slinfer.toml"
    config.write_text(f"""
[controller]
listen = "127.0.0.1:{grpc_port}"
address = "127.0.0.1:{grpc_port}"
state_dir = "{tmp_path / 'state'}"
token = "{TOKEN}"
# No Slurm here: every Slurm command fails, so the autoscaler only logs.
slurm_bin_dir = "{tmp_path / 'no-slurm'}"
heartbeat_s = 0.5

[gateway]
listen = "127.0.0.1:{builtin_port}"
api_keys = ["{CLIENT_KEY}"]

[[models]]
name = "m"
source = "/models/m"
""")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    controller_log = (tmp_path / "controller.log").open("ab")
    gateway_log_path = tmp_path / "gateway.log"
    gateway_log = gateway_log_path.open("ab")

    async def start_controller() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(sys.executable, "-m", "slinfer.controller.main", "--config",
                                                    str(config), stdout=controller_log, stderr=controller_log,
                                                    env=env)

    controller = await start_controller()
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "slinfer.controller.gateway_main", "--config", str(config), "--listen",
        f"127.0.0.1:{gw_port}", "--workers", "2", stdout=gateway_log, stderr=gateway_log, env=env)
    stop_agent = asyncio.Event()
    agent = asyncio.create_task(_agent(grpc_port, engine_pb2.Engine(
        job_id="7", model="m", state=engine_pb2.READY, base_url=engine.base_url, api_key="ek", pool=True,
        user="slinfer"),  # the controller's service user ([controller].user): the pool takes its engines
        stop_agent))
    url = f"http://127.0.0.1:{gw_port}"
    load = Load(url)
    try:
        async with aiohttp.ClientSession() as http:
            async def serving() -> bool:
                h = await _health(http, url)
                return h.get("controller") == "connected" and h.get("replicas") == 1

            await _until("the gateway workers serving the replica", serving, 90)

            async def both_up() -> bool:
                return "slinfer-gateway: 2 workers on" in gateway_log_path.read_text()

            await _until("the second worker", both_up, 60)
            workers = psutil.Process(gateway.pid).children()
            assert len(workers) == 2

            # ---- the controller dies under load and comes back --------------------------------------------
            load.start()
            await asyncio.sleep(1.0)
            before_kill = load.ok
            controller.send_signal(signal.SIGKILL)
            await controller.wait()

            async def unreachable() -> bool:
                h = await _health(http, url)
                return h.get("controller") == "unreachable" and h.get("serving") == "last known routes"

            await _until("/healthz saying the controller is away", unreachable, 10)
            await asyncio.sleep(2.0)
            served_while_away = load.ok - before_kill
            controller = await start_controller()

            async def connected() -> bool:
                return (await _health(http, url)).get("controller") == "connected"

            await _until("the gateway reconnected to the restarted controller", connected, 60)
            await asyncio.sleep(1.0)
            await load.stop()
            assert load.failures == [], f"{len(load.failures)} failed across the controller restart: " \
                                        f"{load.failures[:5]}"
            assert served_while_away > 50, f"only {served_while_away} requests served while the controller was away"
            restart_ok = load.ok

            # ---- a rolling restart of the workers under load ------------------------------------------------
            load.start()
            await asyncio.sleep(1.0)
            gateway.send_signal(signal.SIGHUP)

            async def rolled() -> bool:
                return gateway_log_path.read_text().count("gateway worker 1 restarted") == 1

            await _until("both workers restarted", rolled, 120)
            await asyncio.sleep(1.0)
            await load.stop()
            assert load.failures == [], f"{len(load.failures)} failed across the rolling restart: " \
                                        f"{load.failures[:5]}"
            assert load.ok - restart_ok > 100
            now = {p.pid for p in psutil.Process(gateway.pid).children()}
            assert len(now) == 2 and not now & {p.pid for p in workers}
            print(f"controller restart: {restart_ok} ok, 0 failed ({served_while_away} while it was away); "
                  f"rolling restart: {load.ok - restart_ok} ok, 0 failed")
    finally:
        with contextlib.suppress(Exception):
            await load.stop()
        stop_agent.set()
        agent.cancel()
        for proc in (gateway, controller):
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 40)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        controller_log.close()
        gateway_log.close()
    assert gateway.returncode == 0, gateway_log_path.read_text()[-3000:]
