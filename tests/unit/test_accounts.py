"""The bed's accounting (slinfer/dev/accounting.py): one database per release, the catalog's accounts and QOS
given to the service's user, sacctmgr's "already there" told from a failure, and slurm.conf enforcing it."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from slinfer.dev import accounting, devcluster


def _done(code: int, out: str = "", err: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess([], code, out, err)


def test_one_database_per_release() -> None:
    assert accounting.database("22.05") == "slurm_acct_db_22_05"
    assert accounting.database("26.05") != accounting.database("22.05")


def test_the_catalog_names_the_service_users_accounts_and_qos(tmp_path: Path) -> None:
    config = tmp_path / "slinfer.toml"
    config.write_text('[[models]]\nname = "a"\naccount = "ml"\nqos = "high"\n'
                      '[[models]]\nname = "b"\nburst_qos = "scavenger"\n')
    accounts, qos = accounting.catalog_needs(config)
    assert accounts == ["ml", "slinfer"]
    assert qos == ["high", "normal", "scavenger"]


def test_sacctmgr_already_there_is_no_change_and_a_failure_raises() -> None:
    answers = iter([_done(0, " Adding Account(s)\n  physics\n"), _done(1, " Nothing new added.\n"),
                    _done(1, "", " Unknown option: bogus\n")])

    def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        assert list(argv[:2]) == ["sacctmgr", "-i"]
        return next(answers)

    assert accounting.sacctmgr(run, "add", "account", "physics") is True
    assert accounting.sacctmgr(run, "add", "account", "physics") is False
    with pytest.raises(RuntimeError, match="Unknown option: bogus"):
        accounting.sacctmgr(run, "add", "bogus")


def test_create_order_gives_alice_both_accounts_and_bob_chem_only(tmp_path: Path) -> None:
    config = tmp_path / "slinfer.toml"
    config.write_text('[[models]]\nname = "a"\naccount = "slinfer"\nqos = "normal"\n')
    calls: list[list[str]] = []

    def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        calls.append(list(argv))
        return _done(0, "added\n")

    accounting.create_order(run, "c", config, service_user="svc")
    users = {c[4]: c for c in calls if c[2:4] == ["add", "user"]}
    assert "account=physics,chem" in users["slinfer-alice"]
    assert "account=chem" in users["slinfer-bob"]
    assert "qos=normal,high" in users["slinfer-bob"]
    assert "account=slinfer" in users["svc"] and "qos=normal" in users["svc"]
    added_qos = [c[4] for c in calls if c[2:4] == ["add", "qos"]]
    assert added_qos == ["scavenger", "high"]
    # The cluster comes first: associations need it.
    assert calls[0][2:5] == ["add", "cluster", "c"]


def test_slurmdbd_conf_names_the_release_database_and_the_munge_socket(tmp_path: Path) -> None:
    text = accounting.slurmdbd_conf(host="h", address="10.0.0.1", dbd_port=1, db_port=2, release="26.05",
                                    secret="s3", munge_socket=tmp_path / "m.sock", pid_file=tmp_path / "p",
                                    log_file=tmp_path / "l")
    assert "StorageLoc=slurm_acct_db_26_05\n" in text
    assert f"AuthInfo=socket={tmp_path / 'm.sock'}\n" in text
    assert "StoragePort=2\n" in text and "DbdPort=1\n" in text


def test_the_beds_slurm_conf_enforces_accounting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bed = devcluster.Bed(tmp_path, 29900, slurm="")
    monkeypatch.setattr(devcluster.Bed, "release", lambda self: "22.05")
    conf = devcluster._slurm_conf(bed, "host")
    assert "AccountingStorageType=accounting_storage/slurmdbd\n" in conf
    assert "AccountingStorageEnforce=associations,limits,qos,safe\n" in conf
    assert f"AccountingStoragePort={bed.slurmdbd_port}\n" in conf
    assert f"AccountingStoragePass={bed.munge_socket}\n" in conf
    # slurmctld's state is kept per release (another release's state stops slurmctld at start).
    assert f"StateSaveLocation={tmp_path}/slurmctld/22.05\n" in conf
