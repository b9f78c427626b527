"""Ownership of an engine's processes: spawning it as the job's user, and killing every process it started.

An engine runs in a session of its own (setsid), so its whole tree shares one session id even after the agent
that started it is gone, and carries `SLINFER_ENGINE_JOB=JOBID@RUN_DIR` in its environment, which catches
children that left the session. The agent's run folder is part of the tag because job ids are unique only
within one Slurm cluster, and two agents (two beds, two clusters) may share a machine. This module knows
nothing of engine states, health or Slurm.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

ENGINE_MARKER = "SLINFER_ENGINE_JOB"


def engine_tag(job_id: str, run_dir: str) -> str:
    """The value of ENGINE_MARKER for one job's engine under one agent."""
    return f"{job_id}@{run_dir}"


@dataclass(frozen=True)
class ProcessIdentity:
    """A process we started, told apart from a later process that reuses its pid by its start time."""

    pid: int
    create_time: float

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity:
        """The identity of a running pid; one that is already gone gets a start time that matches nothing."""
        try:
            return cls(pid, psutil.Process(pid).create_time())
        except psutil.NoSuchProcess:
            return cls(pid, 0.0)

    def alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 0.05:
                return False
            return proc.status() != psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False


# Enters the job's folder (else the fallback) and execs the engine, already as the job's user: Popen changes
# folder before it drops privileges, and root must not enter a folder on the user's behalf. The script is a
# constant; the folders and argv reach it as arguments, never as shell text.
CHDIR_THEN_EXEC = 'cd -- "$1" 2>/dev/null || cd -- "$2" || exit 125; shift 2; exec "$@"'


def open_log(log_path: Path, uid: int, gid: int) -> int:
    """The engine's log, appended to: readable by the job's user and root only (it holds what the engine
    prints); never a link planted in its place."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        if os.geteuid() == 0:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return fd


def spawn_as_user(argv: Sequence[str], *, uid: int, gid: int, user: str, env: Mapping[str, str], cwd: str,
                  fallback_cwd: str, log_path: Path) -> tuple[subprocess.Popen[bytes], ProcessIdentity]:
    """Starts argv as uid:gid in a new session, in cwd (fallback_cwd where the user cannot enter it), output
    appended to log_path."""
    groups: list[int] = []
    if os.geteuid() == 0:
        try:
            groups = os.getgrouplist(user, gid) if user else [gid]
        except OSError:
            groups = [gid]
    log_fd = open_log(log_path, uid, gid)
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", CHDIR_THEN_EXEC, "slinfer-engine", cwd, fallback_cwd, *argv], env=dict(env), cwd="/",
            stdin=subprocess.DEVNULL, stdout=log_fd, stderr=subprocess.STDOUT, close_fds=True,
            start_new_session=True,
            **({"user": uid, "group": gid, "extra_groups": groups} if os.geteuid() == 0 else {}),
        )
    finally:
        os.close(log_fd)
    try:
        _wait_for_exec(proc, argv[0], (cwd, fallback_cwd))
    except OSError:
        proc.wait()
        raise
    try:
        created = psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:
        created = 0.0
    return proc, ProcessIdentity(proc.pid, created)


# How long the wrapper may take to enter the folder and exec: milliseconds on an idle node.
EXEC_WAIT_S = 10.0


def _wait_for_exec(proc: subprocess.Popen[bytes], program: str, folders: tuple[str, str]) -> None:
    """Returns once the wrapper has exec'd the engine (its /proc cmdline is no longer the wrapper's); raises the
    OSError that a direct exec would have raised when the wrapper could not enter a folder or exec the program."""
    wrapper = b"\0".join(part.encode() for part in ["/bin/sh", "-c", CHDIR_THEN_EXEC]) + b"\0"
    deadline = time.monotonic() + EXEC_WAIT_S
    while time.monotonic() < deadline:
        code = proc.poll()
        if code == 125:
            raise OSError(errno.EACCES, f"cannot enter the job's folder {folders[0]!r} nor {folders[1]!r}")
        if code == 126:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
        if code == 127:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
        if code is not None:
            return
        try:
            with open(f"/proc/{proc.pid}/cmdline", "rb") as cmdline:
                current = cmdline.read()
        except OSError:
            current = b""
        # An empty cmdline is a wrapper that exited after the poll above (a zombie has none): the next poll
        # gives its status. Taking it for an exec'd engine passed a failed exec as a start (CI, under load).
        if current and not current.startswith(wrapper):
            return
        time.sleep(0.002)


def user_home(user: str, uid: int) -> str:
    try:
        entry = pwd.getpwnam(user) if user else pwd.getpwuid(uid)
        return entry.pw_dir
    except KeyError:
        return ""


def engine_processes(tag: str, session_id: int) -> list[psutil.Process]:
    """Every live process of the engine: its session, plus whatever carries its tag."""
    found: dict[int, psutil.Process] = {}
    marker = f"{ENGINE_MARKER}={tag}"
    for proc in psutil.process_iter(["pid", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
            continue
        try:
            if session_id > 0 and os.getsid(proc.pid) == session_id:
                found[proc.pid] = proc
                continue
            with open(f"/proc/{proc.pid}/environ", "rb") as env_file:
                if marker.encode() in env_file.read().split(b"\0"):
                    found[proc.pid] = proc
        except (OSError, psutil.Error):
            continue
    return list(found.values())


def signal_all(processes: list[psutil.Process], sig: signal.Signals) -> None:
    for proc in processes:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass


def terminate_engine(tag: str, session_id: int, grace_s: float) -> list[int]:
    """SIGTERM to the engine's processes, SIGKILL after grace_s; returns the pids still alive at the end."""
    procs = engine_processes(tag, session_id)
    if not procs:
        return []
    log.info("engine %s: SIGTERM to %d engine processes %s", tag, len(procs), [p.pid for p in procs])
    signal_all(procs, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        procs = engine_processes(tag, session_id)
        if not procs:
            return []
        time.sleep(0.1)
    log.warning("engine %s: %d processes outlived %.0fs of grace, SIGKILL %s", tag, len(procs), grace_s,
                [p.pid for p in procs])
    for _ in range(50):
        signal_all(procs, signal.SIGKILL)
        time.sleep(0.1)
        procs = engine_processes(tag, session_id)
        if not procs:
            return []
    return [p.pid for p in procs]
