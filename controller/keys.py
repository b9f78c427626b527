"""Client API keys of the gateway: created, listed and revoked by the admin, verified on every request.

Only SHA-256 hashes are kept, in the controller's database (controller/store.py: SQLite under
`[controller].state_dir`, or MariaDB/MySQL shared with a standby controller; a store made with a path alone keeps
its own SQLite file beside it, `keys.json` -> `keys.db`): creating or revoking a key is one row's transaction,
and checking one is one lookup by digest in memory, at 100 keys as at 100,000. A `keys.json` of an earlier
version is read into the database on start, in one transaction, and renamed `keys.json.migrated`; so is a
`keys.db` when the keys now live in MariaDB. A standby that takes over reads them again (`reload`). The secret is
shown once, at creation. Keys from `[gateway].api_keys` (in the clear or as "sha256:HEX") are accepted too but
never written. This module does not know about HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from slinfer.controller.store import Database, SqliteDatabase, StoreError

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


# One statement and its arguments, and a second one in the same transaction when given (KeyStore._write's).
_Write = tuple[str, tuple[object, ...], tuple[str, tuple[object, ...]] | None]


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class KeyStore:
    """The set of valid client keys (hashed), persisted in `path`."""

    def __init__(self, path: str | Path, config_keys: list[str] | None = None, db: Database | None = None) -> None:
        self._path = Path(path)
        self._db_path = self._path.with_suffix(".db") if self._path.suffix == ".json" else self._path
        # The controller passes its database (controller/store.py); alone, a store keeps its own SQLite file.
        self._db: Database = db if db is not None else SqliteDatabase(self._db_path)
        self._tables = False
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
        """The database file (of a SQLite store)."""
        return Path(getattr(self._db, "path", self._db_path))

    def _ensure(self) -> Database:
        """The database with the keys' tables, made on the first use; raises KeyStoreError."""
        if self._tables:
            return self._db
        try:
            with self._db.transaction(fenced=False) as tx:
                tx.execute("CREATE TABLE IF NOT EXISTS `keys` (sha256 CHAR(64) PRIMARY KEY, "
                           "key_id VARCHAR(32) NOT NULL UNIQUE, name VARCHAR(128) NOT NULL, "
                           "account VARCHAR(128) NOT NULL, created_at DOUBLE NOT NULL, "
                           "requests_per_minute BIGINT, tokens_per_day BIGINT)")
                # The owner of a key a user made (`slinfer key create`), in its own table: the keys table keeps
                # its columns, and a key without a row here is an administrator's. A revoked key's row stays (its
                # usage is still the user's).
                tx.execute("CREATE TABLE IF NOT EXISTS owners (key_id VARCHAR(32) PRIMARY KEY, "
                           "`user` VARCHAR(128) NOT NULL, expires_at DOUBLE NOT NULL)")
        except StoreError as exc:
            raise KeyStoreError(f"{self._db.name}: cannot open the key database: {exc}") from exc
        self._tables = True
        return self._db

    def _load(self) -> None:
        """(Re)reads every key from the database, after moving an earlier version's key file into it."""
        legacy = self._path if self._path != self._db_path and self._path.exists() else None
        # The previous version's SQLite file, when the keys now live elsewhere (MariaDB, another SQLite file).
        old_db = (self._db_path if self._db_path.exists()
                  and Path(getattr(self._db, "path", "")).resolve() != self._db_path.resolve() else None)
        if (legacy is None and old_db is None and isinstance(self._db, SqliteDatabase)
                and not self._db.exists()):
            return
        db = self._ensure()
        if old_db is not None:
            self._migrate_db(old_db)
        if legacy is not None:
            self._migrate(legacy)
        stored: dict[bytes, KeyInfo] = {}
        try:
            for row in db.query("SELECT sha256, `keys`.key_id, name, account, created_at, requests_per_minute, "
                                "tokens_per_day, coalesce(`user`, ''), coalesce(expires_at, 0) FROM `keys` "
                                "LEFT JOIN owners ON owners.key_id = `keys`.key_id"):
                stored[bytes.fromhex(row[0])] = KeyInfo(
                    key_id=row[1], name=row[2], account=row[3], created_at=float(row[4]),
                    requests_per_minute=_limit(row[5]), tokens_per_day=_limit(row[6]), user=row[7],
                    expires_at=float(row[8]))
            owners = {str(k): str(u) for k, u in db.query("SELECT key_id, `user` FROM owners")}
        except (StoreError, ValueError) as exc:
            raise KeyStoreError(f"{db.name}: unreadable key database: {exc}") from exc
        self._stored, self._owners = stored, owners
        self._by_id = {info.key_id: digest for digest, info in self._stored.items()}

    def reload(self) -> None:
        """Reads the keys again (a standby that now leads: the old leader made and revoked keys meanwhile);
        listeners hear of every key that changed. Raises KeyStoreError."""
        before = dict(self._stored)
        self._load()
        for digest in set(before) | set(self._stored):
            if before.get(digest) != self._stored.get(digest):
                self._changed(digest)

    def _migrate(self, legacy: Path) -> None:
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
            with self._db.transaction() as tx:
                tx.executemany("INSERT OR IGNORE INTO `keys` VALUES (?, ?, ?, ?, ?, ?, ?)",
                               [self._row(d, i) for d, i in found.items()])
            legacy.rename(legacy.with_name(legacy.name + ".migrated"))
        except (OSError, StoreError) as exc:
            raise KeyStoreError(f"{legacy}: cannot move the key file into {self._db.name}: {exc}") from exc
        log.info("moved %d client keys from %s into %s", len(found), legacy, self._db.name)

    def _migrate_db(self, old: Path) -> None:
        """Copies the previous version's SQLite key database into this one (MariaDB), then renames it."""
        source = SqliteDatabase(old)
        try:
            keys = source.query("SELECT sha256, key_id, name, account, created_at, requests_per_minute, "
                                "tokens_per_day FROM `keys`")
            owners = source.query("SELECT key_id, `user`, expires_at FROM owners")
            with self._db.transaction() as tx:
                tx.executemany("INSERT OR IGNORE INTO `keys` VALUES (?, ?, ?, ?, ?, ?, ?)", keys)
                tx.executemany("INSERT OR IGNORE INTO owners VALUES (?, ?, ?)", owners)
            source.close()
            old.rename(old.with_name(old.name + ".migrated"))
        except (OSError, StoreError) as exc:
            raise KeyStoreError(f"{old}: cannot move the key database into {self._db.name}: {exc}") from exc
        log.info("moved %d client keys from %s into %s", len(keys), old, self._db.name)

    @staticmethod
    def _row(digest: bytes, info: KeyInfo) -> tuple[object, ...]:
        return (digest.hex(), info.key_id, info.name, info.account, info.created_at, info.requests_per_minute,
                info.tokens_per_day)

    def _write(self, sql: str, args: tuple[object, ...],
               also: tuple[str, tuple[object, ...]] | None = None) -> int:
        """One statement (and `also`, when given) in one transaction; the rows the first changed. Raises
        KeyStoreError (a controller that lost the lease too: its write is fenced off)."""
        db = self._ensure()
        try:
            with db.transaction() as tx:
                count = tx.execute(sql, args)
                if also is not None:
                    tx.execute(*also)
                return count
        except StoreError as exc:
            raise KeyStoreError(f"{db.name}: cannot write the key database: {exc}") from exc

    def create(self, name: str, account: str = "", requests_per_minute: int | None = None,
               tokens_per_day: int | None = None, *, user: str = "", expires_at: float = 0.0) -> tuple[str, str]:
        """Makes a new key (owned by `user` when given); returns (key_id, secret). The secret is not kept."""
        digest, info, secret, write = self._new(name, account, requests_per_minute, tokens_per_day, user, expires_at)
        self._write(*write)
        self._created(digest, info)
        return info.key_id, secret

    async def create_async(self, name: str, account: str = "", requests_per_minute: int | None = None,
                           tokens_per_day: int | None = None, *, user: str = "",
                           expires_at: float = 0.0) -> tuple[str, str]:
        """`create` with the database's commit in a thread: the controller's loop goes on meanwhile (a commit is
        an fsync, 166-225 ms on the bench's shared disk, which on the loop held every agent's and gateway's
        stream, bench/control_plane_scale.py). The key is known to `verify` and the feed once committed."""
        digest, info, secret, write = self._new(name, account, requests_per_minute, tokens_per_day, user, expires_at)
        await asyncio.to_thread(self._write, *write)
        self._created(digest, info)
        return info.key_id, secret

    def _new(self, name: str, account: str, requests_per_minute: int | None, tokens_per_day: int | None,
             user: str, expires_at: float) -> tuple[bytes, KeyInfo, str, _Write]:
        """A new key checked and made, not yet stored: (digest, info, secret, its write)."""
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
        return digest, info, secret, ("INSERT INTO `keys` VALUES (?, ?, ?, ?, ?, ?, ?)", self._row(digest, info),
                                      ("INSERT INTO owners VALUES (?, ?, ?)", (key_id, user, expires_at))
                                      if user else None)

    def _created(self, digest: bytes, info: KeyInfo) -> None:
        self._stored[digest] = info
        self._by_id[info.key_id] = digest
        if info.user:
            self._owners[info.key_id] = info.user
        self._changed(digest)
        log.info("created client key %s (name %r, account %r)", info.key_id, info.name, info.account)

    @classmethod
    def mirror(cls, entries: list[tuple[bytes, KeyInfo]]) -> KeyStore:
        """A store that only verifies: the gateway tier's copy of the controller's keys (hashes only)."""
        store = cls.__new__(cls)
        store._path = store._db_path = Path("/nonexistent")
        store._db = SqliteDatabase(store._path)
        store._tables = False
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
        """Revokes the key; False when no stored key has this id."""
        digest = self._stored_digest(key_id)
        if digest is None:
            return False
        self._write("DELETE FROM `keys` WHERE key_id = ?", (key_id,))
        return self._revoked(key_id, digest)

    async def revoke_async(self, key_id: str) -> bool:
        """`revoke` with the database's commit in a thread (as `create_async`)."""
        digest = self._stored_digest(key_id)
        if digest is None:
            return False
        await asyncio.to_thread(self._write, "DELETE FROM `keys` WHERE key_id = ?", (key_id,))
        return self._revoked(key_id, digest)

    def _stored_digest(self, key_id: str) -> bytes | None:
        digest = self._by_id.get(key_id)
        return digest if digest is not None and digest in self._stored else None

    def _revoked(self, key_id: str, digest: bytes) -> bool:
        if self._stored.pop(digest, None) is None:
            return False  # another revoke of it committed first
        self._by_id.pop(key_id, None)
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
