"""`slinfer scale` pins: the live Pins (the one owner: the autoscaler reads them, never holds its own), the
PinStore's table, and across a controller restart the real admin gRPC server, CLI and Autoscaler (Slurm is the
in-memory SlurmDouble) before and after a "restart" (new objects on the same folder)."""

from __future__ import annotations

import asyncio
import json
import logging
import stat
from pathlib import Path

import grpc
import pytest

from slinfer.cli import main as cli
from slinfer.config import ModelConfig
from slinfer.controller.admin import AdminService
from slinfer.controller.autoscaler import Autoscaler
from slinfer.controller.keys import KeyStore
from slinfer.controller.pins import Pins, PinStore, PinStoreError
from slinfer.controller.registry import Registry
from slinfer.controller.store import SqliteDatabase
from slinfer.v1 import admin_pb2_grpc
from tests.fakes.slurm_double import Clock, Demand, SlurmDouble

TOKEN = "admin-secret"


def _models(max_replicas: int = 3, names: tuple[str, ...] = ("tiny",)) -> list[ModelConfig]:
    return [ModelConfig(name=n, source="/m", min_replicas=1, max_replicas=max_replicas, window_s=2.0,
                        scale_down_delay_s=0.0) for n in names]


def _autoscaler(clock: Clock, slurm: SlurmDouble, max_replicas: int = 3, names: tuple[str, ...] = ("tiny",),
                pins: Pins | None = None) -> Autoscaler:
    return Autoscaler(_models(max_replicas, names), Registry(agent_timeout_s=6.0, clock=clock),
                      lambda m: Demand(in_flight=0), slurm, clock=clock, settle_s=0.0, pins=pins)


def test_save_writes_one_row_to_a_private_database_and_unpin_removes_it(tmp_path: Path) -> None:
    path = tmp_path / "state" / "pins.json"
    pins = PinStore(path)
    db = path.with_suffix(".db")
    assert pins.pins() == {} and not db.exists()  # nothing made before the first pin
    pins.save("tiny", 2)
    pins.save("big", 0)
    assert SqliteDatabase(db).query("SELECT model, replicas FROM pins ORDER BY model") == [("big", 0), ("tiny", 2)]
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    pins.save("tiny", None)
    assert PinStore(path).pins() == {"big": 0}  # a restarted controller reads the database
    assert not path.exists()


def test_pins_share_the_controllers_database_and_an_old_pin_file_moves_into_it(tmp_path: Path) -> None:
    path = tmp_path / "pins.json"
    path.write_text(json.dumps({"version": 1, "pins": {"tiny": 2}}))
    db = SqliteDatabase(tmp_path / "slinfer.db")
    store = PinStore(path, db)
    assert store.pins() == {"tiny": 2}
    assert not path.exists() and (tmp_path / "pins.json.migrated").exists()
    store.save("big", 1)
    assert PinStore(path, SqliteDatabase(tmp_path / "slinfer.db")).pins() == {"tiny": 2, "big": 1}
    assert not (tmp_path / "pins.db").exists()  # the shared database, not a file of its own


def test_restore_takes_the_saved_pins_and_drops_what_the_catalog_no_longer_allows(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "pins.json"
    path.write_text(json.dumps({"version": 1, "pins": {"tiny": 2, "gone": 1, "small": 3}}))
    clock = Clock()
    # "small" now allows at most 2 replicas; "gone" left the catalog.
    store = PinStore(path)
    with caplog.at_level(logging.INFO, logger="slinfer.controller.pins"):
        pins = Pins(_models(2, ("tiny", "small")), store)
    scaler = _autoscaler(clock, SlurmDouble(clock), max_replicas=2, names=("tiny", "small"), pins=pins)
    assert {s.name: s.pinned for s in scaler.status()} == {"tiny": 2, "small": None}
    assert pins.all() == {"tiny": 2}
    assert store.pins() == {"tiny": 2}
    assert PinStore(path).pins() == {"tiny": 2}  # dropped from the database too
    assert "saved pin model=gone count=1 dropped: 'gone' is not a catalog model" in caplog.text
    assert "saved pin model=small count=3 dropped" in caplog.text and "max_replicas" in caplog.text
    assert "restored pin model=tiny count=2" in caplog.text


@pytest.mark.parametrize("text, why", [
    ("{not json", "unreadable pin file"),
    ('{"version": 2, "pins": {}}', "expected 1"),
    ('{"version": 1, "pins": {"tiny": -1}}', "replica counts of 0 or more"),
    ('{"version": 1, "pins": {"tiny": true}}', "replica counts of 0 or more"),
    ('{"version": 1, "pins": ["tiny"]}', "replica counts of 0 or more"),
    ('[1]', "unreadable pin file"),
])
def test_a_damaged_file_is_refused_with_its_name(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "pins.json"
    path.write_text(text)
    with pytest.raises(PinStoreError, match=why) as info:
        PinStore(path)
    assert str(path) in str(info.value)


def test_an_unwritable_folder_is_an_error_that_names_the_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    pins = PinStore(blocker / "pins.json")
    with pytest.raises(PinStoreError, match="cannot write pin table"):
        pins.save("tiny", 1)
    assert pins.pins() == {}  # nothing recorded that the file does not hold


async def test_a_pin_made_with_the_cli_holds_after_a_restart(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"

    async def controller() -> tuple[grpc.aio.Server, Autoscaler, SlurmDouble, Path]:
        # What controller/main.py does at start: the pins first (from the store), the autoscaler reads them.
        clock = Clock()
        slurm = SlurmDouble(clock)
        pins = Pins(_models(), PinStore(state / "pins.json"))
        scaler = _autoscaler(clock, slurm, pins=pins)
        server = grpc.aio.server()
        admin_pb2_grpc.add_AdminServicer_to_server(
            AdminService(scaler, Registry(agent_timeout_s=6.0, clock=clock), KeyStore(state / "keys.json"),
                         TOKEN, clock, pins=pins), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        config = tmp_path / "slinfer.toml"
        config.write_text(f'[controller]\naddress = "127.0.0.1:{port}"\ntoken = "{TOKEN}"\n')
        return server, scaler, slurm, config

    server, scaler, slurm, config = await controller()
    assert await asyncio.to_thread(cli.main, ["scale", "tiny", "3", "--config", str(config)]) == 0
    assert "pinned at 3" in capsys.readouterr().out
    await server.stop(None)

    server, scaler, slurm, config = await controller()
    try:
        assert scaler.status()[0].pinned == 3
        await scaler.step()
        # No load at all, min_replicas 1: only the pin asks for three jobs.
        assert len(slurm.submits) == 3
        assert await asyncio.to_thread(cli.main, ["scale", "tiny", "auto", "--config", str(config)]) == 0
    finally:
        await server.stop(None)
    server, scaler, slurm, config = await controller()
    try:
        assert scaler.status()[0].pinned is None
        await scaler.step()
        assert len(slurm.submits) == 1
    finally:
        await server.stop(None)


def test_pins_check_the_catalog_and_the_autoscaler_reads_the_one_copy(tmp_path: Path) -> None:
    clock = Clock()
    slurm = SlurmDouble(clock)
    store = PinStore(tmp_path / "pins.json")
    pins = Pins(_models(), store)
    scaler = _autoscaler(clock, slurm, pins=pins)
    assert scaler.pins is pins  # one owner: the autoscaler holds a reference, not a copy
    with pytest.raises(KeyError, match="'nope' is not a catalog model"):
        pins.set("nope", 1)
    with pytest.raises(ValueError, match=r"outside 0\.\.max_replicas \(3\)"):
        pins.set("tiny", 4)
    assert pins.all() == {} and store.pins() == {}  # a refused pin is neither held nor saved
    pins.set("tiny", 0)
    assert pins.scaled_to_zero("tiny") and not pins.scaled_to_zero("other")
    assert store.pins() == {"tiny": 0}
    assert scaler.status()[0].pinned == 0  # shown before the next step
    pins.set("tiny", None)
    assert not pins.scaled_to_zero("tiny") and store.pins() == {}
    assert not hasattr(scaler, "pin")  # nobody pins through the autoscaler


def test_a_pin_that_cannot_be_saved_still_holds_and_says_so(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    pins = Pins(_models(), PinStore(blocker / "pins.json"))
    with pytest.raises(PinStoreError, match="cannot write pin table"):
        pins.set("tiny", 2)
    assert pins.get("tiny") == 2  # the admin API answers "applied, but lost at the next restart"
