"""Client API keys of the gateway: created, listed and revoked by the admin, verified on every request.

Only SHA-256 hashes are kept, in one JSON file (mode 0600) under `[controller].state_dir`, rewritten
atomically on every change; the secret is shown once, at creation. Keys from `[gateway].api_keys` (in
the clear or as "sha256:HEX") are accepted too but never written to the file. This module does not know
about HTTP.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from slinfer.atomicfile import write_atomic

log = logging.getLogger(__name__)

SECRET_PREFIX = "sk-slinfer-"


class KeyStoreError(RuntimeError):
    """The key file cannot be read or written; the message names the file."""


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    name: str
    account: str = ""
    created_at: float = 0.0
    # "store" for created keys, "config" for [gateway].api_keys.
    source: str = "store"
    # The key's own limits (controller/limits.py); None means [gateway]'s default, 0 means none.
    requests_per_minute: int | None = None
    tokens_per_day: int | None = None
    # A gateway tier's share of the rate's burst (the controller's feed sets it); None means [gateway]'s.
    burst: int | None = None


def _limit(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"a key's limit must be an integer of 0 or more, not {value!r}")
    return value


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class KeyStore:
    """The set of valid client keys (hashed), persisted in `path`."""

    def __init__(self, path: str | Path, config_keys: list[str] | None = None) -> None:
        self._path = Path(path)
        self._stored: dict[bytes, KeyInfo] = {}
        self._config: dict[bytes, KeyInfo] = {}
        self._listeners: list[Callable[[bytes], None]] = []
        for i, key in enumerate(config_keys or []):
            if key.startswith("sha256:"):
                try:
                    digest = bytes.fromhex(key.removeprefix("sha256:"))
                except ValueError as exc:
                    raise KeyStoreError(f"gateway.api_keys[{i}]: not a sha256 hex digest") from exc
                if len(digest) != 32:
                    raise KeyStoreError(f"gateway.api_keys[{i}]: a sha256 digest has 64 hex digits")
            else:
                digest = _digest(key)
            self._config[digest] = KeyInfo(key_id=f"config-{i}", name="config", source="config")
        self._load()

    def _load(self) -> None:
        if not self._path.exists():
            return
        try:
            data = json.loads(self._path.read_text())
            self._stored = {bytes.fromhex(k["sha256"]):
                            KeyInfo(key_id=k["key_id"], name=k["name"], account=k.get("account", ""),
                                    created_at=float(k.get("created_at", 0.0)),
                                    requests_per_minute=_limit(k.get("requests_per_minute")),
                                    tokens_per_day=_limit(k.get("tokens_per_day")))
                            for k in data["keys"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeyStoreError(f"{self._path}: unreadable key file: {exc}") from exc

    def _save(self) -> None:
        data = {"keys": [{**asdict(info), "sha256": digest.hex()} for digest, info in self._stored.items()]}
        for entry in data["keys"]:
            del entry["source"]
            del entry["burst"]
        try:
            self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkdir's mode binds only a folder it makes: one that exists (the state dir) is forced too.
            self._path.parent.chmod(0o700)
            write_atomic(self._path, json.dumps(data, indent=1).encode())
        except OSError as exc:
            raise KeyStoreError(f"{self._path}: cannot write key file: {exc}") from exc

    def create(self, name: str, account: str = "", requests_per_minute: int | None = None,
               tokens_per_day: int | None = None) -> tuple[str, str]:
        """Makes a new key; returns (key_id, secret). The secret is not kept."""
        if not name or len(name) > 128 or not name.isprintable():
            raise ValueError("a key name must be 1-128 printable characters")
        if len(account) > 128 or not account.isprintable():
            raise ValueError("an account must be at most 128 printable characters")
        for label, value in (("requests per minute", requests_per_minute), ("tokens per day", tokens_per_day)):
            if value is not None and not 0 <= value < 2**63:
                raise ValueError(f"{label} must be 0 (no limit) or more")
        key_id = secrets.token_hex(6)
        secret = f"{SECRET_PREFIX}{secrets.token_urlsafe(32)}"
        digest = _digest(secret)
        self._stored[digest] = KeyInfo(key_id=key_id, name=name, account=account, created_at=time.time(),
                                       requests_per_minute=requests_per_minute, tokens_per_day=tokens_per_day)
        try:
            self._save()
        except KeyStoreError:
            del self._stored[digest]
            raise
        self._changed(digest)
        log.info("created client key %s (name %r, account %r)", key_id, name, account)
        return key_id, secret

    @classmethod
    def mirror(cls, entries: list[tuple[bytes, KeyInfo]]) -> KeyStore:
        """A store that only verifies: the gateway tier's copy of the controller's keys (hashes only)."""
        store = cls.__new__(cls)
        store._path = Path("/nonexistent")
        store._config = {}
        store._stored = dict(entries)
        store._listeners = []
        return store

    def replace(self, entries: list[tuple[bytes, KeyInfo]]) -> None:
        """The gateway tier's update from the controller; nothing is written."""
        self._stored = dict(entries)

    def apply(self, upserts: Iterable[tuple[bytes, KeyInfo]], removed: Iterable[bytes]) -> None:
        """The gateway tier's delta from the controller: keys added or changed, keys revoked; nothing written."""
        for digest, info in upserts:
            self._stored[digest] = info
        for digest in removed:
            self._stored.pop(digest, None)

    def subscribe(self, listener: Callable[[bytes], None]) -> None:
        """`listener(digest)` is called after a key was created or revoked (the feed sends only changes)."""
        self._listeners.append(listener)

    def _changed(self, digest: bytes) -> None:
        for listener in self._listeners:
            listener(digest)

    def lookup(self, digest: bytes) -> KeyInfo | None:
        """The key with this sha256 digest, or None (revoked or never made)."""
        return self._config.get(digest) or self._stored.get(digest)

    def entries(self) -> list[tuple[bytes, KeyInfo]]:
        """Every key as (sha256 digest, info), for the controller's feed to the gateways."""
        return list(self._stored.items()) + list(self._config.items())

    def list(self) -> list[KeyInfo]:
        return list(self._stored.values()) + list(self._config.values())

    def revoke(self, key_id: str) -> bool:
        found = [d for d, i in self._stored.items() if i.key_id == key_id]
        if not found:
            return False
        before = dict(self._stored)
        for digest in found:
            del self._stored[digest]
        try:
            self._save()
        except KeyStoreError:
            self._stored = before
            raise
        for digest in found:
            self._changed(digest)
        log.info("revoked client key %s", key_id)
        return True

    def verify(self, presented: str) -> KeyInfo | None:
        """The key's info, or None: one lookup by the presented key's SHA-256, whatever the number of keys. A
        lookup's timing tells nothing useful: finding a key through it would need a preimage of the hash."""
        return self.lookup(_digest(presented))
