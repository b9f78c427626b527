"""What an engine is started with, decided from the job, the catalog and this node, with nothing run.

Responsible for: the job's own mistakes in words its user will read (a bad or unknown model, too few GPUs or
nodes, `--inference-pool` from a user the pool does not take); the engine's argv (the catalog's command
template filled in, the model's arguments, its parallel layout, a rank's multi-node launch); the torch
distributed port of an engine across nodes; a rank's network environment. Not responsible for: ports that are
free, files, processes, cgroups or probes (the engine manager, `engines.py`, carries the plan out; `probes.py`
asks the engine how it is).
"""

from __future__ import annotations

import pwd
from collections.abc import Mapping, Sequence
from typing import Any

from slinfer import inference_lora
from slinfer.agent.records import EngineRecord
from slinfer.config import Config, ModelConfig, model_name_problem, pool_users
from slinfer.v1 import engine_pb2 as pb

# vLLM's flags that choose how a model is split over GPUs: a catalog entry that gives one keeps its own layout.
LAYOUT_FLAGS = frozenset({"--tensor-parallel-size", "-tp", "--pipeline-parallel-size", "-pp"})
# Spreads the master ports of jobs with neighbouring ids over the port range (a prime, so every port is used).
MASTER_PORT_STRIDE = 7919


def refusal(config: Config, job: pb.JobSpec, node_name: str, nodes: list[str] | None = None) -> str:
    """The job's own mistake, if any, in words the user will read in the job's output. `nodes` is the job's
    node list, where the hook sent one."""
    if problem := model_name_problem(job.model):
        return f"invalid model name {job.model[:40]!r}: {problem}"
    model = config.model(job.model)
    if model is None:
        known = ", ".join(m.name for m in config.models) or "none"
        return f"model '{job.model}' is not in this cluster's catalog (known: {known})"
    if len(job.gpus) < model.gpus:
        return (f"model '{job.model}' needs {model.gpus} GPU(s) but the job has {len(job.gpus)} "
                f"(submit with --gres=gpu:{model.gpus})")
    if nodes is not None and len(nodes) != model.nodes:
        return (f"model '{job.model}' runs on {model.nodes} node(s) but the job has {len(nodes)} "
                f"(submit with --nodes={model.nodes} --gres=gpu:{model.gpus})")
    if nodes is not None and node_name not in nodes:
        return f"job {job.job_id}'s node list {job.node_list!r} does not name this node ({node_name})"
    if job.pool and not may_publish(config, job.uid, job.user):
        return (f"--inference-pool is refused for user {job.user or job.uid}: only the slinfer service "
                f"(controller.user) and agent.pool_users may publish an engine to the shared pool, whose "
                f"engines read every tenant's prompts; submit without --inference-pool for an engine of "
                f"your own")
    if job.loras and "--enable-lora" in model.engine_args:
        return (f"model '{job.model}' sets its engine's LoRA flags in the catalog (engine_args): --inference-lora "
                f"cannot add to them; submit without it")
    if job.loras:
        served = [model.name, *(a.name for a in model.adapters)]
        return inference_lora.list_problem([(a.name, a.path) for a in job.loras], served)
    return ""


def master_port(config: Config, job_id: str) -> int:
    """Rank 0's torch.distributed port, the same on every node of the job without any of them talking: a
    port of [agent].port_range chosen by the job id."""
    low, high = config.agent.port_range
    return low + (int(job_id.split("_", 1)[0]) * MASTER_PORT_STRIDE) % (high - low + 1)


def rank_env(record: EngineRecord, address: str, interfaces: Mapping[str, Sequence[Any]]) -> dict[str, str]:
    """A rank of an engine across nodes talks to the others from this node's address: vLLM's own pick and
    gloo's (the interface of what the host name resolves to, loopback where it resolves to nothing, as on
    the bed, whose ranks then could not connect) are not trusted. `interfaces` maps each interface's name to
    its addresses (psutil.net_if_addrs()). The catalog's engine_env may override."""
    if record.nnodes <= 1:
        return {}
    env = {"VLLM_HOST_IP": address}
    for name, addresses in interfaces.items():
        if any(a.address == address for a in addresses):
            env["GLOO_SOCKET_IFNAME"] = name
    return env


def may_publish(config: Config, uid: int, user: str) -> bool:
    """Whether a job of uid (Slurm's user name `user`) may put its engine into the shared pool: its user, as
    this node's passwd names the uid, is the controller's or on the allowlist (config.pool_users)."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = user
    return name in pool_users(config)


def engine_command(config: Config, model: ModelConfig, host: str, port: int, gpus: int, job_id: str,
                   rank: int = 0, loras: Sequence[tuple[str, str]] = ()) -> list[str]:
    """What an engine of `model` runs, but for its rank's launch flags and TLS: the config's template (the model's
    own, else the agent's; the rank template for a rank > 0) with its placeholders filled, the model's
    engine_args, its parallel layout, its LoRA flags (the catalog's adapters and the job's own, `loras`, as
    (name, path)). The benchmarks' bare vLLM baseline runs exactly this."""
    if rank > 0:
        template = config.agent.engine_rank_command
    else:
        template = model.engine_command or config.agent.engine_command
    values = {"{python}": config.agent.python, "{source}": model.source, "{model}": model.name, "{host}": host,
              "{port}": str(port), "{gpus}": str(gpus), "{job_id}": job_id}
    argv = []
    for part in template:
        for key, value in values.items():
            part = part.replace(key, value)
        argv.append(part)
    return argv + list(model.engine_args) + parallel_args(model) + lora_args(model, loras)


def lora_args(model: ModelConfig, loras: Sequence[tuple[str, str]] = ()) -> list[str]:
    """vLLM's LoRA flags for an engine of a model with catalog adapters or a job's own (`loras`, as (name, path),
    from --inference-lora; the rank limit is the catalog's); none where the model's engine_args set them."""
    if not (model.adapters or loras) or "--enable-lora" in model.engine_args:
        return []
    return ["--enable-lora", "--max-loras", str(model.max_loras), "--max-lora-rank", str(model.max_lora_rank),
            "--lora-modules", *(f"{a.name}={a.source}" for a in model.adapters),
            *(inference_lora.module_arg(name, path) for name, path in loras)]


def lora_env(model: ModelConfig) -> dict[str, str]:
    """An engine of a model with adapters accepts adapters the catalog gains later through vLLM's
    /v1/load_lora_adapter (controller/adapters.py), without a restart."""
    return {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"} if model.adapters else {}


def parallel_args(model: ModelConfig) -> list[str]:
    """vLLM's tensor-parallel flag for a model of several GPUs: one engine over all of them (the GPUs of every
    node of the job for a model of several nodes). Left out where the entry's own engine_args choose a layout
    (tensor or pipeline parallel), and for a model of one GPU on one node."""
    size = max(model.gpus, 1) * model.nodes
    if size <= 1 or any(arg.split("=", 1)[0] in LAYOUT_FLAGS for arg in model.engine_args):
        return []
    return ["--tensor-parallel-size", str(size)]


def rank_args(record: EngineRecord) -> list[str]:
    """vLLM's multi-node launch (multiprocessing backend) for one rank; rank 0 serves HTTP, the others are
    headless and join rank 0's torch.distributed group at head:master_port."""
    if record.nnodes <= 1:
        return []
    argv = ["--nnodes", str(record.nnodes), "--node-rank", str(record.rank), "--master-addr", record.head,
            "--master-port", str(record.master_port)]
    return [*argv, "--headless"] if record.rank > 0 else argv
