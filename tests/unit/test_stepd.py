"""The agent's request to a job's extern-step slurmstepd to adopt an engine (agent/stepd.py), against a fake
stepd, the fallback to the cgroup write when it refuses (cgroups.JobCgroups.contain_extern), and the adopted
engine's zombie kept until that stepd exited (engines.py, against a 24.11 stepd's segfault at the job's end).
The real stepd answers on the bed (tests/bed/test_accounting.py's private-engine test on 22.05, 24.11 and 26.05)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import psutil
import pytest

from slinfer.agent import engines, stepd, warmstart
from slinfer.agent.cgroups import Hierarchy, JobCgroups
from slinfer.agent.gpu import Gpus
from slinfer.agent.processes import ProcessIdentity
from slinfer.agent.records import RecordStore
from slinfer.agent.warmstart import WarmProcess
from slinfer.config import AgentConfig, Config

INT = struct.Struct("=i")
# What 22.05's and 24.11's slurmstepd answer to the handshake: their SLURM_PROTOCOL_VERSION.
STEPD_22_05 = 38 << 8
STEPD_24_11 = 42 << 8


class FakeStepd:
    """A FAKE extern-step slurmstepd: one thread on a unix socket speaking the protocol of src/slurmd/slurmstepd/
    req.c as the real one does (an int protocol version in, its own version or -1 out; then an int request and
    a pid_t in, an int rc out; REQUEST_STEP_STAT in, its usage out), recording what it was sent and the caller's
    uid from SO_PEERCRED. `mode`:
    "adopt" (rc 0, then `on_adopt(pid)` as the real stepd's plugins would move the pid), "refuse" (rc -1, as
    for a pid its plugins could not add), "close" (the request read, the socket closed with no reply: 26.05
    for a step that is ending or a caller it does not authorize), "handshake" (-1 to the protocol version),
    "cut" (a stat reply that stops half-way)."""

    def __init__(self, path: Path, mode: str, on_adopt: Callable[[int], None] | None = None,
                 version: int = STEPD_24_11) -> None:
        self.path, self.mode, self.on_adopt, self.version = path, mode, on_adopt, version
        self.received: list[int] = []
        self.peer_uid = -1
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _read(self, conn: socket.socket) -> int:
        data = b""
        while len(data) < INT.size:
            chunk = conn.recv(INT.size - len(data))
            assert chunk, "the client closed early"
            data += chunk
        value = int(INT.unpack(data)[0])
        self.received.append(value)
        return value

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            self.peer_uid = struct.unpack("3i", creds)[1]
            self._read(conn)
            if self.mode == "handshake":
                conn.sendall(INT.pack(-1))
                return
            conn.sendall(INT.pack(self.version))
            try:
                request = self._read(conn)
            except AssertionError:
                return  # the client hung up after the handshake
            if request == stepd.REQUEST_STEP_STAT:
                # _handle_stat_jobacct: int len, len bytes of packed jobacctinfo, int number of tasks.
                usage = bytes(range(200))
                if self.mode == "cut":
                    conn.sendall(INT.pack(len(usage)) + usage[:50])
                    return
                conn.sendall(INT.pack(len(usage)) + usage + INT.pack(1))
                return
            pid = self._read(conn)
            if self.mode == "close":
                return
            rc = 0 if self.mode == "adopt" and request == stepd.REQUEST_ADD_EXTERN_PID else -1
            if rc == 0 and self.on_adopt is not None:
                self.on_adopt(pid)
            conn.sendall(INT.pack(rc))

    def close(self) -> None:
        self.server.close()
        self.thread.join(timeout=5)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # A unix socket's path must fit in 108 bytes; pytest's tmp_path may not.
    folder = Path(tempfile.mkdtemp(prefix="stepd-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _socket(folder: Path) -> Path:
    return folder / stepd.socket_name("node1", "42")


def test_the_stepd_adopts_the_pid_sent_as_the_real_protocol_says(short_dir: Path) -> None:
    fake = FakeStepd(_socket(short_dir), "adopt")
    try:
        version = stepd.adopt(fake.path, "42", 4242)
    finally:
        fake.close()
    # The wire: the protocol version, REQUEST_ADD_EXTERN_PID (22 in 22.05, 24.11, 26.05), the pid.
    assert fake.received == [45 << 8, 22, 4242]
    assert version == STEPD_24_11 and stepd.version_name(version) == "42.0"
    # The stepd checks its caller by SO_PEERCRED: it sees the agent's own uid.
    assert fake.peer_uid == os.geteuid()
    assert fake.path.name == "node1_42.4294967292"


@pytest.mark.parametrize(("mode", "said"), [
    ("refuse", "it refused (rc -1"),
    ("close", "slurmstepd closed the socket before its answer"),
    ("handshake", "it refused the connection (answered -1 to protocol version 11520"),
])
def test_a_refusal_or_a_closed_socket_is_an_error_naming_the_job_and_the_pid(short_dir: Path, mode: str,
                                                                              said: str) -> None:
    fake = FakeStepd(_socket(short_dir), mode)
    try:
        with pytest.raises(stepd.StepdError) as caught:
            stepd.adopt(fake.path, "42", 4242)
    finally:
        fake.close()
    message = str(caught.value)
    assert message.startswith(f"job 42: the extern step's slurmstepd ({fake.path}) did not adopt pid 4242: ")
    assert said in message, message
    # The fault happened where it was forced: the handshake refused before any request, the others after it.
    assert fake.received == ([45 << 8] if mode == "handshake" else [45 << 8, 22, 4242])


def test_a_poll_reads_the_stepds_whole_usage_reply_and_a_cut_one_is_an_error(short_dir: Path) -> None:
    fake = FakeStepd(_socket(short_dir), "adopt")
    try:
        assert stepd.poll(fake.path, "42") == 1
    finally:
        fake.close()
    # The request sent is sstat's: REQUEST_STEP_STAT (17) after the handshake, nothing else.
    assert fake.received == [45 << 8, 17]
    (short_dir / fake.path.name).unlink()
    cut = FakeStepd(_socket(short_dir), "cut")
    try:
        with pytest.raises(stepd.StepdError, match=r"^job 42: the extern step's slurmstepd .* did not report its "
                                                   r"usage: slurmstepd closed the socket after 50 of 200 bytes"):
            stepd.poll(cut.path, "42")
    finally:
        cut.close()
    assert cut.received == [45 << 8, 17]


def test_no_stepd_listening_is_an_error_too(short_dir: Path) -> None:
    with pytest.raises(stepd.StepdError, match=r"^job 42: .* did not adopt pid 7: .*No such file"):
        stepd.adopt(_socket(short_dir), "42", 7)


NET_UNIX = """\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 4711 /tmp/bed/slurmd/node2/node2_42.4294967292
0000000000000000: 00000002 00000000 00010000 0001 01 4712 /tmp/bed/slurmd/node1/node1_42.4294967291
0000000000000000: 00000002 00000000 00010000 0001 01 4713 /tmp/bed/slurmd/node1/node1_42.4294967292
0000000000000000: 00000002 00000000 00010000 0001 01 4714 @/abstract/node1_42.4294967292
0000000000000000: 00000003 00000000 00000000 0001 03 4715
"""


def test_the_socket_is_the_one_the_nodes_extern_stepd_bound(tmp_path: Path) -> None:
    (tmp_path / "123" / "net").mkdir(parents=True)
    (tmp_path / "123" / "net" / "unix").write_text(NET_UNIX)
    with mock.patch.object(stepd, "extern_stepd_pids", return_value=[123]):
        # Not node2's (several slurmd on one host), not the batch step's (.4294967291), not an abstract name.
        assert stepd.find_socket("node1", "42", tmp_path) == Path("/tmp/bed/slurmd/node1/node1_42.4294967292")
        assert stepd.find_socket("node2", "42", tmp_path) == Path("/tmp/bed/slurmd/node2/node2_42.4294967292")
        with pytest.raises(stepd.StepdError, match=r"^job 43: no socket node1_43\.4294967292 .* \(1 `slurmstepd"):
            stepd.find_socket("node1", "43", tmp_path)
    # No extern slurmstepd of that job runs here at all.
    with pytest.raises(stepd.StepdError, match=r"0 `slurmstepd: \[999999999\.extern\]` process"):
        stepd.find_socket("node1", "999999999")


def _engine() -> tuple[subprocess.Popen[bytes], int]:
    """A process with a child, as an engine with its engine core."""
    engine = subprocess.Popen(["/bin/sh", "-c", "sleep 30 & wait"])
    for _ in range(200):
        children = psutil.Process(engine.pid).children()
        if children:
            return engine, children[0].pid
        time.sleep(0.01)
    raise AssertionError("the engine's child did not start")


def _node(tmp_path: Path, engine_pid: int) -> tuple[Path, list[Hierarchy]]:
    cg = tmp_path / "cg"
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mounts").write_text(
        f"cgroup {cg}/memory cgroup rw,memory 0 0\ncgroup {cg}/freezer cgroup rw,freezer 0 0\n"
        f"cgroup {cg}/devices cgroup rw,devices 0 0\n")
    (proc / str(engine_pid)).mkdir()
    (proc / str(engine_pid) / "cgroup").write_text("5:memory:/\n4:freezer:/\n3:devices:/\n")
    step = "slurm_node1/uid_1001/job_42/step_extern"
    targets = [Hierarchy(cg / name, f"/{step}") for name in ("memory", "freezer", "devices")]
    return proc, targets


def _writes() -> tuple[list[tuple[str, int]], Callable[..., int]]:
    """Records the pids written into cgroup.procs files (the fake hierarchies are plain folders); any other
    write (the fake stepd's plugins rewriting /proc/PID/cgroup) goes through."""
    written: list[tuple[str, int]] = []
    real_write = Path.write_text

    def write(path: Path, text: str, *args: object, **kwargs: object) -> int:
        if path.name != "cgroup.procs":
            return real_write(path, text)
        written.append((str(path.parent), int(text)))
        return len(text)
    return written, write


def test_an_adopted_engine_is_where_the_stepd_put_it_and_its_children_follow(tmp_path: Path,
                                                                             short_dir: Path) -> None:
    engine, child = _engine()
    proc, targets = _node(tmp_path, engine.pid)
    cg = tmp_path / "cg"
    step = "/slurm_node1/uid_1001/job_42/step_extern"

    def plugins(pid: int) -> None:
        # What the real stepd's plugins do (22.05, v1): memory and the accounting into the task, freezer the
        # step; devices is left out here, so the agent must join that one by hand.
        (proc / str(pid) / "cgroup").write_text(f"5:memory:{step}/task_0\n4:freezer:{step}\n3:devices:/\n")

    fake = FakeStepd(_socket(short_dir), "adopt", plugins)
    written, write = _writes()
    try:
        with mock.patch.object(stepd, "find_socket", return_value=fake.path), \
                mock.patch.object(Path, "write_text", write):
            found, adopted = JobCgroups("node1", proc=proc).contain_extern("42", engine.pid, targets)
    finally:
        fake.close()
        engine.kill()
        engine.wait()
    assert adopted == fake.path and fake.received == [45 << 8, 22, engine.pid]
    assert sorted((h.mountpoint.name, h.path) for h in found) == [
        ("devices", step), ("freezer", step), ("memory", f"{step}/task_0")]
    # The engine's child, forked before the adoption, follows it into the task's memory cgroup.
    assert (str(cg / "memory" / step.lstrip("/") / "task_0"), child) in written
    assert (str(cg / "devices" / step.lstrip("/")), engine.pid) in written
    # Nothing went to the step's own memory folder (outside the task Slurm accounts).
    assert not [w for w in written if w[0] == str(cg / "memory" / step.lstrip("/"))]


def test_a_refusing_stepd_leaves_the_engine_contained_by_hand_with_a_warning(tmp_path: Path, short_dir: Path,
                                                                            caplog: pytest.LogCaptureFixture
                                                                            ) -> None:
    engine, child = _engine()
    proc, targets = _node(tmp_path, engine.pid)
    fake = FakeStepd(_socket(short_dir), "refuse")
    written, write = _writes()
    try:
        with mock.patch.object(stepd, "find_socket", return_value=fake.path), \
                mock.patch.object(Path, "write_text", write), caplog.at_level(logging.WARNING):
            found, adopted = JobCgroups("node1", proc=proc).contain_extern("42", engine.pid, targets)
    finally:
        fake.close()
        engine.kill()
        engine.wait()
    # The refusal happened (the request reached the stepd and was answered -1) ...
    assert fake.received == [45 << 8, 22, engine.pid]
    assert adopted is None and found == targets
    # ... and containment was not lost: the engine and its child are in every hierarchy of the step.
    for target in targets:
        assert (str(target.directory), engine.pid) in written and (str(target.directory), child) in written
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert f"job 42: the extern step's slurmstepd ({fake.path}) did not adopt pid {engine.pid}: it refused " \
           "(rc -1" in warning[0].getMessage()
    assert "writing the engine's pids into the extern step's cgroups instead" in warning[0].getMessage()


def test_a_22_05_stepd_is_not_asked_and_the_engine_is_written_in_by_hand(tmp_path: Path, short_dir: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """22.05 counts an engine written into its extern step's cgroups through the step's own task, and counted an
    adopted one twice (bench/extern_accounting.py): below 24.11's protocol the agent only shakes hands."""
    engine, child = _engine()
    proc, targets = _node(tmp_path, engine.pid)
    fake = FakeStepd(_socket(short_dir), "adopt", version=STEPD_22_05)
    written, write = _writes()
    try:
        with mock.patch.object(stepd, "find_socket", return_value=fake.path), \
                mock.patch.object(Path, "write_text", write), caplog.at_level(logging.INFO):
            found, adopted = JobCgroups("node1", proc=proc).contain_extern("42", engine.pid, targets)
    finally:
        fake.close()
        engine.kill()
        engine.wait()
    assert fake.received == [45 << 8]  # the handshake, and no request
    assert adopted is None and found == targets
    for target in targets:
        assert (str(target.directory), engine.pid) in written and (str(target.directory), child) in written
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("it speaks protocol 38.0, older than 42.0" in r.getMessage() for r in caplog.records)


def test_no_extern_step_means_no_request_and_nothing_contained() -> None:
    with mock.patch.object(stepd, "adopt") as adopt:
        assert JobCgroups("node1").contain_extern("42", os.getpid(), []) == ([], None)
    adopt.assert_not_called()


def test_an_ended_child_is_read_without_reaping_it_and_still_answers_kill_0() -> None:
    running = subprocess.Popen(["sleep", "30"])
    exits = subprocess.Popen(["/bin/sh", "-c", "exit 3"])
    try:
        assert stepd.exit_status_unreaped(running.pid) is None
        running.kill()
        for child, code in ((running, -9), (exits, 3)):
            for _ in range(500):
                if stepd.exit_status_unreaped(child.pid) is not None:
                    break
                time.sleep(0.01)
            assert stepd.exit_status_unreaped(child.pid) == code
            # Not reaped: a zombie, which kill(pid, 0) still reaches (what the stepd's watcher of the pid asks).
            assert psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE
            os.kill(child.pid, 0)
            assert child.returncode is None
            # Control: reaping it makes kill(pid, 0) fail, as it did for the stepd's watcher.
            assert child.wait(timeout=5) == code
            with pytest.raises(ProcessLookupError):
                os.kill(child.pid, 0)
    finally:
        running.kill()
        running.wait()
    with pytest.raises(ChildProcessError):
        stepd.exit_status_unreaped(1)


def test_the_socket_owner_is_the_stepd_listening_on_that_path(tmp_path: Path) -> None:
    for pid, table in ((123, NET_UNIX.replace("node1/node1_42.4294967292", "node1/other")), (124, NET_UNIX)):
        (tmp_path / str(pid) / "net").mkdir(parents=True)
        (tmp_path / str(pid) / "net" / "unix").write_text(table)
    path = Path("/tmp/bed/slurmd/node1/node1_42.4294967292")
    with mock.patch.object(stepd, "extern_stepd_pids", return_value=[122, 123, 124]):
        assert stepd.socket_owner(path, "42", tmp_path) == 124
        assert stepd.socket_owner(Path("/tmp/bed/slurmd/node1/node1_42.4294967291.x"), "42", tmp_path) is None
    with mock.patch.object(stepd, "extern_stepd_pids", return_value=[]):
        assert stepd.socket_owner(path, "42", tmp_path) is None


def _sleepers(count: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen(["sleep", "30"]) for _ in range(count)]


async def test_an_adopted_engine_that_died_is_reaped_only_once_its_stepd_exited(tmp_path: Path) -> None:
    """The fix for a 24.11 stepd's segfault at the job's end (stepd.py): the real EngineManager sees the adopted
    engine's end at once but keeps its zombie while the extern step's slurmstepd (here a stand-in process) runs;
    control: an engine no stepd adopted is reaped at once, as before."""
    config = Config(agent=AgentConfig(address="127.0.0.1", run_dir=str(tmp_path / "run")), models=[])
    manager = engines.EngineManager(config, RecordStore(tmp_path / "run" / "engines"), mock.Mock(), Gpus())
    stand_in, adopted_engine, plain_engine = _sleepers(3)
    adopted = engines._Running(record=types.SimpleNamespace(job_id="42"), identity=mock.Mock(),  # type: ignore
                               popen=adopted_engine, log_path=tmp_path / "log", stepd_socket=Path("/x/sock"))
    plain = engines._Running(record=types.SimpleNamespace(job_id="43"), identity=mock.Mock(),  # type: ignore
                             popen=plain_engine, log_path=tmp_path / "log")
    try:
        with mock.patch.object(stepd, "socket_owner", return_value=stand_in.pid) as owner, \
                mock.patch.object(engines, "ZOMBIE_HOLD_POLL_S", 0.02):
            assert manager._alive(adopted) and manager._alive(plain)
            adopted_engine.kill()
            plain_engine.kill()
            for _ in range(500):
                if not manager._alive(adopted) and not manager._alive(plain):
                    break
                await asyncio.sleep(0.01)
            assert not manager._alive(adopted) and not manager._alive(plain)
            # Its end is known (the code _on_exit reports), one reaper waits, and the zombie stays.
            assert adopted.exit_code == -9 and adopted.reaping is not None and not adopted.reaping.done()
            await asyncio.sleep(0.2)
            assert adopted_engine.returncode is None
            assert psutil.Process(adopted_engine.pid).status() == psutil.STATUS_ZOMBIE
            owner.assert_called_once_with(Path("/x/sock"), "42")
            # The control: not adopted, so reaped at once by Popen.poll as before.
            assert plain_engine.returncode == -9 and plain.reaping is None
            # The stepd exits: the engine is reaped within a poll.
            stand_in.kill()
            stand_in.wait()
            await asyncio.wait_for(adopted.reaping, timeout=2)
            assert adopted_engine.returncode == -9 and not psutil.pid_exists(adopted_engine.pid)
    finally:
        for process in (stand_in, adopted_engine, plain_engine):
            process.kill()
            process.wait()



def _template_child(sock: Path, folder: Path) -> int:
    uid, gid = (65534, 65534) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    request = warmstart.spawn_request(["30"], uid=uid, gid=gid, groups=[gid], cwd=str(folder),
                                      log_path=folder / "engine.log")
    request["module"] = "sleeper"
    env_fd = warmstart.env_descriptor({"PATH": "/usr/bin:/bin"})
    try:
        return int(warmstart.call(sock, request, fds=[env_fd])["pid"])
    finally:
        os.close(env_fd)


def test_the_template_keeps_a_held_engines_zombie_until_asked_for_its_exit() -> None:
    """A warm engine is the template's child, which reaped it within 0.2 s of its end: held (WarmProcess.hold,
    asked once its stepd adopted it), its zombie stays for kill(pid, 0) until poll() asks for its exit; control: a
    child not held is reaped by the template as before."""
    folder = Path(tempfile.mkdtemp(prefix="stepd-warm-", dir="/tmp"))
    folder.chmod(0o777)
    (folder / "sleeper.py").write_text("import sys, time\ntime.sleep(int(sys.argv[1]))\n")
    sock = folder / "t.sock"
    template = subprocess.Popen([sys.executable, str(warmstart.TEMPLATE_SCRIPT), "--socket", str(sock)],
                                env={**os.environ, "PYTHONPATH": str(folder)}, stdout=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if sock.exists():
                break
            time.sleep(0.05)
        held_pid, plain_pid = _template_child(sock, folder), _template_child(sock, folder)
        held = WarmProcess(held_pid, ProcessIdentity.of(held_pid), sock)
        assert held.hold() and not WarmProcess(4_000_000, held.identity, sock).hold()
        # Held and not exited (running, or a dead leader whose threads still exit): not ended yet.
        assert held.peek() == (False, None)
        os.kill(held_pid, signal.SIGKILL)
        os.kill(plain_pid, signal.SIGKILL)
        # The control first: the template reaps a child not held within its 0.2 s (bounded wait under load).
        for _ in range(250):
            if not psutil.pid_exists(plain_pid):
                break
            time.sleep(0.02)
        with pytest.raises(ProcessLookupError):
            os.kill(plain_pid, 0)
        time.sleep(0.5)  # more of the template's reaps
        assert psutil.Process(held_pid).status() == psutil.STATUS_ZOMBIE and not held.identity.alive()
        os.kill(held_pid, 0)
        # Its exit code is read without reaping it (what the agent reports); the zombie stays.
        assert held.peek() == (True, -9) and held.returncode is None
        assert WarmProcess(plain_pid, held.identity, sock).peek() == (True, None)
        os.kill(held_pid, 0)
        assert held.poll() == -9
        with pytest.raises(ProcessLookupError):
            os.kill(held_pid, 0)
    finally:
        template.kill()
        template.wait()
        shutil.rmtree(folder, ignore_errors=True)
