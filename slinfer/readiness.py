"""`slinfer wait-ready` and `slinfer hold`: what a job script runs to wait for, and live with, its engine.

Reads the status file the agent keeps for the job (its path is in `SLINFER_STATUS_FILE`, set by the SPANK
plugin in every step) and the engine's own `/health`. Not responsible for starting or stopping anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

POLL_S = 0.5


def _say(message: str) -> None:
    print(f"slinfer: {message}", file=sys.stderr, flush=True)


def _status(path: str) -> dict[str, object] | None:
    try:
        with open(path) as status_file:
            return json.load(status_file)
    except (OSError, ValueError):
        return None


def _healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url.rstrip('/')}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_ready(timeout: float) -> int:
    """0 once the engine is READY and answers; 1 when it FAILED or the timeout passed; 2 without an engine."""
    error = os.environ.get("SLINFER_ERROR")
    if error:
        _say(error)
        return 1
    path = os.environ.get("SLINFER_STATUS_FILE")
    if not path:
        _say("this job has no slinfer engine (submit it with --inference=MODEL)")
        return 2
    deadline = time.monotonic() + timeout
    state = "unknown"
    while time.monotonic() < deadline:
        status = _status(path)
        if status is not None:
            state = str(status.get("state"))
            if state == "READY" and _healthy(str(status.get("base_url", ""))):
                return 0
            if state in ("FAILED", "STOPPING", "STOPPED"):
                _say(f"engine {state}: {status.get('reason') or 'no reason given'}")
                return 1
        time.sleep(POLL_S)
    _say(f"engine not ready after {timeout:.0f}s (state {state})")
    return 1


def hold(timeout: float) -> int:
    """Waits for READY, then blocks while the engine lives: the batch script of the controller's jobs."""
    code = wait_ready(timeout)
    if code:
        return code
    path = os.environ["SLINFER_STATUS_FILE"]
    while True:
        status = _status(path)
        if status is None:
            return 0
        if status.get("state") == "FAILED":
            _say(f"engine FAILED: {status.get('reason')}")
            return 1
        time.sleep(2)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    wait = sub.add_parser("wait-ready", help="wait until this job's engine is READY (in a job script)")
    wait.add_argument("--timeout", type=float, default=900.0, help="seconds (default 900)")
    wait.set_defaults(func=lambda args: wait_ready(args.timeout))
    held = sub.add_parser("hold", help="wait for this job's engine, then block while it serves")
    held.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for READY (default 900)")
    held.set_defaults(func=lambda args: hold(args.timeout))
