"""Asks a job's extern-step slurmstepd to adopt a process, as pam_slurm_adopt does.

Responsible for: finding the unix socket of a job's extern step on this node (the one slurmstepd listens on,
`<SlurmdSpoolDir>/<NodeName>_<job>.4294967292`), and the one request over it that makes the step adopt a pid:
slurmstepd then adds the pid to its proctrack, task and jobacct_gather plugins, so that the job's limits bind it
and Slurm accounts for it as one of the step's tasks (sacct's TotalCPU and MaxRSS count it on 22.05, 24.11 and
26.05 alike; a pid written into the step's cgroups by hand is counted on 22.05 only). Every reply is checked; each
failure is a StepdError naming the job, the pid and the socket.
Also asks it to poll its tasks' usage (`poll`), so that what an adopted engine used up to its end is counted.
Also says when an adopted engine ended without reaping it (`exit_status_unreaped`) and which process is the step's
stepd (`socket_owner`), so that the engine's parent keeps its zombie until that stepd has exited: slurmstepd up to
25.05 (22.05, 24.11; SchedMD fixed it in 25.11, ticket 22770, commit 6f2fff05fa) watches each adopted pid from a
detached thread that tries kill(pid, 0) once a second and, when that fails, calls jobacct_gather_remove_task and
acct_gather_profile_g_task_end. Killed by the job's end and reaped at once, the engine made that thread run after
the step's teardown had unloaded those plugins (acct_gather_profile_fini): the stepd died of a segfault at ip 0
before it sent its step-complete message, and sacct showed the extern step CANCELLED with 00:00:00 (24.11, a cold
engine under load; dmesg `slurmstepd[...]: segfault at 0 ip 0000000000000000`). A zombie answers kill(pid, 0).
Not responsible for: which pids to adopt or what to do when the stepd refuses (cgroups.JobCgroups.contain_extern
falls back to writing the cgroups itself), the pid's descendants (born inside once it is adopted; those forked
before are moved by cgroups.py), the batch step.

The wire protocol, read in src/common/stepd_api.c (stepd_connect, stepd_add_extern_pid) and
src/slurmd/slurmstepd/req.c (_handle_accept, _handle_add_extern_pid) at slurm-22-05-8-1, slurm-24-11-5-1 and
slurm-26-05-3-1, identical in all three: native-endian C ints on a SOCK_STREAM unix socket.
  client -> int protocol version   stepd -> int its own protocol version (> 0), or -1 (SLURM_ERROR) and close
  client -> int REQUEST_ADD_EXTERN_PID (22), pid_t pid
  stepd  -> int rc: 0 adopted, -1 refused (a caller other than root or SlurmUser up to 24.11, a pid its plugins
            could not add); 26.05 closes the socket without a reply for a caller it does not authorize and for a
            step that is ending.
slurmstepd knows its caller's uid by SO_PEERCRED; the agent runs as root. A stepd older than 24.11 is not asked
(ADOPT_MIN_VERSION): 22.05 counts an engine written into its extern step's cgroups by hand already.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import psutil

# Slurm's SLURM_EXTERN_CONT (0xfffffffc): the extern step's id, the last part of its socket's name.
EXTERN_STEP_ID = 0xFFFFFFFC
# step_msg_t's REQUEST_ADD_EXTERN_PID: the 23rd entry (22) of the enum in 22.05, 24.11 and 26.05.
REQUEST_ADD_EXTERN_PID = 22
# step_msg_t's REQUEST_STEP_STAT (17 in all three): what sstat sends; slurmstepd polls its tasks' usage first.
REQUEST_STEP_STAT = 17
# The most a stat reply's packed jobacctinfo may be: a few hundred bytes per TRES; more is not a stepd talking.
STAT_REPLY_MAX = 1 << 20
# The protocol version the agent says it speaks: 26.05's (MAKE_SLURM_VER(45) = 45 << 8). slurmstepd only checks
# that it is at least its own minimum (20.11's on 22.05, 23.02's on 24.11, 25.05's-3 on 26.05) and uses it for
# nothing else in this request, so the newest of the three is accepted by all of them.
CLIENT_PROTOCOL_VERSION = 45 << 8
# The oldest stepd the agent asks to adopt: 24.11's protocol (42 << 8). 22.05 accounts its extern step through the
# step's own task (the `sleep` in task_0), whose cgroup an engine written in by hand shares: counted once there
# (bench/extern_accounting.py: 10.0 s for 9.9 s burned), while an adopted one was counted twice (36 s for 17.2 s).
# Releases between 22.05 and 24.11 were not tried and are treated as 22.05.
ADOPT_MIN_VERSION = 42 << 8
# Slurm's SLURM_SUCCESS.
SLURM_SUCCESS = 0
# A C int and pid_t on Linux: 4 bytes, the host's byte order (slurmstepd reads them with read(2) as they are).
_INT = struct.Struct("=i")
# How long one exchange may take: slurmstepd answers from a thread of its own within milliseconds; a stepd that
# hangs must not hold the engine's containment (the caller falls back to the cgroup write).
SOCKET_TIMEOUT_S = 5.0


class StepdError(Exception):
    """The extern step's slurmstepd did not adopt the pid; the message names the job, the pid and why."""


class StepdTooOld(StepdError):
    """The stepd is older than ADOPT_MIN_VERSION: not asked, by design (its own task's cgroup accounts the pid)."""


def socket_name(node_name: str, job_id: str) -> str:
    """The name slurmstepd gives its extern step's socket in SlurmdSpoolDir (stepd_api.c's _step_connect)."""
    return f"{node_name}_{job_id}.{EXTERN_STEP_ID}"


def listening_paths(net_unix_text: str) -> list[str]:
    """The paths of the unix sockets in a /proc/PID/net/unix table (abstract and unnamed ones left out)."""
    paths = []
    for line in net_unix_text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 8 and parts[7].startswith("/"):
            paths.append(parts[7])
    return list(dict.fromkeys(paths))


def extern_stepd_pids(job_id: str) -> list[int]:
    """The pids of `slurmstepd: [J.extern]` processes on this host (several where several slurmd share it)."""
    wanted = f"slurmstepd: [{job_id}.extern]"
    found = []
    for process in psutil.process_iter(["cmdline"]):
        # slurmstepd rewrites its argv[0] with spaces in it, which /proc may give back split or whole.
        if " ".join(process.info["cmdline"] or []) == wanted:
            found.append(process.pid)
    return found


def socket_owner(path: Path, job_id: str, proc: Path = Path("/proc")) -> int | None:
    """The pid of the `slurmstepd: [J.extern]` process that listens on `path`; None when none does (gone)."""
    for pid in extern_stepd_pids(job_id):
        try:
            table = (proc / str(pid) / "net" / "unix").read_text()
        except OSError:
            continue
        if str(path) in listening_paths(table):
            return pid
    return None


def exit_status_unreaped(pid: int) -> int | None:
    """The exit code of the caller's own child `pid` once it has ended, in Popen's convention (-N for signal N),
    read without reaping it (waitid's WNOWAIT): the zombie stays, so that kill(pid, 0) still succeeds for the
    slurmstepd that adopted it (see hold_reason). None while it runs; ChildProcessError if it is not a child."""
    result = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if result is None or result.si_pid == 0:
        return None
    return -result.si_status if result.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else result.si_status


def find_socket(node_name: str, job_id: str, proc: Path = Path("/proc")) -> Path:
    """The extern step's socket of this job on this node: the path its slurmstepd bound, read from the kernel's
    table of unix sockets as that process sees it (its network namespace), so that SlurmdSpoolDir need not be
    parsed out of slurm.conf (`%n`, `%h`, Include files) and the bed's release roots, which bind /tmp at the same
    path, need nothing of their own. Raises StepdError when there is none (no PrologFlags=Contain, the step
    not started yet or ended)."""
    name = socket_name(node_name, job_id)
    stepds = extern_stepd_pids(job_id)
    for pid in stepds:
        try:
            table = (proc / str(pid) / "net" / "unix").read_text()
        except OSError:
            continue
        for path in listening_paths(table):
            if path.rsplit("/", 1)[-1] == name:
                return Path(path)
    raise StepdError(f"job {job_id}: no socket {name} of its extern step on node {node_name} "
                     f"({len(stepds)} `slurmstepd: [{job_id}.extern]` process(es) on this host)")


def _read_int(conn: socket.socket, what: str) -> int:
    data = b""
    while len(data) < _INT.size:
        chunk = conn.recv(_INT.size - len(data))
        if not chunk:
            raise ConnectionError(f"slurmstepd closed the socket before {what} ({len(data)} of {_INT.size} bytes)")
        data += chunk
    return int(_INT.unpack(data)[0])


@contextlib.contextmanager
def _connected(path: Path, where: str, timeout_s: float) -> Iterator[tuple[socket.socket, int]]:
    """A connection to the stepd on `path` after its handshake (our protocol version out, its own back), with
    its version; a stepd that answers 0 or less refused us (StepdError naming `where`)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout_s)
        conn.connect(str(path))
        conn.sendall(_INT.pack(CLIENT_PROTOCOL_VERSION))
        version = _read_int(conn, "its protocol version")
        if version <= 0:
            raise StepdError(f"{where}: it refused the connection (answered {version} to protocol version "
                             f"{CLIENT_PROTOCOL_VERSION}; see slurmd's log)")
        yield conn, version


def adopt(path: Path, job_id: str, pid: int, timeout_s: float = SOCKET_TIMEOUT_S,
          min_version: int = ADOPT_MIN_VERSION) -> int:
    """Asks the extern step listening on `path` to adopt `pid`; returns the stepd's protocol version. Raises
    StepdError (naming the job, the pid and the socket) for a refusal, a closed socket or any socket error, and
    StepdTooOld without asking where the stepd's protocol is below min_version."""
    where = f"job {job_id}: the extern step's slurmstepd ({path}) did not adopt pid {pid}"
    try:
        with _connected(path, where, timeout_s) as (conn, version):
            if version < min_version:
                raise StepdTooOld(f"{where}: it speaks protocol {version_name(version)}, older than "
                                  f"{version_name(min_version)}, whose own task's cgroup counts the pid once "
                                  f"written there by hand (not asked)")
            conn.sendall(_INT.pack(REQUEST_ADD_EXTERN_PID) + _INT.pack(pid))
            rc = _read_int(conn, "its answer")
    except StepdError:
        raise
    except OSError as exc:
        raise StepdError(f"{where}: {exc}") from exc
    if rc != SLURM_SUCCESS:
        raise StepdError(f"{where}: it refused (rc {rc}; its reason is in slurmd's log)")
    return version


def poll(path: Path, job_id: str, timeout_s: float = SOCKET_TIMEOUT_S) -> int:
    """Asks the extern step listening on `path` for its usage (REQUEST_STEP_STAT, as sstat does), which makes
    slurmstepd poll its tasks now; returns its number of tasks. The reply is read whole and dropped: the point is
    the poll. jobacct_gather reads an adopted pid's usage from /proc only while it exists, at each
    JobAcctGatherFrequency (default 30 s), at such a request, and once more when it sees the pid gone: an engine
    that Slurm kills at the job's end and its parent reaps before that last read keeps what the previous poll saw.
    The wire (_handle_stat_jobacct, all three releases): request int 17; reply int len, len bytes of packed
    jobacctinfo, int number of tasks (1 for the extern step). Raises StepdError naming the job and the socket."""
    where = f"job {job_id}: the extern step's slurmstepd ({path}) did not report its usage"
    try:
        with _connected(path, where, timeout_s) as (conn, _version):
            conn.sendall(_INT.pack(REQUEST_STEP_STAT))
            length = _read_int(conn, "the length of its usage")
            if not 0 <= length <= STAT_REPLY_MAX:
                raise StepdError(f"{where}: its usage is {length} bytes long")
            _read_exactly(conn, length)
            tasks = _read_int(conn, "its number of tasks")
    except StepdError:
        raise
    except OSError as exc:
        raise StepdError(f"{where}: {exc}") from exc
    return tasks


def _read_exactly(conn: socket.socket, length: int) -> bytes:
    data = b""
    while len(data) < length:
        chunk = conn.recv(min(length - len(data), 65536))
        if not chunk:
            raise ConnectionError(f"slurmstepd closed the socket after {len(data)} of {length} bytes of its usage")
        data += chunk
    return data


def version_name(version: int) -> str:
    """A Slurm protocol version in words: 45 << 8 is "45.0" (26.05), 42 << 8 "42.0" (24.11), 38 << 8 (22.05)."""
    return f"{version >> 8}.{version & 0xFF}"
