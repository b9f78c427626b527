"""Whether the engine Python may run as root: the warm template imports vLLM with it as root, so whoever can
write to that interpreter or anything on its import path would get root on every node.

Responsible for: asking the interpreter for its import path as an unprivileged user (never as root: the
answer is not trusted yet), and checking that the interpreter, every folder on that path, everything below
them and every folder above them belong to root and are not writable by group or others. Not responsible
for: starting the template or choosing warm or cold (`warmstart.py`), nor for what a cold engine runs (it
runs as the job's user, who may use any Python).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# Whom the interpreter is asked as: nobody, who can change nothing that root then runs.
PROBE_UID = 65534
# Printing sys.path imports site (and runs its .pth files): a few seconds on a loaded node at most.
PROBE_TIMEOUT_S = 120.0
# Bits that let someone other than the owner change a file or a folder's entries.
WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


@dataclass(frozen=True)
class Verdict:
    """'' in `problem` means trusted; else the first path found that another user could change, with its owner."""

    problem: str
    checked: int = 0

    @property
    def trusted(self) -> bool:
        return not self.problem


def _owner(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _unsafe(path: str, st: os.stat_result, folder: bool) -> str:
    """Why path (its stat result st) is not root's alone, or ''."""
    if st.st_uid != 0:
        return f"{path} belongs to {_owner(st.st_uid)}, not root"
    if st.st_mode & WRITABLE_BY_OTHERS:
        # A root-owned folder with the sticky bit (/tmp) lets others add their own entries, never replace root's.
        if folder and st.st_mode & stat.S_ISVTX:
            return ""
        return f"{path} is writable by its group or by everyone (mode {stat.S_IMODE(st.st_mode):o})"
    return ""


def _ancestors(path: Path) -> Iterable[Path]:
    yield from reversed(path.parents)


def check_tree(roots: Iterable[str]) -> Verdict:
    """Every folder above each root, the root, and everything below it (links followed to what they name)."""
    checked = 0
    seen: set[str] = set()
    for root in roots:
        given, real = Path(os.path.abspath(root)), Path(os.path.realpath(root))
        if not real.exists():
            continue
        # The folders above the name as given too: whoever may write there could swap a link (a venv's
        # bin/python) for one of their own.
        for above in [*_ancestors(given), *_ancestors(real)]:
            if str(above) in seen:
                continue
            seen.add(str(above))
            checked += 1
            if problem := _unsafe(str(above), os.stat(above), folder=True):
                return Verdict(problem, checked)
        if real.is_file():
            checked += 1
            if problem := _unsafe(str(real), os.stat(real), folder=False):
                return Verdict(problem, checked)
            continue
        for folder, dirs, files in os.walk(real, followlinks=False):
            if folder in seen:
                dirs[:] = []
                continue
            seen.add(folder)
            for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
                checked += 1
                try:
                    st = os.lstat(name)
                    if stat.S_ISLNK(st.st_mode):
                        target = os.path.realpath(name)
                        st = os.stat(target)
                        if stat.S_ISDIR(st.st_mode) and target not in seen:
                            # A link to a folder elsewhere: that folder is on the path too.
                            verdict = check_tree([target])
                            checked += verdict.checked
                            if not verdict.trusted:
                                return Verdict(f"{name} -> {verdict.problem}", checked)
                            continue
                except FileNotFoundError:  # a dangling link imports nothing
                    continue
                if problem := _unsafe(name, st, folder=stat.S_ISDIR(st.st_mode)):
                    return Verdict(problem, checked)
    return Verdict("", checked)


def import_path(python: str, env: Mapping[str, str], extra: Iterable[str] = ()) -> list[str]:
    """The interpreter's sys.path as an unprivileged user sees it with env, plus `extra` (the template script's
    own folder). Raises OSError when it cannot be asked."""
    program = shutil.which(python, path=env.get("PATH"))
    if program is None:
        raise OSError(f"{python} is not found on PATH {env.get('PATH', '')!r}")
    argv = [program, "-c", "import json, sys; print(json.dumps([sys.executable, *sys.path]))"]
    kwargs: dict[str, object] = {}
    if os.geteuid() == 0:
        kwargs = {"user": PROBE_UID, "group": PROBE_UID, "extra_groups": []}
    try:
        done = subprocess.run(argv, env=dict(env), cwd="/", capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S, check=False, **kwargs)  # type: ignore[call-overload]
    except (subprocess.SubprocessError, OSError) as exc:
        raise OSError(f"cannot ask {program} for its import path as uid {PROBE_UID}: {exc}") from exc
    if done.returncode != 0:
        raise OSError(f"{program} as uid {PROBE_UID} exited with {done.returncode}: {done.stderr.strip()[-300:]}")
    try:
        paths = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise OSError(f"{program} printed no import path: {done.stdout[-200:]!r}") from exc
    return [program, *(p for p in paths if isinstance(p, str) and p), *extra]


def check(python: str, env: Mapping[str, str], extra: Iterable[str] = ()) -> Verdict:
    """Whether root may run `python` (with env): a Verdict naming what another user could change."""
    try:
        paths = import_path(python, env, extra)
    except OSError as exc:
        return Verdict(str(exc))
    return check_tree(paths)
