"""The bed under a site's accounting (issue 29.1): slurmdbd enforces associations and QOS at submit, a refused
job is Slurm's message to the user and never a drained node, and sacct accounts for inference jobs (their
account, QOS and the CPU time their engines used)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from slinfer.dev import devcluster
from tests.fakes.slurmbed import SlurmBed, engine_pids, wait_until

pytestmark = pytest.mark.bed
READY_TIMEOUT = 300
ASK = (
    "import os; from openai import OpenAI; c = OpenAI(); "
    "r = c.chat.completions.create(model=os.environ['SLINFER_MODEL'], max_tokens=8, temperature=0, "
    "messages=[{'role': 'user', 'content': 'hello'}]); print('ANSWER', r.usage.completion_tokens)"
)

# Work for the engine after it joined its job: a warm-forked engine starts in about a second of CPU, most of it
# before the extern step exists (Slurm makes it after the prolog that starts the engine), which no cgroup of the
# job is charged; these tokens are the engine's CPU inside the job on every release.
WORK = (
    "import os; from openai import OpenAI; c = OpenAI(); n = sum(c.completions.create(model=os.environ["
    "'SLINFER_MODEL'], prompt='Count:', max_tokens=480, temperature=0, extra_body={'ignore_eos': True})"
    ".usage.completion_tokens for _ in range(6)); print('WORKED', n)"
)


def _submit(bed: SlurmBed, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    """sbatch as `user`, its exit status and message kept (a refusal is the point here)."""
    argv = ["sbatch", "--parsable", "-o", f"{bed.jobs_dir}/job-%j.out", *args, "--wrap", "sleep 1"]
    if bed.bed.slurm_root is not None:
        try:
            return devcluster.run_as(bed.bed, user, argv)
        except subprocess.CalledProcessError as exc:
            return subprocess.CompletedProcess(argv, exc.returncode, exc.stdout, exc.stderr)
    return bed.run("runuser", "-u", user, "--", *argv, check=False)


def _sacct(bed: SlurmBed, *args: str) -> list[list[str]]:
    out = bed.run("sacct", "-a", "-n", "-P", *args).stdout
    return [line.split("|") for line in out.splitlines() if line.strip()]


def _seconds(total_cpu: str) -> float:
    """sacct's TotalCPU ([D-]HH:MM:SS[.mmm] or MM:SS.mmm) in seconds."""
    days, _, rest = total_cpu.rpartition("-")
    parts = [float(p) for p in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0.0)
    return (int(days) if days else 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def test_a_user_without_an_association_is_refused_at_submit(slurm_bed: SlurmBed) -> None:
    # Positive controls first: the same request from users who hold the association is accepted.
    allowed = _submit(slurm_bed, "slinfer-alice", "--inference=tiny", "--gres=gpu:1", "--account=physics")
    assert allowed.returncode == 0, allowed.stderr
    bob_chem = _submit(slurm_bed, "slinfer-bob", "--account=chem", "--qos=high")
    assert bob_chem.returncode == 0, bob_chem.stderr
    # Bob is in chem only: physics is refused by Slurm at submit, with its own message.
    refused = _submit(slurm_bed, "slinfer-bob", "--inference=tiny", "--gres=gpu:1", "--account=physics")
    assert refused.returncode == 1
    assert "Invalid account or account/partition combination specified" in refused.stderr
    assert refused.stdout.strip() == ""
    # And scavenger is not among his QOS.
    bad_qos = _submit(slurm_bed, "slinfer-bob", "--qos=scavenger")
    assert bad_qos.returncode == 1
    assert "Invalid qos specification" in bad_qos.stderr
    bob_jobs = slurm_bed.run("squeue", "-h", "-u", "slinfer-bob", "-o", "%i %a %q").stdout.split("\n")
    assert [line.split()[0] for line in bob_jobs if line.strip()] in ([bob_chem.stdout.strip()], [])
    for job in (allowed.stdout.strip(), bob_chem.stdout.strip()):
        slurm_bed.run("scancel", job, check=False)
        slurm_bed.wait_state(job, {"COMPLETED", "CANCELLED", "FAILED"}, 120)
    state = slurm_bed.node_state()
    assert "drain" not in state and "down" not in state, slurm_bed.node_reason()


def test_sacct_lists_a_private_inference_job_with_account_qos_and_cpu_time(slurm_bed: SlurmBed) -> None:
    python = sys.executable
    job = slurm_bed.sbatch("--inference=tiny", "--gres=gpu:1", "--account=chem", "--qos=high", script=(
        f"slinfer wait-ready --timeout {READY_TIMEOUT} && {python} -c \"{ASK}\" && {python} -c \"{WORK}\""))
    slurm_bed.wait_output(job, r"ANSWER [1-9]", READY_TIMEOUT + 60)
    slurm_bed.wait_output(job, r"WORKED 2880", 300)
    assert slurm_bed.wait_state(job, {"COMPLETED", "FAILED"}, 120) == "COMPLETED", slurm_bed.output(job)
    fields = "--format=JobID,User,Account,QOS,State,TotalCPU,AllocTRES%60"
    # slurmdbd learns a job's end (and its steps' usage) from slurmctld shortly after.
    wait_until("sacct to list the job's end", lambda: any(
        r[0] == job and r[4] == "COMPLETED" for r in _sacct(slurm_bed, "-j", job, fields)), 60)
    rows = {r[0]: r for r in _sacct(slurm_bed, "-j", job, fields)}
    top = rows[job]
    assert top[1:5] == ["slinfer-alice", "chem", "high", "COMPLETED"], top
    assert "gres/gpu=1" in top[6], top
    # The engine lives in the job's extern step: its start-up (tens of CPU seconds) is the job's CPU time.
    cpu = _seconds(top[5])
    print(f"\nsacct {job}: {rows}")
    assert cpu > 5.0, rows
    # It is the extern step's. From 24.11 its slurmstepd adopted the engine (agent/stepd.py), so jobacct_gather
    # counts it as a task of that step (24.11 and 26.05 count a step's own tasks only: an engine written into the
    # step's cgroups by hand was 00:00 there); 22.05 is not asked (it counted an adopted pid twice) and counts the
    # engine written in by hand through the step's own task. (Not counted, the extern step was 0.001-0.004 s.)
    assert _seconds(rows[f"{job}.extern"][5]) > 3.0, rows
    release = slurm_bed.bed.slurm_root.release if slurm_bed.bed.slurm_root is not None else "22.05"
    said = (rf"job {job}: engine pid \d+ adopted by its extern step's slurmstepd" if release != "22.05" else
            rf"job {job}: the extern step's slurmstepd .* did not adopt pid \d+: it speaks protocol 38\.0")
    logged = (slurm_bed.bed.logs / "agent.log").read_text()
    assert re.search(said, logged), logged[-3000:]


def _engine_in_batch_step(bed: SlurmBed, job: str) -> bool:
    """Every process of the job's engine is in its batch step's cpuacct cgroup (which jobacct_gather/cgroup reads
    for the step's task), as /proc says, not the agent."""
    pids = engine_pids(job, run_dir=bed.bed.run_dir)
    where = f"/job_{job}/step_batch/"
    try:
        return bool(pids) and all(any("cpuacct" in line.split(":")[1] and where in line
                                      for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines())
                                  for pid in pids)
    except OSError:
        return False


def _work_through_gateway(bed: SlurmBed) -> int:
    """WORK's completions, sent through the bed's gateway (the pool's engine is not a job's own); tokens made."""
    env = bed.bed.env()
    body = json.dumps({"model": "tiny", "prompt": "Count:", "max_tokens": 480, "temperature": 0,
                       "ignore_eos": True}).encode()
    made = 0
    for _ in range(6):
        request = urllib.request.Request(f"{env['SLINFER_GATEWAY_URL']}/completions", data=body, headers={
            "Authorization": f"Bearer {env['SLINFER_API_KEY']}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            made += int(json.load(response)["usage"]["completion_tokens"])
    return made


def test_sacct_lists_the_services_jobs_under_the_catalogs_account_and_qos(slurm_bed: SlurmBed) -> None:
    slurm_bed.admin("scale", "tiny", "1")
    try:
        wait_until("a READY replica of tiny", lambda: slurm_bed.ready_replicas("tiny") >= 1, READY_TIMEOUT)
        jobs = slurm_bed.controller_jobs("tiny")
        assert len(jobs) == 1, jobs
        pool_job = next(iter(jobs))
        # The agent writes a pool engine into its job's batch step shortly after READY; the work is sent after,
        # so that it is the step's CPU on every release.
        wait_until(f"job {pool_job}'s engine in its batch step", lambda: _engine_in_batch_step(slurm_bed, pool_job),
                   30)
        assert _work_through_gateway(slurm_bed) == 2880
    finally:
        slurm_bed.retire_models("tiny")
    for job in jobs:
        wait_until(f"sacct to list {job}'s end", lambda job=job: any(
            r[0] == job and r[3] not in ("RUNNING", "PENDING")
            for r in _sacct(slurm_bed, "-j", job, "--format=JobID,Account,QOS,State")), 60)
        row = next(r for r in _sacct(slurm_bed, "-j", job, "--format=JobID,User,Account,QOS,Partition,JobName")
                   if r[0] == job)
        assert row == [job, "root", "slinfer", "normal", "debug", "slinfer-tiny"], row
    # The pool engine's work is its job's CPU time, through the batch step's task cgroup (jobacct_gather/cgroup
    # reads the task's cpuacct on 22.05, 24.11 and 26.05; bench/pool_accounting.py: 6.2-8.2 s counted for
    # 6.3-8.2 s of work). Not counted, the batch step would be `slinfer hold` alone (0.2 s to start, then waits).
    rows = {r[0]: r for r in _sacct(slurm_bed, "-j", pool_job, "--format=JobID,TotalCPU,MaxRSS")}
    print(f"\nsacct {pool_job}: {rows}")
    assert _seconds(rows[pool_job][1]) > 3.0, rows
    assert _seconds(rows[f"{pool_job}.batch"][1]) > 3.0, rows
    began = time.monotonic()
    assert slurm_bed.wait_node_idle() == "idle", time.monotonic() - began


def test_the_controller_refuses_to_start_under_an_account_its_user_may_not_use(slurm_bed: SlurmBed,
                                                                                tmp_path: Path) -> None:
    # Positive control: the bed's controller started with the catalog as it is, and said it checked it.
    started = (slurm_bed.bed.logs / "controller.out").read_text()
    assert "may submit every model's jobs where the catalog says" in started
    config = tmp_path / "slinfer.toml"
    text = slurm_bed.bed.config.read_text()
    # The controller's user (root) is in account slinfer only; physics is alice's.
    assert text.count('account = "slinfer"') >= 1
    config.write_text(text.replace('account = "slinfer"', 'account = "physics"', 1))
    config.chmod(0o600)
    done = slurm_bed.run(f"{sys.prefix}/bin/slinfer-controller", "--config", str(config), check=False, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert ("models[0].account: model 'tiny' runs under account 'physics', but the controller's user 'root' has "
            "no association with it on partition 'debug'") in done.stderr


def _model_status(bed: SlurmBed, model: str) -> dict[str, object]:
    env = bed.bed.env()
    request = urllib.request.Request(f"{env['SLINFER_GATEWAY_URL']}/models",
                                     headers={"Authorization": f"Bearer {env['SLINFER_API_KEY']}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return dict(next(m for m in json.load(response)["data"] if m["id"] == model)["slinfer"])


def test_a_submit_slurm_refuses_is_the_models_state_retried_with_backoff(slurm_bed: SlurmBed) -> None:
    controller = devcluster.daemon_pid(slurm_bed.bed, "controller")
    log_offset = (slurm_bed.bed.logs / "controller.out").stat().st_size
    # A site's limit on the service's association: no job may be submitted under it.
    limit = ["sacctmgr", "-i", "modify", "user", "root", "where", "account=slinfer", "set"]
    slurm_bed.run(*limit, "MaxSubmitJobs=0")
    # The pin goes whatever fails below: a tiny replica left pinned holds a CPU and a GPU the next modules need.
    try:
        _refused_then_served(slurm_bed, controller, log_offset, limit)
    finally:
        slurm_bed.run(*limit, "MaxSubmitJobs=-1")
        slurm_bed.retire_models("tiny")


def _refused_then_served(slurm_bed: SlurmBed, controller: int, log_offset: int, limit: list[str]) -> None:
    try:
        slurm_bed.admin("scale", "tiny", "1")
        wait_until("tiny refused twice (retried)", lambda: _model_status(slurm_bed, "tiny").get("state") == "refused"
                   and int(_model_status(slurm_bed, "tiny").get("failures", 0)) >= 2, 90)  # type: ignore[call-overload]
        status = _model_status(slurm_bed, "tiny")
        assert "Job violates accounting/QOS policy" in str(status["reason"]), status
        assert 0 <= float(status["retry_in_s"]) <= 20.0, status  # type: ignore[arg-type]
        assert slurm_bed.controller_jobs("tiny") == {}
        logged = (slurm_bed.bed.logs / "controller.out").read_text()[log_offset:]
        assert "model=tiny sbatch failed (2 in a row), next try in 10s" in logged, logged[-3000:]
        state = slurm_bed.node_state()
        assert "drain" not in state and "down" not in state, slurm_bed.node_reason()
    finally:
        slurm_bed.run(*limit, "MaxSubmitJobs=-1")
    # Positive control: the same controller, without a restart, submits at its next try once Slurm accepts.
    wait_until("a READY replica of tiny", lambda: slurm_bed.ready_replicas("tiny") >= 1, READY_TIMEOUT)
    assert _model_status(slurm_bed, "tiny")["state"] == "ready"
    assert devcluster.daemon_pid(slurm_bed.bed, "controller") == controller
