"""`slinfer-hook prolog|epilog`: what the SPANK plugin runs as root from the job prolog and epilog.

Responsible for: making sure the node agent runs (starting it detached where no service manager runs it),
asking it to start or stop the job's engine, and writing the env file the plugin hands to every job step.
A user's mistake is written into that file (`SLINFER_ERROR`) and the hook still exits 0, so the node is never
drained for it; only an infrastructure failure (no agent, an engine that could not be killed) exits non-zero.
Not responsible for: anything that takes longer than a second or two in the prolog.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc

from slinfer import config as config_mod
from slinfer import inference_lora
from slinfer.agent import jobfiles
from slinfer.agent.jobfiles import SLURM_JOB_ID
from slinfer.agent.processes import engine_processes, engine_tag, terminate_engine
from slinfer.agent.records import RecordStore
from slinfer.v1 import agent_pb2, agent_pb2_grpc, engine_pb2

AGENT_START_TIMEOUT_S = 15.0


class HookError(Exception):
    """An infrastructure failure: the prolog or epilog must fail."""


def _say(message: str) -> None:
    print(f"slinfer-hook: {message}", file=sys.stderr, flush=True)


def _agent_answers(channel: grpc.Channel, timeout: float) -> bool:
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        return True
    except grpc.FutureTimeoutError:
        return False


def _start_agent(config: config_mod.Config) -> None:
    """Starts the agent through systemd where it manages the unit, else as a detached daemon."""
    if Path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
        unit = subprocess.run(["systemctl", "cat", "slinfer-agent.service"], capture_output=True, check=False)
        if unit.returncode == 0:
            subprocess.run(["systemctl", "start", "--no-block", "slinfer-agent.service"], check=False)
            return
    argv = [sys.executable, "-m", "slinfer.agent.daemon"]
    if config.path:
        argv += ["--config", config.path]
    log_path = Path(config.agent.log_file or Path(config.agent.run_dir) / "agent.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": os.environ.get("LANG", "C.UTF-8")}
    with open(log_path, "ab") as log_file:
        # A new session, and no pipe of the prolog's: slurmd must not wait for the agent.
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                         start_new_session=True, close_fds=True, env=env, cwd="/")
    _say(f"started slinfer-agent (log {log_path})")


def connect(config: config_mod.Config) -> grpc.Channel:
    target = f"unix:{config.agent.socket}"
    channel = grpc.insecure_channel(target)
    if _agent_answers(channel, 0.5):
        return channel
    _start_agent(config)
    if _agent_answers(channel, AGENT_START_TIMEOUT_S):
        return channel
    channel.close()
    raise HookError(f"the node agent does not answer on {config.agent.socket}")


def job_from_environment(job_id: str, model: str, pool: bool) -> engine_pb2.JobSpec:
    env = os.environ
    gpus_raw = env.get("SLURM_JOB_GPUS") or env.get("CUDA_VISIBLE_DEVICES") or ""
    gpus = [g for g in gpus_raw.split(",") if g.strip() and g != "NoDevFiles"]
    try:
        uid, gid = int(env["SLURM_JOB_UID"]), int(env["SLURM_JOB_GID"])
    except (KeyError, ValueError) as exc:
        raise HookError(f"the prolog environment lacks SLURM_JOB_UID/SLURM_JOB_GID ({exc})") from exc
    return engine_pb2.JobSpec(job_id=job_id, uid=uid, gid=gid, user=env.get("SLURM_JOB_USER", ""), gpus=gpus,
                              partition=env.get("SLURM_JOB_PARTITION", ""), model=model, pool=pool,
                              work_dir=env.get("SLURM_JOB_WORK_DIR", ""),
                              node_list=env.get("SLURM_JOB_NODELIST", ""),
                              # --inference-lora, as the plugin put it in the prolog's environment; the agent checks.
                              loras=[engine_pb2.LoraAdapter(name=name, path=path)
                                     for name, path in inference_lora.from_environment(env)])


def prolog(config: config_mod.Config, args: argparse.Namespace) -> int:
    job = job_from_environment(args.job_id, args.model, args.pool)
    values = {"SLINFER_MODEL": args.model}
    with connect(config) as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        engine = stub.StartEngine(agent_pb2.StartEngineRequest(job=job), timeout=30)
    if engine.state == engine_pb2.FAILED:
        values["SLINFER_ERROR"] = engine.reason
        _say(f"job {args.job_id}: {engine.reason}")
    elif engine.rank > 0:
        # A headless rank of an engine across nodes: the job's first node serves it; its status file here says
        # how this rank is doing.
        values["SLINFER_STATUS_FILE"] = str(jobfiles.status_path(config.agent.run_dir, args.job_id))
    else:
        values["OPENAI_BASE_URL"] = f"{engine.base_url}/v1"
        values["OPENAI_API_KEY"] = engine.api_key
        values["SLINFER_STATUS_FILE"] = str(jobfiles.status_path(config.agent.run_dir, args.job_id))
        values["SLINFER_JOB_ENGINE"] = engine.base_url
    jobfiles.write_env_file(Path(args.env_file), values, job.uid, job.gid)
    return 0


def epilog(config: config_mod.Config, args: argparse.Namespace) -> int:
    try:
        channel = connect(config)
    except HookError as exc:
        leftover = _stop_without_agent(config, args.job_id, exc)
    else:
        with channel:
            stub = agent_pb2_grpc.AgentStub(channel)
            result = stub.StopEngine(agent_pb2.StopEngineRequest(job_id=args.job_id),
                                     timeout=config.agent.stop_grace_s + 60)
        leftover = list(result.leftover_pids) if not result.clean else []
    Path(args.env_file).unlink(missing_ok=True)
    if leftover:
        raise HookError(f"job {args.job_id}: engine processes {leftover} could not be killed")
    return 0


def _stop_without_agent(config: config_mod.Config, job_id: str, why: HookError) -> list[int]:
    """The agent is gone for good: the job's end must still leave no engine process. Where Slurm contains
    jobs in cgroups it has killed the engine already, with the extern step; elsewhere the hook kills what carries
    the job's engine tag. Only what survives that fails the epilog."""
    tag = engine_tag(job_id, config.agent.run_dir)
    found = [p.pid for p in engine_processes(tag, 0)]
    if not found:
        _say(f"job {job_id}: {why}; no engine process of this job is left")
        leftover = []
    else:
        _say(f"job {job_id}: {why}; stopping engine processes {found} itself")
        leftover = terminate_engine(tag, 0, config.agent.stop_grace_s)
    if not leftover:
        # The job is over and so is its engine: an agent that comes back later must not re-adopt the record
        # and restart the engine of a job that no longer exists.
        RecordStore.of_run_dir(config.agent.run_dir).delete(job_id)
    return leftover


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slinfer-hook", description="slinfer's prolog/epilog hook (root)")
    parser.add_argument("phase", choices=["prolog", "epilog"])
    parser.add_argument("--job-id", required=True)
    parser.add_argument("--model", default="")
    parser.add_argument("--pool", action="store_true")
    parser.add_argument("--env-file", required=True)
    parser.add_argument("--config", default=None)
    args = parser.parse_args(argv)
    began = time.monotonic()
    if not SLURM_JOB_ID.fullmatch(args.job_id):
        _say(f"invalid job id {args.job_id[:20]!r}")
        return 1
    try:
        config = config_mod.load(args.config)
        code = prolog(config, args) if args.phase == "prolog" else epilog(config, args)
    except config_mod.ConfigError as exc:
        _say(f"config error: {exc}")
        return 1
    except HookError as exc:
        _say(str(exc))
        return 1
    except grpc.RpcError as exc:
        _say(f"job {args.job_id}: agent call failed: {exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
        return 1
    if os.environ.get("SLINFER_HOOK_TIMING"):
        _say(f"{args.phase} took {time.monotonic() - began:.2f}s")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
