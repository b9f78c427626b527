"""The administrator's `slinfer scale MODEL N` pins: the one owner of live pins, kept across controller restarts.

Responsible for: `Pins`, the live pins (built first at start, before everything that reads them): checking a new
pin against the catalog (a known model, 0..max_replicas), holding it, and saving it; the autoscaler, the gateway,
the gateway hub and the model board read it. `PinStore`: a table of the controller's database (controller/store.py,
as the key store keeps its keys), one row a pin, written on every pin or unpin; at start
`Pins` takes its saved pins again and drops, with a log line that names it, one the catalog no longer allows (a
model removed, or a count above its new max_replicas).
Not responsible for: what a pin means (the autoscaler holds the model at it; the gateway answers at once for a
model pinned at 0 with no replica), or the admin API (controller/admin.py calls `Pins.set`).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from slinfer.config import ModelConfig
from slinfer.controller.store import Database, SqliteDatabase, StoreError

log = logging.getLogger(__name__)

# The layout of an earlier version's pins.json (moved into the database); another version is refused rather
# than half understood.
FORMAT_VERSION = 1


class PinStoreError(RuntimeError):
    """The pins cannot be read or written; the message names the file or database."""


class PinStore:
    """Pins by model name, in the controller's database (table `pins`): one row a pin, written in one
    transaction (fenced: a controller that lost the lease cannot pin). Alone (no `db`), a store keeps its own
    SQLite file beside `path` (`pins.json` -> `pins.db`). A `pins.json` of an earlier version is read into the
    database on start and renamed `pins.json.migrated`."""

    def __init__(self, path: str | Path, db: Database | None = None) -> None:
        self._path = Path(path)
        self._db: Database = db if db is not None else SqliteDatabase(self._path.with_suffix(".db"))
        self._tables = False
        self._pins: dict[str, int] = {}
        legacy = self._path if self._path.suffix == ".json" and self._path.exists() else None
        if legacy is None and isinstance(self._db, SqliteDatabase) and not self._db.exists():
            return
        if legacy is not None:
            self._migrate(legacy, self._read(legacy))
        self.reload()

    def _ensure(self) -> Database:
        if not self._tables:
            try:
                with self._db.transaction(fenced=False) as tx:
                    tx.execute("CREATE TABLE IF NOT EXISTS pins (model VARCHAR(128) PRIMARY KEY, "
                               "replicas BIGINT NOT NULL)")
            except StoreError as exc:
                raise PinStoreError(f"{self._db.name}: cannot write pin table: {exc}") from exc
            self._tables = True
        return self._db

    def reload(self) -> None:
        """Reads the pins again (a standby that now leads). Raises PinStoreError."""
        db = self._ensure()
        try:
            self._pins = {str(m): int(n) for m, n in db.query("SELECT model, replicas FROM pins")}
        except (StoreError, ValueError) as exc:
            raise PinStoreError(f"{db.name}: unreadable pin table: {exc}") from exc

    @staticmethod
    def _read(path: Path) -> dict[str, int]:
        try:
            data = json.loads(path.read_text())
            if data.get("version") != FORMAT_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {FORMAT_VERSION}")
            pins = data["pins"]
            if not isinstance(pins, dict) or not all(
                    isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                    for k, v in pins.items()):
                raise ValueError("pins must map model names to replica counts of 0 or more")
            return dict(pins)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PinStoreError(f"{path}: unreadable pin file: {exc}") from exc

    def _migrate(self, legacy: Path, pins: dict[str, int]) -> None:
        db = self._ensure()
        try:
            with db.transaction() as tx:
                tx.executemany("INSERT OR IGNORE INTO pins VALUES (?, ?)", sorted(pins.items()))
            legacy.rename(legacy.with_name(legacy.name + ".migrated"))
        except (OSError, StoreError) as exc:
            raise PinStoreError(f"{legacy}: cannot move the pin file into {db.name}: {exc}") from exc
        log.info("moved %d pins from %s into %s", len(pins), legacy, db.name)

    @property
    def path(self) -> str:
        """Where the pins are, for messages."""
        return self._db.name

    def pins(self) -> dict[str, int]:
        return dict(self._pins)

    def save(self, model: str, count: int | None) -> None:
        """Records `model` pinned at `count` (None: back to the load); the database has it before this returns."""
        if self._pins.get(model) == count:
            return
        db = self._ensure()
        try:
            with db.transaction() as tx:
                tx.execute("DELETE FROM pins WHERE model = ?", (model,))
                if count is not None:
                    tx.execute("INSERT INTO pins VALUES (?, ?)", (model, count))
        except StoreError as exc:
            raise PinStoreError(f"{db.name}: cannot write pin table: {exc}") from exc
        if count is None:
            self._pins.pop(model, None)
        else:
            self._pins[model] = count


class Pins:
    """The live pins by model name: the one place a pin is held. Reading is cheap (a dict lookup)."""

    def __init__(self, models: Sequence[ModelConfig], store: PinStore | None = None) -> None:
        self._max = {m.name: m.max_replicas for m in models}
        self._pins: dict[str, int] = {}
        self._store = store
        if store is not None:
            self._restore(store)

    def update_catalog(self, models: Sequence[ModelConfig]) -> None:
        """A reloaded catalog's max_replicas (controller/reload.py); a live pin above a lowered max comes down to
        it (and is saved so)."""
        self._max.update((m.name, m.max_replicas) for m in models)
        for model, count in list(self._pins.items()):
            if count > self._max.get(model, count):
                self.set(model, self._max[model])

    def check(self, model: str, count: int | None) -> None:
        """Raises KeyError for a model not in the catalog, ValueError for a count outside 0..max_replicas."""
        if model not in self._max:
            raise KeyError(f"{model!r} is not a catalog model")
        if count is not None and not 0 <= count <= self._max[model]:
            raise ValueError(f"{model}: {count} is outside 0..max_replicas ({self._max[model]}); "
                             "raise max_replicas in the config to go higher")

    def set(self, model: str, count: int | None) -> None:
        """Holds `model` at `count` replicas regardless of load (None returns it to the load), then saves it.
        A PinStoreError after the check means the pin holds now but is lost at the next restart."""
        self.check(model, count)
        log.info("model=%s pinned %s -> %s", model, self._pins.get(model), "auto" if count is None else count)
        if count is None:
            self._pins.pop(model, None)
        else:
            self._pins[model] = count
        if self._store is not None:
            self._store.save(model, count)

    def get(self, model: str) -> int | None:
        """The count `model` is pinned at, or None while it follows the load."""
        return self._pins.get(model)

    def scaled_to_zero(self, model: str) -> bool:
        """True while an administrator pins `model` at 0 replicas: the autoscaler starts none for it."""
        return self._pins.get(model) == 0

    def all(self) -> dict[str, int]:
        return dict(self._pins)

    def _restore(self, store: PinStore) -> None:
        """Takes the saved pins; those the catalog no longer allows are dropped from the file."""
        for model, count in sorted(store.pins().items()):
            try:
                self.check(model, count)
            except (KeyError, ValueError) as exc:
                log.warning("saved pin model=%s count=%d dropped: %s", model, count,
                            exc.args[0] if exc.args else exc)
                store.save(model, None)
                continue
            self._pins[model] = count
            log.info("restored pin model=%s count=%d from %s", model, count, store.path)
