"""Gateway overhead: the same engine reached directly and through `slinfer-controller`, at several concurrencies.

Prints, per concurrency level: p50/p99 latency and throughput both ways and their difference, plus the
gateway process's CPU time per request (the figure that bounds its throughput on a given core). By default
the engine is `bench/standin_engine.py` (a fast stand-in, so the gateway and not the engine is the
bottleneck); `--engine-url URL --engine-key KEY --model NAME` measures against a real vLLM engine.

The load generator is a minimal keep-alive HTTP/1.1 client (one connection per concurrent user, closed loop,
non-streaming requests) so that it costs the shared CPUs as little as possible. It is a benchmark that
prints figures, not a test.

    .venv/bin/python bench/gateway_overhead.py [--levels 1,100,500,1000] [--duration 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import psutil

ROOT = Path(__file__).resolve().parents[1]
CLIENT_KEY = "bench-client-key"
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:\s*chunked", re.IGNORECASE)


# ---- load generator ----------------------------------------------------------------------------------
class _Conn(asyncio.Protocol):
    """One keep-alive connection that sends a request and waits for one full response at a time."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end + 2])
        m = _CONTENT_LENGTH.search(head)
        if m:
            total = end + 4 + int(m.group(1))
            if len(self.buf) < total:
                return
        elif _CHUNKED.search(head):
            term = self.buf.find(b"\r\n0\r\n\r\n", end)
            if term < 0:
                return
            total = term + 7
        else:
            total = end + 4
        status = int(head[9:12])
        del self.buf[:total]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    async def request(self, payload: bytes) -> int:
        self.waiter = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(payload)
        return await self.waiter


@dataclass
class Result:
    latencies: list[float]
    errors: int
    elapsed: float

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def load(url: str, key: str, body: bytes, concurrency: int, duration: float, warmup: float) -> Result:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path.rstrip("/") or "") + "/v1/chat/completions"
    payload = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    loop = asyncio.get_running_loop()
    conns: list[_Conn] = []
    for _ in range(concurrency):
        _, conn = await loop.create_connection(_Conn, host, port)
        conns.append(conn)
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + duration

    async def user(conn: _Conn) -> None:
        nonlocal errors
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            try:
                status = await conn.request(payload)
            except ConnectionError:
                errors += 1
                return
            t1 = time.perf_counter()
            if t0 >= measure_from and t1 <= stop_at:
                if status == 200:
                    latencies.append(t1 - t0)
                else:
                    errors += 1

    await asyncio.gather(*(user(c) for c in conns))
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    return Result(latencies, errors, duration)


# ---- processes under test ----------------------------------------------------------------------------
def _cpu(proc: psutil.Process | None) -> float:
    if proc is None:
        return float("nan")
    times = proc.cpu_times()
    return times.user + times.system


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_http(url: str, proc: asyncio.subprocess.Process, log: Path, within_s: float = 60.0) -> None:
    parts = urlsplit(url)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            _, writer = await asyncio.open_connection(parts.hostname, parts.port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


async def _start(log: Path, *argv: str) -> asyncio.subprocess.Process:
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(*argv, stdout=out, stderr=out)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _heartbeat(grpc_addr: str, model: str, engine_url: str, engine_key: str) -> None:
    """Registers the engine with the controller the way a node agent does, every second."""
    from slinfer.v1 import controller_pb2, controller_pb2_grpc, engine_pb2

    engine = engine_pb2.Engine(job_id="bench-1", model=model, state=engine_pb2.READY, base_url=engine_url,
                               api_key=engine_key, pool=True, started_at=time.time(), ready_at=time.time())

    async def reports():
        while True:
            yield controller_pb2.AgentReport(node="bench", address="127.0.0.1", agent_id="bench", engines=[engine],
                                             sent_at=time.time())
            await asyncio.sleep(1.0)

    async with grpc.aio.insecure_channel(grpc_addr) as channel:
        call = controller_pb2_grpc.RegistryStub(channel).Report(reports())
        async for _ack in call:
            pass


def serve_gateway(config_path: str, loop_name: str) -> None:
    """The gateway process: the real controller's serve(), under the chosen event loop."""
    from slinfer.config import load as load_config
    from slinfer.controller.main import serve

    config = load_config(config_path)
    factory = None
    if loop_name == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop

    async def run() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await serve(config, stop)

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(run())


async def bench(args: argparse.Namespace) -> None:
    levels = [int(x) for x in args.levels.split(",")]
    body = json.dumps({"model": args.model, "messages": [{"role": "user", "content": "Say hello."}],
                       "max_tokens": args.max_tokens, "temperature": 0}).encode()
    procs: list[asyncio.subprocess.Process] = []
    logs: list[Path] = []
    tasks: list[asyncio.Task[None]] = []
    with tempfile.TemporaryDirectory(prefix="slinfer-bench-") as tmp:
        try:
            if args.engine_url:
                engine_url, engine_key = args.engine_url.rstrip("/").removesuffix("/v1"), args.engine_key
            else:
                port = _free_port()
                engine_url, engine_key = f"http://127.0.0.1:{port}", "bench-engine-key"
                engine_log = Path(tmp) / "engine.log"
                procs.append(await _start(engine_log, sys.executable, str(ROOT / "bench" / "standin_engine.py"),
                                          "--port", str(port), "--api-key", engine_key, "--model", args.model,
                                          "--tokens", str(args.max_tokens), "--delay-ms", str(args.engine_delay_ms)))
                logs.append(engine_log)
                await _wait_http(engine_url, procs[-1], engine_log)
            grpc_port, http_port = _free_port(), _free_port()
            config = Path(tmp) / "slinfer.toml"
            config.write_text(
                f'[controller]\nlisten = "127.0.0.1:{grpc_port}"\nstate_dir = "{tmp}/state"\n'
                f'slurm_bin_dir = "{tmp}/no-slurm"\nlog_level = "warning"\n\n'
                f'[gateway]\nlisten = "127.0.0.1:{http_port}"\napi_keys = ["{CLIENT_KEY}"]\n'
                f"max_outstanding_per_engine = 100000\nqueue_size = 100000\n\n"
                f'[[models]]\nname = "{args.model}"\nsource = "/bench"\n')
            gateway_log = Path(tmp) / "gateway.log"
            gateway = await _start(gateway_log, sys.executable, __file__, "--serve-gateway", str(config),
                                   "--loop", args.loop)
            procs.append(gateway)
            logs.append(gateway_log)
            gateway_url = f"http://127.0.0.1:{http_port}"
            await _wait_http(gateway_url, gateway, gateway_log)
            tasks.append(asyncio.create_task(_heartbeat(f"127.0.0.1:{grpc_port}", args.model, engine_url,
                                                        engine_key)))
            await asyncio.sleep(1.5)
            gw_ps = psutil.Process(gateway.pid)
            engine_ps = psutil.Process(procs[0].pid) if not args.engine_url else None
            me = psutil.Process()
            standin = f"stand-in (bench/standin_engine.py, answers after {args.engine_delay_ms:g} ms)"
            print(f"engine: {'real, ' + engine_url if args.engine_url else standin}; "
                  f"gateway event loop: {args.loop}; {os.cpu_count()} CPUs, load average "
                  f"{os.getloadavg()[0]:.2f}; {args.duration:.0f} s per level after {args.warmup:.0f} s warm-up; "
                  f"non-streaming chat, max_tokens={args.max_tokens}", flush=True)
            header = (f"{'conc':>5} | {'direct p50':>10} {'p99':>8} {'req/s':>7} | {'gateway p50':>11} {'p99':>8} "
                      f"{'req/s':>7} | {'added p50':>9} {'added p99':>9} {'req/s':>7} | {'CPU us/req: gw':>14} "
                      f"{'engine':>6} {'loadgen':>7} | {'errors':>6}")
            print(header)
            print("-" * len(header))
            for level in levels:
                direct = await load(engine_url, engine_key, body, level, args.duration, args.warmup)
                before = [_cpu(p) for p in (gw_ps, engine_ps, me)]
                via = await load(gateway_url, CLIENT_KEY, body, level, args.duration, args.warmup)
                after = [_cpu(p) for p in (gw_ps, engine_ps, me)]
                # CPU over the whole run (warm-up included) divided by the requests served in it (estimated
                # from the measured rate).
                served = via.throughput * (args.duration + args.warmup)
                per_req = [(b - a) / served * 1e6 if served else float("nan")
                           for a, b in zip(before, after, strict=True)]
                ms = 1000.0
                print(f"{level:>5} | {direct.pct(.5) * ms:>8.2f}ms {direct.pct(.99) * ms:>6.2f}ms "
                      f"{direct.throughput:>7.0f} | {via.pct(.5) * ms:>9.2f}ms {via.pct(.99) * ms:>6.2f}ms "
                      f"{via.throughput:>7.0f} | {(via.pct(.5) - direct.pct(.5)) * ms:>7.2f}ms "
                      f"{(via.pct(.99) - direct.pct(.99)) * ms:>7.2f}ms {via.throughput - direct.throughput:>+7.0f} | "
                      f"{per_req[0]:>14.0f} {per_req[1]:>6.0f} {per_req[2]:>7.0f} | "
                      f"{direct.errors + via.errors:>6}", flush=True)
            print("In a closed loop the gateway, engine and load generator share the same CPUs; once they are "
                  "saturated, latency at concurrency N is about N / throughput, so the added latency at high "
                  "concurrency is queueing behind the gateway's CPU cost per request (the 'gw' column).")
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await task
            for proc, log in zip(procs, logs, strict=True):
                if proc.returncode is not None:
                    print(f"{log.name}: exited with {proc.returncode}:\n{log.read_text()[-3000:]}", file=sys.stderr)
            for proc in reversed(procs):
                await _stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,100,500,1000", help="concurrencies, comma-separated")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per level and path")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--engine-url", default="", help="a real engine (http://HOST:PORT); default: stand-in")
    parser.add_argument("--engine-key", default="")
    parser.add_argument("--engine-delay-ms", type=float, default=0.0,
                        help="the stand-in waits this long before answering, like a real generation does")
    parser.add_argument("--model", default="standin", help="the engine's served model name")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="the gateway's event loop")
    parser.add_argument("--serve-gateway", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_gateway:
        serve_gateway(args.serve_gateway, args.loop)
        return
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(bench(args))


if __name__ == "__main__":
    main()
