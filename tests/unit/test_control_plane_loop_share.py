"""The controller's long passes share the event loop (issue 35.4/35.7): `slinfer status` lets the loop run between
chunks of rows, the autoscaler's step between models, and the step asks whether a node's agent is alive once per
node, not once per job.

Work is counted (loop turns given, calls made), never timed; each count has a control.
"""

from __future__ import annotations

import asyncio

import pytest

from bench import control_plane_scale as bench
from slinfer.config import parse
from slinfer.controller import admin as admin_module
from slinfer.controller import autoscaler as autoscaler_module
from slinfer.controller.admin import AdminService
from slinfer.controller.autoscaler import Autoscaler
from slinfer.controller.gateway import Demand
from slinfer.controller.registry import Registry
from slinfer.v1 import admin_pb2


class _Submitting(bench._ListingSlurm):
    """Lists the given jobs and accepts submits and cancels (a lost replica is replaced, a drained one ends)."""

    async def submit(self, model: object, job_name: str, comment: str) -> str:
        return "900"

    async def cancel(self, job_id: str) -> None:
        pass


class _Context:
    def invocation_metadata(self) -> tuple[()]:
        return ()


def _cluster(nodes: int, models: int = bench.MODELS,
             submits: bool = False) -> tuple[Autoscaler, Registry, list[bench.SlurmJob]]:
    """`nodes` agents of 8 READY engines (engine e serves m{e % 8}), every engine one of the autoscaler's jobs;
    the catalog holds the first `models` models, at min = max = what runs (`submits`: a Slurm that accepts)."""
    per_model = nodes * bench.ENGINES // bench.MODELS
    config = parse({"models": [{"name": f"m{i}", "source": "/b", "min_replicas": per_model,
                                "max_replicas": per_model} for i in range(models)]})
    registry = Registry(agent_timeout_s=60.0)
    for node in range(nodes):
        registry.report(bench.agent_report(node))
    jobs = [bench.SlurmJob(job_id=r.job_id, name=f"slinfer-{r.model}", comment=f"slinfer:autoscaler model={r.model}",
                           state="RUNNING", node=r.node, submit_time=1.0, start_time=2.0, end_time=9e9, nodes=r.node)
            for r in registry.replicas()]
    slurm = _Submitting(jobs) if submits else bench._ListingSlurm(jobs)
    scaler = Autoscaler(config.models, registry, lambda _m: Demand(0, 0), slurm, settle_s=0.0)
    return scaler, registry, jobs


async def _with_ticker(work: object) -> tuple[object, int]:
    """Runs `work` (a coroutine) beside a task that counts the loop turns it is given meanwhile."""
    turns = 0

    async def ticker() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)  # the ticker starts
    started = turns
    result = await work  # type: ignore[misc]
    ran = turns - started
    task.cancel()
    return result, ran


def test_status_lets_the_loop_run_between_chunks_and_keeps_its_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin_module, "STATUS_CHUNK", 10)
    scaler, registry, jobs = _cluster(nodes=20)
    asyncio.run(scaler.step())
    admin = AdminService(scaler, registry, keys=None, token="")  # type: ignore[arg-type]
    reply, turns = asyncio.run(_with_ticker(admin.Status(admin_pb2.StatusRequest(), _Context())))
    assert isinstance(reply, admin_pb2.StatusResponse)
    rows = len(reply.replicas) + len(reply.jobs) + len(reply.agents)
    assert len(reply.replicas) == len(jobs) == 160 and len(reply.jobs) == 160 and len(reply.agents) == 20
    # One turn given per 10 rows, and the other task did run in them.
    assert admin.yields == rows // 10 and turns >= admin.yields
    # The order a sort by (model, job id) gives, with the states a one-piece reply shows.
    assert [(r.model, r.job_id) for r in reply.replicas] == sorted((r.model, r.job_id) for r in registry.replicas())
    assert [(j.model, j.job_id) for j in reply.jobs] == sorted((j.model, j.job_id) for j in reply.jobs)
    assert {r.state for r in reply.replicas} == {"READY"}
    assert [a.node for a in reply.agents] == sorted(a.node for a in registry.agents())

    # Control: a small cluster's reply is one piece, and the other task waits until it is done.
    monkeypatch.setattr(admin_module, "STATUS_CHUNK", 1000)
    small, turns = asyncio.run(_with_ticker(admin.Status(admin_pb2.StatusRequest(), _Context())))
    assert admin.yields == rows // 10 and turns == 0
    assert isinstance(small, admin_pb2.StatusResponse) and small.replicas == reply.replicas


def test_status_orders_a_model_before_the_models_its_name_begins() -> None:
    # "m1" < "m10" by (model, job id); grouping by model must keep that, and "m1"'s job 9 before "m10"'s job 1.
    registry = Registry(agent_timeout_s=60.0)
    report = bench.agent_report(0)
    for engine, (model, job_id) in zip(report.engines, [("m10", "1"), ("m1", "9"), ("m1", "10"), ("m2", "3")],
                                       strict=False):
        engine.model, engine.job_id = model, job_id
    del report.engines[4:]
    registry.report(report)
    scaler = Autoscaler(parse({"models": []}).models, registry, lambda _m: Demand(0, 0), bench._ListingSlurm([]))
    admin = AdminService(scaler, registry, keys=None, token="")  # type: ignore[arg-type]
    reply = asyncio.run(admin.Status(admin_pb2.StatusRequest(), _Context()))
    assert [(r.model, r.job_id) for r in reply.replicas] == [("m1", "10"), ("m1", "9"), ("m10", "1"), ("m2", "3")]


def test_an_autoscaler_step_lets_the_loop_run_between_models_and_asks_each_node_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(autoscaler_module, "SHARE_ABOVE_JOBS", 50)
    nodes = 12
    scaler, registry, jobs = _cluster(nodes)
    asked: list[str] = []
    alive = registry.agent_alive

    def counted(node: str) -> bool:
        asked.append(node)
        return alive(node)

    registry.agent_alive = counted  # type: ignore[method-assign]
    _, turns = asyncio.run(_with_ticker(scaler.step()))
    # Positive control: the step read every job, and every model's replicas are READY and adopted.
    assert sum(s.ready for s in scaler.status()) == len(jobs) == nodes * bench.ENGINES
    assert scaler.yields == bench.MODELS and turns >= bench.MODELS
    # Each node's 8 engines serve 8 models: asked once per node, not once per job (96).
    assert sorted(asked) == sorted({r.node for r in registry.replicas()}) and len(asked) == nodes

    # The next step asks again (a step's memo is its own).
    asked.clear()
    asyncio.run(scaler.step())
    assert len(asked) == nodes and scaler.yields == 2 * bench.MODELS

    # Control: a step over no more of its jobs than SHARE_ABOVE_JOBS gives the loop nothing (12 of one model).
    single, _, _ = _cluster(nodes, models=1)
    _, turns = asyncio.run(_with_ticker(single.step()))
    assert single.yields == 0 and turns == 0
    assert [s.ready for s in single.status()] == [nodes * bench.ENGINES // bench.MODELS]


def test_an_autoscaler_step_with_a_dead_agent_sees_its_engines_lost() -> None:
    # The memo holds what the registry says: a node whose agent fell silent is dead for every model's jobs on it.
    clock = [1000.0]
    per_model = 2 * bench.ENGINES // bench.MODELS
    config = parse({"models": [{"name": f"m{i}", "source": "/b", "min_replicas": per_model,
                                "max_replicas": per_model} for i in range(bench.MODELS)]})
    registry = Registry(agent_timeout_s=5.0, clock=lambda: clock[0])
    registry.report(bench.agent_report(0))
    clock[0] += 10.0
    registry.report(bench.agent_report(1))  # node 1 alive, node 0 silent for 10 s
    jobs = [bench.SlurmJob(job_id=r.job_id, name=f"slinfer-{r.model}", comment=f"slinfer:autoscaler model={r.model}",
                           state="RUNNING", node=r.node, submit_time=1.0, start_time=2.0, end_time=9e9, nodes=r.node)
            for r in registry.replicas()]
    scaler = Autoscaler(config.models, registry, lambda _m: Demand(0, 0), _Submitting(jobs),
                        clock=lambda: clock[0], settle_s=0.0)
    asyncio.run(scaler.step())
    statuses = scaler.status()
    assert [s.lost for s in statuses] == [1] * bench.MODELS and [s.ready for s in statuses] == [1] * bench.MODELS


def test_an_autoscaler_step_shares_one_engine_view_per_distinct_value() -> None:
    nodes = 12
    scaler, registry, jobs = _cluster(nodes, submits=True)  # the draining one is replaced
    registry.set_draining(jobs[0].job_id, True)
    made = []
    original = autoscaler_module.EngineView

    def counted(**fields: bool) -> object:
        made.append(fields)
        return original(**fields)

    autoscaler_module._view.cache_clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(autoscaler_module, "EngineView", counted)
        asyncio.run(scaler.step())
        asyncio.run(scaler.step())
    # Positive control: the steps saw every job's engine, one draining (then cancelled) and the rest READY.
    assert sum(s.ready for s in scaler.status()) == len(jobs) - 1
    assert scaler.decisions.get(("m0", "cancel_drained")) == 1
    # Two values among 96 jobs, over two steps: two views made, not 192.
    assert len(made) == 2 and {f["draining"] for f in made} == {True, False}
    autoscaler_module._view.cache_clear()
