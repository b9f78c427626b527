"""`slinfer models`: the models a user can call and their state, as the gateway's `/v1/models` says it.

Responsible for: reading `GET /v1/models` with the user's own client key (no admin token, no gRPC) and
printing one row per model: state (ready / starting / queued / offline), replicas, `max_model_len`, and the
detail behind the state (seconds starting, Slurm's pending reason). The gateway and key come from
`$SLINFER_GATEWAY_URL` / `$SLINFER_API_KEY`, else `$OPENAI_BASE_URL` / `$OPENAI_API_KEY`; `--url` overrides
the address (a key is never taken from the command line, where other users could read it).
Not responsible for: the state itself (controller/modelstatus.py builds it) or administration (admin_cli.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

# A gateway that does not answer within this is reported as unreachable rather than waited for.
TIMEOUT_S = 10.0


def gateway_and_key(url: str | None = None) -> tuple[str, str]:
    """The gateway's /v1 base URL and the client key, from the environment (and `url`)."""
    base = url or os.environ.get("SLINFER_GATEWAY_URL") or os.environ.get("OPENAI_BASE_URL") or ""
    key = os.environ.get("SLINFER_API_KEY") or os.environ.get("OPENAI_API_KEY") or ""
    if not base:
        raise RuntimeError("no gateway address: set SLINFER_GATEWAY_URL (or OPENAI_BASE_URL), or pass --url")
    if not key:
        raise RuntimeError("no client key: set SLINFER_API_KEY (or OPENAI_API_KEY)")
    base = base.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return base, key


def get_list(base: str, key: str, path: str, what: str, query: str = "") -> list[dict[str, Any]]:
    """The `data` list of the gateway's GET {base}/{path}?{query} with the key; a RuntimeError that names the
    gateway's own error message, an unreachable gateway, or an answer that is not `what`."""
    url = f"{base}/{path}" + (f"?{query}" if query else "")
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return list(json.load(response)["data"])
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise RuntimeError(f"{base}/{path} answered {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise RuntimeError(f"cannot reach the gateway at {base}: {exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(f"{base}/{path} did not answer {what}: {exc!r}") from None


def fetch(base: str, key: str) -> list[dict[str, Any]]:
    return get_list(base, key, "models", "a model list")


def row(model: dict[str, Any]) -> list[str]:
    """One model's cells: MODEL, STATE, REPLICAS, MAX_LEN, DETAIL."""
    status = model.get("slinfer") or {}
    state = str(status.get("state", "-"))
    replicas = str(status.get("replicas", 0)) if state == "ready" else "0"
    length = model.get("max_model_len")
    if state == "starting":
        detail = f"engine starting for {status.get('starting_s', 0):.0f} s"
    elif state == "queued":
        waited = status.get("queued_s")
        detail = f"Slurm job pending ({status.get('reason', '?')})"
        if waited is not None:
            detail += f" for {waited:.0f} s"
    elif state == "refused":
        detail = (f"Slurm refused the job ({status.get('reason', '?')}); {status.get('failures', 0)} in a row, "
                  f"next try in {status.get('retry_in_s', 0):.0f} s")
    elif state == "offline":
        detail = "nothing running; started on the first request" if status.get("min_replicas") == 0 else ""
    else:
        detail = ""
    if "min_replicas" in status:
        detail = f"{detail}{'; ' if detail else ''}min {status['min_replicas']} max {status['max_replicas']}"
    return [str(model.get("id", "")), state, replicas, str(length) if length is not None else "-", detail]


def table(models: list[dict[str, Any]]) -> str:
    rows = [["MODEL", "STATE", "REPLICAS", "MAX_LEN", "DETAIL"]] + [row(m) for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)), r[4]]).rstrip()
                     for r in rows)


def _command(args: argparse.Namespace) -> int:
    base, key = gateway_and_key(args.url)
    models = fetch(base, key)
    if args.json:
        json.dump(models, sys.stdout, indent=2)
        print()
    else:
        print(table(models))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("models", help="the models you can call and their state (ready, starting, queued, offline)",
                       description=__doc__.splitlines()[0])
    p.add_argument("--url", help="the gateway's base URL (default $SLINFER_GATEWAY_URL, else $OPENAI_BASE_URL)")
    p.add_argument("--json", action="store_true", help="print the gateway's answer as JSON")
    p.set_defaults(func=_command)
