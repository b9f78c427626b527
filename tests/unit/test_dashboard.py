"""packaging/grafana/slinfer-dashboard.json: it loads, has the panels an operator needs, and every metric it
queries is exported by a running controller (slinfer-controller's serve(), in process) or a running
slinfer-gateway worker fed by that controller."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from pathlib import Path

import aiohttp

from slinfer.backoff import BackoffPolicy
from slinfer.config import load
from slinfer.controller import main as controller_main
from slinfer.controller.gateway_main import serve_worker

DASHBOARD = Path(__file__).resolve().parents[2] / "packaging" / "grafana" / "slinfer-dashboard.json"
PANELS = {"Requests by model and code", "Errors by model and code", "Request latency percentiles",
          "Time to first token percentiles", "Queue depth", "Replicas by state", "Slurm jobs by state",
          "Scaling decisions", "Gateways connected", "Controller reachable (per gateway)",
          "Kubernetes (per controller)"}
_METRIC = re.compile(r"\bslinfer_[a-z_]+\b")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _queried() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    assert {p["title"] for p in dashboard["panels"]} == PANELS
    return {name for p in dashboard["panels"] for t in p["targets"] for name in _METRIC.findall(t["expr"])}


def _exported(text: str) -> set[str]:
    """Sample names, and the names a histogram or counter family exports even before its first sample."""
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names |= {name + s for s in ({"histogram": ("_bucket", "_count", "_sum"),
                                          "counter": ("_total",)}.get(kind, ()))} | {name}
    return names


def test_every_metric_the_dashboard_queries_is_exported(tmp_path: Path, monkeypatch) -> None:
    queried = _queried()
    assert len(queried) >= 9
    # The controller's first table waits for agents to re-register; there are none here.
    monkeypatch.setattr(controller_main, "AGENT_RECONNECT", BackoffPolicy(0.05, 0.05))
    grpc_port, http_port, tier_port = _free_port(), _free_port(), _free_port()
    config_path = tmp_path / "slinfer.toml"
    config_path.write_text(f"""
[controller]
listen = "127.0.0.1:{grpc_port}"
address = "127.0.0.1:{grpc_port}"
state_dir = "{tmp_path / 'state'}"
token = "dash-token"
slurm_bin_dir = "{tmp_path / 'no-slurm'}"
heartbeat_s = 0.05

[gateway]
listen = "127.0.0.1:{http_port}"
api_keys = ["dash-key"]
queue_timeout_s = 0.2

[[models]]
name = "m"
source = "/models/m"
""")
    config = load(str(config_path))

    async def scrape() -> tuple[str, str]:
        stop_controller, stop_tier = asyncio.Event(), asyncio.Event()
        up = asyncio.Event()
        controller = asyncio.create_task(controller_main.serve(config, stop_controller,
                                                               on_ready=lambda _g, _h: up.set()))
        await asyncio.wait_for(up.wait(), 30)
        tier = asyncio.create_task(serve_worker(config, f"127.0.0.1:{tier_port}", "dash-tier", stop_tier,
                                                reuse_port=False))
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(300):
                    with contextlib.suppress(aiohttp.ClientConnectionError):
                        async with http.get(f"http://127.0.0.1:{tier_port}/healthz") as resp:
                            if (await resp.json()).get("controller") == "connected":
                                break
                    await asyncio.sleep(0.05)
                # One request through each, so that the per-request series have samples (a 503: no replica).
                for port in (http_port, tier_port):
                    async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                         headers={"Authorization": "Bearer dash-key"},
                                         json={"model": "m", "messages": []}) as resp:
                        assert resp.status == 503
                async with http.get(f"http://127.0.0.1:{http_port}/metrics") as resp:
                    controller_text = await resp.text()
                async with http.get(f"http://127.0.0.1:{tier_port}/metrics") as resp:
                    tier_text = await resp.text()
        finally:
            stop_tier.set()
            await asyncio.wait_for(tier, 40)
            stop_controller.set()
            await asyncio.wait_for(controller, 40)
        return controller_text, tier_text

    controller_text, tier_text = asyncio.run(scrape())
    exported = _exported(controller_text) | _exported(tier_text)
    missing = sorted(q for q in queried if q not in exported)
    assert missing == [], f"the dashboard queries metrics nobody exports: {missing}"
    # Several gateways add up: the tier's series carry its instance label, the controller's own do not.
    assert 'slinfer_gateway_requests_total{code="503",endpoint="chat",gateway="dash-tier",model="m"}' in tier_text
    assert 'slinfer_gateway_controller_connected{gateway="dash-tier"} 1.0' in tier_text
    assert "slinfer_gateways_connected 1.0" in controller_text
    assert 'gateway="' not in controller_text
