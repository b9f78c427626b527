"""What the agent asks a running engine: is it healthy, and how loaded is it.

Responsible for: vLLM's `GET /health` (200 means it serves) and its Prometheus `/metrics`, read with
prometheus_client's parser into the three load figures the controller scales and routes by. Not responsible
for: when to ask, or what a failed probe means for the engine's state (the engine manager decides).
"""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

# vLLM's gauges of an engine's load, by the name the agent reports each under (pb.EngineLoad's fields).
LOAD_METRICS = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
}
# A probe slower than this is a failed one: /health and /metrics answer in milliseconds.
PROBE_TIMEOUT_S = 2.0


async def healthy(http: aiohttp.ClientSession, base_url: str) -> bool:
    try:
        async with http.get(f"{base_url}/health", timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


def parse_load(text: str) -> dict[str, float]:
    """The load figures in a /metrics text: each gauge summed over its labelled samples (one per model name or
    engine index), 0 where absent. Raises ValueError on text that is not Prometheus' exposition format."""
    load = dict.fromkeys(LOAD_METRICS.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            field = LOAD_METRICS.get(sample.name)
            if field is not None:
                load[field] += sample.value
    return load


async def load(http: aiohttp.ClientSession, base_url: str) -> dict[str, float] | None:
    """The engine's load from its /metrics, or None when it did not answer or answered no metrics text."""
    try:
        async with http.get(f"{base_url}/metrics", timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as response:
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    try:
        return parse_load(text)
    except ValueError:
        return None
