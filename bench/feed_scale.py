"""The gateway feed and the key store at a site's number of keys (issue 35.3 and 35.5), in one run.

For each number of keys it makes the keys through the KeyStore (the admin API's own code; the time per key of
the first and last 100 is printed), starts a GatewayHub behind a real gRPC server on loopback with 200 pool
replicas, and opens `--watchers` watch streams as gateways do. It then prints the first (full) message's size,
and over `--seconds` of steady state (nothing changing) the bytes and messages per second per watcher; then one
key is created and the time until every watcher has it (the change's latency) is printed.
No engines, no Slurm, no TLS (the real controller's feed runs over TLS; this measures the feed's content).

    .venv/bin/python bench/feed_scale.py [--keys 1000 20000] [--watchers 1 8] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import grpc

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slinfer.controller import gatewayhub
from slinfer.controller.gatewayhub import GatewayHub
from slinfer.controller.keys import KeyStore
from slinfer.controller.limits import KeyLimits, Limiter
from slinfer.controller.registry import Registry
from slinfer.controller.usage import UsageLedger
from slinfer.v1 import controller_pb2, engine_pb2, gateway_pb2, gateway_pb2_grpc

TOKEN = "bench-token"
# Replicas in the table: a site of 25 nodes with 8 engines each.
REPLICAS = 200


async def one(keys_n: int, watchers: int, seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        keys = KeyStore(Path(tmp) / "keys.json")
        times = []
        for i in range(keys_n):
            started = time.perf_counter()
            keys.create(f"user{i}", account="bench")
            times.append(time.perf_counter() - started)
        registry = Registry(agent_timeout_s=60.0)
        for node in range(REPLICAS // 8):
            registry.report(controller_pb2.AgentReport(node=f"n{node}", address="10.0.0.1", agent_id="a", engines=[
                engine_pb2.Engine(job_id=f"{node}-{e}", model="m", state=engine_pb2.READY,
                                  base_url=f"http://10.0.{node}.{e}:8000", api_key="k" * 43, pool=True)
                for e in range(8)]))
        ledger = UsageLedger(Path(tmp) / "usage", 60.0)
        hub = GatewayHub(registry, keys, Limiter(KeyLimits(), ledger.tokens_today), ledger, TOKEN, lambda m: False,
                         ["m"], warmup_s=0.0)
        server = grpc.aio.server()
        gatewayhub.add_to_server(hub, server)  # pre-serialized pages
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        received: list[list[tuple[float, int, gateway_pb2.RouteTable]]] = [[] for _ in range(watchers)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                             options=[("grpc.max_receive_message_length", 1 << 30)]) as channel:
            stub = gateway_pb2_grpc.GatewayFeedStub(channel)

            async def watch(i: int) -> None:
                async for m in stub.Watch(gateway_pb2.WatchRequest(gateway=f"w{i}", token=TOKEN)):
                    received[i].append((time.monotonic(), m.ByteSize(), m))

            tasks = [asyncio.create_task(watch(i)) for i in range(watchers)]
            while not all(received):  # noqa: ASYNC110 (a bench polls what the streams received)
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # every watcher joined: the gateway count settled
            start = time.monotonic()
            counts = [len(r) for r in received]
            await asyncio.sleep(seconds)
            steady = [r[c:] for r, c in zip(received, counts, strict=True)]
            made = time.monotonic()
            keys.create("the-change")

            def has_change(r: list[tuple[float, int, gateway_pb2.RouteTable]]) -> float | None:
                for at, _, m in r:
                    if any(k.name == "the-change" for k in m.keys):
                        return at
                return None

            while any(has_change(r) is None for r in received):  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            latency = max(has_change(r) or 0.0 for r in received) - made
            for t in tasks:
                t.cancel()
        await server.stop(grace=0)
        elapsed = made - start
        return {"keys": keys_n, "watchers": watchers,
                "create_first100_ms": 1e3 * sum(times[:100]) / min(100, len(times)),
                "create_last100_ms": 1e3 * sum(times[-100:]) / min(100, len(times)),
                "full_bytes": received[0][0][1],
                "steady_bytes_per_s": sum(b for s in steady for _, b, _ in s) / watchers / elapsed,
                "steady_msgs_per_s": sum(len(s) for s in steady) / watchers / elapsed,
                "change_latency_ms": latency * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--watchers", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    print("| keys | watchers | create ms/key (first 100, last 100) | full state | steady B/s per watcher "
          "| steady msgs/s | change to all watchers |")
    print("|---|---|---|---|---|---|---|")
    for n in args.keys:
        for w in args.watchers:
            r = asyncio.run(one(n, w, args.seconds))
            print(f"| {n} | {w} | {r['create_first100_ms']:.2f}, {r['create_last100_ms']:.2f} "
                  f"| {r['full_bytes'] / 1e3:.0f} KB | {r['steady_bytes_per_s']:.0f} "
                  f"| {r['steady_msgs_per_s']:.2f} | {r['change_latency_ms']:.0f} ms |", flush=True)


if __name__ == "__main__":
    main()
