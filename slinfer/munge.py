"""munge, Slurm's credential service, as proof of a user's identity: the CLI encodes, the controller decodes.

Responsible for: running `munge -n` (the caller's credential, empty payload) and `unmunge` with argument lists
against a given socket, and the decision on `unmunge`'s answer: its exit status alone says whether the
credential is good (a replayed or expired one still prints a UID), then the UID and GID it printed.
Not responsible for: which user may do what with the proven uid (controller/identity.py), munged itself, or
its key (the site's).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

# A munged that answers at all answers in milliseconds (3.6 ms encode + decode, docs/architecture/facts.md);
# past this it is stuck and the call fails rather than holding a gRPC worker.
TIMEOUT_S = 10.0

# unmunge's exit status for each refusal the controller names (munge's own EMUNGE_* codes).
REASONS: dict[int, str] = {
    12: "the credential was tampered with (invalid)",
    13: "the credential is of an unsupported cipher",
    14: "the credential was made with another munge key (not this cluster's)",
    15: "the credential has expired (older than munge's TTL)",
    16: "the credential is dated in the future",
    17: "the credential was replayed (each may be used once)",
    18: "the credential is not for this user",
}


class MungeError(RuntimeError):
    """munge or unmunge could not run, or refused; the message says why."""


@dataclass(frozen=True)
class Identity:
    """Whom a good credential proves: its encoder's uid and gid."""

    uid: int
    gid: int


def _socket_args(socket: str) -> list[str]:
    return [f"--socket={socket}"] if socket else []


def encode(socket: str = "") -> str:
    """A fresh credential of the calling user (no payload); raises MungeError."""
    try:
        done = subprocess.run(["munge", "--no-input", *_socket_args(socket)], capture_output=True, text=True,
                              timeout=TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MungeError(f"cannot run munge: {exc}") from exc
    if done.returncode != 0 or not done.stdout.startswith("MUNGE:"):
        raise MungeError(f"munge failed (exit {done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def verdict(returncode: int, stdout: str, stderr: str = "") -> Identity:
    """The identity `unmunge -N -k STATUS,UID,GID` proved, from its exit status and output; raises MungeError."""
    if returncode != 0:
        reason = REASONS.get(returncode, f"unmunge refused it (exit {returncode}: {stderr.strip()})")
        raise MungeError(reason)
    fields: dict[str, str] = {}
    for line in stdout.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip()] = value.strip()
    try:
        status, uid, gid = int(fields["STATUS"]), int(fields["UID"]), int(fields["GID"])
    except (KeyError, ValueError) as exc:
        raise MungeError(f"unexpected unmunge output {stdout[:200]!r}") from exc
    if status != 0:
        # The exit status said success but the printed status did not: refuse rather than guess.
        raise MungeError(REASONS.get(status, f"unmunge reported status {status}"))
    if uid < 0 or gid < 0:
        raise MungeError(f"unexpected unmunge output {stdout[:200]!r}")
    return Identity(uid=uid, gid=gid)


def decode(credential: str, socket: str = "") -> Identity:
    """Decodes a credential with the local munged (which also refuses a replay); raises MungeError."""
    if not credential.startswith("MUNGE:") or len(credential) > 4096 or not credential.isprintable():
        raise MungeError("not a munge credential")
    try:
        done = subprocess.run(["unmunge", "--numeric", "--keys=STATUS,UID,GID", *_socket_args(socket)],
                              input=credential, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MungeError(f"cannot run unmunge: {exc}") from exc
    return verdict(done.returncode, done.stdout, done.stderr)
