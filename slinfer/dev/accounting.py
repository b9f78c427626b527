"""The bed's Slurm accounting, as a site runs it: MariaDB, slurmdbd, and the cluster, accounts, QOS and
associations a site's policy lives in.

Responsible for: a private MariaDB (Debian's mariadbd, no systemd: its data, socket and log under the bed's
state folder, TCP on loopback at the bed's port), its `slurm` user with a password made once (root-only file),
one database per Slurm release (a 22.05 database is "too old" for 26.05, and their daemons do not talk);
slurmdbd.conf beside slurm.conf (0600: it holds the password); the site's order, made with sacctmgr: the
cluster, the accounts physics and chem and the service's account, the QOS normal, scavenger (preemptible) and
high, the bed users' associations (alice: physics and chem; bob: chem only; both normal and high), and the
service user's (the accounts and QOS the bed's catalog names). Every step is idempotent: `up` on a running bed
changes nothing. `remove` deletes the data at `down`.
Not responsible for: starting or stopping the daemons (devcluster.launch/stop_daemon), slurm.conf's accounting
lines (devcluster._slurm_conf), the catalog (devcluster._slinfer_toml).
"""

from __future__ import annotations

import getpass
import secrets
import shutil
import subprocess
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# The database's user slurmdbd logs in as, over TCP on loopback (root's socket login is for `up` only).
DB_USER = "slurm"
# The account the service's jobs run under on the bed, unless the catalog names others.
SERVICE_ACCOUNT = "slinfer"
# The site's research groups (issue 29): two, so that a user may belong to one and not the other.
ACCOUNTS = ("physics", "chem")
# normal exists in every Slurm database; scavenger is the preemptible tier, high the batch work that preempts it.
QOS = ("normal", "scavenger", "high")
# Who may submit where: alice in both groups, bob in chem only; both may use normal and high, not scavenger.
USER_ASSOCIATIONS = {"slinfer-alice": (("physics", "chem"), ("normal", "high")),
                     "slinfer-bob": (("chem",), ("normal", "high"))}
# sacctmgr's words for "there already", which `up` on a running bed meets.
_ALREADY = ("Nothing new added", "already exists", "Nothing modified")
# Preemption (issue 29): scavenger's jobs get 30 s of grace to finish their requests before Slurm ends them
# (the grace ends at slurmctld's next 30-second check: 37-56 s in all, docs/architecture/facts.md); high may
# take their GPUs.
PREEMPTION = (("scavenger", ("GraceTime=30", "PreemptMode=cancel")), ("high", ("Preempt=scavenger",)))


@dataclass(frozen=True)
class Paths:
    """Where one bed's database lives."""

    folder: Path

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def socket(self) -> Path:
        return self.folder / "mysqld.sock"

    @property
    def log(self) -> Path:
        return self.folder / "mariadb.err"

    @property
    def tmp(self) -> Path:
        return self.folder / "tmp"

    @property
    def pid(self) -> Path:
        return self.folder / "mariadbd.pid"


def database(release: str) -> str:
    """One database per Slurm release: `slurm_acct_db_22_05`."""
    return "slurm_acct_db_" + (release or "unknown").replace(".", "_")


def password(secret: Path) -> str:
    """slurmdbd's database password: made once, root-only, the same at every `up`."""
    if secret.exists():
        return secret.read_text().strip()
    secret.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(16)
    secret.touch(mode=0o600)
    secret.write_text(value + "\n")
    return value


def install_db(paths: Paths) -> bool:
    """Makes the database's system tables where there are none; True when it did."""
    if (paths.data / "mysql").is_dir():
        return False
    paths.folder.mkdir(parents=True, exist_ok=True)
    paths.tmp.mkdir(exist_ok=True)
    for folder in (paths.folder, paths.tmp):
        shutil.chown(folder, "mysql", "mysql")
        folder.chmod(0o750)
    # No /etc/mysql/my.cnf, and temporary tables in the bed's own folder: two beds' installs at once in the
    # shared /tmp failed ("Could not remove temporary table '/tmp/#sql-temptable-...'").
    done = subprocess.run(["mariadb-install-db", "--no-defaults", "--user=mysql", f"--datadir={paths.data}",
                           f"--tmpdir={paths.tmp}", "--auth-root-authentication-method=socket", "--skip-test-db"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"mariadb-install-db failed: {done.stderr.strip() or done.stdout.strip()}")
    return True


def mariadbd_argv(paths: Paths, port: int) -> list[str]:
    """The server, in the foreground, with no configuration file but these flags."""
    return ["mariadbd", "--no-defaults", "--user=mysql", f"--datadir={paths.data}", f"--socket={paths.socket}",
            f"--tmpdir={paths.tmp}",
            f"--port={port}", "--bind-address=127.0.0.1", f"--pid-file={paths.pid}", f"--log-error={paths.log}",
            # A bed's database is small: 32 MB of buffer pool (Debian's default is 128) keeps two beds light.
            "--innodb-buffer-pool-size=32M",
            # Slurm's documentation asks for it: slurmdbd's upgrades and rollups hold long locks.
            "--innodb-lock-wait-timeout=900", "--skip-name-resolve"]


def sql(paths: Paths, statement: str) -> str:
    """One statement as the database's root, over the socket (root's login is by socket only)."""
    done = subprocess.run(["mariadb", f"--socket={paths.socket}", "--batch", "--skip-column-names", "-e",
                           statement], capture_output=True, text=True, check=False, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"mariadb: {statement.split()[0]} failed: {done.stderr.strip()}")
    return done.stdout


def grant(paths: Paths, release: str, secret: str) -> None:
    """The `slurm` user, with this password, on this release's database only."""
    sql(paths, f"CREATE USER IF NOT EXISTS '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{secret}'; "
               f"ALTER USER '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{secret}'; "
               f"GRANT ALL PRIVILEGES ON `{database(release)}`.* TO '{DB_USER}'@'127.0.0.1';")


def slurmdbd_conf(*, host: str, address: str, dbd_port: int, db_port: int, release: str, secret: str,
                  munge_socket: Path, pid_file: Path, log_file: Path) -> str:
    return f"""\
# Generated by `slinfer dev-cluster up`: the bed's slurmdbd (0600: it holds the database's password).
AuthType=auth/munge
AuthInfo=socket={munge_socket}
DbdHost={host}
DbdAddr={address}
DbdPort={dbd_port}
SlurmUser=root
PidFile={pid_file}
LogFile={log_file}
DebugLevel=info
# The bed's own MariaDB, on loopback; one database per Slurm release.
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser={DB_USER}
StoragePass={secret}
StorageLoc={database(release)}
"""


def catalog_needs(config: Path) -> tuple[list[str], list[str]]:
    """The accounts and QOS the catalog's models name (service account and normal at least)."""
    data = tomllib.loads(config.read_text())
    models = data.get("models", [])
    accounts = {m.get("account", "") for m in models} | {SERVICE_ACCOUNT}
    qos = {m.get(key, "") for m in models for key in ("qos", "burst_qos")} | {"normal"}
    return sorted(a for a in accounts if a), sorted(q for q in qos if q)


def sacctmgr(run: Callable[[Sequence[str]], subprocess.CompletedProcess[str]], *args: str) -> bool:
    """One `sacctmgr -i` change; True when it changed something, False when it was there already."""
    done = run(["sacctmgr", "-i", *args])
    said = done.stdout + done.stderr
    if done.returncode == 0 and not any(word in said for word in _ALREADY):
        return True
    if any(word in said for word in _ALREADY):
        return False
    raise RuntimeError(f"sacctmgr {' '.join(args)} failed (exit {done.returncode}): {said.strip()}")


def create_order(run: Callable[[Sequence[str]], subprocess.CompletedProcess[str]], cluster: str,
                 config: Path, service_user: str = "") -> list[str]:
    """The cluster, accounts, QOS and associations; returns what it added (nothing on a bed that has them)."""
    added = []
    accounts, service_qos = catalog_needs(config)
    service_user = service_user or getpass.getuser()
    if sacctmgr(run, "add", "cluster", cluster):
        added.append(f"cluster {cluster}")
    for qos in QOS[1:] + tuple(q for q in service_qos if q not in QOS):
        if sacctmgr(run, "add", "qos", qos):
            added.append(f"qos {qos}")
    for qos, settings in PREEMPTION:
        if sacctmgr(run, "modify", "qos", qos, "set", *settings):
            added.append(f"qos {qos} {' '.join(settings)}")
    for account in (*ACCOUNTS, *accounts):
        if sacctmgr(run, "add", "account", account, f"cluster={cluster}", f"description={account}",
                    f"organization={account}"):
            added.append(f"account {account}")
    users = {**USER_ASSOCIATIONS, service_user: (tuple(accounts), tuple(service_qos))}
    for user, (user_accounts, user_qos) in users.items():
        if sacctmgr(run, "add", "user", user, f"account={','.join(user_accounts)}", f"cluster={cluster}",
                    f"defaultaccount={user_accounts[0]}" if user != "root" else "defaultaccount=root",
                    f"qos={','.join(user_qos)}", "defaultqos=normal"):
            added.append(f"user {user} in {','.join(user_accounts)} with {','.join(user_qos)}")
    return added


def remove(paths: Paths) -> None:
    """The database's files (the server stopped first)."""
    shutil.rmtree(paths.folder, ignore_errors=True)
