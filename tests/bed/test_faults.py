"""Faults on the real bed, each forced by the test and each asserted to have happened, with requests sent /
succeeded / failed reported: Slurm's daemons restarted under load; the controller killed with SIGKILL under
load; a serving job of the real model cancelled or timed out while long streams run, so the cut always lands
mid-stream (each cut stream must end with the OpenAI-shaped `engine_failed` error event, none silently, and
later requests get 503 `no_replica`); an engine that keeps crashing, restarted up to `max_restarts` and then
FAILED with its reason shown by `slinfer wait-ready`; and the two infrastructure failures that must drain the
node: a prolog that cannot reach any agent, an epilog that cannot kill an engine's processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import psutil
import pytest

from slinfer import config as configmod
from slinfer.dev import devcluster
from tests.fakes.slurmbed import SlurmBed, engine_pids, wait_no_engine

pytestmark = pytest.mark.bed
TINY = "tiny"
# The streams that a fault cuts run on the real model: a few hundred tokens take it tens of seconds here, so a
# cut while they run always lands mid-stream.
SMOLLM2 = "smollm2"
LONG_TOKENS = 300
MESSAGES = [{"role": "user", "content": "Write a long story about a cluster."}]
READY_TIMEOUT = 600
# Outcomes of a stream that was cut as slinfer promises, or ran to its end.
CUT = "cut: engine_failed"
COMPLETE = "complete"
# Clear refusals of a stream that began after the engine had gone (before any chunk): retries exhausted on the
# dying engine, or no replica left.
REFUSED = ("refused: 502 engine_failed", "refused: 503 no_replica")
# Once an engine's processes are gone its agent reports it within a health interval (1 s) and the gateway stops
# routing to it; this leaves a loaded machine's agent and controller many such intervals.
NO_REPLICA_WITHIN_S = 15.0


def _admin(bed: SlurmBed, *args: str) -> None:
    bed.admin(*args)


def _gateway(bed: SlurmBed, timeout: float) -> openai.OpenAI:
    env = bed.bed.env()
    return openai.OpenAI(base_url=env["SLINFER_GATEWAY_URL"], api_key=env["SLINFER_API_KEY"], timeout=timeout,
                         max_retries=0)


class DirectLoad:
    """Closed-loop chat requests straight to one engine from a few threads; counts every outcome."""

    def __init__(self, base_url: str, api_key: str, workers: int = 4) -> None:
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=60, max_retries=0)
        self.outcomes: Counter[str] = Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(workers)]

    def _loop(self) -> None:
        deadline = time.monotonic() + 300
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.client.chat.completions.create(model=TINY, messages=MESSAGES, max_tokens=16)
                self.outcomes["ok"] += 1
            except openai.APIError as exc:
                self.outcomes[type(exc).__name__] += 1
                time.sleep(0.2)

    def __enter__(self) -> DirectLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)


class GatewayLoad:
    """Closed-loop short chat requests through the gateway; outcomes with their start times."""

    def __init__(self, bed: SlurmBed, model: str, workers: int = 8, timeout: float = 60) -> None:
        self.client = _gateway(bed, timeout)
        self.model = model
        self.log: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(workers)]

    def _loop(self) -> None:
        deadline = time.monotonic() + 400
        while not self._stop.is_set() and time.monotonic() < deadline:
            began = time.monotonic()
            try:
                self.client.chat.completions.create(model=self.model, messages=MESSAGES, max_tokens=16)
                outcome = "ok"
            except openai.APIStatusError as exc:
                outcome = f"http {exc.status_code} {exc.code}"
            except openai.APIConnectionError:
                outcome = "connection refused or reset"
            self.log.append((began, outcome))
            if outcome != "ok":
                time.sleep(0.2)

    def between(self, start: float, end: float) -> Counter[str]:
        return Counter(o for began, o in self.log if start <= began < end)

    def __enter__(self) -> GatewayLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)


def _stream(bed: SlurmBed, first_chunk: threading.Event | None = None, timeout: float = 300) -> str:
    """One long stream of the real model through the gateway, and how it ended: COMPLETE (finish_reason
    `length`: with ignore_eos an uncut stream runs to max_tokens), CUT (the gateway's `engine_failed` error event
    after the first chunk), 'refused: STATUS CODE' (an error before any chunk); anything else is a failure of
    slinfer's promise: another error mid-stream, another finish_reason (not a cut: the client cannot tell it from
    an answer), or 'SILENTLY TRUNCATED' (no finish_reason, no error)."""
    finish, began = None, False
    try:
        stream = _gateway(bed, timeout).chat.completions.create(
            model=SMOLLM2, messages=MESSAGES, max_tokens=LONG_TOKENS, stream=True, extra_body={"ignore_eos": True})
        for chunk in stream:
            began = True
            if first_chunk is not None:
                first_chunk.set()
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
    except openai.APIStatusError as exc:
        return f"refused: {exc.status_code} {exc.code}"
    except openai.APIError as exc:
        if began:
            return f"cut: {exc.code}" if exc.code else f"cut without error event: {type(exc).__name__}"
        return f"refused: {type(exc).__name__} {exc.code}"
    if finish == "length":
        return COMPLETE
    return f"ended with finish_reason={finish}" if finish else "SILENTLY TRUNCATED"


def _later_requests_get_503_no_replica(bed: SlurmBed) -> None:
    """With the model held at 0 and its only engine gone (the caller waited for its processes), a request is refused
    at once with 503 no_replica and Retry-After. Its agent needs a moment to report the engine gone: until then, for
    at most NO_REPLICA_WITHIN_S, a request may only be refused as one sent to the dying engine is (502
    engine_failed); nothing else (no answer, no other status, no hang) is accepted on the way."""
    client = _gateway(bed, 30)
    gone = time.monotonic()
    seen: Counter[str] = Counter()
    while True:
        began = time.monotonic()
        try:
            client.chat.completions.create(model=SMOLLM2, messages=MESSAGES, max_tokens=4)
            outcome = "ok"
        except openai.APIStatusError as exc:
            outcome = f"refused: {exc.status_code} {exc.code}"
            if exc.status_code == 503 and exc.code == "no_replica":
                assert int(exc.response.headers["Retry-After"]) > 0
                assert time.monotonic() - began < 5, "the 503 must come at once, not after the queue timeout"
        except openai.APIError as exc:
            outcome = f"refused: {type(exc).__name__} {exc.code}"
        seen[outcome] += 1
        assert outcome in REFUSED, f"after the engine's end, a request that was not refused as promised: {dict(seen)}"
        if outcome == "refused: 503 no_replica":
            break
        assert time.monotonic() - gone < NO_REPLICA_WITHIN_S, \
            f"no 503 no_replica within {NO_REPLICA_WITHIN_S} s of the engine's end: {dict(seen)}"
        time.sleep(0.5)
    print(f"requests after the engine's end, until the first 503 no_replica "
          f"({time.monotonic() - gone:.1f}s after it): {dict(seen)}")


def _assert_cuts(outcomes: Counter[str], what: str) -> None:
    cut = outcomes[CUT]
    print(f"\n{what}: {sum(outcomes.values())} streams, {cut} cut mid-stream; how each ended: {dict(outcomes)}")
    assert cut >= 1, f"{what}: no stream was cut mid-stream, so the fault was not exercised: {dict(outcomes)}"
    wrong = {o: n for o, n in outcomes.items() if o not in (CUT, COMPLETE, *REFUSED)}
    assert not wrong, f"{what}: streams that ended otherwise than complete or with engine_failed: {wrong}"


@pytest.fixture(scope="module")
def bed(slurm_bed: SlurmBed) -> Iterator[SlurmBed]:
    slurm_bed.cleanup_jobs()
    # The autoscaler stays out of the way: these tests bring their own engines.
    _admin(slurm_bed, "scale", TINY, "0")
    _admin(slurm_bed, "scale", SMOLLM2, "0")
    yield slurm_bed
    _admin(slurm_bed, "scale", TINY, "auto")
    _admin(slurm_bed, "scale", SMOLLM2, "auto")
    slurm_bed.cleanup_jobs()


@pytest.fixture(autouse=True)
def _no_job_left(bed: SlurmBed) -> Iterator[None]:
    """No test here leaves a job behind for the next, whether it passed or not."""
    yield
    bed.cleanup_jobs()


def _serving_job(bed: SlurmBed, model: str, *args: str) -> str:
    # Only the service's user (the bed's controller runs as root) may publish an engine to the shared pool; any
    # other job here is an unprivileged user's, as a site's users submit.
    user = "root" if "--inference-pool" in args else devcluster.BED_USERS[0]
    job = bed.sbatch(f"--inference={model}", "--gres=gpu:1", *args, user=user,
                     script=f"slinfer wait-ready --timeout {READY_TIMEOUT} && echo READY && sleep 900")
    bed.wait_output(job, r"READY", READY_TIMEOUT)
    return job


def _wait_routable(bed: SlurmBed, model: str, replicas: int = 1, timeout: float = 30) -> float:
    client = _gateway(bed, 10)
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        models = client.models.list().model_dump()["data"]
        if any(m["id"] == model and m.get("ready_replicas", 0) >= replicas for m in models):
            return time.monotonic() - began
        time.sleep(0.5)
    raise AssertionError(f"the gateway never saw {replicas} READY {model} replica(s)")


def _pins(bed: SlurmBed) -> dict[str, int]:
    """The controller's pins as `slinfer status --json` shows them: model -> pinned replica count."""
    status = json.loads(bed.run(sys.executable, "-m", "slinfer.cli.main", "status", "--json").stdout)
    return {m["name"]: int(m.get("pinnedCount", 0)) for m in status["models"] if m.get("pinned")}


def _daemons(bed: SlurmBed, program: str) -> list[psutil.Process]:
    """This bed's running `program` (slinfer-agent, slinfer-controller, or the hook-started `slinfer.agent.daemon`),
    found by its command line: what is running, whatever the pid files say."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if program in cmd and str(bed.bed.config) in cmd and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def _agents(bed: SlurmBed) -> list[psutil.Process]:
    return _daemons(bed, "slinfer-agent") + _daemons(bed, "slinfer.agent.daemon")


def _resume_node(bed: SlurmBed) -> None:
    bed.run("scontrol", "update", f"nodename={devcluster.NODE_NAME}", "state=resume", check=False)
    state = bed.wait_node_idle(timeout=60)
    assert state == "idle", f"the node did not come back after resume: {state}"


def _slurm_daemon(bed: SlurmBed, program: str) -> set[tuple[int, float]]:
    """This bed's running `program` (slurmctld or slurmd) as (pid, start time): every such process in the process
    table (its own name, this bed's slurm.conf on its command line), and the pid in the pid file Slurm itself
    writes (SlurmctldPidFile / SlurmdPidFile) must be one of them. Empty when none runs."""
    running = set()
    for proc in psutil.process_iter(["name", "cmdline", "status", "create_time"]):
        if proc.info["name"] == program and str(bed.bed.conf) in (proc.info["cmdline"] or []) \
                and proc.info["status"] != psutil.STATUS_ZOMBIE:
            running.add((proc.pid, proc.info["create_time"]))
    if running:
        pids = bed.bed.state / "pids"
        # One per node: PROGRAM-self.pid, or PROGRAM-NODE-self.pid on a bed of several (not slurmdbd's for slurmd).
        pid_files = sorted([*pids.glob(f"{program}-self.pid"), *pids.glob(f"{program}-*-self.pid")])
        assert pid_files, f"{program} runs, but wrote no pid file"
        for pid_file in pid_files:
            pid = int(pid_file.read_text().split()[0])
            assert pid in {p for p, _ in running}, f"{pid_file} says {pid}, the process table {running}"
    return running


def _restart_slurm_daemon(bed: SlurmBed, program: str) -> None:
    """Stops and starts `program` as the bed does, and checks that it died and that a new process came back."""
    before = _slurm_daemon(bed, program)
    assert before, f"no {program} of this bed runs"
    devcluster.stop_daemon(bed.bed, program)
    assert not _slurm_daemon(bed, program), f"{program} {before} still runs after stop_daemon"
    time.sleep(2)
    {"slurmctld": devcluster.start_slurmctld, "slurmd": devcluster.start_slurmd}[program](bed.bed)
    after = _slurm_daemon(bed, program)
    assert after and not after & before, f"{program} did not come back as a new process: {before} -> {after}"
    print(f"{program}: pid {sorted(p for p, _ in before)} -> {sorted(p for p, _ in after)}")


@pytest.mark.disruptive
def test_slurmctld_and_slurmd_restarted_mid_run_leave_the_engine_serving(bed: SlurmBed) -> None:
    job = _serving_job(bed, TINY)
    env = bed.env_file(job)
    with DirectLoad(env["OPENAI_BASE_URL"], env["OPENAI_API_KEY"]) as load:
        time.sleep(3)
        _restart_slurm_daemon(bed, "slurmctld")
        assert bed.state(job) == "RUNNING"
        _restart_slurm_daemon(bed, "slurmd")
        time.sleep(3)
        assert bed.state(job) == "RUNNING"
    print(f"\nSlurm daemons restarted under load: {dict(load.outcomes)}")
    assert load.outcomes["ok"] > 20 and set(load.outcomes) == {"ok"}
    # The job's end still runs the epilog through the restarted slurmd, and the engine goes at once.
    cancelled = time.monotonic()
    bed.run("scancel", job)
    print(f"engine gone {wait_no_engine(job, None, 60):.1f}s after scancel")
    # After restarting both of its daemons Slurm sometimes keeps the finished job COMPLETING for minutes (seen
    # on 22.05.8 whatever slinfer does: the epilog had succeeded); slinfer's part is that the engine is gone
    # and the node is not drained.
    state = bed.wait_node_idle(timeout=90)
    print(f"node {state} {time.monotonic() - cancelled:.1f}s after scancel (job {bed.state(job)})")
    assert "drain" not in state and "down" not in state
    assert bed.state(job) == "CANCELLED"


def test_scancel_mid_stream_cuts_streams_with_the_engine_failed_event(bed: SlurmBed) -> None:
    job = _serving_job(bed, SMOLLM2, "--inference-pool")
    _wait_routable(bed, SMOLLM2)
    streams = 8
    with ThreadPoolExecutor(streams) as pool:
        started = [threading.Event() for _ in range(streams)]
        futures = [pool.submit(_stream, bed, event) for event in started]
        for event in started:
            assert event.wait(120), "a stream never began"
        # Every stream has its first chunk and asks for 300 tokens: none can be done within the cut.
        time.sleep(2)
        assert not any(f.done() for f in futures), "a stream ended before the cut"
        bed.run("scancel", job)
        outcomes = Counter(f.result(timeout=300) for f in futures)
    _assert_cuts(outcomes, "scancel mid-stream")
    assert outcomes[CUT] == streams, "all eight streams were mid-way at the scancel"
    wait_no_engine(job, None, 60)
    _later_requests_get_503_no_replica(bed)


@pytest.mark.disruptive  # Slurm sometimes keeps a job it timed out COMPLETING for minutes (seen: ~10 min)
def test_time_limit_mid_stream_cuts_streams_with_the_engine_failed_event(bed: SlurmBed) -> None:
    # Two minutes leave the real model time to start (5-10 s warm, about 70 s cold on CI's 2 cores) and to serve
    # streams before the limit (three were used while a warm start took 25 s: a minute of CI for nothing).
    job = _serving_job(bed, SMOLLM2, "--inference-pool", "--time=2")
    _wait_routable(bed, SMOLLM2)
    started = time.monotonic()
    outcomes: Counter[str] = Counter()

    def worker(offset: float) -> None:
        # Staggered back-to-back long streams: whenever Slurm's time limit (checked every ~30 s) ends the job
        # and its epilog stops the engine, several are mid-way; later ones find no engine and are refused.
        time.sleep(offset)
        while engine_pids(job) and time.monotonic() - started < 300:
            outcomes[_stream(bed)] += 1

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(worker, [0.0, 3.0, 6.0, 9.0]))
    print(f"job {job} ended {bed.state(job)} after {time.monotonic() - started:.0f}s of streams")
    assert bed.wait_state(job, {"TIMEOUT"}, 60) == "TIMEOUT"
    _assert_cuts(outcomes, "time limit mid-stream")
    wait_no_engine(job, None, 60)
    _later_requests_get_503_no_replica(bed)


def test_controller_sigkill_under_load_submits_no_duplicates_and_routing_comes_back(bed: SlurmBed) -> None:
    _admin(bed, "scale", TINY, "1")
    try:
        _wait_routable(bed, TINY, timeout=READY_TIMEOUT)
        jobs = set(bed.controller_jobs(TINY))
        assert len(jobs) == 1, jobs
        # Four closed-loop users stay under one replica's target (8 outstanding): any second job would be a
        # duplicate, not a scale-up.
        with GatewayLoad(bed, TINY, workers=4) as load:
            time.sleep(5)
            (controller,) = _daemons(bed, "slinfer-controller")
            controller.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            controller.wait(10)
            time.sleep(2)
            during = load.between(killed, time.monotonic())
            with socket.socket() as probe:
                probe.settimeout(1)
                builtin_gone = probe.connect_ex(("127.0.0.1", bed.bed.builtin_gateway_port)) != 0
            devcluster.start_controller(bed.bed)
            restarted = time.monotonic()
            # The restarted one finds its job in squeue, and the admin's pin in its state folder.
            print(f"\ncontroller SIGKILLed; routable again {_wait_routable(bed, TINY, timeout=60):.1f}s after "
                  "its restart")
            assert _pins(bed).get(TINY) == 1, f"the pin did not survive the SIGKILL: {_pins(bed)}"
            for _ in range(20):
                assert set(bed.controller_jobs(TINY)) == jobs, "a restarted controller must not submit duplicates"
                time.sleep(0.5)
            after = load.between(restarted + 5, time.monotonic())
        print(f"while dead: {dict(during)}; from 5 s after the restart: {dict(after)}; "
              f"whole run: {dict(Counter(o for _, o in load.log))}")
        assert builtin_gone, "the controller's own gateway still answered: was it killed?"
        if bed.bed.gateway == "tier":
            # What a site runs: the tier keeps serving from its last table while the controller is dead.
            assert during and set(during) == {"ok"}, f"the tier failed requests while the controller was dead: {during}"
        else:
            assert during and "ok" not in during, "requests must fail while the gateway is dead: was it killed?"
        assert after["ok"] > 20 and set(after) == {"ok"}
        assert set(bed.controller_jobs(TINY)) == jobs
    finally:
        # Back to the module's pins (the SIGKILLed controller kept them on disk; this test changed TINY's).
        _admin(bed, "scale", TINY, "0")
        _admin(bed, "scale", SMOLLM2, "0")
    deadline = time.monotonic() + 120
    while bed.controller_jobs(TINY) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not bed.controller_jobs(TINY)


def test_a_crashing_engine_is_restarted_up_to_max_restarts_then_fails_with_its_reason(bed: SlurmBed) -> None:
    max_restarts = configmod.load(str(bed.bed.config)).agent.max_restarts
    assert max_restarts >= 1
    flag = bed.jobs_dir / f"crash-{time.monotonic_ns()}"
    job = bed.sbatch(f"--inference={TINY}", "--gres=gpu:1", script=(
        f"slinfer wait-ready --timeout {READY_TIMEOUT} && echo READY; "
        f"while [ ! -e {flag} ]; do sleep 0.5; done; "
        f"slinfer wait-ready --timeout 30; echo WAIT_READY_EXIT=$?"))
    try:
        bed.wait_output(job, r"READY", READY_TIMEOUT)
        status_file = bed.bed.run_dir / "jobs" / f"{job}.status"

        def state() -> str:
            return str(json.loads(status_file.read_text())["state"])

        killed: list[int] = []
        for crash in range(max_restarts + 1):
            (server,) = [p for p in engine_pids(job) if "vllm.entrypoints" in " ".join(psutil.Process(p).cmdline())]
            assert server not in killed and state() == "READY"
            os.kill(server, signal.SIGKILL)
            killed.append(server)
            deadline = time.monotonic() + 60
            while state() == "READY":  # the agent notices the death
                assert time.monotonic() < deadline, f"crash {crash + 1}: the agent never noticed"
                time.sleep(0.2)
            if crash < max_restarts:
                assert state() == "STARTING", f"crash {crash + 1} of {max_restarts + 1}: {state()}, not restarted"
                deadline = time.monotonic() + READY_TIMEOUT
                while state() != "READY":
                    assert time.monotonic() < deadline, f"crash {crash + 1}: the restarted engine never got READY"
                    assert state() != "FAILED", f"FAILED after only {crash + 1} crash(es)"
                    time.sleep(0.5)
        assert state() == "FAILED"
        wait_no_engine(job, None, 30)
        flag.touch()
        found = bed.wait_output(job, r"WAIT_READY_EXIT=(\d+)", 60)
        out = bed.output(job)
        print(f"\n{len(killed)} crashes (SIGKILL of the API server), {max_restarts} restarts; job output:\n{out}")
        assert found.group(1) == "1"
        assert f"after {max_restarts} restarts" in out
        assert "engine FAILED: engine exited with code -9" in out
    finally:
        bed.run("scancel", job, check=False)
    assert bed.wait_node_idle(timeout=90) == "idle"


def test_prolog_fails_when_no_agent_can_be_reached_and_the_node_is_drained(bed: SlurmBed) -> None:
    socket_path = Path(configmod.load(str(bed.bed.config)).agent.socket)
    # The last test's job must be over, epilog included: its hook starts an agent where none answers (CI: one came
    # 0.5 s after this test stopped the agent, listened, and the prolog below found it).
    assert bed.wait_node_idle(120) == "idle", bed.node_state()
    for agent in _agents(bed):
        agent.terminate()
        agent.wait(30)
    assert not _agents(bed)
    # A directory where the agent's socket belongs: no agent answers, and none the hook starts can listen.
    socket_path.unlink(missing_ok=True)
    socket_path.mkdir()
    job = ""
    try:
        job = bed.sbatch(f"--inference={TINY}", "--gres=gpu:1", script="echo RAN")
        deadline = time.monotonic() + 120
        while "drain" not in bed.node_state():
            assert time.monotonic() < deadline, f"node not drained: {bed.node_state()} (job {bed.state(job)})"
            time.sleep(1)
        reason = bed.run("sinfo", "-h", "-N", "-o", "%E").stdout.strip()
        print(f"\nprolog without an agent: node {bed.node_state()}, reason {reason!r}, job {bed.state(job)}")
        assert "RAN" not in bed.output(job), "the job ran although its prolog failed"
        assert "prolog" in reason.lower()
    finally:
        # An agent again. The failed job's epilog hook may start one at the same moment; the agent's lock lets
        # only one of them live.
        shutil.rmtree(socket_path, ignore_errors=True)
        bed.bed.pidfile("agent").unlink(missing_ok=True)
        try:
            devcluster.launch(bed.bed, "agent", [str(Path(sys.executable).parent / "slinfer-agent"), "--config",
                                                 str(bed.bed.config)])
        except RuntimeError as exc:  # exited at once: the hook's agent holds the lock
            print(f"the epilog hook's agent came first: {exc}")
        deadline = time.monotonic() + 30
        while not socket_path.is_socket() and time.monotonic() < deadline:
            time.sleep(0.2)
        if job:
            bed.run("scancel", job, check=False)
            deadline = time.monotonic() + 120
            while bed.state(job) not in ("CANCELLED", "COMPLETED", "FAILED", "") and time.monotonic() < deadline:
                time.sleep(1)
        _resume_node(bed)
    assert len(_agents(bed)) == 1, [a.cmdline() for a in _agents(bed)]


def test_epilog_fails_when_an_engine_process_cannot_be_killed_and_the_node_is_drained(bed: SlurmBed) -> None:
    freezer_root = Path("/sys/fs/cgroup/freezer")
    if not (freezer_root / "cgroup.procs").exists():
        pytest.fail("this test needs the cgroup v1 freezer at /sys/fs/cgroup/freezer "
                    "(docs/architecture/facts.md: mounted here)")
    job = _serving_job(bed, TINY)
    # A frozen process cannot act on SIGKILL until it is thawed: the agent's kill must fail on it.
    frozen = freezer_root / f"slinfer-test-{os.getpid()}-{job}"
    frozen.mkdir()
    try:
        pids = engine_pids(job)
        assert pids
        for pid in pids:
            (frozen / "cgroup.procs").write_text(str(pid))
        (frozen / "freezer.state").write_text("FROZEN")
        deadline = time.monotonic() + 10
        while (frozen / "freezer.state").read_text().strip() != "FROZEN":
            assert time.monotonic() < deadline, "the engine's processes did not freeze"
            time.sleep(0.1)
        bed.run("scancel", job)
        deadline = time.monotonic() + 180
        while "drain" not in bed.node_state():
            assert time.monotonic() < deadline, f"node not drained: {bed.node_state()} (job {bed.state(job)})"
            time.sleep(1)
        reason = bed.run("sinfo", "-h", "-N", "-o", "%E").stdout.strip()
        left = [p for p in pids if psutil.pid_exists(p)]
        print(f"\nepilog with unkillable engine processes: node {bed.node_state()}, reason {reason!r}, "
              f"still alive {left}")
        assert left, "the frozen engine processes must have outlived the epilog"
        assert "epilog" in reason.lower()
    finally:
        (frozen / "freezer.state").write_text("THAWED")
        bed.run("scancel", job, check=False)
        wait_no_engine(job, None, 60)  # thawed, they act on the SIGKILLs that the agent sent
        deadline = time.monotonic() + 60
        while True:
            try:
                frozen.rmdir()
                break
            except OSError:  # busy until the last of them has been reaped
                assert time.monotonic() < deadline, f"{frozen} still holds {(frozen / 'cgroup.procs').read_text()}"
                time.sleep(0.5)
    _resume_node(bed)
