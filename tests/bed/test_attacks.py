"""An attacker's test suite (issue 27): each test is one attack, made by an unprivileged bed user (slinfer-bob)
against another user's job (slinfer-alice's) or the shared service, on the real bed. Each attack is shown to
fail, and each has a positive control that shows the test could see it succeed: the same step made by whom it
is meant for. An attack whose control fails is inconclusive, and the test fails with it."""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest

from slinfer import config as config_mod
from slinfer import tls
from slinfer.agent import jobfiles
from slinfer.dev import devcluster
from slinfer.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from tests.fakes.slurmbed import SlurmBed, engine_pids, wait_until

pytestmark = pytest.mark.bed

ALICE, BOB = devcluster.BED_USERS
READY_TIMEOUT = 300
# The agent's log line once its warm template answers: engines forked after it start warm.
TEMPLATE_READY = re.compile(r"engine template pid \d+ ready")
# A memory scan reads this much at a time: an engine maps gigabytes.
SCAN_CHUNK = 64 << 20
# What the attacker runs, as the attacker: one probe per call, its outcome as one word on stdout.
PROBE = r'''
import json, socket, sys, urllib.error, urllib.request
kind, args = sys.argv[1], sys.argv[2:]
if kind == "connect":
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(args[0]); print("CONNECTED")
    except PermissionError: print("EACCES")
    except OSError as e: print("OSERROR", e.errno)
elif kind == "open":
    for p in args:
        try: open(p, "rb").close(); print("READABLE", p)
        except OSError as e: print("DENIED", p, e.errno)
elif kind == "http":
    req = urllib.request.Request(args[0], data=args[2].encode() if len(args) > 2 else None,
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer " + args[1]})
    try: print(urllib.request.urlopen(req, timeout=30).status)
    except urllib.error.HTTPError as e: print(e.code)
elif kind in ("grpc-status", "grpc-watch"):
    import grpc
    from slinfer.v1 import admin_pb2, admin_pb2_grpc, gateway_pb2, gateway_pb2_grpc
    address, ca = args[0], args[1]
    try: roots = open(ca, "rb").read() if ca else None
    except OSError: roots = None  # the attacker may not read the bed's CA: the system's then
    creds = grpc.ssl_channel_credentials(roots) if ca else None
    channel = grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)
    try:
        if kind == "grpc-status":
            admin_pb2_grpc.AdminStub(channel).Status(admin_pb2.StatusRequest(), timeout=10)
        else:
            next(iter(gateway_pb2_grpc.GatewayFeedStub(channel).Watch(
                gateway_pb2.WatchRequest(gateway="bob", token=""), timeout=10)))
        print("OK")
    except grpc.RpcError as e: print(e.code().name)
'''


def _as(bed: SlurmBed, user: str, *args: str) -> list[str]:
    """PROBE as `user` (the engine Python, which every bed user may run), its stdout's lines."""
    done = subprocess.run(["runuser", "-u", user, "--", str(devcluster.engine_python()), "-c", PROBE, *args],
                          capture_output=True, text=True, timeout=90, env={**os.environ, **bed.env()}, cwd="/")
    assert done.returncode == 0, done
    return done.stdout.split("\n")[:-1]


def _sbatch_as(bed: SlurmBed, user: str, *args: str, conf: Path | None = None) -> subprocess.CompletedProcess[str]:
    """sbatch as `user` (inside the bed's release root where it has one), with the client config `conf` where
    given, whatever its exit status."""
    argv = ["env", f"SLURM_CONF={conf}", "sbatch", *args] if conf else ["sbatch", *args]
    try:
        return devcluster.run_as(bed.bed, user, argv)
    except subprocess.CalledProcessError as exc:
        return subprocess.CompletedProcess(exc.cmd, exc.returncode, exc.stdout or "", exc.stderr or "")


def _memory_holds(pid: int, needle: bytes) -> bool:
    """Whether any readable mapping of pid's memory holds needle (read as root, in chunks that overlap by the
    needle's length, so that a match across a chunk's edge is found)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            at = start
            while at < end:
                try:
                    mem.seek(at)
                    if needle in mem.read(min(SCAN_CHUNK, end - at)):
                        return True
                except (OSError, OverflowError, ValueError):  # [vvar] and the like cannot be read
                    break
                at += SCAN_CHUNK - len(needle)
    return False


@dataclass
class Serving:
    job_id: str
    key: str
    base_url: str
    engine_pid: int
    pids: list[int]
    work_dir: Path


def _wait_serving(bed: SlurmBed, job_id: str, work_dir: Path) -> Serving:
    bed.wait_output(job_id, "READY_TO_ATTACK", READY_TIMEOUT)
    env = bed.env_file(job_id)
    pids = engine_pids(job_id, run_dir=bed.bed.run_dir)
    assert pids, f"job {job_id} has no engine process"
    leader = min(pids, key=lambda p: psutil.Process(p).create_time())
    return Serving(job_id, env["OPENAI_API_KEY"], env["OPENAI_BASE_URL"], leader, pids, work_dir)


@pytest.fixture(scope="module")
def private_folder(slurm_bed: SlurmBed) -> Iterator[Path]:
    """Alice's private folder (0700, hers): her job's working directory, and the one Bob's job names too."""
    folder = slurm_bed.bed.state / "alice-private"
    folder.mkdir(exist_ok=True)
    entry = pwd.getpwnam(ALICE)
    os.chown(folder, entry.pw_uid, entry.pw_gid)
    folder.chmod(0o700)
    yield folder


@pytest.fixture(scope="module")
def jobs(slurm_bed: SlurmBed, private_folder: Path) -> Iterator[dict[str, Serving]]:
    """Alice's and Bob's private engines, both forked from the warm template, both submitted with Alice's private
    folder as their working directory (Bob's crafted to make root enter it for him)."""
    agent_log = slurm_bed.bed.logs / "agent.log"
    wait_until("the agent's warm template", lambda: TEMPLATE_READY.search(agent_log.read_text(errors="replace")),
               240)
    started = {}
    for user in (ALICE, BOB):
        started[user] = slurm_bed.sbatch("--inference=tiny", "--gres=gpu:1", f"--chdir={private_folder}",
                                         user=user, script="slinfer wait-ready --timeout 280 && "
                                                           "echo READY_TO_ATTACK && sleep 600")
        # One after the other: Bob's engine is forked after Alice's, as the leak needs.
        slurm_bed.wait_output(started[user], "READY_TO_ATTACK", READY_TIMEOUT)
    try:
        yield {user: _wait_serving(slurm_bed, job, private_folder) for user, job in started.items()}
    finally:
        slurm_bed.run("scancel", *started.values(), check=False)
        for job in started.values():
            slurm_bed.wait_state(job, {"CANCELLED", "COMPLETED", "FAILED"}, 120)


def test_publishing_to_the_shared_pool(slurm_bed: SlurmBed) -> None:
    """Bob's `--inference-pool` would put his engine in front of every tenant's prompts. sbatch refuses it at
    submit (the plugstack's pool_users=). Bob can get past that with a client config of his own (SLURM_CONF is
    his to set, and his plugstack need not say pool_users=): then the agent refuses it at the prolog and fails
    his job with the rule, and the node stays up. Control: the service's user (root on the bed) publishes the
    same way, and the gateway answers from that engine."""
    bed = slurm_bed.bed
    at_submit = _sbatch_as(slurm_bed, BOB, "--parsable", "--inference=tiny", "--inference-pool", "--gres=gpu:1",
                           "--wrap", "echo SCRIPT_RAN")
    assert at_submit.returncode != 0, at_submit
    assert f"slinfer: --inference-pool is refused for user {BOB}: only the slinfer service (root)" in \
        at_submit.stderr, at_submit.stderr
    # Bob's own client configuration: the bed's, with a plugstack that names no pool_users.
    own = bed.state / "bob-client"
    own.mkdir(exist_ok=True)
    entry = pwd.getpwnam(BOB)
    plugstack = (bed.state / "plugstack.conf").read_text()
    assert " pool_users=root" in plugstack, "inconclusive: the bed's plugstack does not restrict the pool"
    (own / "plugstack.conf").write_text(plugstack.replace(" pool_users=root", ""))
    (own / "slurm.conf").write_text(re.sub(r"(?m)^PlugStackConfig=.*$", f"PlugStackConfig={own}/plugstack.conf",
                                           bed.conf.read_text()))
    for path in (own, own / "plugstack.conf", own / "slurm.conf"):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    past_sbatch = _sbatch_as(slurm_bed, BOB, "--parsable", "-o", f"{slurm_bed.jobs_dir}/job-%j.out",
                             "--inference=tiny", "--inference-pool", "--gres=gpu:1", "--wrap", "echo SCRIPT_RAN",
                             conf=own / "slurm.conf")
    assert past_sbatch.returncode == 0, past_sbatch.stderr
    refused = past_sbatch.stdout.strip().split(";")[0]
    assert slurm_bed.wait_state(refused, {"FAILED", "COMPLETED"}, 120) == "FAILED", slurm_bed.output(refused)
    out = slurm_bed.output(refused)
    assert f"--inference-pool is refused for user {BOB}" in out and "agent.pool_users" in out, out
    assert "SCRIPT_RAN" not in out and engine_pids(refused) == []
    assert slurm_bed.wait_node_idle() == "idle", "a refused pool job drained the node"
    # Control: root's own pool job is published and answers through the gateway with a client's key.
    control = slurm_bed.sbatch("--inference=tiny", "--inference-pool", "--gres=gpu:1", user="root",
                               script="slinfer wait-ready --timeout 280 && sleep 600")
    try:
        wait_until("root's pool engine routable", lambda: slurm_bed.ready_replicas("tiny") >= 1, READY_TIMEOUT)
        env = bed.env()
        answer = _as(slurm_bed, BOB, "http", f"{env['SLINFER_GATEWAY_URL']}/chat/completions",
                     env["SLINFER_API_KEY"], json.dumps({"model": "tiny", "max_tokens": 2,
                                                         "messages": [{"role": "user", "content": "hi"}]}))
        assert answer == ["200"], answer
    finally:
        slurm_bed.run("scancel", control, check=False)
        slurm_bed.wait_state(control, {"CANCELLED", "COMPLETED", "FAILED"}, 120)
        # The request's load must not bring a controller job onto the node the next tests need.
        slurm_bed.retire_models("tiny")


def test_reading_another_jobs_key_from_ones_own_warm_engines_memory(slurm_bed: SlurmBed,
                                                                    jobs: dict[str, Serving]) -> None:
    """Bob may read his own engine's memory (it is his process, dumpable). Forked from the template after Alice's
    engine, it must hold no trace of her key. Scanned as root; control: each engine holds its own key."""
    agent_log = (slurm_bed.bed.logs / "agent.log").read_text(errors="replace")
    for serving in jobs.values():
        assert f"job {serving.job_id}: warm start: engine pid" in agent_log, "inconclusive: the engine started cold"
    alice, bob = jobs[ALICE], jobs[BOB]
    assert _memory_holds(alice.engine_pid, alice.key.encode()), "control: Alice's engine holds her key"
    assert _memory_holds(bob.engine_pid, bob.key.encode()), "control: Bob's engine holds his key"
    for pid in bob.pids:  # the API server, and the engine core and workers it forked
        assert not _memory_holds(pid, alice.key.encode()), f"Bob's engine process {pid} holds Alice's key"
    template = int((slurm_bed.bed.run_dir / "warm-template.pid").read_text().split()[0])
    assert not _memory_holds(template, alice.key.encode()) and not _memory_holds(template, bob.key.encode()), \
        "the template holds a job's key"


def test_reading_another_users_env_status_and_log_files(slurm_bed: SlurmBed, jobs: dict[str, Serving]) -> None:
    """Every file on the node that holds Alice's key (found as root, through the 0711 folders that Bob cannot
    list), her job's status file and her engine's log: Bob opens none. Control: Alice opens her own."""
    run_dir = slurm_bed.bed.run_dir
    alice = jobs[ALICE]
    holding = [p for p in run_dir.rglob("*") if p.is_file() and not p.is_symlink()
               and alice.key.encode() in p.read_bytes()]
    assert holding, "control: some file of the node holds Alice's key (her job's env file)"
    files = [*holding, jobfiles.status_path(run_dir, alice.job_id), run_dir / "logs" / f"{alice.job_id}.log"]
    assert all(p.exists() for p in files), files
    seen_by_bob = _as(slurm_bed, BOB, "open", *map(str, files))
    assert all(line.startswith("DENIED") for line in seen_by_bob), seen_by_bob
    env_file = jobfiles.jobs_dir(run_dir) / f"{alice.job_id}.env"
    log = run_dir / "logs" / f"{alice.job_id}.log"
    assert _as(slurm_bed, ALICE, "open", str(env_file), str(log)) == [f"READABLE {env_file}", f"READABLE {log}"]


def test_connecting_to_the_agent_the_template_and_the_controller_without_the_token(
        slurm_bed: SlurmBed, jobs: dict[str, Serving]) -> None:
    """Bob connects to the agent's socket and the template's (root-only), and calls the controller's admin API
    and its gateway feed (mutual TLS, token): all refused. Control: root, with the bed's credentials, gets each."""
    bed = slurm_bed.bed
    run_dir = bed.run_dir
    config = config_mod.load(bed.config)
    sockets = [Path(config.agent.socket), run_dir / "warm-template.sock"]
    assert _as(slurm_bed, BOB, "connect", str(sockets[0])) == ["EACCES"]
    assert _as(slurm_bed, BOB, "connect", str(sockets[1])) == ["EACCES"]
    address = f"127.0.0.1:{bed.controller_port}"
    ca = bed.tls_dir / "ca.pem"
    for kind in ("grpc-status", "grpc-watch"):
        # With the CA (a site publishes it) but no client certificate: the handshake fails; plaintext too.
        assert _as(slurm_bed, BOB, kind, address, str(ca)) in (["UNAVAILABLE"], ["UNAUTHENTICATED"])
        assert _as(slurm_bed, BOB, kind, address, "") == ["UNAVAILABLE"]
    # Controls, as root with the bed's own credentials.
    with grpc.insecure_channel(f"unix://{sockets[0]}") as channel:
        listed = agent_pb2_grpc.AgentStub(channel).ListEngines(agent_pb2.ListEnginesRequest(), timeout=10)
    assert {e.job_id for e in listed.engines} >= {s.job_id for s in jobs.values()}
    from slinfer.agent import warmstart

    assert warmstart.call(sockets[1], {"op": "ping"})["ok"]
    credentials = tls.channel_credentials(config)
    assert credentials is not None
    metadata = (("authorization", f"Bearer {config.controller.token}"),)
    with grpc.secure_channel(address, credentials) as channel:
        status = admin_pb2_grpc.AdminStub(channel).Status(admin_pb2.StatusRequest(), timeout=10, metadata=metadata)
        assert status.agents
        first = next(iter(gateway_pb2_grpc.GatewayFeedStub(channel).Watch(
            gateway_pb2.WatchRequest(gateway="control", token=config.controller.token), timeout=10)))
        assert first is not None
        # Private engines are in no gateway's table: Alice's and Bob's keys are not in the feed.
        assert not any(r.api_key in (s.key for s in jobs.values()) for r in first.replicas)


def test_asking_another_users_engine_with_ones_own_jobs_key(slurm_bed: SlurmBed, jobs: dict[str, Serving]) -> None:
    """Bob holds his own engine's key; Alice's engine refuses it (and no key at all). Control: Alice's key."""
    alice, bob = jobs[ALICE], jobs[BOB]
    body = json.dumps({"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    url = f"{alice.base_url}/chat/completions"
    assert _as(slurm_bed, BOB, "http", url, bob.key, body) == ["401"]
    assert _as(slurm_bed, BOB, "http", url, "", body) == ["401"]
    assert _as(slurm_bed, ALICE, "http", url, alice.key, body) == ["200"]


def test_a_crafted_model_or_working_directory_does_not_make_root_act_for_the_user(
        slurm_bed: SlurmBed, jobs: dict[str, Serving], private_folder: Path) -> None:
    """Bob's job names Alice's private folder as its working directory: his engine does not run inside it (root
    would have entered it for him). Control: Alice's engine, same folder, runs there. A model value built to
    reach a path or a shell is refused at submit, naming the problem, and nothing runs."""
    assert Path(os.readlink(f"/proc/{jobs[ALICE].engine_pid}/cwd")) == private_folder, "control"
    bob_cwd = Path(os.readlink(f"/proc/{jobs[BOB].engine_pid}/cwd"))
    assert bob_cwd != private_folder and private_folder not in bob_cwd.parents, bob_cwd
    marker = slurm_bed.bed.state / "attack-marker"
    for value, problem in ((f"tiny;touch {marker}", "character ';' is not allowed"),
                           ("../../../etc/passwd", "character '/' is not allowed"),
                           (".hidden", "must start with a letter or a digit"),
                           ("a..b", 'must not contain ".."'), ("$(id)", "character '$' is not allowed")):
        done = _sbatch_as(slurm_bed, BOB, "--parsable", f"--inference={value}", "--wrap", "true")
        assert done.returncode != 0 and problem in done.stderr, (value, done.stderr)
    assert not marker.exists()
    accepted = _sbatch_as(slurm_bed, BOB, "--test-only", "--inference=tiny", "--wrap", "true")
    assert accepted.returncode == 0 and "slinfer: invalid" not in accepted.stderr, accepted.stderr

