"""`slinfer`: the command line of users (wait-ready), administrators (status, scale, drain, keys) and
developers (dev-cluster). Each group of subcommands lives with the concern it belongs to; this module only
dispatches."""

from __future__ import annotations

import argparse
import sys

from slinfer import __version__
from slinfer.cli import admin as admin_cli
from slinfer.cli import doctor, models, readiness
from slinfer.dev import devcluster


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slinfer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"slinfer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    readiness.register(sub)
    devcluster.register(sub)
    doctor.register(sub)
    models.register(sub)
    admin_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        print(f"slinfer: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
