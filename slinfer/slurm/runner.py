"""The one way slinfer runs a Slurm client: an argv list (never a shell), a time limit, errors with stderr.

Responsible for: running `squeue`, `scontrol`, `sbatch`, ... from a bin folder or PATH, optionally through an
argv prefix that enters a release's root filesystem (slinfer.slurm.release), with the Slurm environment the
caller gives, synchronously (bed, tests, benchmarks) or under asyncio (agent, controller), and turning a failure
or a time-out into a SlurmError; counting the bytes each command printed (for the polling benchmark).
Not responsible for: what to run (queries.py) or what the output means (parse.py).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from slinfer.waits import bounded

T = TypeVar("T")

# Times in every client's output as unix seconds: no local-time parsing, the same on every release.
TIME_FORMAT_ENV = {"SLURM_TIME_FORMAT": "%s"}
# A Slurm client that has not answered in this long is treated as failed (slurmctld's MessageTimeout is 10 s
# by default and a client retries once).
DEFAULT_TIMEOUT_S = 30.0


class SlurmError(RuntimeError):
    """A Slurm command that failed, with its argv, exit status and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        status = "timed out" if returncode is None else f"exited {returncode}"
        super().__init__(f"{argv[0]} {status}: {stderr.strip() or '(no stderr)'}")
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True)
class Query(Generic[T]):
    """A Slurm command and the parser of what it prints."""

    argv: tuple[str, ...]
    parse: Callable[[str], T]


class Runner:
    """Runs Slurm's clients; every call is a subprocess with a time limit."""

    def __init__(self, bin_dir: str = "", env: Mapping[str, str] | None = None, *,
                 prefix: Sequence[str] = (), timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._bin_dir = bin_dir
        self._env = {**(os.environ if env is None else env), **TIME_FORMAT_ENV}
        self._prefix = list(prefix)
        self.timeout_s = timeout_s
        # Bytes the clients printed, over this runner's life: the polling benchmark reads it.
        self.bytes_read = 0
        self.calls = 0

    def argv(self, argv: Sequence[str]) -> list[str]:
        """The command as run: the client from the bin folder, inside the release's root where there is one."""
        first = os.path.join(self._bin_dir, argv[0]) if self._bin_dir and "/" not in argv[0] else argv[0]
        return [*self._prefix, first, *argv[1:]]

    def run(self, argv: Sequence[str], stdin: str | None = None, *, timeout_s: float | None = None) -> str:
        full = self.argv(argv)
        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            done = subprocess.run(full, env=self._env, input=stdin.encode() if stdin is not None else None,
                                  stdin=None if stdin is not None else subprocess.DEVNULL,
                                  capture_output=True, timeout=limit, check=False)
        except OSError as exc:
            raise SlurmError(full, 127, str(exc)) from exc
        except subprocess.TimeoutExpired:
            raise SlurmError(full, None, f"no answer within {limit:g} s") from None
        return self._result(full, done.returncode, done.stdout, done.stderr)

    async def arun(self, argv: Sequence[str], stdin: str | None = None) -> str:
        full = self.argv(argv)
        try:
            proc = await asyncio.create_subprocess_exec(
                *full, env=self._env,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            raise SlurmError(full, 127, str(exc)) from exc
        try:
            out, err = await bounded(
                proc.communicate(stdin.encode() if stdin is not None else None), self.timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise SlurmError(full, None, f"no answer within {self.timeout_s:g} s") from None
        return self._result(full, proc.returncode or 0, out, err)

    def get(self, query: Query[T]) -> T:
        return query.parse(self.run(query.argv))

    async def aget(self, query: Query[T]) -> T:
        return query.parse(await self.arun(query.argv))

    def _result(self, argv: list[str], code: int, out: bytes, err: bytes) -> str:
        self.calls += 1
        self.bytes_read += len(out)
        if code != 0:
            raise SlurmError(argv, code, err.decode(errors="replace"))
        return out.decode(errors="replace")
