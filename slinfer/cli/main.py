"""`slinfer`: the command line of users (wait-ready), administrators (status, scale, drain, keys) and
developers (dev-cluster). Each group of subcommands lives with the concern it belongs to; this module only
dispatches. The development bed (slinfer.dev) is imported only when `dev-cluster` runs: a node's CLI never
loads it."""

from __future__ import annotations

import argparse
import sys

from slinfer import __version__
from slinfer.cli import admin as admin_cli
from slinfer.cli import batches, doctor, models, readiness

# The bed's subcommand, registered here by name only; its options live with the bed (slinfer/dev/devcluster.py).
DEV_CLUSTER = "dev-cluster"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slinfer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"slinfer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    readiness.register(sub)
    # Its arguments, `--help` included, are parsed by the bed's own parser once slinfer.dev is imported.
    sub.add_parser(DEV_CLUSTER, add_help=False,
                   help="a real Slurm with slinfer wired in, for demos and tests (development only)")
    doctor.register(sub)
    models.register(sub)
    batches.register(sub)
    admin_cli.register(sub)
    return parser


def _dev_cluster_parser() -> argparse.ArgumentParser:
    from slinfer.dev import devcluster

    parser = argparse.ArgumentParser(prog="slinfer")
    devcluster.register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == DEV_CLUSTER:
        args = _dev_cluster_parser().parse_args([DEV_CLUSTER, *rest])
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        print(f"slinfer: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
