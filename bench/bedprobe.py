"""The benchmarks' handle on a running dev-cluster bed: what the controller, its gateway and the engines say.

Responsible for: the controller's Admin API (status, pinning a replica count), the gateway's /metrics and
/v1/models, each READY replica's engine URL and key (from the agent's `<run>/jobs/<job>.env`, as a job's own
steps would read them), an engine's /metrics counters, the controller's decision log lines, and restarting the
controller with another config or balancer policy. Not responsible for: bringing the bed up or down
(`slinfer.dev.devcluster`), generating load (`loadgen`) or deciding anything.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import aiohttp
import grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.loadgen import Target
from slinfer import config as config_mod
from slinfer import tls
from slinfer.dev import devcluster
from slinfer.slurm.states import JobState
from slinfer.v1 import admin_pb2, admin_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
# "2025-11-24 03:55:00,123 INFO slinfer.controller.autoscaler: model=tiny submitted job 5"
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) ([\w.]+): (.*)$")


@dataclass(frozen=True)
class Engine:
    job_id: str
    target: Target  # OpenAI base URL (…/v1) and the engine's own key
    root: str  # http://HOST:PORT, for /metrics


@dataclass(frozen=True)
class LogLine:
    at: float  # unix seconds
    logger: str
    message: str


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def metric_sum(values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in values.items() if n == name and want <= set(lab))


class BedProbe:
    """Reads (and, for pinning and controller restarts, steers) one dev-cluster bed."""

    def __init__(self, bed: devcluster.Bed, model: str) -> None:
        self.bed = bed
        self.model = model
        env = bed.env()
        self.gateway = Target("gateway", env["SLINFER_GATEWAY_URL"], env["SLINFER_API_KEY"])
        self._gateway_root = env["SLINFER_GATEWAY_URL"].removesuffix("/v1")
        self._controller = env["SLINFER_CONTROLLER"]
        self._session: aiohttp.ClientSession | None = None
        self._channel: grpc.aio.Channel | None = None
        self._admin: admin_pb2_grpc.AdminStub | None = None
        self._metadata: tuple[tuple[str, str], ...] = ()

    async def __aenter__(self) -> BedProbe:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        # The bed's gRPC port speaks (mutual) TLS and wants the token, as a site's does.
        config = config_mod.load(self.bed.config)
        self._metadata = (("authorization", f"Bearer {config.controller.token}"),)
        self._channel = tls.aio_channel(self._controller, config)
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
        if self._channel is not None:
            await self._channel.close()

    # ---- the controller ---------------------------------------------------------------------------------
    async def status(self) -> admin_pb2.StatusResponse:
        assert self._admin is not None
        return await self._admin.Status(admin_pb2.StatusRequest(), timeout=10, metadata=self._metadata)

    async def model_status(self) -> admin_pb2.ModelStatus:
        reply = await self.status()
        return next(m for m in reply.models if m.name == self.model)

    async def pin(self, replicas: int | None) -> None:
        """`slinfer scale MODEL N` (None: `auto`)."""
        assert self._admin is not None
        request = (admin_pb2.ScaleRequest(model=self.model, auto=True) if replicas is None
                   else admin_pb2.ScaleRequest(model=self.model, replicas=replicas))
        await self._admin.Scale(request, timeout=10, metadata=self._metadata)

    async def wait_replicas(self, ready: int, within_s: float, idle_others: bool = True) -> float:
        """Seconds until exactly `ready` replicas are READY (and, with idle_others, none is starting, pending
        or draining); raises past the timeout."""
        began = time.monotonic()
        last = None
        while time.monotonic() - began < within_s:
            try:
                m = await self.model_status()
                last = m
                if m.ready == ready and (not idle_others or m.starting + m.pending + m.draining == 0):
                    return time.monotonic() - began
            except grpc.aio.AioRpcError:
                pass  # the controller is restarting
            await asyncio.sleep(0.5)
        raise RuntimeError(f"timed out after {within_s:.0f}s waiting for {ready} READY replicas of {self.model}; "
                           f"last status: {last}")

    async def wait_no_jobs(self, within_s: float) -> float:
        began = time.monotonic()
        while time.monotonic() - began < within_s:
            reply = await self.status()
            if not [j for j in reply.jobs if j.model == self.model and JobState.parse(j.state).holds_node] and \
                    not [r for r in reply.replicas if r.model == self.model]:
                return time.monotonic() - began
            await asyncio.sleep(0.5)
        raise RuntimeError(f"timed out after {within_s:.0f}s waiting for {self.model}'s jobs to end")

    def restart_controller(self, config_text: str) -> None:
        """Stops the bed's controller, writes its config, and starts it again (a routing policy is the config's
        `[[models]].balancer`). Its jobs keep running; the new controller adopts them."""
        devcluster.stop_daemon(self.bed, "controller")
        self.bed.config.write_text(config_text)
        devcluster.start_controller(self.bed)

    def controller_log(self, since: float = 0.0) -> list[LogLine]:
        path = self.bed.logs / "controller.out"
        lines = []
        for raw in path.read_text(errors="replace").splitlines() if path.exists() else ():
            m = _LOG_LINE.match(raw)
            if not m:
                continue
            at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if at >= since:
                lines.append(LogLine(at, m.group(3), m.group(4)))
        return lines

    # ---- the gateway ------------------------------------------------------------------------------------
    async def gateway_metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        assert self._session is not None
        async with self._session.get(f"{self._gateway_root}/metrics") as response:
            return metric_values(await response.text())

    async def routable(self) -> int:
        """READY replicas as the gateway's /v1/models counts them (what routing sees)."""
        assert self._session is not None
        async with self._session.get(f"{self.gateway.base_url}/models",
                                     headers={"Authorization": f"Bearer {self.gateway.api_key}"}) as response:
            data = (await response.json())["data"]
        return int(next(m for m in data if m["id"] == self.model)["ready_replicas"])

    async def wait_routable(self, n: int, within_s: float) -> None:
        began = time.monotonic()
        while time.monotonic() - began < within_s:
            try:
                if await self.routable() == n:
                    return
            except (aiohttp.ClientError, OSError):
                pass
            await asyncio.sleep(0.3)
        raise RuntimeError(f"the gateway did not route to {n} replicas of {self.model} within {within_s:.0f}s")

    # ---- the engines ------------------------------------------------------------------------------------
    async def engines(self) -> list[Engine]:
        """The model's READY replicas, each reached as its job's own steps would reach it."""
        reply = await self.status()
        found = []
        for r in sorted(reply.replicas, key=lambda r: r.job_id):
            if r.model != self.model or r.state != "READY":
                continue
            env = self._env_file(r.job_id)
            found.append(Engine(r.job_id, Target(f"engine {r.job_id}", env["OPENAI_BASE_URL"],
                                                 env["OPENAI_API_KEY"]), env["SLINFER_JOB_ENGINE"]))
        return found

    def _env_file(self, job_id: str) -> dict[str, str]:
        path = self.bed.run_dir / "jobs" / f"{job_id}.env"
        return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)

    async def engine_metrics(self, engine: Engine) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        assert self._session is not None
        async with self._session.get(f"{engine.root}/metrics") as response:
            return metric_values(await response.text())
