"""`python -m slinfer.dev.nodeenter --hostname H [--bind SRC DST]... -- ARGV`: the last step into a bed node.

Responsible for: inside the UTS and mount namespaces that `unshare` just made (netns.BedNetwork.enter), setting
the node's host name and binding the node's own files over the shared paths (its slinfer.toml over the bed's,
as each real host has its own /etc), then exec'ing ARGV, so the daemon keeps this pid.
Not responsible for: making namespaces (unshare and `ip netns` do) or choosing what runs (devcluster.py).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slinfer.dev.nodeenter")
    parser.add_argument("--hostname", required=True)
    parser.add_argument("--bind", nargs=2, action="append", default=[], metavar=("SOURCE", "TARGET"))
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command after --")
    socket.sethostname(args.hostname)
    for source, target in args.bind:
        subprocess.run(["mount", "--bind", source, target], check=True)
    os.execvp(command[0], command)
    return 127  # not reached: execvp replaces this process or raises


if __name__ == "__main__":
    sys.exit(main())
