"""Client keys: hashed at rest, 0600, persisted, revocable; config keys in the clear or as sha256."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest

from slinfer.controller.keys import KeyStore, KeyStoreError


def test_create_verify_revoke_and_persist(tmp_path: Path):
    path = tmp_path / "state" / "keys.json"
    store = KeyStore(path)
    key_id, secret = store.create("alice", account="physics")
    info = store.verify(secret)
    assert info is not None and (info.key_id, info.name, info.account) == (key_id, "alice", "physics")
    assert store.verify(secret + "x") is None
    assert store.verify("") is None

    text = path.read_text()
    assert secret not in text
    assert hashlib.sha256(secret.encode()).hexdigest() in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700

    again = KeyStore(path)  # a restarted controller
    assert again.verify(secret).key_id == key_id
    assert [k.name for k in again.list()] == ["alice"]
    assert again.revoke(key_id)
    assert not again.revoke(key_id)
    assert again.verify(secret) is None
    assert KeyStore(path).verify(secret) is None
    assert json.loads(path.read_text()) == {"keys": []}


def test_config_keys_clear_and_hashed(tmp_path: Path):
    digest = hashlib.sha256(b"hashed-one").hexdigest()
    store = KeyStore(tmp_path / "keys.json", ["clear-one", f"sha256:{digest}"])
    assert store.verify("clear-one").source == "config"
    assert store.verify("hashed-one").key_id == "config-1"
    assert store.verify(f"sha256:{digest}") is None
    assert not (tmp_path / "keys.json").exists()  # config keys are never written
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
