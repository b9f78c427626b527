"""Client API keys of the gateway: created, listed and revoked by the admin, verified on every request.

Only SHA-256 hashes are kept, in one SQLite database (mode 0600, its folder 0700) beside the path given
(`keys.json` -> `keys.db`) under `[controller].state_dir`: creating or revoking a key is one row's
transaction, and checking one is one lookup by digest, at 100 keys as at 100,000. A `keys.json` of an earlier
version is read into the database on start, in one transaction, and renamed `keys.json.migrated`. The secret is
shown once, at creation. Keys from `[gateway].api_keys` (in the clear or as "sha256:HEX") are accepted too but
never written. This module does not know about HTTP.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SECRET_PREFIX = "sk-slinfer-"
# What a presented key is compared with when no key has its digest (never equal to a SHA-256 of anything known).
_NO_KEY = bytes(32)


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
    # The Slurm user a key was made for by `slinfer key create` (proven by munge); empty for an admin's key.
    user: str = ""
    # Unix seconds after which the key is refused (its owner's --expires); 0 means never.
    expires_at: float = 0.0


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
        self._db_path = self._path.with_suffix(".db") if self._path.suffix == ".json" else self._path
        self._db: sqlite3.Connection | None = None
        self._stored: dict[bytes, KeyInfo] = {}
        self._config: dict[bytes, KeyInfo] = {}
        self._by_id: dict[str, bytes] = {}  # key id -> digest, for a revoke without a scan
        # key id -> the user it was made for, revoked keys' too: usage is charged to the user after the key went.
        self._owners: dict[str, str] = {}
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

    @property
    def path(self) -> Path:
        """The database file."""
        return self._db_path

    def _connect(self) -> sqlite3.Connection:
        """The database, made (0600, in a 0700 folder) on the first write; raises KeyStoreError."""
        if self._db is not None:
            return self._db
        try:
            self._db_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkdir's mode binds only a folder it makes: one that exists (the state dir) is forced too.
            self._db_path.parent.chmod(0o700)
            os.close(os.open(self._db_path, os.O_RDWR | os.O_CREAT, 0o600))
            self._db_path.chmod(0o600)
            db = sqlite3.connect(self._db_path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA synchronous = FULL")
            db.execute("CREATE TABLE IF NOT EXISTS keys (sha256 TEXT PRIMARY KEY, key_id TEXT NOT NULL UNIQUE, "
                       "name TEXT NOT NULL, account TEXT NOT NULL, created_at REAL NOT NULL, "
                       "requests_per_minute INTEGER, tokens_per_day INTEGER)")
            # The owner of a key a user made (`slinfer key create`), in its own table: the keys table keeps its
            # columns, and a key without a row here is an administrator's. A revoked key's row stays (its
            # usage is still the user's).
            db.execute("CREATE TABLE IF NOT EXISTS owners (key_id TEXT PRIMARY KEY, user TEXT NOT NULL, "
                       "expires_at REAL NOT NULL)")
        except (OSError, sqlite3.Error) as exc:
            raise KeyStoreError(f"{self._db_path}: cannot open the key database: {exc}") from exc
        self._db = db
        return db

    def _load(self) -> None:
        legacy = self._path if self._path != self._db_path and self._path.exists() else None
        if legacy is None and not self._db_path.exists():
            return
        db = self._connect()
        try:
            for row in db.execute("SELECT sha256, key_id, name, account, created_at, requests_per_minute, "
                                  "tokens_per_day, coalesce(user, ''), coalesce(expires_at, 0) FROM keys "
                                  "LEFT JOIN owners USING (key_id)"):
                self._stored[bytes.fromhex(row[0])] = KeyInfo(
                    key_id=row[1], name=row[2], account=row[3], created_at=row[4],
                    requests_per_minute=_limit(row[5]), tokens_per_day=_limit(row[6]), user=row[7],
                    expires_at=float(row[8]))
        except (sqlite3.Error, ValueError) as exc:
            raise KeyStoreError(f"{self._db_path}: unreadable key database: {exc}") from exc
        try:
            self._owners = dict(db.execute("SELECT key_id, user FROM owners").fetchall())
        except sqlite3.Error as exc:
            raise KeyStoreError(f"{self._db_path}: unreadable key database: {exc}") from exc
        if legacy is not None:
            self._migrate(legacy, db)
        self._by_id = {info.key_id: digest for digest, info in self._stored.items()}

    def _migrate(self, legacy: Path, db: sqlite3.Connection) -> None:
        """Reads a key file of an earlier version into the database, in one transaction, then renames it."""
        try:
            data = json.loads(legacy.read_text())
            found = {bytes.fromhex(k["sha256"]):
                     KeyInfo(key_id=k["key_id"], name=k["name"], account=k.get("account", ""),
                             created_at=float(k.get("created_at", 0.0)),
                             requests_per_minute=_limit(k.get("requests_per_minute")),
                             tokens_per_day=_limit(k.get("tokens_per_day")))
                     for k in data["keys"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeyStoreError(f"{legacy}: unreadable key file: {exc}") from exc
        try:
            with self._transaction(db):
                db.executemany("INSERT OR IGNORE INTO keys VALUES (?, ?, ?, ?, ?, ?, ?)",
                               [self._row(d, i) for d, i in found.items()])
            legacy.rename(legacy.with_name(legacy.name + ".migrated"))
        except (OSError, sqlite3.Error) as exc:
            raise KeyStoreError(f"{legacy}: cannot move the key file into {self._db_path}: {exc}") from exc
        for digest, info in found.items():
            self._stored.setdefault(digest, info)
        log.info("moved %d client keys from %s into %s", len(found), legacy, self._db_path)

    @staticmethod
    def _row(digest: bytes, info: KeyInfo) -> tuple[object, ...]:
        return (digest.hex(), info.key_id, info.name, info.account, info.created_at, info.requests_per_minute,
                info.tokens_per_day)

    @staticmethod
    @contextlib.contextmanager
    def _transaction(db: sqlite3.Connection) -> Iterator[None]:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _write(self, sql: str, args: tuple[object, ...],
               also: tuple[str, tuple[object, ...]] | None = None) -> int:
        """One statement (and `also`, when given) in one transaction; the rows the first changed. Raises
        KeyStoreError."""
        db = self._connect()
        try:
            with self._transaction(db):
                count = db.execute(sql, args).rowcount
                if also is not None:
                    db.execute(*also)
                return count
        except sqlite3.Error as exc:
            raise KeyStoreError(f"{self._db_path}: cannot write the key database: {exc}") from exc

    def create(self, name: str, account: str = "", requests_per_minute: int | None = None,
               tokens_per_day: int | None = None, *, user: str = "", expires_at: float = 0.0) -> tuple[str, str]:
        """Makes a new key (owned by `user` when given); returns (key_id, secret). The secret is not kept."""
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
        info = KeyInfo(key_id=key_id, name=name, account=account, created_at=time.time(),
                       requests_per_minute=requests_per_minute, tokens_per_day=tokens_per_day, user=user,
                       expires_at=expires_at)
        self._write("INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?)", self._row(digest, info),
                    ("INSERT INTO owners VALUES (?, ?, ?)", (key_id, user, expires_at)) if user else None)
        self._stored[digest] = info
        self._by_id[key_id] = digest
        if user:
            self._owners[key_id] = user
        self._changed(digest)
        log.info("created client key %s (name %r, account %r)", key_id, name, account)
        return key_id, secret

    @classmethod
    def mirror(cls, entries: list[tuple[bytes, KeyInfo]]) -> KeyStore:
        """A store that only verifies: the gateway tier's copy of the controller's keys (hashes only)."""
        store = cls.__new__(cls)
        store._path = store._db_path = Path("/nonexistent")
        store._db = None
        store._config = {}
        store._stored = dict(entries)
        store._by_id = {}
        store._owners = {}
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

    def owner(self, key_id: str) -> str:
        """The user a key was made for by `slinfer key create` (revoked or not); empty for an admin's key."""
        return self._owners.get(key_id, "")

    def revoke(self, key_id: str) -> bool:
        digest = self._by_id.get(key_id)
        if digest is None or digest not in self._stored:
            return False
        self._write("DELETE FROM keys WHERE key_id = ?", (key_id,))
        del self._stored[digest]
        del self._by_id[key_id]
        self._changed(digest)
        log.info("revoked client key %s", key_id)
        return True

    def verify(self, presented: str) -> KeyInfo | None:
        """The key's info, or None: one lookup by the presented key's SHA-256, whatever the number of keys,
        and one constant-time comparison, found or not. The lookup's timing tells nothing useful: finding a
        key through it would need a preimage of the hash."""
        digest = _digest(presented)
        info = self.lookup(digest)
        known = digest if info is not None else _NO_KEY
        if info is not None and info.expires_at and time.time() >= info.expires_at:
            return None
        return info if hmac.compare_digest(known, digest) else None
