"""What `slinfer dev-cluster up` changes on the host outside its state folder, recorded so that `down` undoes it.

Responsible for: one machine-wide record (RECORD, root-only) of the users the bed created, the original mode
of every folder it made searchable (the o+x bit on /root and the pyenv folders on the way to the engine's
Python), and the beds whose `up` is under way; adding to it at `up` (the first original mode seen is kept: a
second `up` must not record the mode the first one set), and undoing it at `down` once no other bed of this
machine still runs or is going up: beds share the users and the folders, so the last bed down restores them. A
mode someone else changed since is left alone, said so.
Not responsible for: making the changes (devcluster.py does, and reports them here), the bed's own folders.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Outside any bed's state folder (tests remove theirs): the host's changes outlive one bed, not the machine's
# users. An environment variable points the unit tests at a file of their own.
RECORD = Path(os.environ.get("SLINFER_DEV_HOST_RECORD", "/var/lib/slinfer-dev/host-changes.json"))


@dataclass
class HostChanges:
    """The record: users created, and each changed folder's mode before the bed's first change and after it."""

    users: list[str] = field(default_factory=list)
    # path -> [mode before, mode the bed set]
    modes: dict[str, list[int]] = field(default_factory=dict)
    # A bed's state folder -> the pid of the process bringing it up, from the start of its `up` to the end: such a
    # bed has no slurmctld yet but has made (or found) the users (CI: one bed's `down`, run before its own `up`,
    # removed the users another bed had just made, and that bed's jobs failed "uid 1002 has no user name").
    starting: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> HostChanges:
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        return cls(users=list(data.get("users", [])), modes={k: list(v) for k, v in data.get("modes", {}).items()},
                   starting={k: int(v) for k, v in data.get("starting", {}).items()})

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"users": self.users, "modes": self.modes, "starting": self.starting}, out, indent=1,
                      sort_keys=True)
        os.replace(tmp, path)

    @property
    def empty(self) -> bool:
        return not self.users and not self.modes and not self.starting

    def others_starting(self, own: str) -> list[str]:
        """The beds other than `own` whose `up` is under way (its process alive)."""
        return [bed for bed, pid in self.starting.items() if bed != own and _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[HostChanges]:
    """The record, read and written under an exclusive lock (beds go up and down in parallel)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        changes = HostChanges.load(path)
        yield changes
        if changes.empty:
            path.unlink(missing_ok=True)
        else:
            changes.save(path)


@contextlib.contextmanager
def starting(bed: str, path: Path | None = None) -> Iterator[None]:
    """Marks `bed` (its state folder) as going up while the block runs, so that no other bed's `down` undoes what
    it needs before its slurmctld runs (which is how a running bed is seen)."""
    with _locked(path or RECORD) as changes:
        changes.starting[bed] = os.getpid()
    try:
        yield
    finally:
        with _locked(path or RECORD) as changes:
            changes.starting.pop(bed, None)


def _user_exists(user: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def create_user(user: str, make: Callable[[str], None], path: Path | None = None,
                exists: Callable[[str], bool] = _user_exists) -> bool:
    """Makes `user` (with `make`) unless it exists, noted in the record first (a crash in between leaves a name to
    remove); True where it made it. Under the record's lock: two beds going up at once both found the user missing
    and both ran useradd, and the second failed (exit 9, already in use; CI's 26.05 release suite, 36 errors)."""
    record = path or RECORD
    with _locked(record) as changes:
        if exists(user):
            return False
        if user not in changes.users:
            changes.users.append(user)
        changes.save(record)
        make(user)
        return True


def make_searchable(folders: Iterable[Path], path: Path | None = None) -> list[Path]:
    """Gives each folder the search bit for others where it lacks it, recording its mode first; returns those it
    changed. Only search, never read: listings stay private."""
    changed = []
    with _locked(path or RECORD) as changes:
        for folder in folders:
            mode = stat.S_IMODE(folder.stat().st_mode)
            if mode & stat.S_IXOTH:
                continue
            new = mode | stat.S_IXOTH
            before = changes.modes.get(str(folder), [mode, new])[0]
            changes.modes[str(folder)] = [before, new]
            folder.chmod(new)
            changed.append(folder)
    return changed


def undo(path: Path | None = None, busy: Callable[[HostChanges], list[str]] | None = None) -> list[str]:
    """Restores every recorded mode and removes every recorded user; returns what it did and what it left,
    one line each. `busy`, asked under the record's lock (so no bed starts between the question and the undo),
    names the other beds that still need them: then nothing is undone."""
    said = []
    with _locked(path or RECORD) as changes:
        others = busy(changes) if busy is not None else []
        if others:
            return [f"host changes kept: other beds run ({', '.join(sorted(others))})"]
        for folder, (before, after) in sorted(changes.modes.items(), key=lambda kv: -len(kv[0])):
            try:
                now = stat.S_IMODE(Path(folder).stat().st_mode)
            except FileNotFoundError:
                said.append(f"{folder} is gone; nothing to restore")
                continue
            if now != after:
                said.append(f"{folder} is {now:o}, not the {after:o} the bed set: someone changed it since, left so")
            else:
                os.chmod(folder, before)
                said.append(f"{folder} restored to {before:o}")
        changes.modes.clear()
        kept = []
        for user in changes.users:
            done = subprocess.run(["userdel", "--remove", user], capture_output=True, text=True, check=False)
            # 6: no such user (removed already); 12: the home folder was already gone.
            if done.returncode in (0, 6, 12):
                said.append(f"removed the user {user}")
            else:
                kept.append(user)
                said.append(f"could not remove the user {user}: {done.stderr.strip()} (kept in the record)")
        changes.users = kept
    return said
