"""The administrator's `slinfer scale MODEL N` pins: the one owner of live pins, kept across controller restarts.

Responsible for: `Pins`, the live pins (built first at start, before everything that reads them): checking a new
pin against the catalog (a known model, 0..max_replicas), holding it, and saving it; the autoscaler, the gateway,
the gateway hub and the model board read it. `PinStore`: one JSON file (mode 0600) under `[controller].state_dir`,
rewritten atomically (slinfer/atomicfile.py) on every pin or unpin, as the key store keeps its keys; at start
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

from slinfer.atomicfile import write_atomic
from slinfer.config import ModelConfig

log = logging.getLogger(__name__)

# The file's layout; a file of another version is refused rather than half understood.
FORMAT_VERSION = 1


class PinStoreError(RuntimeError):
    """The pin file cannot be read or written; the message names the file."""


class PinStore:
    """Pins by model name, persisted in `path`."""

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._pins: dict[str, int] = {}
        if self._path.exists():
            self._pins = self._read()

    def _read(self) -> dict[str, int]:
        try:
            data = json.loads(self._path.read_text())
            if data.get("version") != FORMAT_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {FORMAT_VERSION}")
            pins = data["pins"]
            if not isinstance(pins, dict) or not all(
                    isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                    for k, v in pins.items()):
                raise ValueError("pins must map model names to replica counts of 0 or more")
            return dict(pins)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PinStoreError(f"{self._path}: unreadable pin file: {exc}") from exc

    def _write(self, pins: dict[str, int]) -> None:
        try:
            self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(self._path, json.dumps({"version": FORMAT_VERSION, "pins": pins}, indent=1,
                                                sort_keys=True).encode())
        except OSError as exc:
            raise PinStoreError(f"{self._path}: cannot write pin file: {exc}") from exc

    @property
    def path(self) -> Path:
        return self._path

    def pins(self) -> dict[str, int]:
        return dict(self._pins)

    def save(self, model: str, count: int | None) -> None:
        """Records `model` pinned at `count` (None: back to the load); the file changes before this returns."""
        pins = dict(self._pins)
        if count is None:
            pins.pop(model, None)
        else:
            pins[model] = count
        if pins == self._pins:
            return
        self._write(pins)
        self._pins = pins


class Pins:
    """The live pins by model name: the one place a pin is held. Reading is cheap (a dict lookup)."""

    def __init__(self, models: Sequence[ModelConfig], store: PinStore | None = None) -> None:
        self._max = {m.name: m.max_replicas for m in models}
        self._pins: dict[str, int] = {}
        self._store = store
        if store is not None:
            self._restore(store)

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
