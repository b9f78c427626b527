"""The warm start: engines forked from a pre-imported template instead of a fresh `python -m vllm...`.

Responsible for: deciding, per engine, whether the warm path applies (the switch, the stock engine command, a
ready template) and saying why not; running the engine template (`enginetemplate.py` with the engine Python, as
root, in the background, restarted when it dies; only where the engine Python is root's alone,
`enginetrust.py`); the agent's side of the template's protocol (one JSON line per
request over its root-only unix socket); and a process handle for a warm engine with the small interface that
the engine manager uses of `subprocess.Popen` (`pid`, `poll()`, `returncode`). Not responsible for: engine
states, containment, health or stopping (the engine manager does those as for a cold start; a warm engine is
found and killed by its session and its marker like any other).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slinfer.agent import enginetrust
from slinfer.agent.processes import ProcessIdentity
from slinfer.config import DEFAULT_ENGINE_COMMAND, Config, ModelConfig

log = logging.getLogger(__name__)

TEMPLATE_SCRIPT = Path(__file__).with_name("enginetemplate.py")
# The module the stock engine command runs: the only one the template pre-imports and can run warm.
STOCK_MODULE = "vllm.entrypoints.openai.api_server"
# What a warm engine still imported after its fork (`python -X importtime`, modules over 1 ms on an idle bed): the
# model loader's quantization base (0.04-0.34 s), the async engine and scheduler, and what the API server's app
# imports for its routes (0.25 s in all); now imported once, in the template.
WARM_PATH_IMPORTS = (
    "vllm.model_executor.layers.quantization.online.base", "vllm.v1.engine.async_llm", "vllm.v1.core.sched.scheduler",
    "vllm.entrypoints.serve.profile.api_router",
    "vllm.entrypoints.openai.responses.api_router", "vllm.entrypoints.scale_out.render.api_router",
    "vllm.entrypoints.generate.structured_decisions.api_router", "vllm.entrypoints.openai.chat_completion.api_router",
    "vllm.entrypoints.serve.tokenize.api_router", "vllm.entrypoints.generate.generative_scoring.api_router",
    "vllm.entrypoints.anthropic.api_router", "vllm.entrypoints.openai.completion.api_router",
    "model_hosting_container_standards.sagemaker", "uvicorn.protocols.http.httptools_impl",
    "uvicorn.protocols.websockets.websockets_sansio_impl")
# What the template imports before it serves: torch, vLLM's server (what the API server imports), the model
# registry, and what the EngineCore and its worker import (CPU and GPU builds; the template skips those that do
# not import). `python -c "import ...api_server"` alone takes 16 s on the bed; these add a few seconds.
PRELOAD = ("torch", "vllm.entrypoints.launchers.api_server.entry", "vllm.model_executor.models.registry",
           "vllm.v1.engine.core", "vllm.v1.executor.multiproc_executor", "vllm.v1.worker.cpu_worker",
           "vllm.v1.worker.cpu_model_runner", "vllm.v1.worker.gpu_worker", "vllm.model_executor.models.llama",
           *WARM_PATH_IMPORTS)
# A spawn request is a fork and an answer: anything slower means the template is stuck.
REQUEST_TIMEOUT_S = 10.0
# How often the agent checks its template is alive and answering.
CHECK_INTERVAL_S = 5.0
# How long a template may take to import: 15-30 s measured on the bed's loaded 2 cores.
START_TIMEOUT_S = 300.0
# Pause before starting a template again after one died, so that a broken engine Python does not spin.
RESTART_DELAY_S = 10.0


# The exit status of a warm engine whose template can no longer tell it.
UNKNOWN_EXIT = -1


class TemplateError(RuntimeError):
    """The template is missing, refused or did not answer; the caller falls back to a cold start."""


def warm_refusal(config: Config, model: ModelConfig, template_ready: bool, template_state: str = "") -> str:
    """Why this model's engine cannot start warm, or "" when it can. Every reason is logged with the cold start
    it leads to."""
    agent = config.agent
    if not agent.warm_start:
        return "agent.warm_start is off"
    if model.engine_command:
        return f"model {model.name} has its own engine_command"
    if list(agent.engine_command) != list(DEFAULT_ENGINE_COMMAND):
        return "agent.engine_command is not the stock vLLM command"
    if model.engine_env:
        # The template imported vLLM, torch and huggingface_hub with [agent].engine_env: a model's own variables
        # might be read at import time, which a fork would not redo.
        return f"model {model.name} has its own engine_env"
    if not template_ready:
        return f"the engine template is not ready ({template_state or 'not started'})"
    return ""


def stock_args(argv: Sequence[str], python: str) -> list[str] | None:
    """The arguments after `-m vllm.entrypoints.openai.api_server` of an engine argv built from the stock
    command, or None when argv is not `{python} -m STOCK_MODULE ...`."""
    if len(argv) < 3 or argv[0] != python or argv[1] != "-m" or argv[2] != STOCK_MODULE:
        return None
    return list(argv[3:])


def spawn_request(args: Sequence[str], *, uid: int, gid: int, groups: Sequence[int], cwd: str,
                  log_path: Path) -> dict[str, Any]:
    """The template's `spawn` request for one engine. It carries no environment: that goes beside it as a
    descriptor (`env_descriptor`), so that no job's key ever enters the template."""
    return {"op": "spawn", "module": STOCK_MODULE, "args": list(args), "uid": uid, "gid": gid,
            "groups": list(groups), "cwd": cwd, "log_path": str(log_path)}


def env_descriptor(env: Mapping[str, str]) -> int:
    """An anonymous in-memory file (memfd, close-on-exec) holding env as JSON, for `call(..., fds=[fd])`: the
    template passes it to the child unread, and the child reads it once it is the job's user."""
    fd = os.memfd_create("slinfer-engine-env", os.MFD_CLOEXEC)
    try:
        os.write(fd, json.dumps(dict(env)).encode())
    except OSError:
        os.close(fd)
        raise
    return fd


def call(socket_path: Path, request: Mapping[str, Any], timeout: float = REQUEST_TIMEOUT_S,
         fds: Sequence[int] = ()) -> dict[str, Any]:
    """One request to the template (with `fds` passed beside it), its answer; TemplateError when there is no
    usable answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(socket_path))
            line = json.dumps(dict(request)).encode() + b"\n"
            sent = socket.send_fds(conn, [line], list(fds)) if fds else 0
            if sent < len(line):
                # Not an empty send after the whole line: the template may have answered and closed by then
                # (a refusal is quick), and sending nothing to a closed peer fails with EPIPE.
                conn.sendall(line[sent:])
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        raise TemplateError(f"engine template at {socket_path}: {exc}") from exc
    try:
        reply = json.loads(data)
    except ValueError as exc:
        raise TemplateError(f"engine template at {socket_path} answered {data[:200]!r}") from exc
    if not isinstance(reply, dict):
        raise TemplateError(f"engine template at {socket_path} answered {data[:200]!r}")
    if not reply.get("ok"):
        raise TemplateError(f"engine template refused: {reply.get('error', reply)}")
    return reply


class WarmProcess:
    """A warm engine, as the engine manager sees a Popen: the agent cannot wait for a child of the template, so
    it sees the pid die, and asks the template for its exit status."""

    def __init__(self, pid: int, identity: ProcessIdentity, socket_path: Path) -> None:
        self.pid = pid
        self.identity = identity
        self.socket_path = socket_path
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if self.identity.alive():
            return None
        try:
            reply = call(self.socket_path, {"op": "exit", "pid": self.pid}, timeout=1.0)
        except TemplateError:
            reply = {}
        if reply.get("exited"):
            self.returncode = int(reply["code"])
        elif reply.get("known"):
            # Still the template's child: a dead leader whose threads are still exiting cannot be reaped yet.
            return None
        else:
            # Gone, its status unknown (the template that forked it is gone or restarted since).
            self.returncode = UNKNOWN_EXIT
        return self.returncode

    def hold(self) -> bool:
        """Asks the template to keep this engine's zombie until poll() asks for its exit (agent/stepd.py says
        why); whether it does."""
        try:
            return bool(call(self.socket_path, {"op": "hold", "pid": self.pid}, timeout=1.0).get("held"))
        except TemplateError:
            return False

    def peek(self) -> tuple[bool, int | None]:
        """Whether a held engine has ended, and its exit code, read without the template reaping it: not ended
        while the template holds it unexited (a dead leader whose threads are still exiting), ended with no code
        where the template cannot say (gone, restarted, never held)."""
        try:
            reply = call(self.socket_path, {"op": "peek", "pid": self.pid}, timeout=1.0)
        except TemplateError:
            return True, None
        if reply.get("exited"):
            return True, int(reply["code"])
        return not reply.get("held"), None


@dataclass
class TemplateStatus:
    ready: bool
    state: str


class EngineTemplate:
    """The node's engine template: started in the background, checked, restarted after it dies."""

    def __init__(self, config: Config, run_dir: Path, logs_dir: Path) -> None:
        self.config = config
        self.socket_path = run_dir / "warm-template.sock"
        self.pid_path = run_dir / "warm-template.pid"
        self.log_path = logs_dir / "warm-template.log"
        self.home = run_dir / "warm-template-home"
        self.process: asyncio.subprocess.Process | None = None
        self.status = TemplateStatus(False, "not started")
        self.starts = 0
        self._task: asyncio.Task[None] | None = None

    def argv(self) -> list[str]:
        argv = [self.config.agent.python, str(TEMPLATE_SCRIPT), "--socket", str(self.socket_path)]
        for module in PRELOAD:
            argv += ["--preload", module]
        return argv

    def env(self) -> dict[str, str]:
        """The environment the template imports with: what every engine shares ([agent].engine_env), not a job's."""
        env = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
               "LANG": os.environ.get("LANG", "C.UTF-8"), "HOME": str(self.home)}
        env.update(self.config.agent.engine_env)
        return env

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Stops the template (its engines live on, in sessions of their own)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._kill()

    def _kill_previous(self) -> None:
        """A template that an earlier agent left (killed agents leave it): ours by its pid file and socket."""
        try:
            pid_s, created_s = self.pid_path.read_text().split()
            identity = ProcessIdentity(int(pid_s), float(created_s))
        except (OSError, ValueError):
            return
        if identity.alive():
            log.info("stopping the engine template pid %d an earlier agent left", identity.pid)
            with contextlib.suppress(OSError):
                os.kill(identity.pid, 9)
        self.pid_path.unlink(missing_ok=True)

    async def _kill(self) -> None:
        proc, self.process = self.process, None
        self.status = TemplateStatus(False, "stopped")
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        self.pid_path.unlink(missing_ok=True)

    async def _run(self) -> None:
        self._kill_previous()
        began = time.monotonic()
        verdict = await asyncio.to_thread(enginetrust.check, self.config.agent.python, self.env(),
                                          [str(TEMPLATE_SCRIPT.parent)])
        if not verdict.trusted:
            # Root would import vLLM from there: whoever can write to it would own the node.
            self.status = TemplateStatus(False, f"refused: {verdict.problem}")
            log.error("engine template not started: root would run %s, which is not root's alone: %s; every "
                      "engine starts cold (as its job's user)", self.config.agent.python, verdict.problem)
            return
        log.info("engine template: %s and its import path are root's alone (%d paths checked in %.1fs)",
                 self.config.agent.python, verdict.checked, time.monotonic() - began)
        while True:
            try:
                await self._start_once()
                await self._watch()
            except asyncio.CancelledError:
                raise
            except (OSError, TemplateError) as exc:
                self.status = TemplateStatus(False, f"failed: {exc}")
                log.error("engine template: %s; retrying in %.0fs, engines start cold meanwhile", exc,
                          RESTART_DELAY_S)
            await self._kill()
            self.status = TemplateStatus(False, "restarting")
            await asyncio.sleep(RESTART_DELAY_S)

    async def _start_once(self) -> None:
        self.home.mkdir(exist_ok=True)
        os.chmod(self.home, 0o700)
        self.socket_path.unlink(missing_ok=True)
        self.starts += 1
        self.status = TemplateStatus(False, "importing")
        began = time.monotonic()
        with open(self.log_path, "ab", buffering=0) as out:  # noqa: ASYNC230  (a local file, opened once)
            self.process = await asyncio.create_subprocess_exec(
                *self.argv(), env=self.env(), cwd=str(self.home), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        identity = ProcessIdentity.of(self.process.pid)
        self.pid_path.write_text(f"{identity.pid} {identity.create_time}\n")
        log.info("engine template pid %d starting: %s", self.process.pid, " ".join(self.argv()))
        while time.monotonic() - began < START_TIMEOUT_S:
            if self.process.returncode is not None:
                raise TemplateError(f"exited with code {self.process.returncode} while importing "
                                    f"(see {self.log_path})")
            if self.socket_path.exists():
                reply = await asyncio.to_thread(call, self.socket_path, {"op": "ping"})
                if reply.get("threads") != 1 or reply.get("tasks") != 1:
                    raise TemplateError(f"runs {reply.get('threads')} threads and {reply.get('tasks')} tasks "
                                        "after its imports: forking it is not safe")
                self.status = TemplateStatus(True, "ready")
                log.info("engine template pid %d ready in %.1fs (%s)", self.process.pid, time.monotonic() - began,
                         reply.get("python"))
                return
            await asyncio.sleep(0.5)
        raise TemplateError(f"not ready after {START_TIMEOUT_S:.0f}s")

    async def _watch(self) -> None:
        assert self.process is not None
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            if self.process.returncode is not None:
                raise TemplateError(f"pid {self.process.pid} exited with code {self.process.returncode}")
            await asyncio.to_thread(call, self.socket_path, {"op": "ping"})

    def spawn(self, args: Sequence[str], *, uid: int, gid: int, groups: Sequence[int], env: Mapping[str, str],
              cwd: str, log_path: Path) -> WarmProcess:
        """Forks one engine from the template; TemplateError when it cannot."""
        if not self.status.ready:
            raise TemplateError(f"not ready ({self.status.state})")
        try:
            env_fd = env_descriptor(env)
        except OSError as exc:
            raise TemplateError(f"cannot hand the engine its environment: {exc}") from exc
        try:
            reply = call(self.socket_path, spawn_request(args, uid=uid, gid=gid, groups=groups, cwd=cwd,
                                                         log_path=log_path), fds=[env_fd])
        finally:
            os.close(env_fd)
        pid = int(reply["pid"])
        return WarmProcess(pid, ProcessIdentity.of(pid), self.socket_path)
