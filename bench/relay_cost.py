"""The relay's CPU per chunk and per request, through the built-in gateway and the gateway tier, against the
same engine reached directly, for 16- and 128-token streams, in one run (issue 35.1).

Responsible for: starting the engines (the stand-in, which writes one event per token as vLLM does, and with
`--vllm` a real vLLM engine on the tiny model), the real controller (`serve()`, its built-in gateway) and
`slinfer-gateway --workers 1` fed by it, registering each engine as a node agent does; then for each engine,
stream length and path (direct, built-in, tier) a closed loop of `--users` concurrent streams for
`--duration` seconds (the stand-in paced `--pacing-ms` between tokens, as an engine's steps are). The
gateway's CPU (the process and its workers, psutil) over the loop, less its idle CPU over as long, divided
by the SSE events its clients received is the CPU per chunk; divided by the requests, the CPU per request.
Inter-token latency is per stream (last event - first) / (events - 1), its mean and p99 over the loop.
Not responsible for: a bed, plots, or comparing checkouts (bench/stream_relay.py --baseline does).

    .venv/bin/python bench/relay_cost.py [--vllm] [--users 32] [--duration 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
import psutil

import bench.gateway_overhead as overhead
from bench.gateway_overhead import CLIENT_KEY, BenchProcesses, _cpu, _free_port
from bench.stream_relay import _connect, _payload

ROOT = Path(__file__).resolve().parents[1]
# The stream lengths of the issue: a short answer (per-request cost shows) and a long one (per-chunk).
TOKENS = (16, 128)
# A real engine's start on this machine's CPUs (tiny: about 35 s; more on a busy machine).
ENGINE_START_S = 300.0
# The controller's service user: the pool takes its engines (issue 27), so the heartbeat says so.
SERVICE_USER = "slinfer"


async def _heartbeat(grpc_addr: str, model: str, engine_url: str, engine_key: str) -> None:
    """Registers the engine the way a node agent does, every second, as the service's own pool engine."""
    from slinfer.v1 import controller_pb2, controller_pb2_grpc, engine_pb2

    engine = engine_pb2.Engine(job_id="bench-1", model=model, state=engine_pb2.READY, base_url=engine_url,
                               api_key=engine_key, pool=True, started_at=time.time(), ready_at=time.time(),
                               user=SERVICE_USER)

    async def reports():  # type: ignore[no-untyped-def]
        while True:
            yield controller_pb2.AgentReport(node="bench", address="127.0.0.1", agent_id="bench", engines=[engine],
                                             sent_at=time.time())
            await asyncio.sleep(1.0)

    async with grpc.aio.insecure_channel(grpc_addr) as channel:
        async for _ack in controller_pb2_grpc.RegistryStub(channel).Report(reports()):
            pass


class _Timed:
    """Per-stream inter-token latency from a _Stream's first and last event."""

    def __init__(self) -> None:
        self.itl: list[float] = []
        self.events = self.requests = self.errors = 0


async def loop(url: str, key: str, body: bytes, users: int, duration_s: float,
               gateway: psutil.Process | None) -> tuple[_Timed, float, float]:
    conns = await _connect(url, users)
    payload = _payload(url, key, body)
    out = _Timed()
    stop_at = time.perf_counter() + duration_s

    async def user(conn) -> None:  # type: ignore[no-untyped-def]
        while time.perf_counter() < stop_at:
            try:
                await conn.request(payload)
            except ConnectionError:
                out.errors += 1
                return
            if conn.status == 200 and conn.events >= 2:
                out.requests += 1
                out.events += conn.events
                out.itl.append((conn.last - conn.first) / (conn.events - 1))
            else:
                out.errors += 1

    cpu0, t0 = _cpu(gateway), time.perf_counter()
    await asyncio.gather(*(user(c) for c in conns))
    elapsed, cpu = time.perf_counter() - t0, _cpu(gateway) - cpu0
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    return out, elapsed, cpu


async def _idle(proc: psutil.Process, seconds: float = 2.0) -> float:
    cpu0 = _cpu(proc)
    await asyncio.sleep(seconds)
    return (_cpu(proc) - cpu0) / seconds


async def _vllm(bp: BenchProcesses, model_dir: str, key: str) -> str:
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_API_KEY": key,
           "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
    log = bp.tmp / "vllm.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512",
            "--dtype", "float32", "--enforce-eager", env=env, stdout=out, stderr=out)
    bp.procs.append(proc)
    bp.logs.append(log)
    await overhead._wait_http(f"http://127.0.0.1:{port}/health", proc, log, within_s=ENGINE_START_S)
    # Listening is not ready: wait for /health to answer 200.
    deadline = time.monotonic() + ENGINE_START_S
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head = await reader.read(64)
            writer.close()
            if b" 200 " in head:
                break
        except OSError:
            pass
        await asyncio.sleep(1.0)
    return f"http://127.0.0.1:{port}"


async def one_engine(label: str, model: str, args: argparse.Namespace) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="slinfer-relay-") as tmp:
        bp = BenchProcesses(tmp)
        try:
            key = "bench-engine-key"
            if label == "vllm":
                engine_url = await _vllm(bp, args.model_dir, key)
            else:
                # Paced as an engine's steps are, so that each event arrives in a read of its own.
                engine_url, _, _ = await bp.standin(model, key, "--honour-max-tokens", "--tokens", "128",
                                                    "--token-delay-ms", str(args.pacing_ms))
            http_port, controller = await bp.gateway(model, "/bench", "uvloop", engine_url, key)
            tier_port, tier = await bp.tier(1)
            paths = [("direct", engine_url, key, None),
                     ("built-in", f"http://127.0.0.1:{http_port}", CLIENT_KEY, psutil.Process(controller.pid)),
                     ("tier", f"http://127.0.0.1:{tier_port}", CLIENT_KEY, psutil.Process(tier.pid))]
            for tokens in TOKENS:
                body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello."}],
                                   "max_tokens": tokens, "ignore_eos": True, "stream": True}).encode()
                for path, url, k, proc in paths:
                    idle = await _idle(proc) if proc is not None else 0.0
                    timed, elapsed, cpu = await loop(url, k, body, args.users, args.duration, proc)
                    net = max(0.0, cpu - idle * elapsed) if proc is not None else math.nan
                    itl = sorted(timed.itl)
                    rows.append({
                        "engine": label, "tokens": tokens, "path": path, "requests": timed.requests,
                        "errors": timed.errors, "events": timed.events,
                        "events_per_s": timed.events / elapsed,
                        "us_per_chunk": 1e6 * net / timed.events if timed.events else math.nan,
                        "ms_per_request": 1e3 * net / timed.requests if timed.requests else math.nan,
                        "itl_mean_ms": 1e3 * statistics.fmean(itl) if itl else math.nan,
                        "itl_p99_ms": 1e3 * itl[min(len(itl) - 1, int(0.99 * len(itl)))] if itl else math.nan})
                    print(_line(rows[-1]), flush=True)
        finally:
            overhead._heartbeat = _saved_heartbeat
            await bp.close()
    return rows


def _line(r: dict[str, object]) -> str:
    return (f"| {r['engine']} | {r['tokens']} | {r['path']} | {r['requests']} ({r['errors']} errors) "
            f"| {r['events_per_s']:.0f} | {r['us_per_chunk']:.1f} | {r['ms_per_request']:.2f} "
            f"| {r['itl_mean_ms']:.2f} | {r['itl_p99_ms']:.2f} |")


_saved_heartbeat = overhead._heartbeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm", action="store_true", help="also against a real vLLM engine (tiny)")
    parser.add_argument("--model-dir", default=str(ROOT / ".venv" / "share" / "slinfer" / "models" / "tiny"))
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--pacing-ms", type=float, default=5.0, help="the stand-in's time between tokens")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    # BenchProcesses.gateway() registers the engine through the module's heartbeat: the service user's own.
    overhead._heartbeat = _heartbeat
    print("| engine | tokens | path | requests | chunks/s | gateway µs/chunk | gateway ms/request "
          "| ITL mean ms | ITL p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = asyncio.run(one_engine("stand-in", "standin", args))
    if args.vllm:
        overhead._heartbeat = _heartbeat
        rows += asyncio.run(one_engine("vllm", "tiny", args))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
