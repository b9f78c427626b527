"""Engines of several GPUs and of several nodes: the argv the agent builds (tensor parallel, vLLM's multi-node
launch), the refusal of an allocation that does not match the model, and a rank that dies failing the engine."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest

from slinfer.agent.engines import EngineManager
from slinfer.agent.gpu import Gpus
from slinfer.agent.launch import master_port, parallel_args, rank_env
from slinfer.agent.records import EngineRecord, RecordStore
from slinfer.config import AgentConfig, Config, ConfigError, ModelConfig, parse
from slinfer.v1 import engine_pb2 as pb

MODEL_ARGS = ["--max-model-len", "512"]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _manager(tmp_path: Path, http: aiohttp.ClientSession, model: ModelConfig, node: str = "n1",
             rank_command: list[str] | None = None) -> EngineManager:
    agent = AgentConfig(address="127.0.0.1", node_name=node, run_dir=str(tmp_path / "run"), health_interval_s=0.05,
                        port_range=[30000, 30999],
                        **({"engine_rank_command": rank_command} if rank_command else {}))
    return EngineManager(Config(agent=agent, models=[model]), RecordStore(tmp_path / "run" / "engines"), http,
                         Gpus())


def _record(port: int = 30001, **layout: object) -> EngineRecord:
    return EngineRecord(job_id="41", model="m", uid=0, gid=0, user="u", gpus=["0", "1"], pool=True, partition="",
                        work_dir="", host="10.0.0.1", port=port, api_key="k", **layout)  # type: ignore[arg-type]


def _job(gpus: list[str], node_list: str = "", job_id: str = "41") -> pb.JobSpec:
    return pb.JobSpec(job_id=job_id, model="m", uid=os.getuid(), gid=os.getgid(), user="", gpus=gpus,
                      node_list=node_list)


def _flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} appears {argv.count(name)} times in {argv}"
    return argv[argv.index(name) + 1]


def test_a_model_of_two_gpus_gets_tensor_parallel_two(tmp_path: Path) -> None:
    model = ModelConfig(name="m", source="/x", gpus=2, engine_args=MODEL_ARGS)
    manager = _manager(tmp_path, None, model)  # type: ignore[arg-type]
    argv = manager._argv(_record(), model)
    assert _flag(argv, "--tensor-parallel-size") == "2"
    assert "--nnodes" not in argv and "--headless" not in argv
    assert argv[argv.index("--max-model-len") + 1] == "512"


def test_one_gpu_gets_no_parallel_flag_and_an_entry_of_its_own_layout_keeps_it() -> None:
    assert parallel_args(ModelConfig(name="m", source="/x", gpus=1)) == []
    assert parallel_args(ModelConfig(name="m", source="/x", gpus=0)) == []
    for own in (["--tensor-parallel-size", "1"], ["-tp", "1"], ["--tensor-parallel-size=1"],
                ["--pipeline-parallel-size", "2"], ["-pp", "2"]):
        assert parallel_args(ModelConfig(name="m", source="/x", gpus=2, engine_args=own)) == [], own
    assert parallel_args(ModelConfig(name="m", source="/x", gpus=4)) == ["--tensor-parallel-size", "4"]


def test_the_ranks_of_an_engine_across_nodes_share_one_launch(tmp_path: Path) -> None:
    model = ModelConfig(name="m", source="/x", gpus=1, nodes=2, engine_args=MODEL_ARGS)
    manager = _manager(tmp_path, None, model)  # type: ignore[arg-type]
    layout = {"nnodes": 2, "head": "10.0.0.1", "master_port": master_port(manager.config, "41")}
    head = manager._argv(_record(rank=0, peers=["10.0.0.2"], **layout), model)
    other = manager._argv(_record(rank=1, port=0, **layout), model)
    # The tensor-parallel size spans both nodes' GPUs: vLLM splits the world of 2 into one rank per node.
    for argv, rank in ((head, "0"), (other, "1")):
        assert _flag(argv, "--tensor-parallel-size") == "2"
        assert _flag(argv, "--nnodes") == "2" and _flag(argv, "--node-rank") == rank
        assert _flag(argv, "--master-addr") == "10.0.0.1"
        assert _flag(argv, "--master-port") == str(layout["master_port"])
        assert argv[argv.index("--max-model-len") + 1] == "512"
    # Rank 0 is the HTTP server on its port; rank 1 runs vLLM's headless serve, without a port.
    assert "vllm.entrypoints.openai.api_server" in head and _flag(head, "--port") == "30001"
    assert "--headless" not in head
    assert "--headless" in other and "--port" not in other and "vllm.entrypoints.openai.api_server" not in other
    assert "ServeSubcommand.cmd(args)" in other[other.index("-c") + 1]


def test_the_master_port_is_the_same_on_every_node_and_in_the_port_range(tmp_path: Path) -> None:
    model = ModelConfig(name="m", source="/x", gpus=1, nodes=2)
    one = _manager(tmp_path / "a", None, model, node="n1")  # type: ignore[arg-type]
    two = _manager(tmp_path / "b", None, model, node="n2")  # type: ignore[arg-type]
    ports = {master_port(one.config, str(j)) for j in range(268000, 268050)}
    assert all(master_port(one.config, str(j)) == master_port(two.config, str(j)) for j in range(268000, 268050))
    assert len(ports) == 50 and all(30000 <= p <= 30999 for p in ports)
    assert master_port(one.config, "268001_3") == master_port(one.config, "268001")


async def test_an_allocation_that_does_not_match_the_model_is_refused_naming_both_numbers(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    manager = _manager(tmp_path, http, ModelConfig(name="m", source="/x", gpus=2, nodes=2))
    one_node = await manager.start(_job(["0", "1"], "n1"))
    assert one_node.state == pb.FAILED
    assert "runs on 2 node(s) but the job has 1" in one_node.reason and "--nodes=2" in one_node.reason
    three = await manager.start(_job(["0", "1"], "n1,n2,n3", job_id="42"))
    assert "runs on 2 node(s) but the job has 3" in three.reason
    few_gpus = await manager.start(_job(["0"], "n1,n2", job_id="43"))
    assert "needs 2 GPU(s) but the job has 1" in few_gpus.reason
    no_list = await manager.start(_job(["0", "1"], "", job_id="44"))
    assert "runs on 2 node(s) but the job has 0" in no_list.reason
    assert manager.engines() == []
    single = _manager(tmp_path / "single", http, ModelConfig(name="m", source="/x", gpus=1))
    spread = await single.start(_job(["0"], "n1,n2", job_id="45"))
    assert spread.state == pb.FAILED and "runs on 1 node(s) but the job has 2" in spread.reason


async def test_a_rank_that_exits_fails_the_engine_and_is_not_restarted(tmp_path: Path,
                                                                       http: aiohttp.ClientSession) -> None:
    model = ModelConfig(name="m", source="/x", gpus=1, nodes=2)
    manager = _manager(tmp_path, http, model, node="n2", rank_command=["/bin/sh", "-c", "echo rank gone; exit 3"])
    engine = await manager.start(_job(["0"], "localhost,n2"))
    assert engine.state == pb.STARTING and engine.rank == 1 and engine.base_url == ""
    assert manager.endpoints() == [], "a headless rank is not this node's endpoint"
    for _ in range(100):
        await asyncio.sleep(0.05)
        (engine,) = manager.engines()
        if engine.state == pb.FAILED:
            break
    assert engine.state == pb.FAILED, engine
    assert "rank 1 of 2" in engine.reason and "code 3" in engine.reason and "not restarted" in engine.reason
    assert engine.restarts == 0
    assert (await manager.stop("41")).clean


def test_nodes_is_a_checked_key() -> None:
    with pytest.raises(ConfigError, match=r"models\[0\]\.nodes.*1 or more"):
        parse({"models": [{"name": "m", "source": "/x", "nodes": 0}]})
    with pytest.raises(ConfigError, match=r"models\[0\]\.nodes.*gpus = 1 or more"):
        parse({"models": [{"name": "m", "source": "/x", "nodes": 2, "gpus": 0}]})
    with pytest.raises(ConfigError, match=r"models\[0\]\.nodes.*integer"):
        parse({"models": [{"name": "m", "source": "/x", "nodes": "2"}]})
    assert parse({"models": [{"name": "m", "source": "/x", "nodes": 2}]}).models[0].nodes == 2


async def test_rank_0_sees_a_rank_leave_when_its_connections_close(tmp_path: Path,
                                                                   http: aiohttp.ClientSession) -> None:
    """vLLM's rank 0 keeps answering /health after a remote rank died: the agent watches the engine's TCP
    connections to the other ranks' nodes. Here the "rank 1" is this test's end of one connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        connect = f"import socket, time; s = socket.create_connection(('127.0.0.1', {port})); time.sleep(60)"
        model = ModelConfig(name="m", source="/x", gpus=1, nodes=2)
        agent = AgentConfig(address="127.0.0.1", node_name="localhost", run_dir=str(tmp_path / "run"),
                            engine_command=[sys.executable, "-c", connect], health_interval_s=60)
        manager = EngineManager(Config(agent=agent, models=[model]), RecordStore(tmp_path / "run" / "engines"),
                                http, Gpus())
        engine = await manager.start(_job(["0"], "localhost,127.0.0.1"))
        assert engine.state == pb.STARTING and engine.rank == 0, engine
        running = manager._engines["41"]
        assert running.record.peers == ["127.0.0.1"]
        peer, _ = await asyncio.to_thread(server.accept)
        for _ in range(100):
            if not manager._lost_ranks(running):
                break
            await asyncio.sleep(0.05)
        assert manager._lost_ranks(running) == ""
        peer.close()
        for _ in range(100):
            if manager._lost_ranks(running):
                break
            await asyncio.sleep(0.05)
        assert manager._lost_ranks(running) == "rank 1 at 127.0.0.1 left the engine (no connection to rank 0)"
        assert (await manager.stop("41")).clean


def test_the_ranks_talk_from_the_agents_address(tmp_path: Path) -> None:
    """gloo binds to what the host name resolves to, loopback where it resolves to nothing (the bed's nodes):
    the ranks get this node's address and its interface."""
    manager = _manager(tmp_path, None, ModelConfig(name="m", source="/x", gpus=1, nodes=2))  # type: ignore[arg-type]
    env = rank_env(_record(rank=1, nnodes=2, head="10.0.0.1"), manager.address, psutil.net_if_addrs())
    assert env == {"VLLM_HOST_IP": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    assert rank_env(_record(), manager.address, psutil.net_if_addrs()) == {}


def test_the_load_is_read_with_prometheus_parser_not_by_hand() -> None:
    """Issue 28: the hand parser took a sample's timestamp for its value. prometheus_client's parser reads the
    value, sums labelled samples, and ignores other metrics."""
    from slinfer.agent.probes import parse_load

    text = ("# TYPE vllm:num_requests_running gauge\n"
            'vllm:num_requests_running{model_name="m",engine="0"} 3.0 1733550000000\n'
            'vllm:num_requests_running{model_name="m",engine="1"} 2.0 1733550000000\n'
            "# TYPE vllm:num_requests_waiting gauge\n"
            'vllm:num_requests_waiting{model_name="m"} 4.0\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            'vllm:kv_cache_usage_perc{model_name="m"} 0.25\n'
            "# TYPE vllm:num_preemptions counter\n"
            'vllm:num_preemptions_total{model_name="m"} 9.0\n')
    assert parse_load(text) == {"running": 5.0, "waiting": 4.0, "kv_cache_usage": 0.25}
    assert parse_load("") == {"running": 0.0, "waiting": 0.0, "kv_cache_usage": 0.0}
