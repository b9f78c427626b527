"""`slinfer batches`: a user's batches (the OpenAI Batch API, issue 31) with their counts and Slurm state.

Responsible for: reading `GET /v1/batches` with the user's own client key (from the environment, as
`slinfer models` does: never from the command line) and printing one row per batch: id, status, lines done of
the total, lines refused, the Slurm job and its state, the model and when it was created.
Not responsible for: the batches themselves (controller/batches.py) or creating them (the openai client).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from slinfer.cli.models import gateway_and_key, get_list

# The most batches one listing shows (the API's page limit).
LIMIT = 100


def fetch(base: str, key: str, limit: int = LIMIT) -> list[dict[str, Any]]:
    return get_list(base, key, "batches", "a batch list", f"limit={limit}")


def row(batch: dict[str, Any]) -> list[str]:
    counts = batch.get("request_counts") or {}
    slurm = batch.get("slurm") or {}
    done = int(counts.get("completed", 0)) + int(counts.get("failed", 0))
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(int(batch.get("created_at") or 0)))
    return [str(batch.get("id", "")), str(batch.get("status", "")), f"{done}/{counts.get('total', 0)}",
            str(counts.get("failed", 0)), str(slurm.get("job_id") or "-"), str(slurm.get("state") or "-"),
            str(batch.get("model") or "-"), created]


def table(batches: list[dict[str, Any]]) -> str:
    rows = [["BATCH", "STATUS", "DONE", "FAILED", "JOB", "SLURM", "MODEL", "CREATED"]] + [row(b) for b in batches]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _command(args: argparse.Namespace) -> int:
    base, key = gateway_and_key(args.url)
    batches = fetch(base, key)
    if args.json:
        json.dump(batches, sys.stdout, indent=2)
        print()
    else:
        print(table(batches))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("batches", help="your batches (OpenAI Batch API): status, lines done, Slurm job",
                       description=__doc__.splitlines()[0])
    p.add_argument("--url", help="the gateway's base URL (default $SLINFER_GATEWAY_URL, else $OPENAI_BASE_URL)")
    p.add_argument("--json", action="store_true", help="print the gateway's answer as JSON")
    p.set_defaults(func=_command)
