"""The catalog's LoRA adapters, as the gateway sees them.

Responsible for: which catalog model each adapter ([[models.adapters]]) belongs to, so that a request for an
adapter goes to an engine of its base model (and counts as its base's load: the gateway keeps in-flight and
queue counts under the base, which is what the autoscaler reads); the `/v1/models` entry of each adapter
(OpenAI's fields, `parent`, `root`, and the base's `slinfer` state); and making sure the engine a request was
given has the adapter: an engine lists the adapters it was started with (`--lora-modules`), and one that
lacks an adapter (the catalog gained it after the engine started, and the controller was restarted with it)
is given it through vLLM's `/v1/load_lora_adapter`, without a restart (the agent starts engines of a model
with adapters with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True).
It also narrows the balancer's candidates to the engines that have an adapter, where one of them is as free as
any (`prefer_loaded`).
When the catalog is reloaded (controller/reload.py) `update` takes the new adapters, and `unload` takes the
dropped ones (and those whose source changed) off the running engines through vLLM's `/v1/unload_lora_adapter`;
from then on a request for a dropped adapter is a 404 model_not_found and /v1/models no longer lists it.
Not responsible for: the engine's flags (agent/launch.py `lora_args`), choosing the engine (the balancer),
or reading the config (reload.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import aiohttp

from slinfer.config import AdapterConfig, ModelConfig
from slinfer.controller.registry import Replica

log = logging.getLogger(__name__)

# An engine's answer to "which adapters do you have" (its /v1/models) or to a load: vLLM loads a LoRA of a few
# MB in tens of milliseconds (19 ms on the CPU with vLLM 0.32); a busy engine may take seconds to answer at all.
ENGINE_ASK_TIMEOUT_S = 30.0


class AdapterLoadFailed(Exception):
    """The engine refused to load the adapter (a rank above --max-lora-rank, an unreadable folder)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Adapters:
    """The catalog's adapters: base of each, their /v1/models entries, and loading them onto engines."""

    def __init__(self, catalog: Sequence[ModelConfig]) -> None:
        self._by_name: dict[str, tuple[ModelConfig, AdapterConfig]] = {
            a.name: (m, a) for m in catalog for a in m.adapters}
        # (engine job id, adapter) pairs known to be on the engine; cleared of gone engines as they are seen.
        self._loaded: set[tuple[str, str]] = set()
        # One load (or look) per engine and adapter at a time: concurrent first requests wait for the one.
        self._pending: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._session: aiohttp.ClientSession | None = None

    def update(self, catalog: Sequence[ModelConfig]) -> list[tuple[str, str]]:
        """Takes a reloaded catalog's adapters; returns the (base model, adapter) pairs to unload from running
        engines: those dropped, and those whose source changed (the engine holds the old weights under the name;
        the next request loads the new ones)."""
        new = {a.name: (m, a) for m in catalog for a in m.adapters}
        gone = [(m.name, name) for name, (m, a) in self._by_name.items()
                if name not in new or new[name][1].source != a.source or new[name][0].name != m.name]
        self._by_name = new
        names = {name for _, name in gone}
        self._loaded = {pair for pair in self._loaded if pair[1] not in names}
        return gone

    async def unload(self, gone: Iterable[tuple[str, str]],
                     replicas: Callable[[str], Iterable[Replica]]) -> dict[str, int]:
        """Unloads each (base, adapter) of `gone` from every engine `replicas(base)` lists; returns how many
        engines each adapter left. An engine that never had it (vLLM's 404) counts as done; one that fails is
        logged and skipped (it still holds a few MB, and no request is routed there for the name)."""
        done: dict[str, int] = {}
        for base_name, name in gone:
            done[name] = 0
            for replica in replicas(base_name):
                started = asyncio.get_running_loop().time()
                try:
                    status, text = await self._post(replica, "/v1/unload_lora_adapter", {"lora_name": name})
                except (aiohttp.ClientError, TimeoutError) as exc:
                    log.warning("adapter %s: engine %s (%s) did not answer its unload: %r", name, replica.job_id,
                                replica.node, exc)
                    continue
                self._loaded.discard((replica.job_id, name))
                if status == 404:
                    continue  # it never had it
                if status >= 300:
                    log.warning("adapter %s: engine %s (%s) refused its unload (%d): %s", name, replica.job_id,
                                replica.node, status, text[:300])
                    continue
                done[name] += 1
                log.info("adapter %s unloaded from engine %s (%s) in %.0f ms", name, replica.job_id, replica.node,
                         (asyncio.get_running_loop().time() - started) * 1000)
        return done

    async def _post(self, replica: Replica, path: str, body: dict[str, str]) -> tuple[int, str]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ENGINE_ASK_TIMEOUT_S))
        async with self._session.post(f"{replica.base_url.rstrip('/')}{path}", json=body,
                                      headers={"Authorization": f"Bearer {replica.api_key}"}) as resp:
            return resp.status, await resp.text()

    def base(self, name: str) -> ModelConfig | None:
        """The catalog model whose engines serve adapter `name`; None if it is no adapter."""
        found = self._by_name.get(name)
        return found[0] if found is not None else None

    def names(self) -> list[str]:
        return list(self._by_name)

    def entries(self, models: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """The `/v1/models` entries of the adapters, after their bases' `models` entries."""
        by_id = {m["id"]: m for m in models}
        out = []
        for name, (model, adapter) in self._by_name.items():
            parent = by_id.get(model.name, {})
            out.append({"id": name, "object": "model", "created": 0, "owned_by": "slinfer", "root": adapter.source,
                        "parent": model.name, "max_model_len": parent.get("max_model_len"),
                        "slinfer": {**parent.get("slinfer", {}), "adapter": True}})
        return out

    def prefer_loaded(self, candidates: list[Replica], name: str, exclude: Collection[str]) -> list[Replica]:
        """The candidates that have adapter `name` already, where one of them is as little loaded as any other
        candidate; else all: an engine without it would load it (milliseconds) before answering, but a busier
        engine would cost more."""
        usable = [r for r in candidates if r.job_id not in exclude]
        loaded = [r for r in usable if (r.job_id, name) in self._loaded]
        if not loaded or len(loaded) == len(usable):
            return candidates
        least = min(r.outstanding for r in usable)
        return loaded if min(r.outstanding for r in loaded) <= least else candidates

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def forget(self, live_job_ids: Iterable[str]) -> None:
        live = set(live_job_ids)
        self._loaded = {pair for pair in self._loaded if pair[0] in live}

    async def ensure(self, replica: Replica, name: str) -> None:
        """Returns once `replica`'s engine has adapter `name` (looked up, or loaded); raises AdapterLoadFailed
        where the engine refuses it or does not answer."""
        key = (replica.job_id, name)
        if key in self._loaded:
            return
        pending = self._pending.get(key)
        if pending is not None:
            await asyncio.shield(pending)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            try:
                await self._ensure(replica, name)
            except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as exc:
                raise AdapterLoadFailed(502, f"engine {replica.job_id} did not answer about adapter '{name}': "
                                        f"{exc!r}") from exc
            self._loaded.add(key)
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: a failure with no second waiter is not "never retrieved"
            raise
        finally:
            del self._pending[key]

    async def _ensure(self, replica: Replica, name: str) -> None:
        found = self._by_name.get(name)
        if found is None:  # dropped by a reload while this request was on its way
            raise AdapterLoadFailed(404, f"The model '{name}' does not exist; GET /v1/models lists the models "
                                    "served here.")
        _, adapter = found
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ENGINE_ASK_TIMEOUT_S))
        base = replica.base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {replica.api_key}"}
        async with self._session.get(f"{base}/v1/models", headers=headers) as resp:
            listing = await resp.json(content_type=None)
        served = {m.get("id") for m in listing.get("data", []) if isinstance(m, dict)}
        for other in served & self._by_name.keys():
            self._loaded.add((replica.job_id, other))
        if name in served:
            return
        started = asyncio.get_running_loop().time()
        async with self._session.post(f"{base}/v1/load_lora_adapter", headers=headers,
                                      json={"lora_name": name, "lora_path": adapter.source}) as resp:
            text = await resp.text()
            if resp.status >= 300:
                raise AdapterLoadFailed(resp.status, f"the engine refused to load adapter '{name}' "
                                        f"({resp.status}): {text[:300]}")
        log.info("adapter %s loaded on engine %s (%s) in %.0f ms", name, replica.job_id, replica.node,
                 (asyncio.get_running_loop().time() - started) * 1000)
