"""Flow 1 on the real bed: `sbatch --inference=MODEL` serves a real vLLM engine inside the job, and nothing of it
survives the job, whichever way the job ends; a user's mistake never drains the node."""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil
import pytest

from tests.fakes.slurmbed import SlurmBed, engine_pids, wait_no_engine

ASK = (
    "import os; from openai import OpenAI; c = OpenAI(); "
    "r = c.chat.completions.create(model=os.environ['SLINFER_MODEL'], max_tokens=8, temperature=0, "
    "messages=[{'role': 'user', 'content': 'hello'}]); "
    "print('ANSWER', r.usage.completion_tokens, repr(r.choices[0].message.content))"
)
pytestmark = pytest.mark.bed
READY_TIMEOUT = 300


def _port(bed: SlurmBed, job_id: str) -> int:
    url = bed.env_file(job_id).get("OPENAI_BASE_URL", "")
    return int(url.rsplit(":", 1)[1].split("/")[0]) if url else 0


def _agent_pid(bed: SlurmBed) -> int:
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if any("slinfer-agent" in c or c == "slinfer.agent.daemon" for c in cmd) and str(bed.bed.config) in cmd:
            return proc.pid
    return 0


def test_job_sees_engine_and_gets_a_chat_completion(slurm_bed: SlurmBed) -> None:
    python = sys.executable
    began = time.monotonic()
    job = slurm_bed.sbatch("--inference=tiny", "--gres=gpu:1", script=(
        "env | grep -E '^(OPENAI_BASE_URL|OPENAI_API_KEY|SLINFER_MODEL)=' | sed 's/=.*//' | sort | tr '\\n' ' '; "
        "echo; srun env | grep -c '^OPENAI_API_KEY='; "
        f"slinfer wait-ready --timeout {READY_TIMEOUT} && echo READY_AT $(date +%s.%N) && {python} -c \"{ASK}\""))
    slurm_bed.wait_output(job, r"READY_AT", READY_TIMEOUT + 30)
    print(f"\nsbatch -> READY: {time.monotonic() - began:.1f}s")
    assert slurm_bed.wait_state(job, {"COMPLETED", "FAILED"}, 120) == "COMPLETED", slurm_bed.output(job)
    out = slurm_bed.output(job)
    # The batch step and an srun step both see the engine's variables.
    assert "OPENAI_API_KEY OPENAI_BASE_URL SLINFER_MODEL" in out
    assert out.splitlines()[1].strip() == "1"
    answer = [line for line in out.splitlines() if line.startswith("ANSWER")]
    assert answer and int(answer[0].split()[1]) > 0, out
    # The job ended normally: no engine process, the node idle, the env file gone.
    wait_no_engine(job, None, 30)
    assert slurm_bed.wait_node_idle() == "idle"
    assert slurm_bed.env_file(job) == {}


def test_engine_runs_on_the_jobs_gpus_with_its_own_key_and_port(slurm_bed: SlurmBed) -> None:
    """Two jobs on one node: disjoint GPUs, different ports and keys. One is scancelled mid-run, the other
    reaches its time limit; after each, nothing of its engine is left and the node is not drained."""
    script = f"slinfer wait-ready --timeout {READY_TIMEOUT} && echo READY && sleep 600"
    first = slurm_bed.sbatch("--inference=tiny", "--gres=gpu:2", "--time=1", script=script)
    second = slurm_bed.sbatch("--inference=tiny", "--gres=gpu:1", script=script)
    for job in (first, second):
        slurm_bed.wait_output(job, r"READY", READY_TIMEOUT)
    envs = {job: slurm_bed.env_file(job) for job in (first, second)}
    assert envs[first]["OPENAI_BASE_URL"] != envs[second]["OPENAI_BASE_URL"]
    assert envs[first]["OPENAI_API_KEY"] != envs[second]["OPENAI_API_KEY"]
    gpus = {}
    for job in (first, second):
        (pid,) = [p for p in engine_pids(job) if "vllm.entrypoints" in " ".join(psutil.Process(p).cmdline())]
        environ = psutil.Process(pid).environ()
        gpus[job] = set(environ["CUDA_VISIBLE_DEVICES"].split(","))
        assert "--api-key" not in psutil.Process(pid).cmdline()
    assert len(gpus[first]) == 2 and len(gpus[second]) == 1
    assert not gpus[first] & gpus[second]

    began = time.monotonic()
    slurm_bed.run("scancel", second)
    gone = wait_no_engine(second, _port(slurm_bed, second) or None, 60)
    print(f"\nscancel -> last engine process gone: {time.monotonic() - began:.1f}s (after {gone:.1f}s polling)")
    assert slurm_bed.wait_state(second, {"CANCELLED"}, 30) == "CANCELLED"

    assert slurm_bed.wait_state(first, {"TIMEOUT"}, 150) == "TIMEOUT"
    wait_no_engine(first, None, 60)
    assert slurm_bed.wait_node_idle() == "idle"


def test_model_not_in_catalog_fails_the_job_with_the_reason_and_the_node_stays_idle(slurm_bed: SlurmBed) -> None:
    job = slurm_bed.sbatch("--inference=no-such-model", script="echo SCRIPT_RAN")
    assert slurm_bed.wait_state(job, {"FAILED", "COMPLETED"}, 60) == "FAILED"
    out = slurm_bed.output(job)
    assert ("model 'no-such-model' is not in this cluster's catalog "
            "(known: tiny, smollm2, tiny-tp2, tiny-2node, tiny-embed, tiny-lora)") in out
    assert "SCRIPT_RAN" not in out
    assert slurm_bed.wait_node_idle() == "idle"
    assert engine_pids(job) == []


def test_too_few_gpus_is_a_users_mistake_too(slurm_bed: SlurmBed) -> None:
    job = slurm_bed.sbatch("--inference=tiny", script="echo SCRIPT_RAN")
    assert slurm_bed.wait_state(job, {"FAILED", "COMPLETED"}, 60) == "FAILED"
    assert "needs 1 GPU(s) but the job has 0 (submit with --gres=gpu:1)" in slurm_bed.output(job)
    assert slurm_bed.wait_node_idle() == "idle"


def test_agent_killed_while_engine_runs_is_restarted_and_readopts_it(slurm_bed: SlurmBed) -> None:
    script = f"slinfer wait-ready --timeout {READY_TIMEOUT} && echo READY && sleep 600"
    job = slurm_bed.sbatch("--inference=tiny", "--gres=gpu:1", script=script)
    slurm_bed.wait_output(job, r"READY", READY_TIMEOUT)
    engine_before = sorted(engine_pids(job))
    agent = _agent_pid(slurm_bed)
    assert agent, "the agent is not running"
    os.kill(agent, signal.SIGKILL)
    psutil.wait_procs([psutil.Process(agent)], timeout=10) if psutil.pid_exists(agent) else None
    assert sorted(engine_pids(job)) == engine_before, "killing the agent must not touch the engine"

    # The next hook call (this job's epilog) restarts the agent, which re-adopts and stops the engine.
    slurm_bed.run("scancel", job)
    wait_no_engine(job, _port(slurm_bed, job) or None, 90)
    assert slurm_bed.wait_state(job, {"CANCELLED"}, 30) == "CANCELLED"
    assert _agent_pid(slurm_bed), "the epilog's hook should have restarted the agent"
    log = (slurm_bed.bed.logs / "agent.log").read_text()
    assert f"job {job}: re-adopting READY engine" in log
    assert slurm_bed.wait_node_idle() == "idle"


@pytest.mark.parametrize("value, problem", [
    ("a;b", "character ';' is not allowed"),
    ("$(id)", "character '$' is not allowed"),
    ("../etc", "character '/' is not allowed"),
    ("a..b", 'it must not contain ".."'),
    ("", "the model name is empty"),
    ("x" * 500, "it is 500 bytes long, at most 128 are allowed"),
])
def test_malformed_inference_value_is_refused_at_submit(slurm_bed: SlurmBed, value: str, problem: str) -> None:
    before = slurm_bed.run("squeue", "-h", "-o", "%i").stdout.split()
    out = slurm_bed.run("sbatch", f"--inference={value}", "--wrap", "true", check=False)
    assert out.returncode != 0
    assert "slinfer: invalid --inference value" in out.stderr, out.stderr
    assert problem in out.stderr, out.stderr
    assert slurm_bed.run("squeue", "-h", "-o", "%i").stdout.split() == before
    assert slurm_bed.node_state() in ("idle", "mixed", "allocated")


def test_sbatch_help_lists_both_options(slurm_bed: SlurmBed) -> None:
    out = slurm_bed.run("sbatch", "--help").stdout
    assert "--inference=MODEL" in out
    assert "--inference-pool" in out


def test_pool_without_inference_is_refused(slurm_bed: SlurmBed) -> None:
    out = slurm_bed.run("sbatch", "--inference-pool", "--wrap", "true", check=False)
    assert out.returncode != 0
    assert "--inference-pool" in out.stderr and "--inference" in out.stderr


def test_agent_socket_is_root_only_and_job_files_are_not_listable(slurm_bed: SlurmBed) -> None:
    jobs = slurm_bed.bed.run_dir / "jobs"
    assert oct(jobs.stat().st_mode & 0o777) == "0o711"
    socket_path = slurm_bed.bed.run_dir / "agent.sock"
    assert oct(socket_path.stat().st_mode & 0o777) == "0o600"
    assert socket_path.stat().st_uid == 0
