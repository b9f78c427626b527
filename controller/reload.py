"""Reloading the site config without a restart: SIGHUP to `slinfer-controller` (`systemctl reload`).

Responsible for: reading the config file again, comparing it with the running config key by key, and applying
the keys that may change at run time, `RUNTIME_MODEL_KEYS` of each catalog model (its adapters, min_replicas
and max_replicas), to the parts that hold them (the autoscaler, the pins, /v1/models' board and the gateway,
which unloads the adapters the catalog dropped from the running engines: controller/adapters.py). A file that
does not parse, or that changes any other key (a listen address, TLS, a state path, a model added or removed),
is refused whole: the running config stays, and the log names each dotted key at fault.
Not responsible for: the gateway tier (`slinfer-gateway` re-reads the file on its own SIGHUP, restarting its
workers one by one), the agents (they read the file on their nodes at each engine start), or the keys, limits
and quotas (`[gateway]` needs a restart: the key store and limiter hold state built from them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from slinfer.config import Config, ConfigError, ModelConfig, load

log = logging.getLogger(__name__)

# The keys of a catalog model a reload applies to the running controller; any other change needs a restart.
RUNTIME_MODEL_KEYS = frozenset({"adapters", "min_replicas", "max_replicas"})
# The sections compared key by key; `path` (where the file was read from) is no setting.
SECTIONS = ("controller", "gateway", "agent", "kubernetes", "batch", "state")


class CatalogHolder(Protocol):
    """A part of the controller that holds catalog models' settings (autoscaler, pins, the /v1/models board)."""

    def update_catalog(self, models: Sequence[ModelConfig]) -> None: ...


@dataclass
class Outcome:
    """What one reload did: `refused` names the dotted keys (or the parse error) that kept the old config."""

    applied: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    # Adapters taken off running engines: name -> engines that unloaded it.
    unloaded: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.refused


def differences(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ between two configs; catalog models are matched by name (an
    index in a key is the model's place in `new`, or in `old` for a model removed)."""
    keys: list[str] = []
    for section in SECTIONS:
        a, b = getattr(old, section), getattr(new, section)
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]
    before = {m.name: m for m in old.models}
    now = {m.name: (i, m) for i, m in enumerate(new.models)}
    for i, m in enumerate(old.models):
        if m.name not in now:
            keys.append(f"models[{i}] ({m.name!r} removed)")
    for name, (i, m) in now.items():
        if name not in before:
            keys.append(f"models[{i}] ({name!r} added)")
            continue
        was = before[name]
        keys += [f"models[{i}].{f.name}" for f in dataclasses.fields(m) if getattr(m, f.name) != getattr(was, f.name)]
    return keys


def runtime_key(key: str) -> bool:
    """True for a key a reload applies (`models[i].adapters`, ...)."""
    head, _, tail = key.partition("].")
    return head.startswith("models[") and tail in RUNTIME_MODEL_KEYS


class Reloader:
    """Holds the running config and applies a re-read file to the controller's parts; see the module docstring."""

    def __init__(self, config: Config, holders: Sequence[CatalogHolder],
                 gateway_update: Callable[[Sequence[ModelConfig]], Awaitable[dict[str, int]]],
                 reader: Callable[[str], Config] = load) -> None:
        self.config = config
        self._holders = holders
        self._gateway_update = gateway_update
        self._reader = reader
        # One reload at a time: a second SIGHUP while one applies waits for it, then reads the file again.
        self._lock = asyncio.Lock()

    async def reload(self) -> Outcome:
        """Reads `self.config.path` again and applies it, or refuses it whole (logged at ERROR, keys named)."""
        async with self._lock:
            started = time.monotonic()
            path = self.config.path
            try:
                new = self._reader(path)
            except ConfigError as exc:
                log.error("config reload refused, the running config is kept: %s: %s", path, exc)
                return Outcome(refused=[str(exc)])
            except OSError as exc:
                log.error("config reload refused, the running config is kept: cannot read %s: %s", path, exc)
                return Outcome(refused=[f"(file): {exc}"])
            changed = differences(self.config, new)
            fixed = [k for k in changed if not runtime_key(k)]
            if fixed:
                log.error("config reload refused, the running config is kept: %s cannot change while the "
                          "controller runs (restart it to apply)", ", ".join(fixed))
                return Outcome(refused=fixed)
            if not changed:
                log.info("config reload: %s has no change", path)
                return Outcome()
            # The catalog's order may differ; the parts take the models by name.
            for holder in self._holders:
                holder.update_catalog(new.models)
            self.config = new
            unloaded = await self._gateway_update(new.models)
            outcome = Outcome(applied=changed, unloaded=unloaded, seconds=time.monotonic() - started)
            log.info("config reload applied in %.0f ms: %s%s", outcome.seconds * 1000, ", ".join(changed),
                     "".join(f"; adapter {name} unloaded from {n} engine(s)" for name, n in unloaded.items()))
            return outcome
