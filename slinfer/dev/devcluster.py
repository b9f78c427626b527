"""`slinfer dev-cluster up|down|status|env`: a real Slurm with slinfer wired in, on loopback (one node) or on a
bridge to compute nodes in network namespaces of their own (`--nodes N`, netns.py).

The bed runs Debian's munged, slurmctld and slurmd from a generated config in a state folder, fake GPUs
(character devices listed in gres.conf, so Slurm allocates them and sets CUDA_VISIBLE_DEVICES as on a GPU node),
the compiled SPANK plugin in its plugstack.conf, the node agent and the controller. The bed is secured as a
site should be: a random `[controller].token` (kept across `up`s), and a CA with certificates for the gRPC
port, so agents and the CLI speak mutual TLS to the controller. Every daemon runs in the
foreground of a session of its own with a pid file here, so `down` stops exactly what `up` started and then
checks that nothing is left. With several nodes, each node is a slurmd and an agent in the node's network, UTS
and mount namespaces (its own address, host name, config, run folder, socket and fake GPUs); slurmctld and the
controller run on the head, on the bridge's address. This module does not install anything; `make install` does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import stat
import string
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from slinfer.dev import accounting, hostchanges
from slinfer.dev.netns import BedNetwork
from slinfer.slurm import parse, queries
from slinfer.slurm.release import SlurmRoot
from slinfer.slurm.runner import Query, Runner, SlurmError

if TYPE_CHECKING:
    from slinfer.tls import Issued

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path(os.environ.get("SLINFER_DEV_STATE", "/tmp/slinfer-dev"))
NODE_NAME = "slinfer-dev"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEV_API_KEY = "sk-slinfer-dev"
# slurm.conf's ClusterName and slurmdbd's cluster: each bed has a database of its own, so all share the name.
CLUSTER_NAME = "slinfer-dev"
# The file in a bed's state folder that names the release root it runs (empty: the system's Slurm).
SLURM_RECORD = "slurm-root"
# The file in a bed's state folder that holds its node count, so `down|status|env` need no --nodes.
NODES_RECORD = "node-count"
# And its port base: a bed of several nodes names its namespaces and interfaces from it, so `down` must know it.
PORT_BASE_RECORD = "port-base"
# Unprivileged users who submit the bed's jobs, as a site's users do: two, so that one can try the other's engine.
BED_USERS = ("slinfer-alice", "slinfer-bob")
# The bed's controller runs as root, so root's jobs are the service's: the only ones the shared pool takes
# ([controller].user, and the plugstack's pool_users=).
BED_SERVICE_USER = "root"
# Which gateway serves the bed's gateway port (Bed.gateway_port, $SLINFER_GATEWAY_URL): "tier", the default, is what
# a site runs (slinfer-gateway, fed by the controller; the controller's built-in gateway on a port of its own);
# "builtin" serves it from the controller's built-in gateway, with no tier.
GATEWAY_ENV = "SLINFER_BED_GATEWAY"
GATEWAY_MODES = ("tier", "builtin")
# The bed's own tier: one worker (a site runs one per core; the bed's machine has two, shared by everything).
TIER_WORKERS = 1
# A bed takes the ports port_base..+99, so the next bed's FirstJobId (port_base * 10) is at least this far on.
JOB_ID_SPAN = 1000
# Fake GPUs are character devices of the memory driver at minors it does not use: each needs its own number,
# since Slurm's device cgroup allows and denies by major:minor (all at /dev/null's 1:3 would deny /dev/null).
FAKE_GPU_MAJOR, FAKE_GPU_MINOR = 1, 240
@dataclass(frozen=True)
class Bed:
    """Paths and ports of one bed; everything derives from the state folder and a port base."""

    state: Path
    port_base: int = 16800
    gpus: int = 4
    # A release's root filesystem (/opt/slurm/24.11) whose Slurm the bed runs; empty: the system's Slurm.
    slurm: str = field(default_factory=lambda: os.environ.get("SLINFER_SLURM", ""))
    # Compute nodes: 1 runs on loopback in the host's namespaces; 2 or more get a namespace each (netns.py).
    nodes: int = 1
    # What serves gateway_port: GATEWAY_MODES, from $SLINFER_BED_GATEWAY.
    gateway: str = field(default_factory=lambda: os.environ.get(GATEWAY_ENV, "") or "tier")

    def __post_init__(self) -> None:
        if self.gateway not in GATEWAY_MODES:
            raise ValueError(f"{GATEWAY_ENV}={self.gateway!r}: must be one of {', '.join(GATEWAY_MODES)}")

    @property
    def network(self) -> BedNetwork | None:
        return BedNetwork(self.port_base, self.nodes) if self.nodes > 1 else None

    @property
    def head_address(self) -> str:
        """Where nodes reach slurmctld and the controller: loopback with one node, the bridge with several."""
        net = self.network
        return net.head_address if net else "127.0.0.1"

    @property
    def node_names(self) -> list[str]:
        return [NODE_NAME] if self.nodes == 1 else [f"{NODE_NAME}-{i}" for i in range(1, self.nodes + 1)]

    def node_index(self, node: str) -> int:
        return self.node_names.index(node) + 1

    def node_address(self, node: str) -> str:
        net = self.network
        return net.node_address(self.node_index(node)) if net else "127.0.0.1"

    def node_dir(self, node: str) -> Path:
        """A node's own files (its config, plugstack, run folder, GPUs); with one node, the state folder."""
        return self.state if self.nodes == 1 else self.state / "nodes" / node

    def node_config(self, node: str) -> Path:
        return self.node_dir(node) / "slinfer.toml"

    def node_run_dir(self, node: str) -> Path:
        return self.node_dir(node) / "run"

    def daemon_name(self, daemon: str, node: str) -> str:
        """The pid file's name of a node's slurmd or agent ("agent" on a bed of one node, "agent-NODE" else)."""
        return daemon if self.nodes == 1 else f"{daemon}-{node}"

    @property
    def slurm_root(self) -> SlurmRoot | None:
        return SlurmRoot(Path(self.slurm)) if self.slurm else None

    @property
    def slurm_bin(self) -> Path:
        """The wrappers that run the release's commands inside its root (only with `slurm`)."""
        return self.state / "slurm-bin"

    @property
    def conf(self) -> Path:
        return self.state / "slurm.conf"

    @property
    def config(self) -> Path:
        return self.state / "slinfer.toml"

    @property
    def tls_dir(self) -> Path:
        return self.state / "tls"

    @property
    def token_file(self) -> Path:
        return self.state / "controller.token"

    @property
    def munge_socket(self) -> Path:
        return self.state / "munge" / "munge.socket"

    @property
    def run_dir(self) -> Path:
        return self.state / "run"

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def slurmctld_port(self) -> int:
        return self.port_base + 17

    @property
    def slurmd_port(self) -> int:
        return self.port_base + 18

    @property
    def slurmdbd_port(self) -> int:
        return self.port_base + 19

    @property
    def mariadb_port(self) -> int:
        return self.port_base + 20

    @property
    def database(self) -> accounting.Paths:
        """The bed's MariaDB: data, socket and log (accounting.py)."""
        return accounting.Paths(self.state / "mariadb")

    @property
    def dbd_conf(self) -> Path:
        """slurmdbd.conf, beside slurm.conf, where slurmdbd and the clients look for it."""
        return self.state / "slurmdbd.conf"

    @property
    def controller_port(self) -> int:
        return self.port_base + 90

    @property
    def gateway_port(self) -> int:
        """The clients' port: the tier's, or the built-in gateway's with SLINFER_BED_GATEWAY=builtin."""
        return self.port_base + 80

    @property
    def builtin_gateway_port(self) -> int:
        """The controller's built-in gateway: its own port beside the tier, else the clients' port."""
        return self.port_base + 81 if self.gateway == "tier" else self.gateway_port

    @property
    def first_job_id(self) -> int:
        return self.port_base * 10

    @property
    def job_ids(self) -> range:
        """The job ids this bed's lives can give out; another bed's (port_base at least 100 apart) never overlap."""
        return range(self.first_job_id, self.first_job_id + JOB_ID_SPAN)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}/v1"

    def pidfile(self, name: str) -> Path:
        return self.state / "pids" / f"{name}.pid"

    def env(self) -> dict[str, str]:
        env = {"SLURM_CONF": str(self.conf), "SLINFER_CONFIG": str(self.config),
               "SLINFER_GATEWAY_URL": self.gateway_url, "SLINFER_API_KEY": DEV_API_KEY,
               "SLINFER_CONTROLLER": f"{self.head_address}:{self.controller_port}"}
        if self.slurm:
            # The release's clients first: the daemons, the agent, the controller and users all run them.
            env["PATH"] = f"{self.slurm_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        return env

    @property
    def slurmctld_state(self) -> Path:
        """slurmctld's StateSaveLocation, one per release: a state another release saved stops slurmctld at
        start ("Can not recover assoc_usage state, incompatible version"), so a bed that changes release keeps
        each release's state apart rather than failing."""
        return self.state / "slurmctld" / (self.release() or "unknown")

    def release(self) -> str:
        """The release of the Slurm this bed runs ("24.11")."""
        root = self.slurm_root
        if root is not None:
            return root.release
        # slurmctld -V reads no config (sinfo -V waits 60 s for a slurm.conf that `up` has not written yet).
        try:
            return Runner(env={**os.environ, **self.env()}).get(Query(("slurmctld", "-V"), parse.release))
        except SlurmError:
            return ""



def _bin_dir() -> Path:
    return Path(sys.executable).parent


def plugin_path(bed: Bed | None = None) -> Path:
    """The plugin the bed loads: `make -C spank SLURM_ROOT=...` builds one per release into spank/build/R/."""
    root = bed.slurm_root if bed is not None else None
    default = REPO_ROOT / "spank" / ("build/" + root.release if root else "") / "spank_slinfer.so"
    return Path(os.environ.get("SLINFER_SPANK_PLUGIN", default))


def tiny_model_path() -> Path:
    return Path(os.environ.get("SLINFER_TINY_MODEL", Path(sys.prefix) / "share" / "slinfer" / "models" / "tiny"))


def smollm2_model_path() -> Path:
    from slinfer.dev import smollm2model

    return smollm2model.default_path()


def engine_python() -> Path:
    """The Python with vLLM that engines run: the venv's, or the packages' CI's installed one."""
    return Path(os.environ.get("SLINFER_ENGINE_PYTHON") or _bin_dir() / "python")


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def bed_token(bed: Bed) -> str:
    """The bed's controller token: made once (root-only file), then the same at every `up`."""
    if bed.token_file.exists():
        return bed.token_file.read_text().strip()
    token = secrets.token_urlsafe(32)
    fd = os.open(bed.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token


def bed_certificates(bed: Bed, host: str) -> tuple[Path, Issued, Issued]:
    """The bed's CA, the controller's server certificate (for 127.0.0.1, localhost, the host name and, with
    several nodes, the bridge's address the nodes dial) and the agents' client certificate; made once and kept,
    like a site's, and the server's made again when the names it must carry change."""
    from slinfer.tls import CertificateAuthority, Issued

    ca = CertificateAuthority(bed.tls_dir, "slinfer dev-cluster CA")
    server, client = Issued(bed.tls_dir / "controller.pem", bed.tls_dir / "controller.key"), \
        Issued(bed.tls_dir / "agent.pem", bed.tls_dir / "agent.key")
    names = ["127.0.0.1", "localhost", host] + ([bed.head_address] if bed.nodes > 1 else [])
    names_file = bed.tls_dir / "controller.names"
    recorded = names_file.read_text().split() if names_file.exists() else ["127.0.0.1", "localhost", host]
    if not (server.cert.exists() and server.key.exists()) or recorded != names:
        server = ca.issue("controller", names)
        names_file.write_text(" ".join(names) + "\n")
    if not (client.cert.exists() and client.key.exists()):
        client = ca.issue("agent", [NODE_NAME], client=True)
    return ca.cert_path, server, client


def render(name: str, **values: object) -> str:
    """The template `name` of slinfer/dev/templates (string.Template: `$key` placeholders) filled with `values`;
    a placeholder without a value raises KeyError, so a template and its caller cannot drift apart unseen."""
    text = (resources.files("slinfer.dev") / "templates" / name).read_text()
    return string.Template(text).substitute({key: str(value) for key, value in values.items()})


def _slurm_conf(bed: Bed, host: str) -> str:
    s = bed.state
    # switch/none went away after 22.05 (later releases run without a switch plugin when none is named); the
    # system's Slurm here is Debian 12's 22.05.
    root = bed.slurm_root
    switch = "SwitchType=switch/none\n" if root is None or root.release == "22.05" else ""
    several = bed.nodes > 1
    # Several slurmds share the state folder: each gets its own spool, pid file and log (%n: the node's name).
    per_node = "-%n" if several else ""
    spool = f"{s}/slurmd/%n" if several else f"{s}/slurmd"
    nodes = "\n".join(
        f"NodeName={name} NodeAddr={bed.node_address(name)} NodeHostname={name if several else host} CPUs=8 "
        f"RealMemory=98304 Gres=gpu:{bed.gpus} State=UNKNOWN" for name in bed.node_names)
    several_lines = """\
# A job of a lost node ends there (NODE_FAIL): the controller, not Slurm's requeue, replaces the capacity.
JobRequeue=0
""" if several else ""
    # Slurm must call a silent node DOWN (and end its jobs) well before the controller forgets the node's agent
    # (60 s): a forgotten agent's job that Slurm still lists RUNNING would count as a replica starting.
    timeouts = ("MessageTimeout=10\n# Pings every 7 s: a node off the network is DOWN within about 30 s."
                "\nSlurmdTimeout=20" if several else
                "MessageTimeout=20\n# Pings every 20 s: a restarted slurmctld learns soon what slurmd already finished."
                "\nSlurmdTimeout=60")
    # Least loaded node first: replicas spread over the nodes, as a site wants for its service.
    lln = " LLN=YES" if several else ""
    description = (f"Slurm of {bed.nodes} nodes on a bridge" if several else "single-node Slurm on loopback")
    return render(
        "slurm.conf.in", description=description, cluster_name=CLUSTER_NAME, host=host,
        head_address=bed.head_address, slurmctld_port=bed.slurmctld_port, slurmd_port=bed.slurmd_port,
        munge_socket=bed.munge_socket, slurmctld_state=bed.slurmctld_state, spool=spool,
        slurmctld_pid_file=bed.pidfile("slurmctld-self"), slurmd_pid_file=bed.pidfile("slurmd" + per_node + "-self"),
        logs=bed.logs, per_node=per_node, switch=switch, slurmdbd_port=bed.slurmdbd_port, state=s,
        first_job_id=bed.first_job_id, timeouts=timeouts, several_lines=several_lines, nodes=nodes,
        node_list=",".join(bed.node_names), lln=lln)


# Where each catalog model's jobs run in the site's order (accounting.py makes the associations).
SITE_ORDER = render("site-order.toml.in", account=accounting.SERVICE_ACCOUNT)


def _slinfer_toml(bed: Bed, node: str, token: str, ca: Path, server: Issued, client: Issued) -> str:
    """The bed's slinfer.toml as `node` sees it: the same [controller], [gateway] and catalog everywhere; the
    [agent] part names the node, its address (engines listen on and advertise it), run folder and socket."""
    run = bed.node_run_dir(node)
    return render(
        "slinfer.toml.in", for_node="" if bed.nodes == 1 else f" for the node {node}",
        controller=f"{bed.head_address}:{bed.controller_port}", token=token, server_cert=server.cert,
        server_key=server.key, ca=ca, state=bed.state, service_user=BED_SERVICE_USER,
        slinfer_bin=_bin_dir() / "slinfer", gateway_port=bed.gateway_port, api_key=DEV_API_KEY, run=run,
        builtin_gateway=(f'gateway_listen = "127.0.0.1:{bed.builtin_gateway_port}"' if bed.gateway == "tier"
                         else "# no gateway_listen: the built-in gateway serves [gateway].listen (no tier)"),
        address=bed.node_address(node), node=node, slurm_conf=bed.conf, python=engine_python(), logs=bed.logs,
        log_name="agent.log" if bed.nodes == 1 else f"agent-{node}.log", client_cert=client.cert,
        client_key=client.key, port_low=bed.port_base + 1000, port_high=bed.port_base + 1999,
        tiny=tiny_model_path(), smollm2=smollm2_model_path(), site_order=SITE_ORDER.rstrip("\n"),
        munge_socket=bed.munge_socket, user_controller=f"{bed.head_address}:{bed.controller_port + 1}")


def _gres_conf(bed: Bed) -> str:
    """gres.conf: each node's fake GPUs, by the files _fake_gpus makes."""
    return "".join(render("gres.conf.in", node=node, node_dir=bed.node_dir(node), last=bed.gpus - 1)
                   for node in bed.node_names)


def _plugstack_conf(bed: Bed, node: str, hook: str | Path) -> str:
    """A node's plugstack.conf: the SPANK plugin with the hook, the shared config and the node's run folder."""
    return render("plugstack.conf.in", plugin=plugin_path(bed), hook=hook, config=bed.config,
                  run_dir=bed.node_run_dir(node), pool_users=BED_SERVICE_USER)


def _fake_gpus(bed: Bed, node: str, first_minor: int) -> None:
    folder = bed.node_dir(node)
    for i in range(bed.gpus):
        dev = folder / f"gpu{i}"
        rdev = os.makedev(FAKE_GPU_MAJOR, first_minor + i)
        if not (dev.exists() and dev.stat().st_rdev == rdev):
            dev.unlink(missing_ok=True)
            os.mknod(dev, 0o666 | stat.S_IFCHR, rdev)


def write_configs(bed: Bed) -> None:
    host = socket.gethostname().split(".")[0]
    s = bed.state
    for sub in ("munge", "slurmctld", "slurmd", "pids", "logs", "run", "controller"):
        (s / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(s, 0o755)
    bed.slurmctld_state.mkdir(parents=True, exist_ok=True)
    token = bed_token(bed)
    ca, server, client = bed_certificates(bed, host)
    _write(bed.conf, _slurm_conf(bed, host))
    # cgroup v1 as this machine mounts it; the limits production sites set. Memory is the job's --mem.
    _write(s / "cgroup.conf", render("cgroup.conf.in"))
    _write(s / "gres.conf", _gres_conf(bed))
    # Packaging's CI points the bed at installed files: the hook in /usr/libexec, a Python that has vLLM.
    hook = os.environ.get("SLINFER_HOOK") or _bin_dir() / "slinfer-hook"
    for n, node in enumerate(bed.node_names):
        # Each node's GPUs have minors of their own: the device cgroup allows and denies by major:minor.
        bed.node_run_dir(node).mkdir(parents=True, exist_ok=True)
        if bed.nodes > 1:
            (s / "slurmd" / node).mkdir(parents=True, exist_ok=True)
        _fake_gpus(bed, node, FAKE_GPU_MINOR + n * bed.gpus)
        # A node reads the shared paths (bed.config, plugstack.conf); several nodes see their own files there,
        # bound over them in the node's mount namespace (netns.BedNetwork.enter), as each host has its /etc.
        _write(bed.node_dir(node) / "plugstack.conf", _plugstack_conf(bed, node, hook))
        # The config holds the token: root-only, as the packages install theirs (root:slinfer 0640).
        _write(bed.node_config(node), _slinfer_toml(bed, node, token, ca, server, client), mode=0o600)
    release = bed.release()
    _write(bed.dbd_conf, accounting.slurmdbd_conf(
        host=host, address=bed.head_address, dbd_port=bed.slurmdbd_port, db_port=bed.mariadb_port, release=release,
        secret=accounting.password(s / "slurmdbd.secret"), munge_socket=bed.munge_socket,
        pid_file=bed.pidfile("slurmdbd-self"), log_file=bed.logs / "slurmdbd.log"), mode=0o600)
    if bed.nodes > 1:
        # The head's own files: no agent runs there, its [agent] part is the first node's (unused).
        _write(s / "plugstack.conf", (bed.node_dir(bed.node_names[0]) / "plugstack.conf").read_text())
        _write(bed.config, _slinfer_toml(bed, bed.node_names[0], token, ca, server, client), mode=0o600)


def node_binds(bed: Bed, node: str) -> list[tuple[Path, Path]]:
    """The node's own files bound over the shared paths in its mount namespace."""
    return [(bed.node_config(node), bed.config),
            (bed.node_dir(node) / "plugstack.conf", bed.state / "plugstack.conf")]


def daemon_pid(bed: Bed, name: str) -> int:
    """The pid of a daemon of this bed, or 0."""
    try:
        pid, created = json.loads(bed.pidfile(name).read_text())
        proc = psutil.Process(pid)
        if abs(proc.create_time() - created) < 0.05 and proc.status() != psutil.STATUS_ZOMBIE:
            return int(pid)
    except (OSError, ValueError, psutil.Error):
        pass
    return 0


def launch(bed: Bed, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    pid = daemon_pid(bed, name)
    if pid:
        return pid
    log_path = bed.logs / f"{name}.out"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True,
                                env={**os.environ, **bed.env(), **(env or {})})
    bed.pidfile(name).write_text(json.dumps([proc.pid, psutil.Process(proc.pid).create_time()]))
    time.sleep(0.2)
    if proc.poll() is not None:
        raise RuntimeError(f"{name} exited at once (code {proc.returncode}); see {log_path}")
    return proc.pid


def stop_daemon(bed: Bed, name: str, grace: float = 10.0) -> int:
    """Stops a daemon of this bed; returns the pid it stopped, or 0 when none ran. A pid file whose process is
    gone (it died, or its pid was reused) is said on stderr and removed, never taken for a stop: a caller that
    must know a daemon really died and came back checks the pid returned."""
    pid = daemon_pid(bed, name)
    if pid:
        try:
            proc = psutil.Process(pid)
            proc.terminate()
            proc.wait(grace)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        except psutil.NoSuchProcess:
            pass
    elif bed.pidfile(name).exists():
        print(f"dev-cluster: {name}'s pid file {bed.pidfile(name)} names no running {name} (it had died "
              f"already); nothing stopped", file=sys.stderr)
    bed.pidfile(name).unlink(missing_ok=True)
    return pid


def slurm_runner(bed: Bed) -> Runner:
    """The bed's Slurm clients (the shared layer's runner, with the bed's SLURM_CONF)."""
    return Runner(env={**os.environ, **bed.env()})


def run_as(bed: Bed, user: str, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A Slurm command of one of the bed's users (from /, with the bed's environment); on a release root the
    bed enters the root for them, as only root may chroot. Their PATH is the one `dev-cluster env` gives a user:
    a job inherits it, and its script runs `slinfer` from this venv."""
    env = {**os.environ, **bed.env()}
    env["PATH"] = _user_path(bed, os.environ.get("PATH", "/usr/bin:/bin"))
    root = bed.slurm_root
    if root is not None:
        return subprocess.run(root.argv(argv, "/", user), env=env, capture_output=True, text=True, check=True,
                              timeout=timeout)
    return subprocess.run(argv, user=user, env=env, cwd="/", capture_output=True, text=True, check=True,
                          timeout=timeout)


def node_state(bed: Bed, node: str = "") -> str:
    """A bed node's state as sinfo prints it (idle, mixed, drained, ...); the first node unless named. Raises
    when sinfo fails: an empty answer would read as "no state" to a caller checking for drain, and hide a broken
    Slurm."""
    try:
        return slurm_runner(bed).get(queries.node_state(node or bed.node_names[0]))
    except SlurmError as exc:
        status = "timed out" if exc.returncode is None else f"exit {exc.returncode}"
        raise RuntimeError(f"sinfo failed ({status}): {exc.stderr.strip()}") from exc


def _ping(bed: Bed) -> bool:
    try:
        return "UP" in slurm_runner(bed).run(["scontrol", "ping"])
    except SlurmError:
        return False


def _queued(bed: Bed) -> list[str]:
    try:
        return [j.job_id for j in slurm_runner(bed).get(queries.all_jobs())]
    except SlurmError:
        return []


def _wait_for(what: str, predicate: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except RuntimeError as exc:  # a daemon that was just started may not answer yet
            last_error = f" (last: {exc})"
        time.sleep(0.3)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}{last_error}")


def _ensure_munge_key(bed: Bed) -> Path:
    key = bed.state / "munge" / "munge.key"
    if not key.exists():
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(os.urandom(128))
    # Others may reach the socket (bed users submit jobs, as on a site) but not list the folder; the key is 0600.
    os.chmod(bed.state / "munge", 0o711)
    return key


def ensure_users() -> list[str]:
    """Creates the bed's unprivileged users where they are missing, recorded first (hostchanges.py) so that the
    last bed's `down` removes them; returns those it created."""
    return [user for user in BED_USERS if hostchanges.create_user(user, _useradd)]


def _useradd(user: str) -> None:
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", "--user-group", user], check=True,
                   capture_output=True)


def make_usable_by_users(path: Path) -> list[Path]:
    """Lets every user reach and run `path` (the engine's Python, as a site's shared one is): each folder on the
    way, link targets included, gets the search bit for others where it lacks it (a pyenv under /root, 0700),
    its mode recorded first so that the last bed's `down` restores it (hostchanges.py). Only search, never read:
    folder listings stay private. Returns the folders it changed."""
    folders = [folder for target in {path.absolute(), path.resolve()} for folder in reversed(target.parents)]
    return hostchanges.make_searchable(dict.fromkeys(folders))


def other_beds_running(bed: Bed) -> list[str]:
    """The Slurm configs of other beds whose slurmctld runs on this machine (they share the users and the
    folders made searchable, so the host's changes stay while any runs)."""
    others = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        argv = proc.info["cmdline"] or []
        if proc.info["name"] != "slurmctld" or "-f" not in argv[:-1]:
            continue
        conf = argv[argv.index("-f") + 1]
        if conf != str(bed.conf):
            others.append(conf)
    return others


def restore_host(bed: Bed) -> list[str]:
    """Undoes what `up` changed on the host (users, search bits), unless another bed still runs or is going up;
    says what."""
    return hostchanges.undo(busy=lambda changes: other_beds_running(bed) + changes.others_starting(str(bed.state)))


def up(bed: Bed, controller: bool = True) -> None:
    if os.geteuid() != 0:
        raise RuntimeError("the dev cluster runs Slurm's daemons and the agent as root: run as root")
    with hostchanges.starting(str(bed.state)):
        _up(bed, controller)


def _up(bed: Bed, controller: bool) -> None:
    root = bed.slurm_root
    bed.state.mkdir(parents=True, exist_ok=True)
    # `dev-cluster env|status|down` without --slurm find the bed's release here.
    (bed.state / SLURM_RECORD).write_text(bed.slurm + "\n")
    for user in ensure_users():
        print(f"dev-cluster: created the unprivileged user {user}", file=sys.stderr)
    # Before the root's mounts: the root copies the host's search bits on the way to each of them.
    for folder in make_usable_by_users(engine_python()):
        print(f"dev-cluster: {folder} is now searchable by all users, so that their engines can run "
              f"{engine_python()}", file=sys.stderr)
    if root is not None:
        root.mount()
        root.write_wrappers(bed.slurm_bin)
    if not plugin_path(bed).exists():
        build = f"make -C spank SLURM_ROOT={root.root}" if root else "make spank` (or `make install"
        raise RuntimeError(f"SPANK plugin {plugin_path(bed)} is missing: run `{build}`")
    if not (tiny_model_path() / "config.json").exists():
        from slinfer.dev import tinymodel

        tinymodel.generate(tiny_model_path())
    from slinfer.dev import smollm2model

    if not smollm2_model_path().joinpath("config.json").exists():
        smollm2model.build(smollm2_model_path())
    else:
        smollm2model.ensure_float32(smollm2_model_path())  # an older build's bf16, converted once
    (bed.state / NODES_RECORD).write_text(f"{bed.nodes}\n")
    (bed.state / PORT_BASE_RECORD).write_text(f"{bed.port_base}\n")
    write_configs(bed)
    net = bed.network
    # Idempotent like the rest of `up`: a running bed keeps its network (and the daemons in its namespaces).
    if net is not None and net.left() != net.expected():
        net.create()
    m = bed.state / "munge"
    launch(bed, "munged", ["munged", "-F", "-f", f"--socket={bed.munge_socket}",
                            f"--key-file={_ensure_munge_key(bed)}", f"--pid-file={m}/munged.pid",
                            f"--seed-file={m}/seed", f"--log-file={bed.logs}/munged.log"])
    _wait_for("munged's socket", bed.munge_socket.exists, 10)
    start_accounting(bed)
    # A fresh bed starts with no jobs; a running one keeps its state.
    start_slurmctld(bed, clear_state=not daemon_pid(bed, "slurmctld"))
    if not any(daemon_pid(bed, bed.daemon_name("slurmd", node)) for node in bed.node_names):
        _sweep_stale_cgroups(bed)
    start_slurmd(bed)
    for node in bed.node_names:
        if any(word in node_state(bed, node) for word in ("drain", "down")):
            with contextlib.suppress(SlurmError):
                slurm_runner(bed).run(["scontrol", "update", f"nodename={node}", "state=resume"])
        _wait_for(f"the node {node} to be idle or allocated",
                  lambda node=node: node_state(bed, node).rstrip("*~#") in ("idle", "mixed", "allocated"), 30)
    for node in bed.node_names:
        start_agent(bed, node)
    if controller:
        start_controller(bed)
        if bed.gateway == "tier":
            start_tier(bed)


def start_accounting(bed: Bed) -> None:
    """MariaDB, slurmdbd, and the site's order in it (accounting.py); on a running bed, nothing changes."""
    db = bed.database
    began = time.monotonic()
    accounting.install_db(db)
    for name, port in (("mariadb", bed.mariadb_port), ("slurmdbd", bed.slurmdbd_port)):
        if not daemon_pid(bed, name):
            _port_free(port, f"{name} (port base + {port - bed.port_base})")
    launch(bed, "mariadb", accounting.mariadbd_argv(db, bed.mariadb_port))
    _wait_for("MariaDB", lambda: db.socket.exists() and _port_open(bed.mariadb_port), 60)
    accounting.grant(db, bed.release(), accounting.password(bed.state / "slurmdbd.secret"))
    launch(bed, "slurmdbd", ["slurmdbd", "-D"])
    _wait_for("slurmdbd", lambda: _port_open(bed.slurmdbd_port, bed.head_address), 60)

    def sacctmgr(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), env={**os.environ, **bed.env()}, capture_output=True, text=True,
                              check=False, timeout=60)

    for added in accounting.create_order(sacctmgr, CLUSTER_NAME, bed.config):
        print(f"dev-cluster: accounting: added {added}", file=sys.stderr)
    print(f"dev-cluster: accounting (MariaDB, slurmdbd, the site's order) ready in {time.monotonic() - began:.1f} s",
          file=sys.stderr)


def start_slurmctld(bed: Bed, clear_state: bool = False) -> int:
    pid = launch(bed, "slurmctld", ["slurmctld", "-D", "-f", str(bed.conf), *(["-c"] if clear_state else [])])
    _wait_for("slurmctld", lambda: _ping(bed), 30)
    return pid


def in_node(bed: Bed, node: str, argv: list[str]) -> list[str]:
    """argv as a process of `node`: as it is on a bed of one node, else inside the node's namespaces."""
    net = bed.network
    if net is None:
        return argv
    return net.enter(bed.node_index(node), node, node_binds(bed, node), argv)


def start_slurmd(bed: Bed) -> int:
    """Starts every node's slurmd and waits until each registered; returns the first one's pid."""
    pids = [launch(bed, bed.daemon_name("slurmd", node),
                   in_node(bed, node, ["slurmd", "-D", "-f", str(bed.conf), "-N", node]))
            for node in bed.node_names]
    for node in bed.node_names:
        _wait_for(f"the node {node} to register",
                  lambda node=node: node_state(bed, node) not in ("", "unknown", "unknown*", "down*"), 30)
    return pids[0]


def start_agent(bed: Bed, node: str) -> int:
    pid = launch(bed, bed.daemon_name("agent", node),
                 in_node(bed, node, [str(_bin_dir() / "slinfer-agent"), "--config", str(bed.node_config(node))]))
    _wait_for(f"the agent's socket on {node}", (bed.node_run_dir(node) / "agent.sock").exists, 20)
    return pid


def restart_agent(bed: Bed) -> int:
    """Stops the bed's agent, whoever started it (`up` or the hook), and starts it again; engines keep running."""
    stop_daemon(bed, "agent")
    agents = [p for p in _bed_processes(bed)
              if any(part.endswith(("slinfer-agent", "slinfer.agent.daemon")) for part in p.info["cmdline"] or [])]
    for proc in agents:
        proc.terminate()
    _, alive = psutil.wait_procs(agents, timeout=10)
    # An agent still shutting down holds the socket's lock, and the new one would exit at once.
    for proc in alive:
        proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return launch(bed, "agent", [str(_bin_dir() / "slinfer-agent"), "--config", str(bed.config)])


def start_controller(bed: Bed) -> int:
    pid = launch(bed, "controller", [str(_bin_dir() / "slinfer-controller"), "--config", str(bed.config)])
    _wait_for("the controller's gateway", lambda: _port_open(bed.builtin_gateway_port), 30)
    return pid


def reload_tier(bed: Bed, timeout: float = 120.0) -> None:
    """SIGHUP to the bed's tier, as a site's `systemctl reload slinfer-gateway` after changing the catalog (the
    workers read it from the file themselves); returns once as many new workers listen as ran before and no old
    one does (the supervisor replaces them one by one, each new one listening before the old one stops and drains
    the connections it has: a client must connect anew to meet the new catalog). Nothing to do on a bed without
    a tier."""
    if bed.gateway != "tier":
        return
    pid = daemon_pid(bed, "tier")
    if not pid:
        raise RuntimeError("the bed's gateway tier is not running")
    def listening(child: psutil.Process) -> bool:
        with contextlib.suppress(psutil.Error):
            return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == bed.gateway_port
                       for c in child.net_connections(kind="tcp"))
        return False

    # The daemon's pid is the launcher's: the workers are further down (recursive).
    old = {child.pid for child in psutil.Process(pid).children(recursive=True) if listening(child)}
    if not old:
        raise RuntimeError(f"no worker of the bed's gateway tier listens on port {bed.gateway_port}")
    os.kill(pid, signal.SIGHUP)

    def replaced() -> bool:
        now = [child for child in psutil.Process(pid).children(recursive=True) if listening(child)]
        # An old worker stops listening at its SIGTERM, then drains its open connections (up to its grace).
        return sum(1 for child in now if child.pid not in old) >= len(old) and not any(c.pid in old for c in now)

    _wait_for("the tier's new workers", replaced, timeout)


def restart_controller(bed: Bed, timeout: float = 90.0) -> int:
    """Stops the bed's controller and starts it again; with the tier, returns only once the tier holds the new
    controller's table (its /healthz names the new run's epoch): until then it serves the routes it knew, and a
    test reading the gateway's /v1/models would see replicas that the restart's changes already retired."""
    before = _tier_epoch(bed) if bed.gateway == "tier" else ""
    stop_daemon(bed, "controller")
    pid = start_controller(bed)
    if bed.gateway == "tier":
        _wait_for("the tier to follow the new controller", lambda: _tier_epoch(bed) not in ("", before), timeout)
    return pid


def _tier_epoch(bed: Bed) -> str:
    """The epoch of the controller run whose table the tier holds, "" while it is not connected."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{bed.gateway_port}/healthz", timeout=5) as response:
            health = json.load(response)
    except (OSError, ValueError):
        return ""
    return str(health.get("epoch", "")) if health.get("controller") == "connected" else ""


def start_tier(bed: Bed) -> int:
    """The bed's own gateway tier (daemon "tier") on the clients' port, as a site runs it beside the controller.
    Tests that start a tier of their own (start_gateway, daemon "gateway") do so beside it."""
    pid = launch(bed, "tier", [str(_bin_dir() / "slinfer-gateway"), "--config", str(bed.config),
                               "--listen", f"127.0.0.1:{bed.gateway_port}", "--workers", str(TIER_WORKERS)])
    _wait_for("the bed's gateway tier", lambda: _port_open(bed.gateway_port), 90)
    return pid


def start_gateway(bed: Bed, port: int, workers: int = 2) -> int:
    """A `slinfer-gateway` tier (its supervisor and `workers` workers) on `port`, fed by the bed's controller."""
    pid = launch(bed, "gateway", [str(_bin_dir() / "slinfer-gateway"), "--config", str(bed.config),
                                  "--listen", f"127.0.0.1:{port}", "--workers", str(workers)])
    # A worker listens once it has the controller's first table (within ~12 s of the controller's start).
    _wait_for("the gateway tier", lambda: _port_open(port), 90)
    return pid


def _port_free(port: int, what: str) -> None:
    """Raises, naming the holder, when a process listens on `port` already (an engine of another bed whose port
    range covers this bed's ports: its daemon would die with "Address already in use")."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            try:
                holder = " ".join(psutil.Process(conn.pid).cmdline())[:200] if conn.pid else "?"
            except psutil.Error:
                holder = "?"
            raise RuntimeError(f"port {port} for {what} is taken by pid {conn.pid} ({holder}): wait until it is "
                               f"free, or choose another --port-base")


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def _bed_processes(bed: Bed) -> list[psutil.Process]:
    """Processes of this bed: daemons by pid file, engines by the bed's marker or state folder in argv, and
    whatever lives in its nodes' network namespaces."""
    found = []
    in_nodes = set(bed.network.pids()) if bed.network is not None else set()
    # The state folder as a whole path component: /tmp/bed must not match /tmp/bed26's processes.
    marker = re.compile(re.escape(str(bed.state)) + r"(/|$|\s)")
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmdline = " ".join(proc.info["cmdline"] or [])
        if marker.search(cmdline) or proc.pid in in_nodes:
            found.append(proc)
    return found


def down(bed: Bed) -> list[int]:
    """Stops everything the bed runs; returns the pids of processes that could not be stopped."""
    if daemon_pid(bed, "slurmctld"):
        jobs = _queued(bed)
        if jobs:
            with contextlib.suppress(SlurmError):
                slurm_runner(bed).run(["scancel", *jobs])
            # Epilogs stop the engines: give them the time a real job's end takes.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and _queued(bed):
                time.sleep(0.5)
    names = ["tier", "controller", *(bed.daemon_name(d, node) for d in ("agent", "slurmd") for node in bed.node_names)]
    for name in (*names, "slurmctld", "slurmdbd", "mariadb", "munged"):
        stop_daemon(bed, name, grace=30.0 if name == "mariadb" else 10.0)
    # The cluster, accounts, QOS and associations go with the database (a fresh `up` makes them again).
    if not daemon_pid(bed, "mariadb"):
        accounting.remove(bed.database)
    root = bed.slurm_root
    if root is not None and not root.unmount():
        log.info("slurm root %s stays mounted: processes %s still run in it", root.root, root.in_use())
    _kill_engines_left(bed)
    from slinfer.kube.cleanup import remove_published  # the Nodes, Leases and Pods its agents published
    remove_published(bed.config, bed.node_names)
    left = _bed_processes(bed)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
    _sweep_stale_cgroups(bed)
    survivors = [p.pid for p in _bed_processes(bed)]
    _remove_network(bed)
    if not survivors:
        for line in restore_host(bed):
            print(f"dev-cluster: {line}", file=sys.stderr)
    return survivors


def _sweep_stale_cgroups(bed: Bed) -> None:
    """Removes the job cgroups an earlier life of this bed left (stalecgroups.py says why), saying which."""
    from slinfer.dev import stalecgroups

    for folder, outcome in stalecgroups.sweep(bed.job_ids).items():
        if isinstance(outcome, OSError):
            print(f"dev-cluster: could not remove the stale cgroup {folder}: {outcome}", file=sys.stderr)
        else:
            killed = f", killed {outcome}" if outcome else ""
            print(f"dev-cluster: removed the stale cgroup {folder}{killed}", file=sys.stderr)


def _remove_network(bed: Bed) -> None:
    """Removes the namespaces, veths and bridge of a bed of several nodes; raises if any is left."""
    net = bed.network
    if net is None:
        return
    net.remove()
    # A namespace's veth goes with it, but the kernel frees it a moment later.
    _wait_for("the bed's network to be gone", lambda: not net.left(), 10)


def _kill_engines_left(bed: Bed) -> None:
    from slinfer.agent.processes import engine_tag, terminate_engine

    records = [(run, r) for run in map(bed.node_run_dir, bed.node_names) for r in (run / "engines").glob("*.json")]
    for run_dir, record in records:
        try:
            data = json.loads(record.read_text())
            tag = engine_tag(str(data["job_id"]), str(run_dir))
            terminate_engine(tag, int(data.get("session_id", 0)), 5.0)
        except (OSError, ValueError, KeyError):
            continue
        record.unlink(missing_ok=True)


def status(bed: Bed) -> dict[str, object]:
    names = ["munged", "mariadb", "slurmdbd", "slurmctld",
             *(bed.daemon_name(d, node) for node in bed.node_names for d in ("slurmd", "agent")), "controller", "tier"]
    daemons = {name: daemon_pid(bed, name) for name in names}
    root = bed.slurm_root
    slurm = f"{root.version} in {root.root}" if root else f"system Slurm {bed.release()}"
    try:
        nodes = {node: node_state(bed, node) if daemons["slurmctld"] else "slurmctld not running"
                 for node in bed.node_names}
    except RuntimeError as exc:
        nodes = {node: str(exc) for node in bed.node_names}
    shown: dict[str, object] = {"node": nodes[NODE_NAME]} if bed.nodes == 1 else {
        "nodes": {node: {"state": state, "address": bed.node_address(node)} for node, state in nodes.items()},
        "network": bed.network.left() if bed.network else []}
    return {"state_dir": str(bed.state), "slurm": slurm, "daemons": daemons, **shown, **bed.env()}


def env_lines(bed: Bed) -> str:
    lines = [f"export {key}={value}" for key, value in bed.env().items()]
    lines = [line for line in lines if not line.startswith("export PATH=")]
    lines.append(f'export PATH="{_user_path(bed, "$PATH")}"')
    return "\n".join(lines)


def _user_path(bed: Bed, rest: str) -> str:
    """A bed user's PATH: the release's clients first, then this venv's `slinfer`, then `rest`."""
    first = f"{bed.slurm_bin}:" if bed.slurm else ""
    return f"{first}{_bin_dir()}:{rest}"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = sub.add_parser("dev-cluster", help="a real Slurm with slinfer wired in, for demos and tests")
    parser.add_argument("action", choices=["up", "down", "status", "env"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("--port-base", type=int, default=None,
                        help="ports, subnet and job ids derive from it (default $SLINFER_DEV_PORT_BASE or 16800; "
                             "down, status and env find the bed's own)")
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--nodes", type=int, default=0,
                        help="compute nodes (default 1, on loopback; 2 or more each get network, UTS and mount "
                             "namespaces of their own on a bridge); down, status and env find the bed's count")
    parser.add_argument("--no-controller", action="store_true", help="do not start the controller")
    parser.add_argument("--slurm", default=os.environ.get("SLINFER_SLURM", ""), metavar="ROOT",
                        help="run the Slurm release in this root (make slurm SLURM_RELEASE=24.11 makes "
                             "/opt/slurm/24.11); default: the system's Slurm, or the one the bed was brought up with")
    parser.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    state = args.state_dir.resolve()
    recorded = state / SLURM_RECORD
    slurm = args.slurm or (recorded.read_text().strip() if args.action != "up" and recorded.exists() else "")
    nodes = args.nodes or _recorded(state / NODES_RECORD, args.action, 1)
    if nodes < 1:
        raise SystemExit(f"dev-cluster: --nodes {nodes}: a bed has at least one node")
    port_base = args.port_base or _recorded(state / PORT_BASE_RECORD, args.action,
                                            int(os.environ.get("SLINFER_DEV_PORT_BASE", 16800)))
    bed = Bed(state, port_base, args.gpus, slurm, nodes)
    if args.action == "up":
        up(bed, controller=not args.no_controller)
        print(f"dev cluster up in {bed.state}; run: eval \"$(slinfer dev-cluster env --state-dir {bed.state})\"")
    elif args.action == "down":
        left = down(bed)
        if left:
            print(f"dev cluster down, but processes {left} survived", file=sys.stderr)
            return 1
        print(f"dev cluster down ({bed.state}); no process left")
    elif args.action == "status":
        print(json.dumps(status(bed), indent=2))
    else:
        print(env_lines(bed))
    return 0


def _recorded(path: Path, action: str, default: int) -> int:
    """A number `up` recorded in the state folder, for the commands on a running bed; `up` takes the default."""
    return int(path.read_text()) if action != "up" and path.exists() else default

