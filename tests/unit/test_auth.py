"""Authentication between the pieces: an agent's report needs `[controller].token` (a refused one registers
nothing the gateway could route to), every Admin call needs it too (and a refused one changes nothing), and
client keys are kept hashed and compared without an early exit."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from slinfer.config import ModelConfig
from slinfer.controller import keys as keys_module
from slinfer.controller.admin import AdminService
from slinfer.controller.autoscaler import Autoscaler
from slinfer.controller.keys import KeyStore
from slinfer.controller.registry import Registry, RegistryService
from slinfer.controller.usage import UsageLedger
from slinfer.v1 import admin_pb2, admin_pb2_grpc, controller_pb2, controller_pb2_grpc, engine_pb2
from tests.fakes.slurm_double import Clock, Demand, SlurmDouble

TOKEN = "the-agent-and-admin-token"


def report(node: str, token: str, engine_url: str = "http://127.0.0.1:9") -> controller_pb2.AgentReport:
    engine = engine_pb2.Engine(job_id="42", model="m", state=engine_pb2.READY, base_url=engine_url,
                               api_key="k", pool=True, started_at=time.time())
    return controller_pb2.AgentReport(node=node, address="127.0.0.1", agent_id="a", engines=[engine],
                                      sent_at=time.time(), token=token)


async def send(channel: grpc.aio.Channel, *reports: controller_pb2.AgentReport) -> list[controller_pb2.ReportAck]:
    stub = controller_pb2_grpc.RegistryStub(channel)

    async def requests() -> AsyncIterator[controller_pb2.AgentReport]:
        for r in reports:
            yield r

    return [ack async for ack in stub.Report(requests())]


@pytest.fixture
async def registry_server() -> AsyncIterator[tuple[Registry, grpc.aio.Channel]]:
    registry = Registry()
    server = grpc.aio.server()
    controller_pb2_grpc.add_RegistryServicer_to_server(RegistryService(registry, TOKEN, 0.5), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield registry, channel
    await channel.close()
    await server.stop(None)


@pytest.mark.parametrize("token", ["", "wrong", TOKEN + "x", TOKEN[:-1], TOKEN.upper()])
async def test_a_report_without_the_right_token_is_refused_and_registers_nothing(registry_server, token) -> None:
    registry, channel = registry_server
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await send(channel, report("intruder", token))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert registry.agents() == [] and registry.replicas() == [] and registry.routable("m") == []
    # The server keeps serving: the real agent registers right after.
    acks = await send(channel, report("node1", TOKEN))
    assert len(acks) == 1 and [a.node for a in registry.agents()] == ["node1"]
    assert [r.job_id for r in registry.routable("m")] == ["42"]


async def test_a_good_stream_that_turns_bad_is_cut_and_the_bad_report_not_applied(registry_server) -> None:
    registry, channel = registry_server
    moved = report("node1", "wrong", engine_url="http://attacker:1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await send(channel, report("node1", TOKEN), moved)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert [r.base_url for r in registry.replicas()] == ["http://127.0.0.1:9"]


async def test_a_stream_is_acked_at_its_first_report_and_where_a_report_asks_and_every_report_is_applied(
        registry_server) -> None:
    registry, channel = registry_server
    urls = [f"http://127.0.0.1:{p}" for p in (11, 12, 13, 14)]
    reports = [report("node1", TOKEN, engine_url=u) for u in urls]
    reports[2].want_ack = True
    acks = await send(channel, *reports)
    assert len(acks) == 2 and all(a.heartbeat_interval == 0.5 for a in acks)  # the first and the third
    assert [r.base_url for r in registry.replicas()] == [urls[-1]]  # the unacked last one was applied too
    # Control: where every report asks, every report is acked.
    for r in reports:
        r.want_ack = True
    assert len(await send(channel, *reports)) == 4


async def test_without_a_configured_token_reports_are_accepted(tmp_path: Path) -> None:
    registry = Registry()
    server = grpc.aio.server()
    controller_pb2_grpc.add_RegistryServicer_to_server(RegistryService(registry, "", 0.5), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert len(await send(channel, report("node1", "anything"))) == 1
    finally:
        await server.stop(None)


# ---- Admin ---------------------------------------------------------------------------------------------------
@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[tuple[grpc.aio.Channel, KeyStore, Autoscaler]]:
    clock = Clock()
    registry = Registry(clock=clock)
    model = ModelConfig(name="tiny", source="/m", min_replicas=1, max_replicas=2)
    scaler = Autoscaler([model], registry, lambda m: Demand(), SlurmDouble(clock), clock=clock, settle_s=0.0)
    keys = KeyStore(tmp_path / "keys.json")
    server = grpc.aio.server()
    admin_pb2_grpc.add_AdminServicer_to_server(
        AdminService(scaler, registry, keys, TOKEN, clock, usage=UsageLedger(tmp_path / "usage")), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield channel, keys, scaler
    await channel.close()
    await server.stop(None)


CALLS = [
    ("Status", admin_pb2.StatusRequest()),
    ("Scale", admin_pb2.ScaleRequest(model="tiny", replicas=2)),
    ("Drain", admin_pb2.DrainRequest(job_id="7")),
    ("CreateKey", admin_pb2.CreateKeyRequest(name="sneaky")),
    ("ListKeys", admin_pb2.ListKeysRequest()),
    ("RevokeKey", admin_pb2.RevokeKeyRequest(key_id="")),
    ("Usage", admin_pb2.UsageRequest()),
]


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),),
                                      (("authorization", f"Basic {TOKEN}"),), (("x-token", TOKEN),)],
                         ids=["none", "wrong", "no-scheme", "basic", "other-header"])
async def test_every_admin_call_without_the_token_is_refused_and_changes_nothing(admin, metadata) -> None:
    channel, keys, scaler = admin
    key_id, _ = keys.create("victim")
    stub = admin_pb2_grpc.AdminStub(channel)
    for method, request in CALLS:
        if method == "RevokeKey":
            request = admin_pb2.RevokeKeyRequest(key_id=key_id)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await getattr(stub, method)(request, metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
    assert [k.name for k in keys.list()] == ["victim"]  # nothing created, nothing revoked
    assert all(st.pinned is None for st in scaler.status())  # nothing pinned
    # With the token the same calls work (those that need an existing object answer NOT_FOUND, not a refusal).
    good = (("authorization", f"Bearer {TOKEN}"),)
    assert (await stub.Status(admin_pb2.StatusRequest(), metadata=good)).models[0].name == "tiny"
    created = await stub.CreateKey(admin_pb2.CreateKeyRequest(name="ok"), metadata=good)
    assert created.secret and len(keys.list()) == 2
    await stub.Usage(admin_pb2.UsageRequest(), metadata=good)


# ---- client keys -------------------------------------------------------------------------------------------------
def test_keys_are_stored_hashed_and_compared_in_constant_time(tmp_path: Path, monkeypatch) -> None:
    store = KeyStore(tmp_path / "keys.json", ["config-secret"])
    secrets = [store.create(f"user{i}")[1] for i in range(5)]
    text = store.path.read_bytes()  # the key database (issue 35.5)
    for secret in secrets:
        assert secret.encode() not in text and hashlib.sha256(secret.encode()).hexdigest().encode() in text
    assert b"config-secret" not in text  # config keys are never written

    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", counting)
    # The first stored key, the last one, a config key and no key at all: the same number of constant-time
    # comparisons, whatever the number of keys (a lookup by digest, then one comparison; issue 35.5).
    counts = []
    for presented in (secrets[0], secrets[-1], "config-secret", "sk-slinfer-guess"):
        calls.clear()
        store.verify(presented)
        counts.append(len(calls))
    more = [store.create(f"more{i}")[1] for i in range(20)]
    for presented in (more[-1], "sk-slinfer-guess"):
        calls.clear()
        store.verify(presented)
        counts.append(len(calls))
    assert counts == [1] * 6
    assert store.verify(secrets[0]) is not None and store.verify("sk-slinfer-guess") is None
