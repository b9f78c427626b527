"""What TLS costs: per agent report and per admin call on the gRPC port, and on the gateway-to-engine hop.

One run measures both sides against a baseline from the same run, in rounds that alternate the modes, so a
busy machine slows both alike; it prints medians over the rounds and the ratio to plaintext.

1. gRPC (a real grpc.aio server with the controller's RegistryService and AdminService, in this process):
   - a report: one long-lived Report stream, as an agent keeps; each report waits for its ack;
   - an admin call on a kept channel (ListKeys);
   - an admin call on a new channel each time, as every `slinfer` CLI command makes (TCP + TLS handshake);
   for plaintext, TLS and mutual TLS. Wall time per operation, and this process's CPU time per operation
   (client and server together).
2. The gateway-to-engine hop: a `slinfer-controller` process routes to two `bench/standin_engine.py`
   processes, one plain HTTP and one HTTPS (a certificate of the engine CA, verified by the gateway), with 100
   concurrent closed-loop users; throughput, p50/p99 latency, and the controller's CPU per request.

    .venv/bin/python bench/grpc_tls.py [--reports 2000] [--calls 500] [--fresh 100] [--requests 3000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loadgen import LoadGenerator, Stats, Target  # noqa: E402
from slinfer import tls  # noqa: E402
from slinfer.config import parse  # noqa: E402
from slinfer.controller.admin import AdminService  # noqa: E402
from slinfer.controller.keys import KeyStore  # noqa: E402
from slinfer.controller.registry import Registry, RegistryService  # noqa: E402
from slinfer.v1 import admin_pb2, admin_pb2_grpc, controller_pb2, controller_pb2_grpc, engine_pb2  # noqa: E402

TOKEN = "bench-token"
CLIENT_KEY = "bench-client-key"
ENGINE_KEY = "bench-engine-key"
MODES = ("plaintext", "tls", "mtls")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pki(folder: Path) -> dict[str, str]:
    ca = tls.CertificateAuthority(folder)
    server = ca.issue("server", ["127.0.0.1", "localhost"])
    client = ca.issue("client", ["bench-node"], client=True)
    return {"ca": str(ca.cert_path), "cert": str(server.cert), "key": str(server.key),
            "client_cert": str(client.cert), "client_key": str(client.key)}


def _config(mode: str, pki: dict[str, str], port: int) -> dict[str, object]:
    controller: dict[str, object] = {"token": TOKEN, "address": f"127.0.0.1:{port}"}
    agent: dict[str, object] = {}
    if mode != "plaintext":
        controller.update(tls_cert=pki["cert"], tls_key=pki["key"], tls_ca=pki["ca"],
                          tls_client_auth=mode == "mtls")
    if mode == "mtls":
        agent.update(tls_cert=pki["client_cert"], tls_key=pki["client_key"])
    return {"controller": controller, "agent": agent}


async def _timed(n: int, op: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) per operation over n operations."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        await op()
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


async def grpc_round(mode: str, pki: dict[str, str], tmp: Path,
                     args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    port = _free_port()
    config = parse(_config(mode, pki, port))
    server = grpc.aio.server()
    registry = Registry(agent_timeout_s=3600)
    controller_pb2_grpc.add_RegistryServicer_to_server(RegistryService(registry, TOKEN, 1.0), server)
    admin_pb2_grpc.add_AdminServicer_to_server(
        AdminService(None, registry, KeyStore(tmp / f"keys-{mode}.json"), TOKEN), server)  # type: ignore[arg-type]
    creds = tls.server_credentials(config)
    address = f"127.0.0.1:{port}"
    if creds is None:
        server.add_insecure_port(address)
    else:
        server.add_secure_port(address, creds)
    await server.start()
    out: dict[str, tuple[float, float]] = {}
    auth = (("authorization", f"Bearer {TOKEN}"),)
    try:
        async with tls.aio_channel(address, config) as channel:
            queue: asyncio.Queue[controller_pb2.AgentReport] = asyncio.Queue()

            async def reports():  # type: ignore[no-untyped-def]
                while True:
                    yield await queue.get()

            engines = [engine_pb2.Engine(job_id=str(100 + i), model="m", state=engine_pb2.READY,
                                         base_url=f"http://10.0.0.{i}:20000", api_key="k" * 43) for i in range(4)]
            call = controller_pb2_grpc.RegistryStub(channel).Report(reports())

            async def one_report() -> None:
                await queue.put(controller_pb2.AgentReport(node="bench-node", agent_id="a", token=TOKEN,
                                                           engines=engines, sent_at=time.time(), want_ack=True))
                await call.read()  # the controller acks the reports that ask

            await _timed(50, one_report)  # warm-up: the stream and the handshake are set up
            out["report"] = await _timed(args.reports, one_report)
            call.cancel()
            admin = admin_pb2_grpc.AdminStub(channel)

            async def kept_call() -> None:
                await admin.ListKeys(admin_pb2.ListKeysRequest(), metadata=auth, timeout=10)

            await _timed(20, kept_call)
            out["admin call, kept channel"] = await _timed(args.calls, kept_call)

        async def fresh_call() -> None:
            async with tls.aio_channel(address, config) as fresh:
                await admin_pb2_grpc.AdminStub(fresh).ListKeys(admin_pb2.ListKeysRequest(), metadata=auth,
                                                               timeout=10)

        out["admin call, new channel (CLI)"] = await _timed(args.fresh, fresh_call)
    finally:
        await server.stop(None)
    return out


# ---- the gateway-to-engine hop -----------------------------------------------------------------------------------
async def _start(log: Path, *argv: str) -> asyncio.subprocess.Process:
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=asyncio.subprocess.STDOUT)


async def _wait_port(port: int, proc: asyncio.subprocess.Process, log: Path) -> None:
    for _ in range(600):
        if proc.returncode is not None:
            raise RuntimeError(f"{log.name} exited: {log.read_text()[-2000:]}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{log.name} did not listen on {port}")


async def hop(pki: dict[str, str], tmp: Path, args: argparse.Namespace) -> dict[str, list[tuple[Stats, float]]]:
    procs: list[asyncio.subprocess.Process] = []
    ports = {"http": _free_port(), "https": _free_port()}
    grpc_port, http_port = _free_port(), _free_port()
    results: dict[str, list[tuple[Stats, float]]] = {"http": [], "https": []}
    heartbeat: asyncio.Task[None] | None = None
    try:
        for scheme, port in ports.items():
            log = tmp / f"engine-{scheme}.log"
            extra = ["--ssl-certfile", pki["cert"], "--ssl-keyfile", pki["key"]] if scheme == "https" else []
            procs.append(await _start(log, sys.executable, str(ROOT / "bench" / "standin_engine.py"), "--port",
                                      str(port), "--api-key", ENGINE_KEY, "--model", scheme, "--tokens", "16",
                                      *extra))
            await _wait_port(port, procs[-1], log)
        config = tmp / "slinfer.toml"
        config.write_text(
            f'[controller]\nlisten = "127.0.0.1:{grpc_port}"\nstate_dir = "{tmp}/state"\ntoken = "{TOKEN}"\n'
            f'slurm_bin_dir = "{tmp}/no-slurm"\nlog_level = "warning"\n\n'
            f'[gateway]\nlisten = "127.0.0.1:{http_port}"\napi_keys = ["{CLIENT_KEY}"]\nengine_ca = "{pki["ca"]}"\n'
            "max_outstanding_per_engine = 100000\nqueue_size = 100000\n\n"
            '[[models]]\nname = "http"\nsource = "/bench"\n\n[[models]]\nname = "https"\nsource = "/bench"\n')
        log = tmp / "controller.log"
        controller = await _start(log, sys.executable, "-m", "slinfer.controller.main", "--config", str(config))
        procs.append(controller)
        await _wait_port(http_port, controller, log)
        heartbeat = asyncio.create_task(_heartbeat(f"127.0.0.1:{grpc_port}", ports))
        await asyncio.sleep(1.0)
        gateway = psutil.Process(controller.pid)
        target = Target("gateway", f"http://127.0.0.1:{http_port}/v1", CLIENT_KEY)
        messages = [{"role": "user", "content": "hello"}]
        for n in range(args.rounds):
            # Each round swaps the order, so whatever the first run of a round pays (caches, a busy neighbour)
            # falls on both schemes alike.
            for scheme in ("http", "https") if n % 2 == 0 else ("https", "http"):
                gen = LoadGenerator(target, scheme, max_tokens=16)
                try:
                    await gen.through([gen.body(messages, False) for _ in range(200)], args.users, False)  # warm
                    cpu = sum(gateway.cpu_times()[:2])
                    samples = await gen.through([gen.body(messages, False) for _ in range(args.requests)],
                                                args.users, False)
                    cpu_per = (sum(gateway.cpu_times()[:2]) - cpu) / max(1, len(samples))
                finally:
                    await gen.close()
                stats = Stats.of(samples)
                if stats.errors:
                    raise RuntimeError(f"{scheme}: {stats.errors} failed requests: {stats.error_kinds}")
                results[scheme].append((stats, cpu_per))
    finally:
        if heartbeat is not None:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            await proc.wait()
    return results


async def _heartbeat(address: str, ports: dict[str, int]) -> None:
    engines = [engine_pb2.Engine(job_id=str(i + 1), model=scheme, state=engine_pb2.READY, pool=True,
                                 base_url=f"{scheme}://127.0.0.1:{port}", api_key=ENGINE_KEY, user="slinfer")
               for i, (scheme, port) in enumerate(ports.items())]

    async def reports():  # type: ignore[no-untyped-def]
        while True:
            yield controller_pb2.AgentReport(node="bench-node", agent_id="a", token=TOKEN, engines=engines,
                                             sent_at=time.time())
            await asyncio.sleep(0.5)

    async with grpc.aio.insecure_channel(address) as channel:
        async for _ in controller_pb2_grpc.RegistryStub(channel).Report(reports()):
            pass


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:8.0f} us"


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="slinfer-bench-tls-") as name:
        tmp = Path(name)
        pki = _pki(tmp / "pki")
        rounds: dict[str, list[dict[str, tuple[float, float]]]] = {m: [] for m in MODES}
        for n in range(args.rounds):
            for mode in MODES[n % 3:] + MODES[:n % 3]:  # rotated each round, as the hop's runs are
                rounds[mode].append(await grpc_round(mode, pki, tmp, args))
        print(f"gRPC port, medians of {args.rounds} rounds (wall per operation | this process's CPU per "
              "operation, client and server together)")
        for op in rounds["plaintext"][0]:
            base_wall = statistics.median(r[op][0] for r in rounds["plaintext"])
            base_cpu = statistics.median(r[op][1] for r in rounds["plaintext"])
            for mode in MODES:
                wall = statistics.median(r[op][0] for r in rounds[mode])
                cpu = statistics.median(r[op][1] for r in rounds[mode])
                print(f"  {op:32s} {mode:9s} wall {_us(wall)} (x{wall / base_wall:4.2f})   "
                      f"cpu {_us(cpu)} (x{cpu / base_cpu:4.2f})")
        if args.requests:
            results = await hop(pki, tmp, args)
            print(f"\ngateway -> stand-in engine, {args.users} concurrent users, {args.requests} requests per run, "
                  f"medians of {args.rounds} runs")
            base: dict[str, float] = {}
            for scheme in ("http", "https"):
                runs = results[scheme]
                figures = {"throughput": statistics.median(s.throughput for s, _ in runs),
                           "p50": statistics.median(s.p50 for s, _ in runs),
                           "p99": statistics.median(s.p99 for s, _ in runs),
                           "cpu": statistics.median(c for _, c in runs)}
                if scheme == "http":
                    base = figures
                ratio = figures["throughput"] / base["throughput"]
                print(f"  {scheme:5s} {figures['throughput']:7.0f} req/s (x{ratio:4.2f})"
                      f"  p50 {figures['p50'] * 1000:6.1f} ms (x{figures['p50'] / base['p50']:4.2f})"
                      f"  p99 {figures['p99'] * 1000:6.1f} ms (x{figures['p99'] / base['p99']:4.2f})"
                      f"  gateway cpu {_us(figures['cpu'])}/req (x{figures['cpu'] / base['cpu']:4.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=2000, help="reports per round and mode")
    parser.add_argument("--calls", type=int, default=500, help="admin calls on a kept channel per round and mode")
    parser.add_argument("--fresh", type=int, default=100, help="admin calls on new channels per round and mode")
    parser.add_argument("--requests", type=int, default=3000, help="gateway requests per run (0: skip the hop)")
    parser.add_argument("--users", type=int, default=100, help="concurrent users on the gateway hop")
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
