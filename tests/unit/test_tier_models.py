"""/v1/models through a gateway tier worker: a pool engine that is STARTING makes its model "starting" there
too (the tier knows no Slurm jobs, only the feed's replicas)."""

from __future__ import annotations

import aiohttp

from slinfer.controller.registry import Registry
from slinfer.v1 import controller_pb2, engine_pb2
from tests.unit.test_gateway_tier import Tier, tier, worker  # noqa: F401  (tier: a fixture used by name)


def _engine(registry: Registry, state: int) -> None:
    registry.report(controller_pb2.AgentReport(node="n1", address="127.0.0.1", agent_id="a", engines=[
        engine_pb2.Engine(job_id="7", model="m", state=state, base_url="http://127.0.0.1:9", api_key="ek",
                          pool=True, started_at=1.0)]))


async def _state(http: aiohttp.ClientSession, url: str) -> dict[str, object]:
    async with http.get(f"{url}/v1/models", headers={"Authorization": "Bearer config-key"}) as resp:
        assert resp.status == 200
        (entry,) = [m for m in (await resp.json())["data"] if m["id"] == "m"]
        return dict(entry["slinfer"])


async def test_a_starting_engine_shows_as_starting_through_the_tier(tier: Tier) -> None:  # noqa: F811
    async with worker(tier, "gw-a") as url, aiohttp.ClientSession() as http:
        assert (await _state(http, url))["state"] == "offline"  # control: nothing yet
        _engine(tier.registry, engine_pb2.STARTING)
        seen = await _poll(http, url, "starting")
        assert 0 <= float(seen["starting_s"]) < 5, seen  # type: ignore[arg-type]


async def _poll(http: aiohttp.ClientSession, url: str, want: str) -> dict[str, object]:
    import asyncio

    state: dict[str, object] = {}
    for _ in range(100):
        state = await _state(http, url)
        if state["state"] == want:
            return state
        await asyncio.sleep(0.02)
    raise AssertionError(f"never {want}: {state}")
