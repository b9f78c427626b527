"""What a user can read about each model: served now, starting, queued in Slurm, or offline.

Responsible for: one entry per catalog model (served or not) and per served model outside the catalog, for the
gateway's `/v1/models`: the OpenAI fields, `max_model_len` as the model's engine reports it (vLLM's own
`/v1/models` carries it; asked once per engine, remembered per model), and the extension object `slinfer`:

- `ready`: `replicas` routable engines;
- `starting`: a job of the service runs (or a pooled engine reports STARTING) but no engine is READY;
  `starting_s` since it started (a user's private engine of the model is not the service's);
- `queued`: the model's Slurm job is PENDING; `reason` as squeue says it, `queued_s` since it was submitted;
- `refused`: Slurm refused the model's last job at submit (no association, a QOS limit): `reason` in Slurm's
  words, `failures` in a row, `retry_in_s` until the autoscaler's next try (it backs off);
- `offline`: nothing runs or waits (a model with `min_replicas = 0` and no load).

In the gateway tier only the controller knows the jobs and refusals: it sends what it holds of each model
(`held`, absolute times) in the route feed, and a tier worker's board shows that (`remote`).

It also knows which of the route table's routes a model's engine serves (the engine's `/openapi.json`, asked
the first time an engine answers a route with a bare 404), so the gateway's 404 can name them.

Not responsible for: starting anything (the autoscaler), reading Slurm (it reads the autoscaler's view of its
own jobs, as of its last squeue), or authenticating the caller (the gateway).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import aiohttp

from slinfer.config import ModelConfig
from slinfer.controller.jobtable import Refusal
from slinfer.controller.registry import Registry, Replica
from slinfer.controller.routes import ROUTES
from slinfer.controller.slurm import SlurmJob
from slinfer.v1 import engine_pb2

log = logging.getLogger(__name__)

# An engine asked for its max_model_len answers from memory; one that does not within this is asked again on
# the next listing, and the listing does not wait longer for it.
ENGINE_ASK_TIMEOUT_S = 2.0
# vLLM builds its OpenAPI schema on the first request for it: seconds on a busy CPU. Asked once per model.
ENGINE_ROUTES_TIMEOUT_S = 10.0

# The autoscaler's jobs as of its last squeue, as (model, job) pairs.
Jobs = Callable[[], Iterable[tuple[str, SlurmJob]]]


class ModelBoard:
    """Builds `/v1/models` entries from the catalog, the Registry and the autoscaler's jobs."""

    def __init__(self, catalog: Sequence[ModelConfig], registry: Registry, jobs: Jobs | None = None,
                 clock: Callable[[], float] = time.time,
                 refusals: Callable[[str], Refusal | None] | None = None,
                 remote: Callable[[str], dict[str, Any] | None] | None = None) -> None:
        self._catalog = {m.name: m for m in catalog}
        self._registry = registry
        self._jobs = jobs
        self._refusals = refusals
        # A tier worker's: what the controller held of a model (`held`, from the route feed), or None.
        self._remote = remote
        self._clock = clock
        # max_model_len by engine job id, and the last one seen per model (kept while the model is offline).
        self._by_engine: dict[str, int] = {}
        self._by_model: dict[str, int] = {}
        self._routes: dict[str, list[str]] = {}  # model -> the route table's paths its engine serves
        self._routes_unknown: set[str] = set()  # engines (job ids) that did not say
        self._session: aiohttp.ClientSession | None = None

    def update_catalog(self, catalog: Sequence[ModelConfig]) -> None:
        """A reloaded catalog's models (controller/reload.py): /v1/models shows their new replica bounds."""
        self._catalog.update((m.name, m) for m in catalog)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _jobs_by_model(self) -> dict[str, list[SlurmJob]]:
        jobs: dict[str, list[SlurmJob]] = {}
        for model, job in (self._jobs() if self._jobs is not None else ()):
            jobs.setdefault(model, []).append(job)
        return jobs

    async def entries(self) -> list[dict[str, Any]]:
        names = list(self._catalog) + sorted({r.model for r in self._registry.replicas()} - set(self._catalog))
        jobs = self._jobs_by_model()
        await self._learn_lengths(names)
        return [self._entry(name, jobs.get(name, [])) for name in names]

    def feed_states(self) -> dict[str, str]:
        """What this board holds of each catalog model with no routable replica (`held`), as the route feed
        carries it to the tier: JSON with absolute times, so it changes only when the model's state does."""
        idle = [name for name in self._catalog if not self._registry.has_routable(name)]
        if not idle:
            return {}  # every model serves: the jobs (all of them, at a site's scale) are not read
        jobs = self._jobs_by_model()
        held = {name: self.held(name, jobs.get(name, [])) for name in idle}
        return {name: json.dumps(state, sort_keys=True) for name, state in held.items() if state is not None}

    def held(self, model: str, jobs: Sequence[SlurmJob]) -> dict[str, Any] | None:
        """The model's state short of ready, from the engines, jobs and refusals this board knows, with
        absolute unix times (`since`, `retry_at`); None when it knows of nothing running or waiting."""
        # The shared service's engines only: a user's private job of the same model (its own `sbatch
        # --inference`, pool=False) is not a replica of the service, starting or not.
        replicas = {r.job_id: r for r in self._registry.replicas(model) if r.pool}
        # Since when each starting job (or engine) started: the job's start, else the engine's.
        starts = [r.started_at for r in replicas.values() if r.state == engine_pb2.STARTING and r.started_at]
        starting_jobs = [j for j in jobs if j.state in ("RUNNING", "CONFIGURING")
                         and (j.job_id not in replicas or replicas[j.job_id].state == engine_pb2.STARTING)]
        starts += [j.start_time for j in starting_jobs if j.start_time]
        if starts or starting_jobs:
            return {"state": "starting", "since": min(starts) if starts else None}
        pending = sorted((j for j in jobs if j.state == "PENDING"), key=lambda j: j.submit_time)
        if pending:
            first = pending[0]
            return {"state": "queued", "reason": first.reason or "None", "jobs": len(pending),
                    "since": first.submit_time or None}
        refusal = self._refusals(model) if self._refusals is not None else None
        if refusal is not None:
            # Slurm refused the last submit (no association, a QOS limit): its reason, and the next try.
            return {"state": "refused", "reason": refusal.reason, "failures": refusal.failures,
                    "retry_at": refusal.retry_at}
        return None

    def state(self, model: str, jobs: Sequence[SlurmJob]) -> dict[str, Any]:
        """The `slinfer` extension object of one model."""
        routable = self._registry.routable(model)
        if routable:
            return {"state": "ready", "replicas": len(routable)}
        held = self.held(model, jobs)
        if held is None and self._remote is not None:
            held = self._remote(model)
        return _relative(held, self._clock()) if held is not None else {"state": "offline"}

    def _entry(self, name: str, jobs: Sequence[SlurmJob]) -> dict[str, Any]:
        config = self._catalog.get(name)
        status = self.state(name, jobs)
        if config is not None:
            status["min_replicas"] = config.min_replicas
            status["max_replicas"] = config.max_replicas
        return {"id": name, "object": "model", "created": 0, "owned_by": "slinfer",
                "max_model_len": self._by_model.get(name), "slinfer": status}

    async def engine_routes(self, replica: Replica) -> list[str] | None:
        """The route table's paths that `replica`'s engine serves, from its /openapi.json; None if unknown."""
        known = self._routes.get(replica.model)
        if known is not None or replica.job_id in self._routes_unknown:
            return known
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ENGINE_ASK_TIMEOUT_S))
        url = f"{replica.base_url.rstrip('/')}/openapi.json"
        try:
            async with self._session.get(url, headers={"Authorization": f"Bearer {replica.api_key}"},
                                         timeout=aiohttp.ClientTimeout(total=ENGINE_ROUTES_TIMEOUT_S)) as resp:
                paths = (await resp.json(content_type=None))["paths"]
            served = [r.path for r in ROUTES if "post" in (paths.get(r.engine_path) or {})]
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.info("engine %s (%s) did not list its routes: %r", replica.job_id, replica.model, exc)
            self._routes_unknown.add(replica.job_id)  # not asked again: each ask may take the whole timeout
            return None
        log.info("model %s: its engine serves %s", replica.model, ", ".join(served) or "none of the route table")
        self._routes[replica.model] = served
        return served

    async def _learn_lengths(self, names: Sequence[str]) -> None:
        unknown = [r for name in names for r in self._registry.routable(name) if r.job_id not in self._by_engine]
        if unknown:
            await asyncio.gather(*(self._ask(r) for r in unknown))

    async def _ask(self, replica: Replica) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ENGINE_ASK_TIMEOUT_S))
        url = f"{replica.base_url.rstrip('/')}/v1/models"
        try:
            async with self._session.get(url, headers={"Authorization": f"Bearer {replica.api_key}"}) as resp:
                data = await resp.json(content_type=None)
            length = next(int(m["max_model_len"]) for m in data["data"]
                          if m.get("id") == replica.model and m.get("max_model_len") is not None)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError, StopIteration) as exc:
            log.info("engine %s (%s) did not say its max_model_len: %r", replica.job_id, replica.model, exc)
            return
        self._by_engine[replica.job_id] = length
        if self._by_model.get(replica.model) != length:
            log.info("model %s: max_model_len %d (engine %s)", replica.model, length, replica.job_id)
        self._by_model[replica.model] = length
        # Forget engines that are gone, so the map stays as small as the registry.
        live = {r.job_id for r in self._registry.replicas()}
        for job_id in [j for j in self._by_engine if j not in live]:
            del self._by_engine[job_id]


def _relative(held: dict[str, Any], now: float) -> dict[str, Any]:
    """`held` as /v1/models shows it: seconds since a start or submit, seconds until the next try."""
    state = held.get("state")
    since = held.get("since")
    if state == "starting":
        return {"state": "starting", "starting_s": round(max(now - float(since), 0.0), 1) if since else 0.0}
    if state == "queued":
        return {"state": "queued", "reason": held.get("reason", "None"), "jobs": held.get("jobs", 1),
                "queued_s": round(max(now - float(since), 0.0), 1) if since else None}
    if state == "refused":
        return {"state": "refused", "reason": held.get("reason", ""), "failures": held.get("failures", 0),
                "retry_in_s": round(max(float(held.get("retry_at") or now) - now, 0.0), 1)}
    return {"state": "offline"}
