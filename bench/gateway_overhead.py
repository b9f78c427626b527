"""Gateway overhead: the same engine reached directly and through the gateway, at several concurrencies.

The gateway is `slinfer-controller`'s own (`--workers 0`, the default) and/or the gateway tier,
`slinfer-gateway --workers N` fed by that controller (`--workers 0,1,2` measures all three in one run).
Prints, per gateway and concurrency level: p50/p99 latency and throughput both ways and their difference, plus
the gateway's CPU time per request (all its processes; the figure that bounds its throughput on a given core).
By default the engine is `bench/standin_engine.py` (a fast stand-in, so the gateway and not the engine is the
bottleneck); `--engine-url URL --engine-key KEY --model NAME` measures against a real vLLM engine.

The load generator is a minimal keep-alive HTTP/1.1 client (one connection per concurrent user, closed loop,
non-streaming requests) so that it costs the shared CPUs as little as possible. It is a benchmark that
prints figures, not a test.

    .venv/bin/python bench/gateway_overhead.py [--levels 1,100,500,1000] [--duration 5] [--workers 0,1,2]
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
import urllib.request
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
import psutil

ROOT = Path(__file__).resolve().parents[1]
CLIENT_KEY = "bench-client-key"
T = TypeVar("T")
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:\s*chunked", re.IGNORECASE)


# ---- load generator ----------------------------------------------------------------------------------
def response_span(buf: bytearray, *, streaming: bool = False) -> tuple[int, int] | None:
    """Where the first whole HTTP response in `buf` ends: (end of its head, end of the response), or None while
    it is incomplete. Without Content-Length the body is chunked when the head says so or when `streaming`."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end + 2])
    m = _CONTENT_LENGTH.search(head)
    if m:
        total = end + 4 + int(m.group(1))
        return (end, total) if len(buf) >= total else None
    if streaming or _CHUNKED.search(head):
        term = buf.find(b"\r\n0\r\n\r\n", end)
        return (end, term + 7) if term >= 0 else None
    return end, end + 4


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
        span = response_span(self.buf)
        if span is None:
            return
        status = int(self.buf[9:12])
        del self.buf[:span[1]]
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


async def load(url: str, key: str, body: bytes, concurrency: int, duration: float, warmup: float,
               route: str = "/v1/chat/completions") -> Result:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path.rstrip("/") or "") + route
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
    """CPU seconds of `proc` and its children now alive (a gateway tier's workers)."""
    if proc is None:
        return float("nan")
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            total += times.user + times.system
    return total


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


def _health(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        return json.load(response)  # type: ignore[no-any-return]


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

    # The service's own engine ([controller].user): the pool takes no other user's.
    engine = engine_pb2.Engine(job_id="bench-1", model=model, state=engine_pb2.READY, base_url=engine_url,
                               api_key=engine_key, pool=True, started_at=time.time(), ready_at=time.time(),
                               user="slinfer")

    async def reports():
        while True:
            yield controller_pb2.AgentReport(node="bench", address="127.0.0.1", agent_id="bench", engines=[engine],
                                             sent_at=time.time())
            await asyncio.sleep(1.0)

    async with grpc.aio.insecure_channel(grpc_addr) as channel:
        call = controller_pb2_grpc.RegistryStub(channel).Report(reports())
        async for _ack in call:
            pass


class BenchProcesses:
    """The child processes of a gateway benchmark (a stand-in engine, the gateway) and the agent heartbeat.

    Responsible for: starting each with its log in `tmp`, the gateway's config, waiting until each listens, and
    on `close()` stopping all and printing the log of any that exited. Not responsible for: load or figures.
    """

    def __init__(self, tmp: str) -> None:
        self.tmp = Path(tmp)
        self.procs: list[asyncio.subprocess.Process] = []
        self.logs: list[Path] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, name: str, *argv: str) -> asyncio.subprocess.Process:
        log = self.tmp / f"{name}.log"
        proc = await _start(log, *argv)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    async def standin(self, model: str, key: str, *extra: str) -> tuple[str, int, asyncio.subprocess.Process]:
        """A stand-in engine (bench/standin_engine.py) on a free port: its URL, port and process."""
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = await self.start("engine", sys.executable, str(ROOT / "bench" / "standin_engine.py"),
                                "--port", str(port), "--api-key", key, "--model", model, *extra)
        await _wait_http(url, proc, self.logs[-1])
        return url, port, proc

    async def gateway(self, model: str, source: str, loop: str, engine_url: str,
                      engine_key: str) -> tuple[int, asyncio.subprocess.Process]:
        """The real controller's gateway for `model`, fed `engine_url` by a heartbeat: its HTTP port and process."""
        grpc_port, http_port = _free_port(), _free_port()
        config = self.tmp / "slinfer.toml"
        config.write_text(
            f'[controller]\nlisten = "127.0.0.1:{grpc_port}"\naddress = "127.0.0.1:{grpc_port}"\n'
            f'state_dir = "{self.tmp}/state"\n'
            # Loopback only, and the heartbeat sends no token: the gateway's cost is measured, not auth.
            "insecure = true\n"
            f'slurm_bin_dir = "{self.tmp}/no-slurm"\nlog_level = "warning"\n\n'
            f'[gateway]\nlisten = "127.0.0.1:{http_port}"\napi_keys = ["{CLIENT_KEY}"]\n'
            f"max_outstanding_per_engine = 100000\nqueue_size = 100000\n\n"
            f'[[models]]\nname = "{model}"\nsource = "{source}"\n')
        proc = await self.start("gateway", sys.executable, str(ROOT / "bench" / "gateway_overhead.py"),
                                "--serve-gateway", str(config), "--loop", loop)
        await _wait_http(f"http://127.0.0.1:{http_port}", proc, self.logs[-1])
        self.tasks.append(asyncio.create_task(_heartbeat(f"127.0.0.1:{grpc_port}", model, engine_url, engine_key)))
        return http_port, proc

    async def tier(self, workers: int) -> tuple[int, asyncio.subprocess.Process]:
        """`slinfer-gateway --workers N` fed by the controller `gateway()` started: its HTTP port and process."""
        port = _free_port()
        proc = await self.start(f"tier-{workers}", sys.executable, "-m", "slinfer.controller.gateway_main",
                                "--config", str(self.tmp / "slinfer.toml"), "--listen", f"127.0.0.1:{port}",
                                "--workers", str(workers))
        # A worker listens once the controller's first table came (about 12 s after the controller started).
        await _wait_http(f"http://127.0.0.1:{port}", proc, self.logs[-1], within_s=120.0)
        if workers > 1:
            deadline = time.monotonic() + 120.0
            # a process's children: nothing to wait on but polling
            while len(psutil.Process(proc.pid).children()) < workers and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        # Every worker (a random one answers each probe) has the controller's table with the engine in it.
        deadline, fed = time.monotonic() + 60.0, 0
        while fed < 4 * workers and time.monotonic() < deadline:
            health = await asyncio.to_thread(_health, port)
            fed = fed + 1 if health.get("controller") == "connected" and health.get("replicas") == 1 else 0
            await asyncio.sleep(0.05)
        if fed < 4 * workers:
            raise RuntimeError(f"slinfer-gateway --workers {workers} has no route to the engine: {health}")
        return port, proc

    async def stop(self, proc: asyncio.subprocess.Process) -> None:
        await _stop(proc)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task
        for proc, log in zip(self.procs, self.logs, strict=True):
            if proc.returncode is not None:
                print(f"{log.name}: exited with {proc.returncode}:\n{log.read_text()[-3000:]}", file=sys.stderr)
        for proc in reversed(self.procs):
            await _stop(proc)


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
    with tempfile.TemporaryDirectory(prefix="slinfer-bench-") as tmp:
        children = BenchProcesses(tmp)
        engine: asyncio.subprocess.Process | None = None
        try:
            if args.engine_url:
                engine_url, engine_key = args.engine_url.rstrip("/").removesuffix("/v1"), args.engine_key
            else:
                engine_key = "bench-engine-key"
                engine_url, _, engine = await children.standin(
                    args.model, engine_key, "--tokens", str(args.max_tokens), "--delay-ms", str(args.engine_delay_ms))
            http_port, gateway = await children.gateway(args.model, "/bench", args.loop, engine_url, engine_key)
            await asyncio.sleep(1.5)
            engine_ps = psutil.Process(engine.pid) if engine is not None else None
            me = psutil.Process()
            standin = f"stand-in (bench/standin_engine.py, answers after {args.engine_delay_ms:g} ms)"
            print(f"engine: {'real, ' + engine_url if args.engine_url else standin}; "
                  f"gateway event loop: {args.loop}; {os.cpu_count()} CPUs, load average "
                  f"{os.getloadavg()[0]:.2f}; {args.duration:.0f} s per level after {args.warmup:.0f} s warm-up; "
                  f"non-streaming chat, max_tokens={args.max_tokens}", flush=True)
            header = (f"{'gateway':>9} {'conc':>5} | {'direct p50':>10} {'p99':>8} {'req/s':>7} | "
                      f"{'gateway p50':>11} {'p99':>8} {'req/s':>7} | {'added p50':>9} {'added p99':>9} "
                      f"{'req/s':>7} | {'CPU us/req: gw':>14} {'engine':>6} {'loadgen':>7} | {'errors':>6}")
            print(header)
            print("-" * len(header))
            for workers in [int(w) for w in args.workers.split(",")]:
                if workers == 0:
                    label, port, proc = "built-in", http_port, gateway
                else:
                    label = f"{workers} worker" + ("s" if workers > 1 else "")
                    port, proc = await children.tier(workers)
                gateway_url = f"http://127.0.0.1:{port}"
                gw_ps = psutil.Process(proc.pid)
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
                    print(f"{label:>9} {level:>5} | {direct.pct(.5) * ms:>8.2f}ms {direct.pct(.99) * ms:>6.2f}ms "
                          f"{direct.throughput:>7.0f} | {via.pct(.5) * ms:>9.2f}ms {via.pct(.99) * ms:>6.2f}ms "
                          f"{via.throughput:>7.0f} | {(via.pct(.5) - direct.pct(.5)) * ms:>7.2f}ms "
                          f"{(via.pct(.99) - direct.pct(.99)) * ms:>7.2f}ms "
                          f"{via.throughput - direct.throughput:>+7.0f} | "
                          f"{per_req[0]:>14.0f} {per_req[1]:>6.0f} {per_req[2]:>7.0f} | "
                          f"{direct.errors + via.errors:>6}", flush=True)
                if workers:
                    await children.stop(proc)
            print("In a closed loop the gateway, engine and load generator share the same CPUs; once they are "
                  "saturated, latency at concurrency N is about N / throughput, so the added latency at high "
                  "concurrency is queueing behind the gateway's CPU cost per request (the 'gw' column).")
        finally:
            await children.close()


def run_fast(main: Coroutine[Any, Any, T]) -> T:
    """Runs a benchmark's load generator under uvloop where it is installed: it then costs the shared CPUs less."""
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


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
    parser.add_argument("--workers", default="0",
                        help="gateways to measure, comma-separated: 0 is the controller's own, N is "
                             "slinfer-gateway --workers N (default 0)")
    parser.add_argument("--serve-gateway", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_gateway:
        serve_gateway(args.serve_gateway, args.loop)
        return
    run_fast(bench(args))


if __name__ == "__main__":
    main()
