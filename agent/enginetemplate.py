"""The warm engine template: a root process of the engine Python that has imported torch and vLLM once, started no
thread, and forks one engine per request.

Responsible for: importing the modules named by --preload, listening on a root-only unix socket for requests
(one JSON line in, one JSON line out per connection), refusing to fork while any thread other than its own runs,
forking a child per `spawn` request that takes the job's session, log, groups, gid, uid (verified), environment,
folder and argv and then runs the requested module as `__main__` (what `python -m MODULE ARGS` runs), reaping
its children and answering what became of each. Not responsible for: deciding which job gets a warm engine,
containment, health or stopping engines (the agent does, as for a cold start).

No job's secret ever enters this process: a `spawn` request carries no environment. The job's environment (its
engine's API key among it) comes as a file descriptor beside the request (SCM_RIGHTS), which the template
closes unread after the fork; only the child reads it, after it has become the job's user. So no later child,
whose memory its own user can read, inherits an earlier job's key from the template's heap.

This file runs with the site's engine Python, which may be another venv than the agent's: it imports nothing of
slinfer and only the standard library before --preload. The agent's side of the protocol is `warmstart.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import runpy
import select
import socket
import sys
import threading
import traceback
from typing import Any

# Variables that the preloaded imports set and that name the template's own user: left for the engine to compute.
USER_SPECIFIC = frozenset({"TORCHINDUCTOR_CACHE_DIR"})
# One request or answer is a JSON object on one line; an engine's argv and environment fit well within this.
MAX_LINE = 1 << 20
# How often the loop wakes to reap children when no request comes: a dead engine's status is known within this.
REAP_INTERVAL_S = 0.2
# Descriptors a request may carry (a spawn carries one: its environment); more are closed and refused.
MAX_FDS = 4
# Exit statuses kept for the agent to ask about; older ones are dropped so that a long-lived template stays small.
KEEP_EXITS = 1024


def thread_count() -> tuple[int, int]:
    """Python's threads and the kernel's tasks of this process; a fork is safe only when both are 1."""
    try:
        tasks = len(os.listdir("/proc/self/task"))
    except OSError:
        tasks = -1
    return threading.active_count(), tasks


def _force_fork_in_vllm() -> None:
    """vLLM's CPU platform overrides VLLM_WORKER_MULTIPROC_METHOD to spawn while it builds the engine config,
    which would make the EngineCore import torch and vLLM again. In a warm child nothing holds CUDA or OpenMP
    state, so the fork that the job asked for (its environment) is put back after that override."""
    try:
        from vllm.platforms.cpu import CpuPlatform
    except Exception:  # not vLLM, or not its CPU build: nothing to undo
        return
    original = CpuPlatform.check_and_update_config.__func__  # type: ignore[attr-defined]

    def check_and_update_config(cls: Any, vllm_config: Any) -> None:
        wanted = os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")
        original(cls, vllm_config)
        if wanted:
            os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = wanted

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)  # type: ignore[method-assign]
    try:
        from vllm.model_executor.models import registry
    except Exception:
        return
    # vLLM inspects a model's class in a fresh `python -m ...registry` so that CUDA stays uninitialised in the
    # API server: 15-20 s of imports again. A forked child keeps that isolation and inherits the imports.
    registry._run_in_subprocess = _run_in_forked_child
    try:
        import setproctitle
    except ImportError:
        return
    # vLLM names its processes (VLLM::EngineCore, VLLM::Worker) with setproctitle, which writes over the argv
    # memory it found at import, in the template; /proc now reads this process's argv elsewhere.
    setproctitle.setproctitle = _set_title


def _set_title(title: str) -> None:
    try:
        publish_in_proc([title])
    except OSError:
        return
    ctypes.CDLL(None).prctl(PR_SET_NAME, title.encode()[:15], 0, 0, 0)


def _run_in_forked_child(fn: Any) -> Any:
    """What vLLM's registry `_run_in_subprocess` does (fn's result, or its error), in a fork instead of a new
    interpreter."""
    import pickle

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        code = 0
        try:
            try:
                payload = pickle.dumps((True, fn()))
            except BaseException as exc:  # sent back and raised in the parent
                payload = pickle.dumps((False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
            with os.fdopen(write_fd, "wb") as out:
                out.write(payload)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as inp:
        data = inp.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise RuntimeError(f"model inspection child exited with {os.waitstatus_to_exitcode(status)}")
    ok, value = pickle.loads(data)
    if not ok:
        raise RuntimeError(f"Error raised in subprocess:\n{value}")
    return value


# prctl(PR_SET_MM, PR_SET_MM_MAP, ...): replaces where the kernel reads /proc/PID/cmdline and /proc/PID/environ
# from, for the process itself, without CAP_SYS_RESOURCE (which the single PR_SET_MM_ARG_START and the like need).
PR_SET_MM, PR_SET_MM_MAP = 35, 14
# prctl option: the 15-character name `ps -o comm` and /proc/PID/stat show.
PR_SET_NAME = 15
# The blocks those now point at: they must live as long as the process.
_PUBLISHED: list[Any] = []


def publish_in_proc(argv: list[str], env: dict[str, str] | None = None) -> None:
    """Makes /proc/self/cmdline and /proc/self/environ show the engine's argv and environment instead of the
    template's: the agent finds and kills an engine's processes by the marker in its environ, and people read
    `ps`. Raises OSError where the kernel refuses (no CONFIG_CHECKPOINT_RESTORE)."""
    class MmMap(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint64) for name in (
            "start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack", "arg_start",
            "arg_end", "env_start", "env_end")] + [("auxv", ctypes.c_void_p), ("auxv_size", ctypes.c_uint32),
                                                   ("exe_fd", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    libc.sbrk.restype = ctypes.c_void_p
    with open("/proc/self/stat", "rb") as stat_file:
        fields = stat_file.read().rsplit(b")", 1)[1].split()

    def field(number: int) -> int:  # proc(5) numbers them from 1; the list starts at the 3rd
        return int(fields[number - 3])

    blocks = []
    for items in (argv, [f"{k}={v}" for k, v in env.items()] if env is not None else None):
        if items is None:  # the environment stays where it is
            blocks.append((field(50), field(51)))
            continue
        blob = b"".join(item.encode() + b"\0" for item in items) or b"\0"
        buf = ctypes.create_string_buffer(blob, len(blob))
        _PUBLISHED.append(buf)
        blocks.append((ctypes.addressof(buf), ctypes.addressof(buf) + len(blob)))
    mm = MmMap(start_code=field(26), end_code=field(27), start_data=field(45), end_data=field(46),
               start_brk=field(47), brk=libc.sbrk(0) or 0, start_stack=field(28), arg_start=blocks[0][0],
               arg_end=blocks[0][1], env_start=blocks[1][0], env_end=blocks[1][1], auxv=None, auxv_size=0,
               exe_fd=0xFFFFFFFF)
    if libc.prctl(PR_SET_MM, PR_SET_MM_MAP, ctypes.byref(mm), ctypes.sizeof(mm), 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_MM, PR_SET_MM_MAP): {os.strerror(errno)}")


# prctl option: the "dumpable" flag that owns /proc/PID/* by the process's uid, as after an exec.
PR_SET_DUMPABLE = 4


def _set_dumpable() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_DUMPABLE): {os.strerror(errno)}")


def _read_env(env_fd: int) -> dict[str, str]:
    """The job's environment from the descriptor the agent sent (a JSON object), read to its end and closed."""
    chunks = []
    with os.fdopen(env_fd, "rb") as source:
        source.seek(0)
        while chunk := source.read(65536):
            chunks.append(chunk)
    env = json.loads(b"".join(chunks))
    if not isinstance(env, dict):
        raise ValueError("the environment descriptor holds no JSON object")
    return {str(k): str(v) for k, v in env.items()}


def _child(request: dict[str, Any], env_fd: int, closing: list[socket.socket], import_env: dict[str, str]) -> None:
    """Becomes the job's engine; never returns."""
    code = 1
    try:
        for sock in closing:
            sock.close()
        os.setsid()
        # The job's user and root only: the log holds what the engine prints, which is the job's business.
        log_fd = os.open(request["log_path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        if os.geteuid() == 0:
            os.fchown(log_fd, int(request["uid"]), int(request["gid"]))
            os.fchmod(log_fd, 0o600)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null_fd, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(null_fd)
        os.close(log_fd)
        uid, gid = int(request["uid"]), int(request["gid"])
        module = str(request["module"])
        args = [str(a) for a in request["args"]]
        if os.geteuid() == 0:
            os.setgroups([int(g) for g in request.get("groups", [])])
            os.setgid(gid)
            os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid or os.getegid() != gid:
            raise PermissionError(f"could not become uid {uid} gid {gid} (now {os.getuid()}/{os.geteuid()} "
                                  f"{os.getgid()}/{os.getegid()})")
        # The job's environment, read only now, as the job's user: the key never was in the template. Then what
        # the preloaded imports set (a cold start's imports would set it too, e.g. torch's
        # PYTORCH_NVML_BASED_CUDA_CHECK) where the job's does not say otherwise.
        env = {**import_env, **_read_env(env_fd)}
        try:
            publish_in_proc([sys.executable, "-m", module, *args], env)
        except OSError as exc:
            print(f"slinfer engine template: /proc shows the template's argv and environment: {exc}", file=sys.stderr)
        # A uid change makes the process undumpable: /proc/PID/* then stays root's, and the job's user could not
        # read or debug their own engine. An exec (the cold start) sets it back; the fork does it here. Its
        # memory holds its own job's secrets only: the template never held any (see the module's docstring).
        _set_dumpable()
        os.environ.clear()
        os.environ.update(env)
        # As the job's user: root would reach a folder the user may not, for them. Its home where it cannot.
        try:
            os.chdir(request["cwd"])
        except OSError:
            os.chdir(env.get("HOME", "/"))
        sys.argv = [module, *args]
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        if module.startswith("vllm."):
            # After the environment: vLLM's platform module reads it when imported, as in a cold start.
            _force_fork_in_vllm()
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # whatever the engine raised ends it, with the traceback in its log
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def freeze_heap() -> None:
    """Moves every object the imports made into the collector's permanent generation, which no collection
    visits. A child inherits that: vLLM collects several times while it starts (after loading weights, before
    freezing its own heap), and each full collection of the template's millions of imported objects took
    0.5-1.5 s of a warm start's CPU and wrote to every page holding one, copying it from the template (measured
    with bench/warmstart.py and py-spy: a tiny engine's start 3.8 s of CPU before, 1.8 s after)."""
    gc.collect()
    gc.freeze()


class Template:
    def __init__(self, listener: socket.socket, import_env: dict[str, str] | None = None) -> None:
        self.listener = listener
        self.import_env = import_env or {}
        self.children: set[int] = set()
        self.exits: dict[int, int] = {}
        # Children whose zombie stays until the agent asks for their exit: an engine a slurmstepd adopted, which
        # a 24.11 stepd must still find with kill(pid, 0) during its step's teardown (agent/stepd.py says why).
        self.held: set[int] = set()

    def reap(self) -> None:
        for pid in list(self.children - self.held):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                self.children.discard(pid)
                self.exits[pid] = os.waitstatus_to_exitcode(status)
                while len(self.exits) > KEEP_EXITS:
                    del self.exits[next(iter(self.exits))]

    def answer(self, request: dict[str, Any], conn: socket.socket, fds: list[int]) -> dict[str, Any]:
        op = request.get("op")
        if op == "ping":
            threads, tasks = thread_count()
            return {"ok": True, "pid": os.getpid(), "threads": threads, "tasks": tasks,
                    "python": sys.executable, "children": sorted(self.children), "frozen": gc.get_freeze_count()}
        if op == "hold":
            pid = int(request.get("pid", 0))
            if pid in self.children:
                self.held.add(pid)
            return {"ok": True, "pid": pid, "held": pid in self.held}
        if op == "peek":
            # A held child's exit status, read without reaping it (waitid's WNOWAIT).
            pid = int(request.get("pid", 0))
            if pid not in self.held:
                return {"ok": True, "pid": pid, "exited": False, "held": False}
            try:
                seen = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                seen = None
            if seen is None or seen.si_pid == 0:
                return {"ok": True, "pid": pid, "exited": False, "held": True}
            code = -seen.si_status if seen.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else seen.si_status
            return {"ok": True, "pid": pid, "exited": True, "code": code, "held": True}
        if op == "exit":
            pid = int(request.get("pid", 0))
            self.held.discard(pid)
            self.reap()
            if pid in self.exits:
                return {"ok": True, "pid": pid, "exited": True, "code": self.exits[pid]}
            return {"ok": True, "pid": pid, "exited": False, "known": pid in self.children}
        if op == "spawn":
            threads, tasks = thread_count()
            if threads != 1 or tasks != 1:
                return {"ok": False, "error": f"template runs {threads} Python threads and {tasks} tasks: "
                                              "refusing to fork"}
            missing = [k for k in ("args", "uid", "gid", "cwd", "log_path", "module") if k not in request]
            if len(fds) != 1:
                missing.append("its environment (one descriptor beside the request)")
            if "env" in request:
                return {"ok": False, "error": "spawn request carries an environment: it must come as a descriptor"}
            if missing:
                return {"ok": False, "error": f"spawn request lacks {', '.join(missing)}"}
            pid = os.fork()
            if pid == 0:
                _child(request, fds[0], [self.listener, conn], self.import_env)
            self.children.add(pid)
            return {"ok": True, "pid": pid}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def serve_one(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            with conn:
                conn.settimeout(5.0)
                data = b""
                while not data.endswith(b"\n") and len(data) < MAX_LINE:
                    chunk, received, _, _ = socket.recv_fds(conn, 65536, MAX_FDS)
                    fds.extend(received)
                    if not chunk:
                        break
                    data += chunk
                try:
                    request = json.loads(data)
                    if not isinstance(request, dict):
                        raise ValueError("not an object")
                    reply = self.answer(request, conn, fds)
                except (ValueError, TypeError, KeyError) as exc:
                    reply = {"ok": False, "error": f"bad request: {exc}"}
                conn.sendall(json.dumps(reply).encode() + b"\n")
        finally:
            # Closed unread: a descriptor left open here would reach every later child.
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def run(self) -> None:
        while True:
            readable, _, _ = select.select([self.listener], [], [], REAP_INTERVAL_S)
            self.reap()
            if readable:
                conn, _ = self.listener.accept()
                try:
                    self.serve_one(conn)
                except OSError:
                    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="slinfer's warm engine template (started by the agent)")
    parser.add_argument("--socket", required=True, help="unix socket to listen on (created 0600)")
    parser.add_argument("--preload", action="append", default=[], help="module to import before serving")
    args = parser.parse_args(argv)
    before = dict(os.environ)
    for module in args.preload:
        try:
            __import__(module)
        except Exception as exc:  # a module of another vLLM build (CPU or GPU) is left to import in the child
            print(f"slinfer engine template: not preloaded {module}: {type(exc).__name__}: {exc}", flush=True)
    import_env = {k: v for k, v in os.environ.items() if before.get(k) != v and k not in USER_SPECIFIC}
    freeze_heap()
    threads, tasks = thread_count()
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    # Bound and listening under another name, then renamed: whoever sees the socket's path can connect (the
    # agent takes its appearance for readiness; between a bind and a listen a connect is refused).
    binding = f"{args.socket}.{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(binding)
    finally:
        os.umask(old_umask)
    os.chmod(binding, 0o600)
    listener.listen(16)
    os.rename(binding, args.socket)
    print(f"slinfer engine template pid {os.getpid()} ready on {args.socket} with {threads} threads, {tasks} tasks "
          f"and {gc.get_freeze_count()} objects frozen after importing {', '.join(args.preload) or 'nothing'}",
          flush=True)
    Template(listener, import_env).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
