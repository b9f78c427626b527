"""Client keys: hashed at rest, 0600, persisted, revocable; config keys in the clear or as sha256."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from slinfer.controller.keys import KeyStore, KeyStoreError
from slinfer.controller.store import SqliteDatabase
from tests.unit.test_control_plane_loop_share import _with_ticker


def test_create_verify_revoke_and_persist(tmp_path: Path):
    path = tmp_path / "state" / "keys.json"
    store = KeyStore(path)
    key_id, secret = store.create("alice", account="physics")
    info = store.verify(secret)
    assert info is not None and (info.key_id, info.name, info.account) == (key_id, "alice", "physics")
    assert store.verify(secret + "x") is None
    assert store.verify("") is None

    db = path.with_suffix(".db")
    assert store.path == db and not path.exists()
    text = db.read_bytes()
    assert secret.encode() not in text
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in text
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700

    again = KeyStore(path)  # a restarted controller
    assert again.verify(secret).key_id == key_id
    assert [k.name for k in again.list()] == ["alice"]
    assert again.revoke(key_id)
    assert not again.revoke(key_id)
    assert again.verify(secret) is None
    assert KeyStore(path).verify(secret) is None
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM keys").fetchone() == (0,)


def test_config_keys_clear_and_hashed(tmp_path: Path):
    digest = hashlib.sha256(b"hashed-one").hexdigest()
    store = KeyStore(tmp_path / "keys.json", ["clear-one", f"sha256:{digest}"])
    assert store.verify("clear-one").source == "config"
    assert store.verify("hashed-one").key_id == "config-1"
    assert store.verify(f"sha256:{digest}") is None
    assert not (tmp_path / "keys.json").exists()  # config keys are never written
    assert not (tmp_path / "keys.db").exists()
    assert not store.revoke("config-0")
    assert store.verify("clear-one") is not None


def test_bad_config_digest_and_bad_file_are_clear_errors(tmp_path: Path):
    with pytest.raises(KeyStoreError, match=r"gateway.api_keys\[0\]"):
        KeyStore(tmp_path / "k.json", ["sha256:nothex"])
    with pytest.raises(KeyStoreError, match="64 hex"):
        KeyStore(tmp_path / "k.json", ["sha256:abcd"])
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(KeyStoreError, match=r"broken\.json"):
        KeyStore(bad)
    assert bad.read_text() == "{not json"  # nothing lost


def test_failed_write_keeps_the_old_state(tmp_path: Path):
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    store = KeyStore(blocked / "keys.json")
    with pytest.raises(KeyStoreError):
        store.create("bob")
    assert store.list() == []


def test_names_are_checked(tmp_path: Path):
    store = KeyStore(tmp_path / "keys.json")
    with pytest.raises(ValueError):
        store.create("")
    with pytest.raises(ValueError):
        store.create("bad\nname")


def test_an_existing_folder_is_forced_to_0700(tmp_path: Path):
    folder = tmp_path / "state"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755  # the fault: a folder others can read
    store = KeyStore(folder / "keys.json")
    store.create("alice")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_key_file_of_an_earlier_version_moves_into_the_database(tmp_path: Path):
    path = tmp_path / "keys.json"
    secret = "sk-slinfer-old"
    path.write_text(json.dumps({"keys": [{"key_id": "abc", "name": "old", "account": "chem", "created_at": 5.0,
                                          "requests_per_minute": 7, "tokens_per_day": None,
                                          "sha256": hashlib.sha256(secret.encode()).hexdigest()}]}))
    store = KeyStore(path)
    info = store.verify(secret)
    assert info is not None and (info.key_id, info.account, info.requests_per_minute) == ("abc", "chem", 7)
    assert not path.exists() and (tmp_path / "keys.json.migrated").exists()
    again = KeyStore(path)  # the next start reads the database alone
    assert again.verify(secret) == info
    assert again.revoke("abc") and KeyStore(path).verify(secret) is None


def test_create_revoke_and_verify_cost_the_same_at_100_and_at_10000_keys(tmp_path: Path):
    store = KeyStore(tmp_path / "keys.json")

    def costs() -> tuple[float, float, float]:
        started = time.perf_counter()
        made = [store.create(f"probe{i}") for i in range(20)]
        created = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(20):
            for _, secret in made:
                assert store.verify(secret) is not None
        verified = time.perf_counter() - started
        started = time.perf_counter()
        for key_id, _ in made:
            assert store.revoke(key_id)
        return created, verified, time.perf_counter() - started

    for i in range(100):
        store.create(f"u{i}")
    small = costs()
    # 10,000 more keys, written as a site would have them (one transaction; the API's cost is what is measured).
    rows = [(f"{i:064x}", f"bulk{i}", "bulk", "", 0.0, None, None) for i in range(10_000)]
    with sqlite3.connect(store.path) as db:
        db.executemany("INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    store = KeyStore(tmp_path / "keys.json")
    assert len(store.list()) == 10_100
    large = costs()
    # A whole-file rewrite per key would cost 100 times more at 10,100 keys; allow 3x for a busy machine.
    for label, a, b in zip(("create", "verify", "revoke"), small, large, strict=True):
        assert b < 3 * a + 0.05, f"{label}: {a * 1e3:.1f} ms for 20 at 100 keys, {b * 1e3:.1f} ms at 10,100"


class _SlowCommits(SqliteDatabase):
    """A SQLite database whose every write transaction takes `delay_s` more, as an fsync on a busy disk does."""

    delay_s = 0.4

    @contextlib.contextmanager
    def transaction(self, fenced: bool = True):  # type: ignore[no-untyped-def]
        with super().transaction(fenced) as tx:
            yield tx
            time.sleep(self.delay_s)


async def test_a_key_made_or_revoked_through_the_api_commits_while_the_loop_goes_on(tmp_path: Path) -> None:
    db = _SlowCommits(tmp_path / "keys.db")
    store = KeyStore(tmp_path / "keys.json", db=db)
    changed: list[bytes] = []
    store.subscribe(changed.append)
    (key_id, secret), ticks = await _with_ticker(store.create_async("alice", account="physics"))
    assert ticks >= 10  # the loop turned meanwhile (0.4 s of commit)
    info = store.verify(secret)
    assert info is not None and info.key_id == key_id and len(changed) == 1
    assert KeyStore(tmp_path / "keys.json").verify(secret) is not None  # committed: another store reads it
    found, ticks = await _with_ticker(store.revoke_async(key_id))
    assert found is True and ticks >= 10 and store.verify(secret) is None and len(changed) == 2
    assert not await store.revoke_async(key_id)
    # Control: the synchronous create holds the loop for its commit.

    async def held() -> tuple[str, str]:
        return store.create("bob")

    _, ticks = await _with_ticker(held())
    assert ticks <= 1


async def test_two_revokes_of_one_key_at_once_revoke_it_once(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json", db=_SlowCommits(tmp_path / "keys.db"))
    key_id, secret = await store.create_async("alice")
    changed: list[bytes] = []
    store.subscribe(changed.append)
    assert sorted(await asyncio.gather(store.revoke_async(key_id), store.revoke_async(key_id))) == [False, True]
    assert len(changed) == 1 and store.verify(secret) is None
