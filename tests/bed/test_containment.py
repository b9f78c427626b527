"""Engines of unprivileged users on a bed with cgroup containment as production sites run it (proctrack/cgroup,
task/cgroup with ConstrainCores/RAMSpace/Devices, PrologFlags=Contain): the engine is the job's user's, lives in
the job's cgroups, answers no other user, obeys the job's memory limit, and is killed by Slurm at the job's end
even when the agent is gone for good. Every job here is submitted by one of the bed's unprivileged users."""

from __future__ import annotations

import os
import pwd
import signal
import stat
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from slinfer.agent import jobfiles
from slinfer.dev import devcluster
from tests.fakes.slurmbed import SlurmBed, engine_pids, wait_no_engine

pytestmark = pytest.mark.bed

ALICE, BOB = devcluster.BED_USERS
READY_TIMEOUT = 300
# The model whose memory the memory tests count: a warm-forked engine shares the engine template's imported
# pages (frozen, so never copied) and charges its job only what it allocates itself; smollm2's 540 MB of float32
# weights are that engine's own, tiny's few MB are not enough to tell an engine from none.
HEAVY_MODEL = "smollm2"
# Several of the agent's health intervals: long enough for a re-adopted dead engine to be restarted.
AGENT_SUPERVISION_S = 10
# Cgroup v1 hierarchies whose limits bind a job: memory and cores, devices, and the freezer Slurm kills through.
JOB_HIERARCHIES = ("memory", "cpuset", "devices", "freezer")
ASK = (
    "import os; from openai import OpenAI; c = OpenAI(); "
    "r = c.chat.completions.create(model=os.environ['SLINFER_MODEL'], max_tokens=4, temperature=0, "
    "messages=[{'role': 'user', 'content': 'hello'}]); print('ANSWER', r.usage.completion_tokens)"
)
# Run as the other user: an HTTP status for a request to a URL with an optional bearer key.
STATUS_OF = (
    "import sys, urllib.request, urllib.error\n"
    "req = urllib.request.Request(sys.argv[1])\n"
    "if len(sys.argv) > 2: req.add_header('Authorization', 'Bearer ' + sys.argv[2])\n"
    "try: print(urllib.request.urlopen(req, timeout=10).status)\n"
    "except urllib.error.HTTPError as e: print(e.code)\n"
)
# Run as the other user, the paths on stdin: which of them that user can open for reading.
CAN_OPEN = (
    "import sys\n"
    "for p in sys.stdin.read().splitlines():\n"
    "    try: open(p, 'rb').close(); print('READABLE', p)\n"
    "    except OSError as e: print('DENIED', p, e.errno)\n"
)


def _files_holding(top: Path, secret: str) -> list[Path]:
    """Every regular file under `top` that holds `secret`, found as root: root lists the 0711 folders (run/jobs,
    run/logs, engine-tls) that another user cannot, so a readable file inside them is found too."""
    found = []
    for folder, _, names in os.walk(top):
        for name in names:
            path = Path(folder) / name
            try:
                if not stat.S_ISREG(path.lstat().st_mode):
                    continue
                if secret.encode() in path.read_bytes():
                    found.append(path)
            except OSError:  # gone meanwhile (a log rotated, a socket's lock)
                continue
    return found


def _opened_by(bed: SlurmBed, user: str, paths: list[Path]) -> dict[str, str]:
    """path -> READABLE or DENIED, as `user` opening each for reading."""
    py = str(devcluster.engine_python())
    done = subprocess.run(["runuser", "-u", user, "--", py, "-c", CAN_OPEN], input="\n".join(map(str, paths)),
                          capture_output=True, text=True, timeout=60, env={**os.environ, **bed.env()})
    assert done.returncode == 0, done
    return {line.split(" ")[1]: line.split(" ")[0] for line in done.stdout.splitlines()}


def _serving_job(bed: SlurmBed, user: str, model: str = "tiny") -> str:
    job = bed.sbatch(f"--inference={model}", "--gres=gpu:1", user=user,
                     script=f"slinfer wait-ready --timeout {READY_TIMEOUT - 20} && python -c \"{ASK}\" "
                            "&& sleep 900")
    bed.wait_output(job, r"ANSWER \d+", READY_TIMEOUT + 30)
    return job


def _cgroup_paths(pid: int) -> dict[str, str]:
    paths = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            paths[controller] = path
    return paths


def _end(bed: SlurmBed, job: str) -> None:
    bed.run("scancel", job)
    assert wait_no_engine(job, None, 90) < 90, f"engine of job {job} outlived its job"
    assert bed.wait_node_idle() == "idle"


def test_the_engine_is_the_jobs_users_and_lives_in_the_jobs_cgroups(slurm_bed: SlurmBed) -> None:
    alice = pwd.getpwnam(ALICE)
    job = _serving_job(slurm_bed, ALICE, HEAVY_MODEL)
    try:
        slurm_job = slurm_bed.job(job)
        assert slurm_job is not None and slurm_job.user == ALICE, slurm_job
        pids = engine_pids(job)
        assert len(pids) >= 2, f"expected vLLM's API server and its engine core, found {pids}"
        for pid in pids:
            proc = psutil.Process(pid)
            assert proc.uids().real == alice.pw_uid and proc.uids().effective == alice.pw_uid, (pid, proc.uids())
            paths = _cgroup_paths(pid)
            for hierarchy in JOB_HIERARCHIES:
                assert f"/job_{job}/step_extern" in paths.get(hierarchy, ""), (pid, hierarchy, paths)
        if slurm_bed.bed.release() >= "26.05":
            # 26.05's extern step keeps no task of its own; its slurmstepd adopts the engine (agent/stepd.py), and
            # what sstat then reports is that adopted process's. The memory that binds is the step's memory
            # cgroup's, which holds the engine and its children: hundreds of MB.
            usage = int(Path("/sys/fs/cgroup/memory", paths["memory"].lstrip("/"), "memory.usage_in_bytes")
                        .read_text())
            print(f"{job}.extern memory cgroup usage {usage >> 20} MiB")
            assert usage > 200 << 20, f"the extern step's memory cgroup holds {usage} bytes, not an engine"
            return
        # Slurm's accounting sees the engine: the extern step's memory is the engine's, hundreds of MB.
        stat = slurm_bed.run("sstat", "--noheader", "--parsable2", "-j", f"{job}.extern", "--format=MaxRSS")
        max_rss = stat.stdout.strip().splitlines()[0]
        assert max_rss.endswith(("K", "M", "G")), stat.stdout
        kib = float(max_rss[:-1]) * {"K": 1, "M": 1024, "G": 1024 * 1024}[max_rss[-1]]
        print(f"sstat {job}.extern MaxRSS={max_rss}")
        assert kib > 200 * 1024, f"the extern step's MaxRSS {max_rss} is not an engine's"
    finally:
        _end(slurm_bed, job)


def test_another_user_is_kept_out_of_the_engine(slurm_bed: SlurmBed) -> None:
    job_a = _serving_job(slurm_bed, ALICE)
    job_b = _serving_job(slurm_bed, BOB)
    try:
        env_a, env_b = slurm_bed.env_file(job_a), slurm_bed.env_file(job_b)
        key_a, key_b = env_a["OPENAI_API_KEY"], env_b["OPENAI_API_KEY"]
        models_a = env_a["OPENAI_BASE_URL"] + "/models"
        assert key_a != key_b
        py = str(devcluster.engine_python())
        # Bob reads nothing of Alice's: not her env or status file, nor her key in any file of the run folder.
        for private in (slurm_bed.bed.run_dir / "jobs" / f"{job_a}.env",
                        jobfiles.status_path(slurm_bed.bed.run_dir, job_a)):
            assert private.exists(), private
            read = slurm_bed.as_user(BOB, "cat", str(private))
            assert read.returncode != 0 and "Permission denied" in read.stderr, (private, read)
        holding = _files_holding(slurm_bed.bed.state, key_a)
        print(f"\nfiles under the state folder that hold Alice's key: {[str(p) for p in holding]}")
        # The search finds her key where it must be (her env file, in the 0711 run/jobs).
        assert slurm_bed.bed.run_dir / "jobs" / f"{job_a}.env" in holding, holding
        opened = _opened_by(slurm_bed, BOB, holding)
        assert set(opened) == {str(p) for p in holding}, opened
        readable = [p for p, how in opened.items() if how != "DENIED"]
        assert not readable, f"Bob can read files that hold Alice's key: {readable}"
        # Positive control: a file Bob may read, inside the same 0711 folder, is found readable by the same check.
        control = slurm_bed.bed.run_dir / "jobs" / "bob-readable-control"
        control.write_text("readable by anyone\n")
        control.chmod(0o644)
        try:
            assert _opened_by(slurm_bed, BOB, [control]) == {str(control): "READABLE"}
        finally:
            control.unlink()
        # The key is on no command line, and Bob cannot read the engine's environment.
        for proc in psutil.process_iter(["cmdline"]):
            assert key_a not in " ".join(proc.info["cmdline"] or []), proc
        engine = engine_pids(job_a)[0]
        environ = slurm_bed.as_user(BOB, "cat", f"/proc/{engine}/environ")
        assert environ.returncode != 0 and key_a not in environ.stdout, environ
        # Alice's engine refuses Bob without a key and with his own job's key; it answers Alice's.
        assert slurm_bed.as_user(BOB, py, "-c", STATUS_OF, models_a).stdout.strip() == "401"
        assert slurm_bed.as_user(BOB, py, "-c", STATUS_OF, models_a, key_b).stdout.strip() == "401"
        assert slurm_bed.as_user(ALICE, py, "-c", STATUS_OF, models_a, key_a).stdout.strip() == "200"
    finally:
        slurm_bed.run("scancel", job_b)
        _end(slurm_bed, job_a)
        assert wait_no_engine(job_b, None, 90) < 90


def test_the_jobs_memory_limit_stops_its_engine_and_the_job_says_why(slurm_bed: SlurmBed) -> None:
    job = slurm_bed.sbatch(f"--inference={HEAVY_MODEL}", "--gres=gpu:1", "--mem=300M", user=ALICE,
                           script=f"slinfer wait-ready --timeout {READY_TIMEOUT} || {{ echo WAIT_FAILED; exit 3; }}")
    assert slurm_bed.wait_state(job, {"COMPLETED", "FAILED"}, READY_TIMEOUT + 60) == "FAILED", slurm_bed.output(job)
    out = slurm_bed.output(job)
    print(out)
    assert "WAIT_FAILED" in out
    assert "killed by the job's memory limit" in out, out
    assert engine_pids(job) == []
    assert slurm_bed.wait_node_idle() == "idle", "an engine over its job's memory limit drained the node"


def test_with_the_agent_dead_for_good_slurm_kills_the_engine_at_the_jobs_end(slurm_bed: SlurmBed) -> None:
    bed = slurm_bed.bed
    job = _serving_job(slurm_bed, ALICE)
    socket_path = bed.run_dir / "agent.sock"
    log_before = slurm_bed.slurmd_log_size()
    try:
        agents = [p for p in psutil.process_iter(["cmdline"])
                  if any(part.endswith(("slinfer-agent", "slinfer.agent.daemon")) for part in p.info["cmdline"] or [])
                  and str(bed.config) in (p.info["cmdline"] or [])]
        assert agents, "no agent of this bed runs"
        for agent in agents:
            agent.send_signal(signal.SIGKILL)
        psutil.wait_procs(agents, timeout=10)
        # The agent must not come back: a folder where its socket goes makes every restart fail at once.
        socket_path.unlink(missing_ok=True)
        (socket_path / "blocked").mkdir(parents=True)
        engines = engine_pids(job)
        assert engines, "the engine must outlive its agent"
        assert all(f"/job_{job}/step_extern" in _cgroup_paths(pid)["freezer"] for pid in engines)
        began = time.monotonic()
        slurm_bed.run("scancel", job)
        gone = wait_no_engine(job, None, 90)
        assert gone < 90, f"engine processes {engine_pids(job)} survived the job without their agent"
        state = slurm_bed.wait_node_idle()
        tail = slurm_bed.slurmd_log_since(log_before)
        assert state == "idle", (f"the job's end without an agent left the node {state} "
                                 f"({slurm_bed.node_reason()!r}):\n{tail[-3000:]}")
        print(f"engine gone {gone:.1f}s after scancel, node idle {time.monotonic() - began:.1f}s after it")
        assert f"job {job}: the node agent does not answer" in tail and "no engine process of this job is left" \
            in tail, "the epilog should have found the engine already killed by Slurm:\n" + tail[-3000:]
        # The agent comes back at last: the job is over, so it must not re-adopt and restart the job's engine.
        (socket_path / "blocked").rmdir()
        socket_path.rmdir()
        devcluster.restart_agent(bed)
        time.sleep(AGENT_SUPERVISION_S)
        assert engine_pids(job) == [], f"the agent that came back restarted the engine of ended job {job}"
        assert not (bed.run_dir / "engines" / f"{job}.json").exists(), "the ended job's engine record is left"
    finally:
        if socket_path.is_dir():
            (socket_path / "blocked").rmdir()
            socket_path.rmdir()
        devcluster.restart_agent(bed)
