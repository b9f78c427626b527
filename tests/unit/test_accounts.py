"""The bed's accounting (slinfer/dev/accounting.py): one database per release, the catalog's accounts and QOS
given to the service's user, sacctmgr's "already there" told from a failure, and slurm.conf enforcing it."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from slinfer.dev import accounting, devcluster
from slinfer.slurm import accounts


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


def _wanted(account: str = "chem", partition: str = "debug", qos: str = "high") -> accounts.Wanted:
    return accounts.Wanted(0, "tiny", account, partition, [("qos", qos)] if qos else [])


ROWS = [accounts.Association("chem", "", frozenset({"normal", "high"})),
        accounts.Association("physics", "gpu", frozenset({"normal"}))]
OPEN = {"debug": {"AllowAccounts": "ALL", "DenyAccounts": "(null)", "AllowQos": "ALL", "DenyQos": "(null)"},
        "gpu": {"AllowAccounts": "ALL", "AllowQos": "ALL"}}


def test_a_usable_account_partition_and_qos_is_no_problem() -> None:
    assert accounts.problems("svc", _wanted(), ROWS, "", OPEN) == []
    # A partition-specific association counts on its own partition.
    assert accounts.problems("svc", _wanted("physics", "gpu", "normal"), ROWS, "", OPEN) == []


def test_a_missing_association_names_the_model_the_key_and_the_account() -> None:
    found = accounts.problems("svc", _wanted("physics", "debug", "normal"), ROWS, "", OPEN)
    assert found == ["models[0].account: model 'tiny' runs under account 'physics', but the controller's user "
                     "'svc' has no association with it on partition 'debug' (sacctmgr show assoc user=svc)"]


def test_a_qos_outside_the_association_is_named_by_its_key() -> None:
    found = accounts.problems("svc", _wanted(qos="scavenger"), ROWS, "", OPEN)
    assert len(found) == 1 and found[0].startswith("models[0].qos: model 'tiny' asks for QOS 'scavenger'")
    burst = accounts.Wanted(3, "tiny", "chem", "debug", [("qos", "normal"), ("burst_qos", "scavenger")])
    assert [p.split(":")[0] for p in accounts.problems("svc", burst, ROWS, "", OPEN)] == ["models[3].burst_qos"]


def test_the_default_account_stands_in_for_an_unnamed_one() -> None:
    assert accounts.problems("svc", _wanted(account=""), ROWS, "chem", OPEN) == []
    assert accounts.problems("svc", _wanted(account=""), ROWS, "physics", OPEN)[0].startswith("models[0].account")


def test_a_partition_missing_or_closed_to_the_account_or_qos() -> None:
    missing = accounts.problems("svc", _wanted(partition="nope"), ROWS, "", {"nope": None})
    assert missing[0].startswith("models[0].partition: model 'tiny' names partition 'nope', which Slurm does not")
    closed = {"debug": {"AllowAccounts": "physics", "AllowQos": "normal,scavenger", "DenyQos": "(null)"}}
    keys = [p.split(":")[0] for p in accounts.problems("svc", _wanted(), ROWS, "", closed)]
    assert keys == ["models[0].account", "models[0].qos"]


def test_the_client_asks_sacctmgr_and_scontrol(tmp_path: Path) -> None:
    import asyncio

    from slinfer.config import ModelConfig
    from slinfer.controller.slurm import SlurmClient

    log = tmp_path / "calls"
    for name, out in (("sacctmgr", "chem||high,normal\n"),
                      ("scontrol", "PartitionName=debug AllowAccounts=ALL AllowQos=ALL\n")):
        script = tmp_path / name
        script.write_text(f"#!/bin/sh\necho \"{name} $*\" >> {log}\nprintf '{out}'\n")
        script.chmod(0o755)
    client = SlurmClient(str(tmp_path), user="svc")
    good = ModelConfig(name="tiny", source="/m", account="chem", partition="debug", qos="high")
    bad = ModelConfig(name="big", source="/m", account="chem", partition="debug", qos="scavenger")
    assert asyncio.run(client.site_order_problems([good])) == []
    found = asyncio.run(client.site_order_problems([good, bad]))
    assert len(found) == 1 and found[0].startswith("models[1].qos: model 'big'")
    assert "sacctmgr --noheader --parsable2 show assoc user=svc format=account,partition,qos" in log.read_text()
    # Models that name no account, partition or QOS ask Slurm nothing.
    log.unlink()
    assert asyncio.run(client.site_order_problems([ModelConfig(name="x", source="/m")])) == []
    assert not log.exists()


def test_up_names_the_process_that_holds_a_daemons_port() -> None:
    import os
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(RuntimeError, match=rf"port {port} for slurmdbd \(port base \+ 19\) is taken by pid "
                                               rf"{os.getpid()} "):
            devcluster._port_free(port, "slurmdbd (port base + 19)")
    devcluster._port_free(port, "slurmdbd (port base + 19)")  # positive control: free once closed
