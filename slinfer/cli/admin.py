"""The administrator's commands of `slinfer`: status, scale, drain, keys and usage, spoken to the controller's Admin
API.

Responsible for: parsing the commands, finding the controller (`--controller`, else $SLINFER_CONTROLLER, else
`[controller].address` of the config) and its token, calling the Admin service, and printing readable tables.
Not responsible for: deciding anything (the controller does) or reading Slurm itself.
"""

from __future__ import annotations

import argparse
import calendar
import csv
import io
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import json_format

from slinfer import config as configmod
from slinfer import munge, tls
from slinfer.v1 import admin_pb2, admin_pb2_grpc

CALL_TIMEOUT_S = 15.0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--controller", metavar="HOST:PORT",
                        help="the controller's gRPC address (default: $SLINFER_CONTROLLER, else "
                             "[controller].address of the config)")
    common.add_argument("--config", metavar="PATH",
                        help="slinfer.toml (default: $SLINFER_CONFIG, else /etc/slinfer/slinfer.toml)")

    p = sub.add_parser("status", parents=[common], help="models, replicas, Slurm jobs and load")
    p.add_argument("--json", action="store_true", help="print the controller's answer as JSON")
    p.set_defaults(func=_status)

    p = sub.add_parser("scale", parents=[common], help="pin a model's replica count (or 'auto' to unpin)")
    p.add_argument("model")
    p.add_argument("replicas", help="a number of replicas, or 'auto'")
    p.set_defaults(func=_scale)

    p = sub.add_parser("drain", parents=[common],
                       help="take one controller job out of routing; it is cancelled once idle")
    p.add_argument("job_id")
    p.set_defaults(func=_drain)

    keys = sub.add_parser("keys", help="client API keys of the gateway")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    p = ksub.add_parser("create", parents=[common], help="make a key; its secret is shown once")
    p.add_argument("name")
    p.add_argument("--account", default="", help="the Slurm account the key's use is attributed to")
    p.add_argument("--rpm", type=_count, metavar="N",
                   help="requests per minute for this key (0: no limit; default: [gateway].key_requests_per_minute)")
    p.add_argument("--tokens-per-day", type=_count, metavar="N",
                   help="prompt plus completion tokens per UTC day (0: no limit; default: "
                        "[gateway].key_tokens_per_day)")
    p.set_defaults(func=_keys_create)
    p = ksub.add_parser("list", parents=[common], help="list keys (never their secrets)")
    p.set_defaults(func=_keys_list)
    p = ksub.add_parser("revoke", parents=[common], help="revoke a key by its id")
    p.add_argument("key_id")
    p.set_defaults(func=_keys_revoke)

    own = argparse.ArgumentParser(add_help=False, parents=[common])
    own.add_argument("--munge-socket", metavar="PATH",
                     help="munged's socket (default: $SLINFER_MUNGE_SOCKET, else [controller].munge_socket, "
                          "else munge's own default)")
    key = sub.add_parser("key", help="your own gateway keys, proven by munge (no administrator needed)")
    ksub = key.add_subparsers(dest="key_command", required=True)
    p = ksub.add_parser("create", parents=[own], help="make a key bound to you and a Slurm account; shown once")
    p.add_argument("--account", default="", help="a Slurm account you have an association with (default: "
                                                 "your default account)")
    p.add_argument("--name", default="", help="a label for the key (default: USER@ACCOUNT)")
    p.add_argument("--expires", type=_count, default=0, metavar="DAYS",
                   help="the key is revoked after this many days (default 0: never)")
    p.set_defaults(func=_key_create)
    p = ksub.add_parser("list", parents=[own], help="list your keys (never their secrets)")
    p.set_defaults(func=_key_list)
    p = ksub.add_parser("revoke", parents=[own], help="revoke one of your keys by its id")
    p.add_argument("key_id")
    p.set_defaults(func=_key_revoke)

    p = sub.add_parser("usage", parents=[own],
                       help="requests and tokens per key, model and Slurm account, per UTC day")
    p.add_argument("--key", default="", metavar="ID", help="only this key")
    p.add_argument("--account", default="", metavar="A", help="only this Slurm account")
    p.add_argument("--user", default="", metavar="U", help="only the keys this user made (`slinfer key create`)")
    p.add_argument("--mine", action="store_true",
                   help="your own usage, proven by munge (the default when the config gives no admin token and is not "
                        "an insecure controller's)")
    p.add_argument("--since", type=_when_arg, default=0.0, metavar="WHEN",
                   help="YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS] (UTC), or an age such as 7d, 12h, 30m")
    p.add_argument("--until", type=_when_arg, default=0.0, metavar="WHEN", help="as --since; default now")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=_usage)


# ---- talking to the controller ------------------------------------------------------------------------------
def _target(args: argparse.Namespace) -> tuple[str, configmod.Config]:
    """(address, config) from the arguments, the environment and the config; the config holds token and TLS."""
    path = args.config or os.environ.get("SLINFER_CONFIG") or None
    try:
        cfg = configmod.load(path)
    except configmod.ConfigError as exc:
        raise RuntimeError(f"config: {exc}") from exc
    address = args.controller or os.environ.get("SLINFER_CONTROLLER") or cfg.controller.address
    if _own(args) and not args.controller:
        # A user's own keys go to the users' port where there is one ([controller].user_address).
        address = os.environ.get("SLINFER_USER_CONTROLLER") or cfg.controller.user_address or address
    return address, cfg


def _own(args: argparse.Namespace) -> bool:
    """Whether the command is a user's own (munge-proven, on the users' port, no token)."""
    return bool(getattr(args, "key_command", None)) or bool(getattr(args, "own", False))


def _call(args: argparse.Namespace, method: str, request: Any) -> Any:
    address, cfg = _target(args)
    token = "" if _own(args) else cfg.controller.token
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        channel_of = tls.sync_channel(address, cfg)
    except configmod.ConfigError as exc:
        raise RuntimeError(f"config: {exc}") from exc
    with channel_of as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        try:
            return getattr(stub, method)(request, timeout=CALL_TIMEOUT_S, metadata=metadata)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            if code == grpc.StatusCode.UNAVAILABLE:
                # The handshake's failures look like an unreachable host: say which side of TLS this client is.
                how = (f"over TLS, trusting {cfg.controller.tls_ca or 'the system CAs'}" if tls.client_uses_tls(cfg)
                       else "in plaintext ([controller].tls_ca is empty; a TLS port refuses plaintext)")
                raise RuntimeError(f"cannot reach the controller at {address} {how}: {details}") from None
            name = code.name if code is not None else "error"
            raise RuntimeError(f"{details} ({name.lower()})") from None


# ---- commands -----------------------------------------------------------------------------------------------
def _status(args: argparse.Namespace) -> int:
    reply: admin_pb2.StatusResponse = _call(args, "Status", admin_pb2.StatusRequest())
    if args.json:
        sys.stdout.write(json_format.MessageToJson(reply, always_print_fields_with_no_presence=True) + "\n")
        return 0
    sys.stdout.write(render_status(reply))
    from slinfer.kube.health import status_section  # the API server as this host's [kubernetes] reaches it

    sys.stdout.write(status_section(_target(args)[1]))
    return 0


def _scale(args: argparse.Namespace) -> int:
    if args.replicas == "auto":
        request = admin_pb2.ScaleRequest(model=args.model, auto=True)
    else:
        try:
            n = int(args.replicas)
        except ValueError:
            raise RuntimeError(f"scale: {args.replicas!r} is neither a number of replicas nor 'auto'") from None
        if n < 0:
            raise RuntimeError("scale: the number of replicas must be 0 or more")
        request = admin_pb2.ScaleRequest(model=args.model, replicas=n)
    reply: admin_pb2.ScaleResponse = _call(args, "Scale", request)
    m = reply.model
    held = f"pinned at {m.pinned_count}" if m.pinned else f"following the load (min {m.min_replicas}, " \
                                                          f"max {m.max_replicas})"
    sys.stdout.write(f"{m.name}: {held}; now {m.ready} ready, {m.starting} starting, {m.pending} pending\n")
    return 0


def _drain(args: argparse.Namespace) -> int:
    reply: admin_pb2.DrainResponse = _call(args, "Drain", admin_pb2.DrainRequest(job_id=args.job_id))
    sys.stdout.write(f"job {args.job_id} ({reply.model}) is draining; it is cancelled once its requests finish\n")
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    request = admin_pb2.CreateKeyRequest(name=args.name, account=args.account)
    if args.rpm is not None:
        request.requests_per_minute = args.rpm
    if args.tokens_per_day is not None:
        request.tokens_per_day = args.tokens_per_day
    reply: admin_pb2.CreateKeyResponse = _call(args, "CreateKey", request)
    sys.stdout.write(f"key id: {reply.key_id}\nsecret: {reply.secret}\n(the secret is not stored; keep it now)\n")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    reply: admin_pb2.ListKeysResponse = _call(args, "ListKeys", admin_pb2.ListKeysRequest())
    rows = [[k.key_id, k.name, k.account or "-", _when(k.created_at) if k.created_at else "-", k.source,
             _limit(k, "requests_per_minute"), _limit(k, "tokens_per_day"), k.user or "-"] for k in reply.keys]
    sys.stdout.write(_table(["ID", "NAME", "ACCOUNT", "CREATED", "SOURCE", "RPM", "TOKENS/DAY", "USER"], rows))
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    _call(args, "RevokeKey", admin_pb2.RevokeKeyRequest(key_id=args.key_id))
    sys.stdout.write(f"key {args.key_id} revoked\n")
    return 0


def _credential(args: argparse.Namespace) -> str:
    """A fresh munge credential of the user running the CLI (each is good for one call)."""
    socket = args.munge_socket or os.environ.get("SLINFER_MUNGE_SOCKET") or ""
    if not socket:
        socket = _target(args)[1].controller.munge_socket
    try:
        return munge.encode(socket)
    except munge.MungeError as exc:
        raise RuntimeError(f"cannot prove who you are with munge: {exc}") from None


def _key_create(args: argparse.Namespace) -> int:
    reply: admin_pb2.CreateKeyResponse = _call(args, "CreateOwnKey", admin_pb2.OwnKeyCreateRequest(
        credential=_credential(args), name=args.name, account=args.account, expires_days=args.expires))
    expires = _when(reply.expires_at) if reply.expires_at else "never"
    sys.stdout.write(f"key id: {reply.key_id}\nuser: {reply.user}\naccount: {reply.account}\nexpires: {expires}\n"
                     f"secret: {reply.secret}\n(the secret is not stored; keep it now)\n")
    return 0


def _key_list(args: argparse.Namespace) -> int:
    reply: admin_pb2.ListKeysResponse = _call(args, "ListOwnKeys",
                                              admin_pb2.OwnKeysRequest(credential=_credential(args)))
    rows = [[k.key_id, k.name, k.account or "-", _when(k.created_at) if k.created_at else "-",
             _when(k.expires_at) if k.expires_at else "never"] for k in reply.keys]
    sys.stdout.write(_table(["ID", "NAME", "ACCOUNT", "CREATED", "EXPIRES"], rows))
    return 0


def _key_revoke(args: argparse.Namespace) -> int:
    _call(args, "RevokeOwnKey", admin_pb2.OwnKeyRevokeRequest(credential=_credential(args), key_id=args.key_id))
    sys.stdout.write(f"key {args.key_id} revoked\n")
    return 0


USAGE_COLUMNS = ("day", "key_id", "key_name", "account", "model", "requests", "failed", "prompt_tokens",
                 "completion_tokens", "estimated", "user")


def _usage(args: argparse.Namespace) -> int:
    if args.until and args.until <= args.since:
        raise RuntimeError("usage: --until must be later than --since")
    query = admin_pb2.UsageRequest(key_id=args.key, since=args.since, until=args.until, account=args.account,
                                   user=args.user)
    cfg = _target(args)[1].controller
    # A config without the admin's token (and not an insecure controller's) is a user's: their own usage.
    args.own = args.mine or not (cfg.token or cfg.insecure)
    if args.own:
        reply: admin_pb2.UsageResponse = _call(args, "OwnUsage", admin_pb2.OwnUsageRequest(
            credential=_credential(args), query=query))
    else:
        reply = _call(args, "Usage", query)
    sys.stdout.write(render_usage(reply, args.format))
    return 0


def render_usage(reply: admin_pb2.UsageResponse, fmt: str) -> str:
    records = [{c: getattr(r, c) for c in USAGE_COLUMNS} for r in reply.rows]
    if fmt == "json":
        return json.dumps(records, indent=1) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=USAGE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        return out.getvalue()
    if not records:
        return "(no usage recorded)\n"
    return _table([c.upper() for c in USAGE_COLUMNS], [[str(r[c]) or "-" for c in USAGE_COLUMNS] for r in records])


# ---- arguments ----------------------------------------------------------------------------------------------
def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{value} is out of range (0 means no limit)")
    return value


_AGE = re.compile(r"^(\d+)([dhm])$")


def _when_arg(text: str, now: float | None = None) -> float:
    """Unix seconds from a UTC date or time, or from an age before now."""
    m = _AGE.match(text)
    if m:
        unit = {"d": 86400, "h": 3600, "m": 60}[m.group(2)]
        return (now if now is not None else time.time()) - int(m.group(1)) * unit
    for fmt in ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S"):
        try:
            return float(calendar.timegm(time.strptime(text, fmt)))
        except ValueError:
            continue
    raise argparse.ArgumentTypeError(f"{text!r} is neither YYYY-MM-DD[THH:MM[:SS]] (UTC) nor an age like 7d, 12h, 30m")


def _limit(key: admin_pb2.KeyInfo, name: str) -> str:
    if not key.HasField(name):
        return "default"
    value = getattr(key, name)
    return str(value) if value else "none"


# ---- rendering ----------------------------------------------------------------------------------------------
def render_status(reply: admin_pb2.StatusResponse) -> str:
    now = reply.now or time.time()
    parts: list[str] = []
    if not reply.squeue_ok:
        parts.append("warning: the controller's last squeue failed; it is not scaling until Slurm answers\n")
    rows = []
    for m in reply.models:
        rows.append([m.name, f"{m.ready}/{m.desired}", f"{m.min_replicas}-{m.max_replicas}",
                     str(m.pinned_count) if m.pinned else "auto", f"{m.load:.1f}", f"{m.target:g}",
                     str(m.in_flight), str(m.queued), str(m.starting), str(m.pending), str(m.draining),
                     (f"{m.last_decision} ({_ago(now - m.last_decision_at)} ago)" if m.last_decision else "-")])
    parts.append(_table(["MODEL", "READY/DESIRED", "MIN-MAX", "PIN", "LOAD", "TARGET", "IN-FLIGHT", "QUEUED",
                         "STARTING", "PENDING", "DRAINING", "LAST DECISION"], rows))
    # POOL "no" is a user's private engine: listed, never routed to.
    rows = [[r.job_id, r.model, r.node, r.state, "yes" if r.pool else "no", str(r.outstanding), f"{r.running:g}",
             f"{r.waiting:g}", f"{100 * r.kv_cache_usage:.0f}%", r.base_url] for r in reply.replicas]
    parts.append("\nREPLICAS\n" + (_table(["JOB", "MODEL", "NODE", "STATE", "POOL", "OUTSTANDING", "RUNNING",
                                           "WAITING", "KV", "URL"], rows) if rows else "(none)\n"))
    rows = [[j.job_id, j.model, j.state, j.node or "-", _ago(now - j.submit_time) if j.submit_time else "-",
             _ago(j.end_time - now) if j.end_time > now else "-", j.reason if j.reason != "None" else ""]
            for j in reply.jobs]
    parts.append("\nSLURM JOBS\n" + (_table(["JOB", "MODEL", "STATE", "NODE", "AGE", "TIME LEFT", "REASON"],
                                            rows) if rows else "(none)\n"))
    rows = [[a.node, a.address, "yes" if a.alive else "NO", f"{_ago(now - a.last_seen)} ago", str(a.engines),
             f"{a.load1:.2f}", str(a.gpus)] for a in reply.agents]
    parts.append("\nAGENTS\n" + (_table(["NODE", "ADDRESS", "ALIVE", "LAST SEEN", "ENGINES", "LOAD1", "GPUS"],
                                        rows) if rows else "(none)\n"))
    return "".join(parts)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
             for line in [list(headers), *rows]]
    return "\n".join(lines) + "\n"


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(at))


def fetch_status(controller: str | None = None, config: str | None = None) -> admin_pb2.StatusResponse:
    """The controller's Status for callers outside this CLI (the demo's progress line), found as `status` finds it."""
    reply: admin_pb2.StatusResponse = _call(argparse.Namespace(controller=controller, config=config), "Status",
                                            admin_pb2.StatusRequest())
    return reply
