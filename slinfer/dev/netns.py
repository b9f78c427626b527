"""The network of a bed of several nodes: one network namespace per compute node, joined by veth pairs to a
bridge in the host namespace, where the head (slurmctld, controller, gateway) has the bridge's address.

Responsible for: naming the bridge, namespaces, veths and the private subnet from the bed's port base (so two
beds on one machine never collide), creating them, taking one node's link down and up again (a node lost to the
network), removing them all, and listing what of them is left; the argv that runs a command inside a node.
Not responsible for: what runs in a node (devcluster.py starts slurmd and the agent there), nor any route out of
the subnet: the nodes reach the head and each other, nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Linux limits interface names to 15 characters (IFNAMSIZ - 1); "slb65535" + "v16" stays far below.
IFNAME_MAX = 15
# The head's host number on the bridge; nodes follow from NODE_HOST_BASE + 1, leaving room for a router-like .1.
HEAD_HOST = 1
NODE_HOST_BASE = 10
# Where `ip netns add` pins a namespace, so `nsenter --net=` can join it by path.
NETNS_DIR = Path("/run/netns")


@dataclass(frozen=True)
class BedNetwork:
    """The names and addresses of one bed's network; every name derives from the port base."""

    port_base: int
    nodes: int

    def __post_init__(self) -> None:
        if not 0 < self.port_base < 65536:
            raise ValueError(f"port base {self.port_base} is outside 1..65535")
        if not 1 <= self.nodes <= 200:
            raise ValueError(f"{self.nodes} nodes: a bed's /24 holds 1..200")
        for name in (self.bridge, *(self.veth_host(i) for i in self.indexes),
                     *(self.veth_node(i) for i in self.indexes)):
            if len(name) > IFNAME_MAX:
                raise ValueError(f"interface name {name!r} is longer than {IFNAME_MAX} characters")

    @property
    def indexes(self) -> range:
        return range(1, self.nodes + 1)

    @property
    def prefix(self) -> str:
        return f"slb{self.port_base}"

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    def namespace(self, i: int) -> str:
        return f"{self.prefix}n{i}"

    def veth_host(self, i: int) -> str:
        return f"{self.prefix}h{i}"

    def veth_node(self, i: int) -> str:
        return f"{self.prefix}v{i}"

    @property
    def subnet(self) -> str:
        # 10.<high byte>.<low byte>.0/24: a /24 per port base, so beds with different bases never overlap.
        return f"10.{self.port_base >> 8}.{self.port_base & 0xFF}"

    @property
    def head_address(self) -> str:
        return f"{self.subnet}.{HEAD_HOST}"

    def node_address(self, i: int) -> str:
        return f"{self.subnet}.{NODE_HOST_BASE + i}"

    def enter(self, i: int, hostname: str, binds: list[tuple[Path, Path]], argv: list[str]) -> list[str]:
        """The argv that runs `argv` as a process of node i: in its network namespace, in UTS and mount
        namespaces of its own with `hostname` set and each (source, target) bound over target. nsenter and
        unshare exec, they do not fork, so the pid of the returned command is the daemon's pid."""
        inner = [sys.executable, "-m", "slinfer.dev.nodeenter", "--hostname", hostname]
        for source, target in binds:
            inner += ["--bind", str(source), str(target)]
        return ["nsenter", f"--net={NETNS_DIR / self.namespace(i)}", "--",
                "unshare", "--uts", "--mount", "--propagation", "private", "--", *inner, "--", *argv]

    def create(self) -> None:
        """Makes the bridge, the namespaces and the veths; first removes any left by an earlier run."""
        self.remove()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.head_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in self.indexes:
            ns, host, node = self.namespace(i), self.veth_host(i), self.veth_node(i)
            _ip("netns", "add", ns)
            _ip("link", "add", host, "type", "veth", "peer", "name", node)
            _ip("link", "set", node, "netns", ns)
            _ip("link", "set", host, "master", self.bridge)
            _ip("link", "set", host, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self.node_address(i)}/24", "dev", node)
            _ip("-n", ns, "link", "set", node, "up")
        log.info("bed network up: bridge %s at %s, %d nodes %s.%d..%d", self.bridge, self.head_address,
                 self.nodes, self.subnet, NODE_HOST_BASE + 1, NODE_HOST_BASE + self.nodes)

    def expected(self) -> list[str]:
        """Every namespace and interface `create` makes (the node ends live inside their namespaces)."""
        return sorted([self.bridge, *(f(i) for i in self.indexes for f in (self.namespace, self.veth_host))])

    def set_link(self, i: int, up: bool) -> None:
        """Takes node i off the network (its veth down on the bridge's side) or puts it back."""
        _ip("link", "set", self.veth_host(i), "up" if up else "down")

    def remove(self) -> None:
        """Deletes the bed's namespaces (and so the veths' node ends), the host ends and the bridge, whatever
        their number: a bed brought up with more nodes than this handle names leaves nothing either."""
        for name in self.left():
            if (NETNS_DIR / name).exists():
                _ip("netns", "delete", name)
        for name in self.left():
            if name.startswith(self.prefix) and not (NETNS_DIR / name).exists():
                # A namespace's veth end goes with it, and the kernel frees its pair a moment later.
                _ip("link", "delete", name, missing_ok=True)

    def pids(self) -> list[int]:
        """Every process living in one of the bed's node namespaces: a node's slurmd, agent, slurmstepds, job
        steps and engines. A node taken off the network keeps its slurmstepds after its slurmd is gone, and
        nothing in their argv names the bed, so they are found by their namespace."""
        inodes = set()
        for i in self.indexes:
            with contextlib.suppress(OSError):
                inodes.add((NETNS_DIR / self.namespace(i)).stat().st_ino)
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                link = os.readlink(entry / "ns" / "net")  # "net:[INODE]"
                if int(link[5:-1]) in inodes:
                    found.append(int(entry.name))
        return found

    def left(self) -> list[str]:
        """The bed's namespaces and interfaces that still exist (empty after `remove`)."""
        mine = re.compile(re.escape(self.prefix) + r"(br|[nhv]\d+)$")
        names = [p.name for p in NETNS_DIR.iterdir() if mine.match(p.name)] if NETNS_DIR.is_dir() else []
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
        for line in links.splitlines():
            name = line.split(":", 2)[1].strip().split("@")[0]
            if mine.match(name):
                names.append(name)
        return sorted(names)


def _ip(*args: str, missing_ok: bool = False) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0 and not (missing_ok and "Cannot find device" in done.stderr):
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
