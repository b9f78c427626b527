"""The administrator's `slinfer scale MODEL N` pins, kept across controller restarts.

Responsible for: one JSON file (mode 0600) under `[controller].state_dir`, rewritten atomically
(slinfer/atomicfile.py) on every pin or unpin, as the key store keeps its keys; reading it at start and handing
each pin to the autoscaler again; dropping, with a log line that names it, a saved pin the catalog no longer
allows (a model removed, or a count above its new max_replicas). Not responsible for: what a pin means (the
autoscaler holds the model at it), checking a new pin (the autoscaler does, before it is saved), or the admin
API (controller/admin.py calls `save` after the autoscaler took the pin).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol

from slinfer.atomicfile import write_atomic

log = logging.getLogger(__name__)

# The file's layout; a file of another version is refused rather than half understood.
FORMAT_VERSION = 1


class PinStoreError(RuntimeError):
    """The pin file cannot be read or written; the message names the file."""


class Pinnable(Protocol):
    def pin(self, model: str, count: int | None) -> None: ...


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

    def restore(self, autoscaler: Pinnable) -> None:
        """Hands every saved pin to the autoscaler; those it refuses are dropped from the file."""
        dropped = []
        for model, count in sorted(self._pins.items()):
            try:
                autoscaler.pin(model, count)
            except (KeyError, ValueError) as exc:
                log.warning("saved pin model=%s count=%d dropped: %s", model, count,
                            exc.args[0] if exc.args else exc)
                dropped.append(model)
                continue
            log.info("restored pin model=%s count=%d from %s", model, count, self._path)
        if dropped:
            self._write({m: c for m, c in self._pins.items() if m not in dropped})
            self._pins = {m: c for m, c in self._pins.items() if m not in dropped}
