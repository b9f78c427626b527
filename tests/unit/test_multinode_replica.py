"""The controller's side of a model of several nodes: its pool job asks sbatch for all of them, and the engine
across them (only rank 0's agent reports it; EngineManager.endpoints leaves the other ranks out) is one
replica, drained and cancelled as one job."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from slinfer.agent.engines import EngineManager
from slinfer.agent.gpu import Gpus
from slinfer.agent.records import RecordStore
from slinfer.config import AgentConfig, Config, ModelConfig
from slinfer.controller.slurm import SlurmClient
from slinfer.v1 import engine_pb2
from tests.fakes.slurm_double import Demand
from tests.unit.test_autoscaler import Bed


def test_the_pool_job_of_a_model_of_two_nodes_asks_for_both() -> None:
    client = SlurmClient(user="slinfer")
    argv = client.submit_argv(ModelConfig(name="big", source="/m", gpus=4, nodes=2), "slinfer-big", "c")
    assert "--nodes=2" in argv and "--ntasks-per-node=1" in argv
    assert "--gres=gpu:4" in argv, "gres is per node: 4 GPUs on each of the 2 nodes"
    single = client.submit_argv(ModelConfig(name="small", source="/m", gpus=1), "slinfer-small", "c")
    assert not any(a.startswith("--nodes") for a in single) and "--gres=gpu:1" in single


async def test_an_engine_across_two_nodes_is_one_replica_drained_and_cancelled_as_one() -> None:
    bed = Bed(window_s=2.0, max_replicas=2, nodes=2)
    bed.demand["tiny"] = Demand(in_flight=2)
    await bed.step()
    (job,) = bed.slurm.active()
    bed.slurm.start(job, "n1")
    # Rank 0's agent on n1 reports the engine; rank 1's agent on n2 reports its node without it.
    bed.engine(job, node="n1")
    bed.engines["n2"] = {}
    bed.heartbeat()
    assert [r.job_id for r in bed.registry.routable("tiny")] == [job]
    await bed.step()
    assert len(bed.slurm.submits) == 1, "one engine over two nodes must count as one replica, not trigger more"
    bed.demand["tiny"] = Demand(in_flight=0)
    await bed.step(5)
    await bed.step()
    assert bed.slurm.cancels == [job], bed.scaler.decisions


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_only_rank_0_is_an_endpoint_of_its_agent(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    model = ModelConfig(name="m", source="/x", gpus=1, nodes=2)
    engines = {}
    for node in ("localhost", "127.0.0.1"):
        agent = AgentConfig(address="127.0.0.1", node_name=node, run_dir=str(tmp_path / node),
                            engine_command=["/bin/sleep", "30"], engine_rank_command=["/bin/sleep", "30"],
                            health_interval_s=60)
        manager = EngineManager(Config(agent=agent, models=[model]), RecordStore(tmp_path / node / "engines"), http,
                                Gpus())
        job = engine_pb2.JobSpec(job_id="7", model="m", uid=os.getuid(), gid=os.getgid(), gpus=["0"],
                                 node_list="localhost,127.0.0.1")
        engines[node] = (manager, await manager.start(job))
    try:
        (head, head_engine), (other, other_engine) = engines["localhost"], engines["127.0.0.1"]
        assert head_engine.rank == 0 and head_engine.base_url.startswith("http://127.0.0.1:")
        assert other_engine.rank == 1 and other_engine.base_url == ""
        assert [e.job_id for e in head.endpoints()] == ["7"]
        assert other.endpoints() == [] and [e.job_id for e in other.engines()] == ["7"]
    finally:
        for manager, _ in engines.values():
            assert (await manager.stop("7")).clean
