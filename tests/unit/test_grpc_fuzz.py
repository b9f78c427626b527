"""The gRPC surfaces under bad messages (hypothesis): the agent's local API, the controller's Registry and Admin.
Missing and out-of-range fields get a clean gRPC error or are ignored safely, the servers keep serving, and the
agent starts nothing for an invalid job, nor for a job Slurm does not confirm.

The servers are the real ones (AgentService on its unix socket with the real EngineManager, RegistryService,
AdminService) on an event loop in a thread of their own; the calls here are plain blocking gRPC. The engine
command would write a marker file if it ever ran, so "nothing started" is checked on disk, not trusted."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from slinfer.agent.engines import EngineManager
from slinfer.agent.gpu import Gpus
from slinfer.agent.records import RecordStore
from slinfer.agent.server import serve as serve_agent
from slinfer.agent.slurmview import SlurmView
from slinfer.config import AgentConfig, Config, ModelConfig
from slinfer.controller.admin import AdminService
from slinfer.controller.autoscaler import Autoscaler
from slinfer.controller.keys import KeyStore
from slinfer.controller.registry import Registry, RegistryService
from slinfer.controller.usage import UsageLedger
from slinfer.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    agent_pb2,
    agent_pb2_grpc,
    controller_pb2,
    controller_pb2_grpc,
    engine_pb2,
)
from tests.fakes.slurm_double import Clock, Demand, SlurmDouble

TOKEN = "fuzz-token"
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TIMEOUT_S = 10.0


@dataclass
class Servers:
    loop: asyncio.AbstractEventLoop
    agent: agent_pb2_grpc.AgentStub
    agent_trusting: agent_pb2_grpc.AgentStub  # verify_jobs = false: only the job's own fields are checked
    registry_stub: controller_pb2_grpc.RegistryStub
    admin: admin_pb2_grpc.AdminStub
    registry: Registry
    marker: Path
    run_dirs: list[Path]
    managers: list[EngineManager]

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        """Reads server-side state on the servers' own thread."""
        async def call() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(TIMEOUT_S)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    tmp = tmp_path_factory.mktemp("grpcfuzz")
    marker = tmp / "an-engine-ran"
    engine_command = [sys.executable, "-c", f"open({str(marker)!r}, 'a').write('ran')"]
    config = Config(agent=AgentConfig(address="127.0.0.1", engine_command=engine_command),
                    models=[ModelConfig(name="m", source="/x", gpus=1)])
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        async with aiohttp.ClientSession() as http:
            managers, agent_servers, run_dirs = [], [], []
            # Slurm confirms nothing here: `false` stands in for an scontrol whose answer is an error.
            for name, checker in (("verified", SlurmView("node1", scontrol="false")), ("trusting", None)):
                run_dir = tmp / name
                cfg = Config(agent=AgentConfig(address="127.0.0.1", engine_command=engine_command,
                                               run_dir=str(run_dir)), models=config.models)
                manager = EngineManager(cfg, RecordStore(run_dir / "engines"), http, Gpus(), checker)
                managers.append(manager)
                run_dirs.append(run_dir)
                agent_servers.append(await serve_agent(manager, tmp / f"{name}.sock"))
            clock = Clock()
            registry = Registry(agent_timeout_s=3600)
            scaler = Autoscaler(config.models, registry, lambda m: Demand(), SlurmDouble(clock), clock=clock,
                                settle_s=0.0)
            server = grpc.aio.server()
            controller_pb2_grpc.add_RegistryServicer_to_server(RegistryService(registry, TOKEN, 0.5), server)
            admin_pb2_grpc.add_AdminServicer_to_server(
                AdminService(scaler, registry, KeyStore(tmp / "keys.json"), TOKEN, clock,
                             usage=UsageLedger(tmp / "usage")), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            state.update(port=port, registry=registry, managers=managers, run_dirs=run_dirs)
            ready.set()
            await stop.wait()
            await server.stop(None)
            for s in agent_servers:
                await s.stop(None)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(30)
    channels = [grpc.insecure_channel(f"unix:{tmp}/verified.sock"), grpc.insecure_channel(f"unix:{tmp}/trusting.sock"),
                grpc.insecure_channel(f"127.0.0.1:{state['port']}")]
    yield Servers(loop, agent_pb2_grpc.AgentStub(channels[0]), agent_pb2_grpc.AgentStub(channels[1]),
                  controller_pb2_grpc.RegistryStub(channels[2]), admin_pb2_grpc.AdminStub(channels[2]),
                  state["registry"], marker, state["run_dirs"], state["managers"])
    for channel in channels:
        channel.close()
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)


def assert_nothing_started(s: Servers) -> None:
    assert not s.marker.exists(), "an engine command ran"
    for manager in s.managers:
        states = s.on_loop(lambda m=manager: [e.state for e in m.engines()])
        assert all(state == engine_pb2.FAILED for state in states), states
    for run_dir in s.run_dirs:
        assert not any((run_dir / "logs").iterdir()), "an engine log was opened"


TEXT = st.text(max_size=60)
JOB_ID = st.one_of(TEXT, st.integers(0, 2**64).map(str), st.sampled_from(["", "0", "-1", "1 2", "1;reboot",
                                                                           "../../1", "١٢٣", "²"]))
JOB = st.builds(engine_pb2.JobSpec, job_id=JOB_ID, uid=st.integers(0, 2**32 - 1), gid=st.integers(0, 2**32 - 1),
                user=TEXT, gpus=st.lists(TEXT, max_size=5), partition=TEXT,
                model=st.one_of(TEXT, st.just("m"), st.just("m;rm -rf /"), st.just("../m")),
                pool=st.booleans(), work_dir=TEXT)


def start(stub: agent_pb2_grpc.AgentStub, job: engine_pb2.JobSpec) -> engine_pb2.Engine | grpc.StatusCode:
    try:
        return stub.StartEngine(agent_pb2.StartEngineRequest(job=job), timeout=TIMEOUT_S)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined,no-any-return]


# ---- the agent ----------------------------------------------------------------------------------------------------
@FUZZ
@given(job=JOB)
def test_the_agent_starts_nothing_that_slurm_does_not_confirm(servers: Servers, job: engine_pb2.JobSpec) -> None:
    answer = start(servers.agent, job)
    if isinstance(answer, grpc.StatusCode):
        assert answer == grpc.StatusCode.INVALID_ARGUMENT
    else:
        assert answer.state == engine_pb2.FAILED and answer.reason
    assert_nothing_started(servers)
    assert servers.agent.ListEngines(agent_pb2.ListEnginesRequest(), timeout=TIMEOUT_S) is not None


INVALID_JOB = st.one_of(
    JOB.filter(lambda j: j.model != "m"),  # not in the catalog, or not a model name at all
    JOB.map(lambda j: engine_pb2.JobSpec(job_id=j.job_id, uid=j.uid, model="m", gpus=[])),  # too few GPUs
    JOB.filter(lambda j: not j.job_id.isascii() or not j.job_id.isdigit()).map(
        lambda j: engine_pb2.JobSpec(job_id=j.job_id, uid=1000, gid=1000, user="u", model="m", gpus=["0"])),
)


@FUZZ
@given(job=INVALID_JOB)
def test_the_agent_starts_nothing_for_an_invalid_job_even_without_slurm(servers: Servers,
                                                                        job: engine_pb2.JobSpec) -> None:
    # Non-ASCII digits with a valid model and GPUs are the known gap of test_non_ascii_digits_are_not_a_job_id.
    assume(not (job.model == "m" and job.gpus and job.job_id.isdigit() and not job.job_id.isascii()))
    answer = start(servers.agent_trusting, job)
    if isinstance(answer, grpc.StatusCode):
        assert answer == grpc.StatusCode.INVALID_ARGUMENT
    else:
        assert answer.state == engine_pb2.FAILED and answer.reason
    assert_nothing_started(servers)


@FUZZ
@given(job_id=JOB_ID)
def test_stop_of_an_unknown_or_malformed_job_is_clean(servers: Servers, job_id: str) -> None:
    try:
        reply = servers.agent.StopEngine(agent_pb2.StopEngineRequest(job_id=job_id), timeout=TIMEOUT_S)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    else:
        assert not reply.found


# ---- the Registry -------------------------------------------------------------------------------------------------
FLOAT = st.floats(allow_nan=True, allow_infinity=True)
ENGINE = st.builds(engine_pb2.Engine, job_id=JOB_ID, model=TEXT, state=st.integers(-5, 50), reason=TEXT,
                   base_url=st.one_of(TEXT, st.just("http://127.0.0.1:1")), api_key=TEXT, pool=st.booleans(),
                   started_at=FLOAT, ready_at=FLOAT,
                   load=st.builds(engine_pb2.EngineLoad, running=FLOAT, waiting=FLOAT, kv_cache_usage=FLOAT))
REPORT = st.builds(controller_pb2.AgentReport, node=TEXT, address=TEXT, agent_id=TEXT,
                   engines=st.lists(ENGINE, max_size=4), sent_at=FLOAT,
                   token=st.one_of(st.just(TOKEN), TEXT), want_ack=st.just(True))  # an ack per accepted report


@FUZZ
@given(reports=st.lists(REPORT, min_size=1, max_size=3))
def test_registry_reports_are_acked_or_refused_cleanly(servers: Servers, reports: list) -> None:
    try:
        acks = list(servers.registry_stub.Report(iter(reports), timeout=TIMEOUT_S))
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.UNAUTHENTICATED,  # type: ignore[attr-defined]
                              grpc.StatusCode.INVALID_ARGUMENT)
        acks = []
    assert all(math.isclose(a.heartbeat_interval, 0.5) for a in acks)
    accepted = reports[:len(acks)]
    assert all(r.token == TOKEN and r.node for r in accepted)

    def routable() -> list[tuple[int, bool, bool]]:
        return [(r.state, r.pool, r.draining) for model in {r.model for r in servers.registry.replicas()}
                for r in servers.registry.routable(model)]

    # Whatever was accepted, only READY, pooled engines with a job id are routable.
    assert all(state == engine_pb2.READY and pool and not draining for state, pool, draining in routable())
    assert all(r.job_id for r in servers.on_loop(servers.registry.replicas))
    # The server keeps serving a good agent.
    good = controller_pb2.AgentReport(node="good", address="a", agent_id="g", token=TOKEN)
    assert len(list(servers.registry_stub.Report(iter([good]), timeout=TIMEOUT_S))) == 1


# ---- Admin --------------------------------------------------------------------------------------------------------
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@FUZZ
@given(call=st.one_of(
    st.builds(lambda m, a, n: ("Scale", admin_pb2.ScaleRequest(model=m, auto=a, replicas=n)),
              st.one_of(TEXT, st.just("m")), st.booleans(), st.integers(0, 2**32 - 1)),
    st.builds(lambda j: ("Drain", admin_pb2.DrainRequest(job_id=j)), JOB_ID),
    st.builds(lambda n, a: ("CreateKey", admin_pb2.CreateKeyRequest(name=n, account=a)),
              st.one_of(TEXT, st.text(min_size=129, max_size=300)), TEXT),
    st.builds(lambda k: ("RevokeKey", admin_pb2.RevokeKeyRequest(key_id=k)), TEXT),
    st.builds(lambda k, s, u: ("Usage", admin_pb2.UsageRequest(key_id=k, since=s, until=u)), TEXT, FLOAT, FLOAT),
))
def test_admin_calls_get_an_answer_or_a_clean_error(servers: Servers, call: tuple[str, Any]) -> None:
    method, request = call
    try:
        getattr(servers.admin, method)(request, timeout=TIMEOUT_S, metadata=AUTH)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT,  # type: ignore[attr-defined]
                              grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION), exc
    status = servers.admin.Status(admin_pb2.StatusRequest(), timeout=TIMEOUT_S, metadata=AUTH)
    assert [m.name for m in status.models] == ["m"]
    assert all(m.pinned_count <= 2**32 - 1 for m in status.models)


def test_scale_beyond_max_is_refused_or_clamped(servers: Servers) -> None:
    try:
        reply = servers.admin.Scale(admin_pb2.ScaleRequest(model="m", replicas=10**6), timeout=TIMEOUT_S,
                                    metadata=AUTH)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    else:
        assert reply.model.pinned_count <= reply.model.max_replicas
    servers.admin.Scale(admin_pb2.ScaleRequest(model="m", auto=True), timeout=TIMEOUT_S, metadata=AUTH)
    assert os.path.exists(servers.run_dirs[0])


# ---- non-ASCII digits (last: a regression would start an engine) ---------------------------------------------------
def test_non_ascii_digits_are_not_a_job_id(servers: Servers) -> None:
    job = engine_pb2.JobSpec(job_id="١٢٣", uid=1000, gid=1000, user="u", model="m", gpus=["0"])
    try:
        assert start(servers.agent_trusting, job) == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        with contextlib.suppress(grpc.RpcError):
            servers.agent_trusting.StopEngine(agent_pb2.StopEngineRequest(job_id=job.job_id), timeout=TIMEOUT_S)
