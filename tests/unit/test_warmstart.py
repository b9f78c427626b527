"""The warm start without vLLM: the real engine template program (agent/enginetemplate.py) with a stand-in engine
module, its protocol as the agent speaks it, its refusal to fork beside a thread, and the agent's choice between
the warm and the cold path (a table of cases)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from slinfer.agent import warmstart
from slinfer.agent.engines import EngineManager
from slinfer.agent.gpu import Gpus
from slinfer.agent.processes import ENGINE_MARKER, ProcessIdentity
from slinfer.agent.records import RecordStore
from slinfer.agent.warmstart import TemplateError, TemplateStatus, WarmProcess, call, stock_args, warm_refusal
from slinfer.config import DEFAULT_ENGINE_COMMAND, AgentConfig, Config, ModelConfig
from slinfer.v1 import engine_pb2 as pb

# A stand-in for vLLM's server module: writes what it was given and what it is, then exits with argv's code.
FAKE_ENGINE = """
import json, os, sys
out, code = sys.argv[1], int(sys.argv[2])
print("fake engine on stdout", flush=True)
with open(out, "w") as f:
    json.dump({"argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd(), "uid": os.getuid(),
               "euid": os.geteuid(), "gid": os.getgid(), "sid": os.getsid(0), "pid": os.getpid(),
               "name": __name__, "proc_environ": open("/proc/self/environ", "rb").read().decode(),
               "proc_cmdline": open("/proc/self/cmdline", "rb").read().decode()}, f)
sys.exit(code)
"""
# A stand-in engine that stays up (its memory is scanned), after writing its pid and open descriptors.
SLEEPER = """
import json, os, sys, time
fds = sorted(os.listdir("/proc/self/fd"))
with open(sys.argv[1], "w") as f:
    json.dump({"pid": os.getpid(), "fds": fds}, f)
time.sleep(120)
"""
# Preloaded by the template: a string built at run time, so it lives in the template's heap as a key would.
CANARY_MODULE = "CANARY = '-'.join(['slinfer', 'canary', str(6 * 7)])\n"
THREAD_STARTER = "import threading, time\nthreading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n"
# A preloaded module with a heap of its own: 50,000 lists, each an object the collector tracks.
BIG_HEAP = "HEAP = [[i] for i in range(50_000)]\n"
# A stand-in engine that reports how many objects it inherited frozen, then exits.
GC_REPORT = "import gc, sys\nopen(sys.argv[1], 'w').write(str(gc.get_freeze_count()))\n"


def _start_template(folder: Path, *preload: str) -> tuple[subprocess.Popen[bytes], Path]:
    sock = folder / "t.sock"
    argv = [sys.executable, str(warmstart.TEMPLATE_SCRIPT), "--socket", str(sock)]
    for module in preload:
        argv += ["--preload", module]
    proc = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(folder)}, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the template did not start"
        time.sleep(0.05)
    return proc, sock


@pytest.fixture
def folder() -> Iterator[Path]:
    # Reachable by an unprivileged uid (pytest's tmp_path is root's 0700 when the tests run as root).
    path = Path(tempfile.mkdtemp(prefix="slinfer-warm-"))
    path.chmod(0o777)
    (path / "fakeengine.py").write_text(FAKE_ENGINE)
    (path / "threadstarter.py").write_text(THREAD_STARTER)
    (path / "sleeper.py").write_text(SLEEPER)
    (path / "canary.py").write_text(CANARY_MODULE)
    (path / "bigheap.py").write_text(BIG_HEAP)
    (path / "gcreport.py").write_text(GC_REPORT)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture
def template(folder: Path) -> Iterator[Path]:
    proc, sock = _start_template(folder, "json")
    yield sock
    proc.kill()
    proc.wait()


def _spawn(sock: Path, folder: Path, code: int, uid: int, gid: int, env: dict[str, str],
           module: str = "fakeengine") -> int:
    request = warmstart.spawn_request([str(folder / "out.json"), str(code)], uid=uid, gid=gid, groups=[gid],
                                      cwd=str(folder), log_path=folder / "engine.log")
    request["module"] = module
    env_fd = warmstart.env_descriptor(env)
    try:
        return int(call(sock, request, fds=[env_fd])["pid"])
    finally:
        os.close(env_fd)


def _wait_exit(sock: Path, pid: int) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        reply = call(sock, {"op": "exit", "pid": pid})
        if reply["exited"]:
            return reply
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} did not exit")


def test_the_socket_is_root_only_and_a_ping_reports_one_thread(template: Path) -> None:
    assert template.stat().st_mode & 0o777 == 0o600
    reply = call(template, {"op": "ping"})
    assert reply["threads"] == 1 and reply["tasks"] == 1 and reply["python"] == sys.executable


def test_a_spawned_child_gets_exactly_the_requests_session_env_folder_argv_and_log(template: Path,
                                                                                   folder: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", ENGINE_MARKER: "7@/run/x", "VLLM_API_KEY": "secret"}
    uid, gid = (65534, 65534) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    pid = _spawn(template, folder, 3, uid, gid, env)
    assert _wait_exit(template, pid) == {"ok": True, "pid": pid, "exited": True, "code": 3}
    seen = json.loads((folder / "out.json").read_text())
    assert seen["env"] == env, "the child's environment is the request's, nothing of the template's"
    assert seen["uid"] == seen["euid"] == uid and seen["gid"] == gid
    assert seen["sid"] == seen["pid"] == pid, "the child leads a session of its own"
    assert seen["cwd"] == str(folder) and seen["name"] == "__main__"
    assert seen["argv"][1:] == [str(folder / "out.json"), "3"]
    # /proc shows the engine's own environment and command line (the agent finds engines by the marker there).
    assert f"{ENGINE_MARKER}=7@/run/x" in seen["proc_environ"].split("\0")
    assert "PYTHONPATH" not in seen["proc_environ"]
    assert seen["proc_cmdline"].split("\0")[1:3] == ["-m", "fakeengine"]
    assert "fake engine on stdout" in (folder / "engine.log").read_text()


def memory_holds(pid: int, needle: bytes) -> bool:
    """Whether any readable mapping of pid's memory holds needle (as root, or as pid's own dumpable user)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except (OSError, OverflowError, ValueError):  # [vvar] and the like cannot be read
                continue
    return False


def _wait_file(path: Path) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(path.read_text())  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: children of other uids")
def test_no_job_key_ever_enters_the_template_and_a_later_child_holds_only_its_own(folder: Path) -> None:
    """Issue 27's leak: the template forks without exec, so whatever its heap held, every later child (whose
    memory its user reads) inherits. Keys now come beside the request as a descriptor that only the child reads:
    the template's memory holds none, a later child holds its own key and not the earlier one's."""
    proc, sock = _start_template(folder, "json", "canary")
    children: list[int] = []
    try:
        keys = [f"key-{n}-{os.urandom(12).hex()}" for n in range(2)]
        for n, (key, uid) in enumerate(zip(keys, (65534, 65533), strict=True)):
            request = warmstart.spawn_request([str(folder / f"out{n}.json"), "0"], uid=uid, gid=uid, groups=[uid],
                                              cwd=str(folder), log_path=folder / f"engine{n}.log")
            request["module"] = "sleeper"
            env_fd = warmstart.env_descriptor({"PATH": "/bin", "VLLM_API_KEY": key})
            try:
                children.append(int(call(sock, request, fds=[env_fd])["pid"]))
            finally:
                os.close(env_fd)
            _wait_file(folder / f"out{n}.json")
        # Positive controls: the scan reads the template's heap (the canary its import built), and each child
        # holds its own key.
        assert memory_holds(proc.pid, b"slinfer-canary-42"), "the scan cannot see the template's heap"
        for child, key in zip(children, keys, strict=True):
            assert memory_holds(child, key.encode()), f"child {child} does not hold its own key"
        for key in keys:
            assert not memory_holds(proc.pid, key.encode()), "a job's key is in the template's memory"
        assert not memory_holds(children[1], keys[0].encode()), "the later child holds the earlier job's key"
        # The descriptor was closed: the child keeps stdin, stdout, stderr (and the one listdir opened).
        later = _wait_file(folder / "out1.json")
        assert later["fds"] == ["0", "1", "2", "3"], later
        log = folder / "engine1.log"
        assert log.stat().st_uid == 65533 and log.stat().st_mode & 0o777 == 0o600, "the log is the job user's alone"
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, 9)
        proc.kill()
        proc.wait()


def test_a_spawn_that_carries_its_environment_inline_is_refused(template: Path, folder: Path) -> None:
    request = warmstart.spawn_request([str(folder / "out.json"), "0"], uid=os.getuid(), gid=os.getgid(),
                                      groups=[], cwd=str(folder), log_path=folder / "engine.log")
    request["env"] = {"VLLM_API_KEY": "inline"}
    env_fd = warmstart.env_descriptor({})
    try:
        with pytest.raises(TemplateError, match="carries an environment"):
            call(template, request, fds=[env_fd])
    finally:
        os.close(env_fd)
    assert not (folder / "out.json").exists()


def test_what_the_preloaded_imports_set_reaches_the_child_unless_the_job_says_otherwise(folder: Path) -> None:
    (folder / "setsenv.py").write_text("import os\nos.environ.update(FROM_IMPORT='1', BOTH='import', "
                                        "TORCHINDUCTOR_CACHE_DIR='/tmp/torchinductor_root')\n")
    proc, sock = _start_template(folder, "setsenv")
    try:
        pid = _spawn(sock, folder, 0, os.getuid(), os.getgid(), {"PATH": "/bin", "BOTH": "job"})
        _wait_exit(sock, pid)
        env = json.loads((folder / "out.json").read_text())["env"]
        assert env == {"PATH": "/bin", "BOTH": "job", "FROM_IMPORT": "1"}
    finally:
        proc.kill()
        proc.wait()


def test_a_child_inherits_the_preloaded_heap_frozen_so_that_its_collections_skip_it(folder: Path) -> None:
    frozen = {}
    for preload in (("json",), ("json", "bigheap")):
        proc, sock = _start_template(folder, *preload)
        try:
            assert call(sock, {"op": "ping"})["frozen"] > 0
            pid = _spawn(sock, folder, 0, os.getuid(), os.getgid(), {"PATH": "/bin"}, module="gcreport")
            assert _wait_exit(sock, pid)["code"] == 0
            frozen[preload] = int((folder / "out.json").read_text())
        finally:
            proc.kill()
            proc.wait()
            sock.unlink()  # the next template's start waits for its own socket
    # The 50,000 lists the preloaded module made are in the child's permanent generation; without the freeze
    # neither child would have any frozen object.
    assert frozen[("json", "bigheap")] - frozen[("json",)] >= 50_000


def test_an_unknown_pid_and_bad_requests_are_answered_not_fatal(template: Path) -> None:
    assert call(template, {"op": "exit", "pid": 999999}) == {"ok": True, "pid": 999999, "exited": False,
                                                             "known": False}
    with pytest.raises(TemplateError, match="unknown op 'nope'"):
        call(template, {"op": "nope"})
    with pytest.raises(TemplateError, match="lacks args, gid, cwd, log_path, module, its environment"):
        call(template, {"op": "spawn", "uid": 0})
    assert call(template, {"op": "ping"})["ok"], "the template still serves"


def test_a_template_with_a_thread_refuses_to_fork(folder: Path) -> None:
    proc, sock = _start_template(folder, "threadstarter")
    try:
        assert call(sock, {"op": "ping"})["threads"] == 2
        with pytest.raises(TemplateError, match="refusing to fork"):
            _spawn(sock, folder, 0, os.getuid(), os.getgid(), {})
        assert not (folder / "out.json").exists()
    finally:
        proc.kill()
        proc.wait()


def test_a_missing_template_is_a_template_error(folder: Path) -> None:
    with pytest.raises(TemplateError, match=r"t\.sock"):
        call(folder / "t.sock", {"op": "ping"})


def test_a_warm_process_reports_its_exit_status_through_the_template(template: Path, folder: Path) -> None:
    pid = _spawn(template, folder, 5, os.getuid(), os.getgid(), {"PATH": "/bin"})
    process = WarmProcess(pid, ProcessIdentity.of(pid), template)
    deadline = time.monotonic() + 30
    while process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert process.returncode == 5


# -- the fallback decision -----------------------------------------------------------------------------------

STOCK = ModelConfig(name="tiny", source="/m", gpus=1)


@pytest.mark.parametrize("agent, model, ready, expected", [
    (AgentConfig(), STOCK, True, ""),
    (AgentConfig(warm_start=False), STOCK, True, "agent.warm_start is off"),
    (AgentConfig(), dataclasses.replace(STOCK, engine_command=["apptainer", "run"]), True,
     "model tiny has its own engine_command"),
    (AgentConfig(engine_command=["podman", "run", "vllm"]), STOCK, True,
     "agent.engine_command is not the stock vLLM command"),
    (AgentConfig(), dataclasses.replace(STOCK, engine_env={"X": "1"}), True, "model tiny has its own engine_env"),
    (AgentConfig(), STOCK, False, "the engine template is not ready (importing)"),
    (AgentConfig(engine_env={"HF_HUB_OFFLINE": "1"}), STOCK, True, ""),
])
def test_when_the_warm_path_applies(agent: AgentConfig, model: ModelConfig, ready: bool, expected: str) -> None:
    assert warm_refusal(Config(agent=agent, models=[model]), model, ready, "importing") == expected


@pytest.mark.parametrize("argv, expected", [
    (["py", "-m", "vllm.entrypoints.openai.api_server", "--port", "1"], ["--port", "1"]),
    (["other-py", "-m", "vllm.entrypoints.openai.api_server"], None),
    (["py", "-m", "vllm.entrypoints.cli.main"], None),
    (["py"], None),
])
def test_stock_args(argv: list[str], expected: list[str] | None) -> None:
    assert stock_args(argv, "py") == expected


class _FakeTemplate:
    """The manager's view of a template: a status and a spawn that either fails or starts a real process."""

    def __init__(self, ready: bool, fail: str = "") -> None:
        self.status = TemplateStatus(ready, "ready" if ready else "importing")
        self.fail = fail
        self.requests: list[dict[str, object]] = []

    def spawn(self, args: list[str], **kwargs: object) -> WarmProcess:
        self.requests.append({"args": args, **kwargs})
        if self.fail:
            raise TemplateError(self.fail)
        proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
        return WarmProcess(proc.pid, ProcessIdentity.of(proc.pid), Path("/nonexistent"))


@pytest.mark.parametrize("ready, fail, path, logged", [
    (True, "", "warm", "warm start: engine pid"),
    (True, "engine template refused: template runs 2 Python threads", "cold",
     "cold start: engine template refused: template runs 2 Python threads"),
    (False, "", "cold", "cold start: the engine template is not ready (importing)"),
])
async def test_the_manager_starts_warm_or_falls_back_cold_and_logs_why(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, ready: bool, fail: str, path: str, logged: str) -> None:
    template = _FakeTemplate(ready, fail)
    agent = AgentConfig(address="127.0.0.1", python="/bin/sleep", run_dir=str(tmp_path / "run"),
                        health_interval_s=30, engine_command=list(DEFAULT_ENGINE_COMMAND))
    config = Config(agent=agent, models=[ModelConfig(name="m", source="/x", gpus=1)])
    caplog.set_level(logging.INFO, logger="slinfer.agent.engines")
    async with aiohttp.ClientSession() as http:
        manager = EngineManager(config, RecordStore(tmp_path / "run" / "engines"), http, Gpus(),
                                template=template)  # type: ignore[arg-type]
        engine = await manager.start(pb.JobSpec(job_id="9", model="m", uid=os.getuid(), gid=os.getgid(),
                                                user="", gpus=["0"]))
        try:
            record = manager.store.load_all()[0]
            assert engine.state == pb.STARTING and record.start_path == path
            assert f"job 9: {logged}" in caplog.text
            if ready:
                (request,) = template.requests
                env = request["env"]
                assert isinstance(env, dict)
                assert env["VLLM_WORKER_MULTIPROC_METHOD"] == "fork" and env[ENGINE_MARKER].startswith("9@")
                assert env["VLLM_API_KEY"] == record.api_key and record.api_key not in request["args"]
                assert request["uid"] == os.getuid() and "--port" in request["args"]
            assert record.session_id == record.pid > 0
            if path == "warm":
                assert ProcessIdentity(record.pid, record.create_time).alive()
        finally:
            await manager.stop("9")
            await manager.close()


def test_the_switch_is_on_by_default_and_a_wrong_value_names_the_key() -> None:
    from slinfer.config import ConfigError, parse

    assert parse({}).agent.warm_start is True
    assert parse({"agent": {"warm_start": False}}).agent.warm_start is False
    with pytest.raises(ConfigError, match=r"^agent\.warm_start"):
        parse({"agent": {"warm_start": "yes"}})


class _HealthTemplate(_FakeTemplate):
    """Spawns an HTTP server on the engine's port whose GET /health answers 200: an engine that serves at once."""

    def __init__(self, folder: Path) -> None:
        super().__init__(True)
        self.folder = folder

    def spawn(self, args: list[str], **kwargs: object) -> WarmProcess:
        self.requests.append({"args": args, **kwargs})
        (self.folder / "health").write_text("ok")
        port = args[args.index("--port") + 1]
        proc = subprocess.Popen([sys.executable, "-m", "http.server", port, "--bind", "127.0.0.1", "--directory",
                                 str(self.folder)], start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        return WarmProcess(proc.pid, ProcessIdentity.of(proc.pid), Path("/nonexistent"))


async def test_a_starting_engine_is_probed_often_whatever_the_health_interval(tmp_path: Path) -> None:
    agent = AgentConfig(address="127.0.0.1", python="/bin/sleep", run_dir=str(tmp_path / "run"),
                        health_interval_s=30, engine_command=list(DEFAULT_ENGINE_COMMAND))
    config = Config(agent=agent, models=[ModelConfig(name="m", source="/x", gpus=1)])
    async with aiohttp.ClientSession() as http:
        manager = EngineManager(config, RecordStore(tmp_path / "run" / "engines"), http, Gpus(),
                                template=_HealthTemplate(tmp_path))  # type: ignore[arg-type]
        began = time.monotonic()
        engine = await manager.start(pb.JobSpec(job_id="9", model="m", uid=os.getuid(), gid=os.getgid(),
                                                user="", gpus=["0"]))
        try:
            assert engine.state == pb.STARTING
            while manager.store.load_all()[0].state != pb.READY:
                # With health_interval_s between the probes of a STARTING engine, READY would take 30 s.
                assert time.monotonic() - began < 5, "the starting engine was not probed within 5 s"
                await asyncio.sleep(0.05)
        finally:
            await manager.stop("9")
