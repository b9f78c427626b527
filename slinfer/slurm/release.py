"""A Slurm release in a root filesystem of its own (/opt/slurm/RELEASE, made by `make slurm SLURM_RELEASE=...`),
and how the bed runs that release's daemons, clients and job steps inside it.

Responsible for: the bind mounts that make the root see the bed's world at the same paths (the checkout, the
venv and its interpreter, /tmp where beds, job folders and the munge socket live, /proc, /sys, /dev, the
host's users), made once and idempotently, and removed once no process lives in the root; and the wrapper
commands (squeue, sbatch, slurmctld, ...) that enter the root, put first on PATH for the bed's daemons, agent,
controller and users (`slinfer dev-cluster env`).
Not responsible for: making the root (packaging/slurm-root.sh), the bed's configs or daemons (devcluster.py).
"""

from __future__ import annotations

import logging
import os
import pwd
import shlex
import stat
import subprocess
import sys
from pathlib import Path

from slinfer.slurm import parse

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Where `make slurm SLURM_RELEASE=R` puts release R.
ROOTS_DIR = Path("/opt/slurm")
# Slurm's programs the bed or its users run; each gets a wrapper that runs the root's own.
COMMANDS = ("sbatch", "salloc", "srun", "squeue", "scancel", "scontrol", "sinfo", "sdiag", "sacct", "sprio",
            "sstat", "sacctmgr", "sreport", "slurmctld", "slurmd", "slurmdbd")
# Runs inside the root: the caller's folder where the root has it (bind-mounted), else /, then the command.
# A fixed script; the folder and the command's arguments reach it as positional parameters, never as code.
_ENTER = 'cd "$1" 2>/dev/null || cd /; shift; exec "$@"'


class SlurmRoot:
    """One release's root filesystem, as the bed uses it."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    @property
    def complete(self) -> bool:
        return (self.root / ".complete").exists()

    @property
    def version(self) -> str:
        """`slurm-wlm 24.11.5`, as slurm-root.sh recorded it."""
        stamp = self.root / ".complete"
        return stamp.read_text().strip() if stamp.exists() else ""

    @property
    def release(self) -> str:
        """`24.11`."""
        return parse.release(self.version)

    def binds(self) -> list[Path]:
        """Host folders and files the root sees at the same path."""
        paths = [Path("/tmp"), REPO_ROOT, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(),
                 Path("/etc/passwd"), Path("/etc/group"), Path("/etc/hosts")]
        out: list[Path] = []
        for p in paths:
            if not any(p == q or q in p.parents for q in out):
                out.append(p)
        return out

    def mount(self) -> None:
        """Makes every mount the bed needs; those already there are left as they are."""
        if not self.complete:
            raise RuntimeError(f"{self.root} is not a complete Slurm root: run `make slurm "
                               f"SLURM_RELEASE={self.root.name}`")
        present = _mount_points()
        special = [("proc", ["mount", "-t", "proc", "proc"]), ("sys", ["mount", "--rbind", "/sys"]),
                   ("dev", ["mount", "--rbind", "/dev"])]
        for name, argv in special:
            target = self.root / name
            if str(target) not in present:
                target.mkdir(exist_ok=True)
                _run([*argv, str(target)])
                if name != "proc":
                    _run(["mount", "--make-rslave", str(target)])
        for src in self.binds():
            target = self.root / src.relative_to("/")
            self._searchable_as_on_the_host(src)
            if str(target) in present and src.is_file() and os.stat(target).st_ino != os.stat(src).st_ino:
                # A file bind holds the inode it was made on: useradd/userdel replace /etc/passwd and /etc/group
                # with new files, so a bed's users made since would be unknown in the root (sbatch there could
                # not name its own user). Bind the host's file again.
                _run(["umount", str(target)])
                present.discard(str(target))
            if str(target) in present:
                continue
            if src.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch(exist_ok=True)
            _run(["mount", "--bind", str(src), str(target)])
        log.info("slurm root %s mounted (%s)", self.root, self.version)

    def _searchable_as_on_the_host(self, src: Path) -> None:
        """The root's folders on the way to a bind mount get the search bit for others where the host's have it:
        a user who reaches the host's path (the engine's Python under a /root made 0701) reaches it in the root,
        whose own /root debootstrap made 0700."""
        for host_folder in src.parents:
            if host_folder == Path("/"):
                continue
            root_folder = self.root / host_folder.relative_to("/")
            root_folder.mkdir(parents=True, exist_ok=True)
            mode = root_folder.stat().st_mode
            if host_folder.stat().st_mode & stat.S_IXOTH and not mode & stat.S_IXOTH:
                root_folder.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)

    def in_use(self) -> list[int]:
        """Pids of processes whose root is this one."""
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if Path(os.readlink(entry / "root")) == self.root:
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids

    def unmount(self) -> bool:
        """Removes the mounts once no process lives in the root; False when some still does."""
        if self.in_use():
            return False
        prefix = f"{self.root}/"
        for target in sorted((m for m in _mount_points() if m.startswith(prefix)), key=len, reverse=True):
            if target in _mount_points():
                _run(["umount", "--recursive", "--lazy", target])
        return True

    def argv(self, argv: list[str], cwd: str = "", user: str = "") -> list[str]:
        """`argv` run inside the root, from `cwd` (default: the caller's folder), as `user` when given (only
        root may chroot: the bed's users reach the root this way, through root)."""
        spec = []
        if user:
            entry = pwd.getpwnam(user)
            spec = [f"--userspec={entry.pw_uid}:{entry.pw_gid}"]
        return ["chroot", *spec, str(self.root), "/bin/sh", "-c", _ENTER, "sh", cwd or os.getcwd(), *argv]

    def write_wrappers(self, bin_dir: Path) -> Path:
        """Wrappers that run the root's own Slurm commands, for PATH; returns the folder."""
        bin_dir.mkdir(parents=True, exist_ok=True)
        for name in COMMANDS:
            # By its path inside the root: PATH there still names this folder (it lies under /tmp).
            inside = next((f"/{d}/{name}" for d in ("usr/bin", "usr/sbin", "bin", "sbin")
                           if (self.root / d / name).exists()), "")
            if not inside:
                continue
            path = bin_dir / name
            root = shlex.quote(str(self.root))
            # Inside the root already (a job step's srun: jobs inherit this PATH), the root's /.complete
            # is at / and the command runs as it is.
            path.write_text(f'#!/bin/sh\n# Slurm {self.version} from {self.root} (slinfer dev-cluster)\n'
                            f'[ -e /.complete ] && exec {inside} "$@"\n'
                            f"exec chroot {root} /bin/sh -c '{_ENTER}' sh \"$PWD\" {inside} \"$@\"\n")
            path.chmod(0o755)
        return bin_dir


def _mount_points() -> set[str]:
    points = set()
    with open("/proc/self/mountinfo") as info:
        for line in info:
            # Field 5 is the mount point, with spaces and the like escaped as octal (\040).
            points.add(line.split()[4].encode().decode("unicode_escape"))
    return points


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


def main(argv: list[str]) -> int:
    """`python -m slinfer.slurm.release run ROOT -- CMD...`: CMD inside the root, mounted first (the plugin's
    per-release build uses it); `mount ROOT` / `unmount ROOT` alone."""
    if len(argv) < 2 or argv[0] not in ("run", "mount", "unmount"):
        print("usage: python -m slinfer.slurm.release run ROOT -- CMD... | mount ROOT | unmount ROOT",
              file=sys.stderr)
        return 2
    root = SlurmRoot(Path(argv[1]))
    if argv[0] == "unmount":
        return 0 if root.unmount() else 1
    root.mount()
    if argv[0] == "run":
        cmd = argv[3:] if argv[2:3] == ["--"] else argv[2:]
        full = root.argv(cmd)
        os.execvp(full[0], full)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
