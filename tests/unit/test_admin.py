"""The Admin API end to end in one process: the real gRPC server with AdminService, the real Registry, KeyStore
and Autoscaler (Slurm is the in-memory SlurmDouble), and the `slinfer` CLI as a person runs it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from slinfer.cli import main as cli
from slinfer.config import ModelConfig
from slinfer.controller.admin import AdminService
from slinfer.controller.autoscaler import Autoscaler
from slinfer.controller.gatewayhub import GatewayHub
from slinfer.controller.keys import KeyStore
from slinfer.controller.limits import KeyLimits, Limiter
from slinfer.controller.registry import Registry
from slinfer.controller.usage import UsageLedger
from slinfer.v1 import admin_pb2_grpc, controller_pb2, engine_pb2, gateway_pb2
from tests.fakes.slurm_double import Clock, Demand, SlurmDouble

TOKEN = "admin-secret"


@dataclass
class Controller:
    address: str
    config: Path
    registry: Registry
    scaler: Autoscaler
    slurm: SlurmDouble
    keys: KeyStore
    keys_path: Path
    clock: Clock


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    clock = Clock()
    registry = Registry(agent_timeout_s=6.0, clock=clock)
    slurm = SlurmDouble(clock)
    model = ModelConfig(name="tiny", source="/m", min_replicas=1, max_replicas=2, window_s=2.0,
                        scale_down_delay_s=0.0)
    scaler = Autoscaler([model], registry, lambda m: Demand(in_flight=3), slurm, clock=clock, settle_s=0.0)
    keys_path = tmp_path / "state" / "keys.json"
    keys = KeyStore(keys_path, ["config-secret"])
    server = grpc.aio.server()
    admin_pb2_grpc.add_AdminServicer_to_server(AdminService(scaler, registry, keys, TOKEN, clock), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    config = tmp_path / "slinfer.toml"
    config.write_text(f'[controller]\naddress = "127.0.0.1:{port}"\ntoken = "{TOKEN}"\n')
    try:
        yield Controller(f"127.0.0.1:{port}", config, registry, scaler, slurm, keys, keys_path, clock)
    finally:
        await server.stop(None)


async def slinfer(c: Controller, *argv: str) -> int:
    # The CLI is synchronous: run it beside the server's event loop, as a separate process would.
    return await asyncio.to_thread(cli.main, [*argv, "--config", str(c.config)])


async def bring_up_one(c: Controller) -> str:
    await c.scaler.step()
    (job,) = c.slurm.active()
    c.slurm.start(job, "node7")
    c.registry.report(controller_pb2.AgentReport(
        node="node7", address="10.0.0.7", agent_id="x", host=controller_pb2.HostTelemetry(load1=0.5),
        engines=[engine_pb2.Engine(job_id=job, model="tiny", state=engine_pb2.READY, pool=True,
                                   base_url="http://10.0.0.7:20001", ready_at=c.clock.now,
                                   load=engine_pb2.EngineLoad(running=2, waiting=1, kv_cache_usage=0.25))]))
    c.clock.now += 2
    await c.scaler.step()
    return job


async def test_status_table(controller: Controller, capsys: pytest.CaptureFixture[str]) -> None:
    job = await bring_up_one(controller)
    assert await slinfer(controller, "status") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = lines[0].split()
    assert header[:3] == ["MODEL", "READY/DESIRED", "MIN-MAX"]
    row = lines[1].split()
    assert row[:6] == ["tiny", "1/1", "1-2", "auto", "3.0", "8"]
    assert f"submitted job {job}" in lines[1]
    replica = next(line for line in lines if line.startswith(job) and "http://" in line).split()
    assert replica == [job, "tiny", "node7", "READY", "yes", "0", "2", "1", "25%", "http://10.0.0.7:20001"]
    slurm_row = next(line for line in lines if line.startswith(job) and "RUNNING" in line).split()
    assert slurm_row[:4] == [job, "tiny", "RUNNING", "node7"]
    agent_row = next(line for line in lines if line.startswith("node7")).split()
    assert agent_row[:3] == ["node7", "10.0.0.7", "yes"]


async def test_status_json(controller: Controller, capsys: pytest.CaptureFixture[str]) -> None:
    await bring_up_one(controller)
    assert await slinfer(controller, "status", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["models"][0]["name"] == "tiny"
    assert data["models"][0]["ready"] == 1
    assert data["squeueOk"] is True
    assert data["replicas"][0]["state"] == "READY"


async def test_scale_pins_and_unpins(controller: Controller, capsys: pytest.CaptureFixture[str]) -> None:
    await bring_up_one(controller)
    assert await slinfer(controller, "scale", "tiny", "2") == 0
    assert "pinned at 2" in capsys.readouterr().out
    assert controller.scaler.status()[0].pinned == 2
    await controller.scaler.step()
    assert len(controller.slurm.submits) == 2
    assert await slinfer(controller, "scale", "tiny", "auto") == 0
    assert "following the load" in capsys.readouterr().out
    assert controller.scaler.status()[0].pinned is None


async def test_scale_errors(controller: Controller, capsys: pytest.CaptureFixture[str]) -> None:
    assert await slinfer(controller, "scale", "tiny", "5") == 1
    assert "max_replicas" in capsys.readouterr().err
    assert await slinfer(controller, "scale", "nope", "1") == 1
    err = capsys.readouterr().err
    assert "'nope' is not a catalog model" in err and "not_found" in err
    assert await slinfer(controller, "scale", "tiny", "lots") == 1
    assert "neither a number" in capsys.readouterr().err
    assert controller.scaler.status()[0].pinned is None


async def test_drain(controller: Controller, capsys: pytest.CaptureFixture[str]) -> None:
    job = await bring_up_one(controller)
    assert await slinfer(controller, "drain", job) == 0
    assert f"job {job} (tiny) is draining" in capsys.readouterr().out
    assert controller.registry.get(job).draining  # type: ignore[union-attr]
    assert await slinfer(controller, "drain", "999") == 1
    assert "not an active job" in capsys.readouterr().err
    assert await slinfer(controller, "drain", "12;x") == 1
    assert "not a Slurm job id" in capsys.readouterr().err


async def test_keys_lifecycle(controller: Controller, capsys: pytest.CaptureFixture[str]) -> None:
    assert await slinfer(controller, "keys", "create", "alice", "--account", "physics") == 0
    out = capsys.readouterr().out
    key_id = out.split("key id: ")[1].split()[0]
    secret = out.split("secret: ")[1].split()[0]
    assert controller.keys.verify(secret) is not None
    assert secret.encode() not in controller.keys.path.read_bytes()
    assert await slinfer(controller, "keys", "list") == 0
    listing = capsys.readouterr().out
    assert key_id in listing and "alice" in listing and "physics" in listing and "config" in listing
    assert secret not in listing
    assert await slinfer(controller, "keys", "revoke", key_id) == 0
    capsys.readouterr()
    assert controller.keys.verify(secret) is None
    assert await slinfer(controller, "keys", "revoke", key_id) == 1
    assert "no key" in capsys.readouterr().err
    assert await slinfer(controller, "keys", "revoke", "config-0") == 1
    assert "[gateway].api_keys" in capsys.readouterr().err
    assert controller.keys.verify("config-secret") is not None


async def test_wrong_or_missing_token_is_refused(controller: Controller, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    for token_line in ('token = "wrong"\n', ""):
        controller.config.write_text(f'[controller]\naddress = "{controller.address}"\n{token_line}')
        assert await slinfer(controller, "keys", "create", "mallory") == 1
        assert "unauthenticated" in capsys.readouterr().err
    assert controller.keys.list()[0].source == "config"
    assert len(controller.keys.list()) == 1


async def test_unreachable_controller(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "slinfer.toml"
    config.write_text('[controller]\naddress = "127.0.0.1:9"\n')
    code = await asyncio.to_thread(cli.main, ["status", "--config", str(config)])
    assert code == 1
    assert "cannot reach the controller at 127.0.0.1:9" in capsys.readouterr().err


async def test_bad_config_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "slinfer.toml"
    config.write_text('[controller]\nadress = "127.0.0.1:9"\n')
    code = await asyncio.to_thread(cli.main, ["status", "--config", str(config)])
    assert code == 1
    assert "controller.adress" in capsys.readouterr().err


async def test_status_counts_the_gateway_tiers_requests_in_flight_on_a_replica(tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture[str],
                                                                              ) -> None:
    """With the gateway tier, a replica's requests in flight are the tier's (its workers' last reports), and
    `slinfer status` shows them beside the built-in gateway's own count."""
    clock = Clock()
    registry = Registry(agent_timeout_s=6.0, clock=clock)
    slurm = SlurmDouble(clock)
    scaler = Autoscaler([ModelConfig(name="tiny", source="/m", min_replicas=1, max_replicas=2)], registry,
                        lambda m: Demand(), slurm, clock=clock, settle_s=0.0)
    keys = KeyStore(tmp_path / "keys.json")
    ledger = UsageLedger(tmp_path / "usage", 60.0)
    hub = GatewayHub(registry, keys, Limiter(KeyLimits(), ledger.tokens_today), ledger, "", lambda m: False,
                     ["tiny"], clock=clock, warmup_s=0.0)
    c = Controller("", tmp_path / "slinfer.toml", registry, scaler, slurm, keys, tmp_path / "keys.json", clock)
    server = grpc.aio.server()
    admin_pb2_grpc.add_AdminServicer_to_server(
        AdminService(scaler, registry, keys, TOKEN, clock, tier_in_flight=hub.in_flight), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    c.config.write_text(f'[controller]\naddress = "127.0.0.1:{port}"\ntoken = "{TOKEN}"\n')
    try:
        job = await bring_up_one(c)
        registry.get(job).outstanding = 1  # type: ignore[union-attr]  # the built-in gateway's own
        for name, n in (("w0", 2), ("w1", 3)):
            await hub.Report(gateway_pb2.GatewayReport(gateway=name, replicas=[
                gateway_pb2.ReplicaLoad(job_id=job, outstanding=n)]), None)  # type: ignore[arg-type]
        assert hub.in_flight() == {job: 5}
        assert await slinfer(c, "status", "--json") == 0
        assert json.loads(capsys.readouterr().out)["replicas"][0]["outstanding"] == 6
        # Control: once the tier's reports are stale, only the built-in gateway's count is left.
        clock.now += 600
        assert hub.in_flight() == {}
        assert await slinfer(c, "status", "--json") == 0
        assert json.loads(capsys.readouterr().out)["replicas"][0]["outstanding"] == 1
    finally:
        await server.stop(None)
