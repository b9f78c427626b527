"""What streaming through the gateway costs: CPU per relayed chunk and per request, added TTFT and inter-token
latency, against the same engine reached directly, in one run.

Responsible for: (stand-in mode, the default) starting `bench/standin_engine.py` with 256-token streams at a
set chunk pacing and a real gateway (the controller's `serve()`, as bench/gateway_overhead.py does), with
`--baseline DIR` a second one running an older checkout's code, then, for each concurrency level (100 and
1000 streams), direct and gateway rounds of that many streams started at once, taking turns; the gateway
process's CPU (psutil) over a gateway round divided by the SSE events its clients received is the CPU per
relayed chunk ("net": less the gateway's idle CPU over as long); a closed loop of short (16-token) streams
gives the CPU per request.
(`--bed STATE_DIR` mode) against one real vLLM engine of a running dev-cluster bed, with the replica count
pinned to one (`slinfer scale tiny 1`), alternating direct and gateway rounds of streamed chat requests: the
throughput ratio and the mean-TTFT ratio, plus the controller's CPU per request.
Not responsible for: bringing a bed up (bench/run_all.py does), plotting.

The stand-in client is a minimal keep-alive HTTP/1.1 client (one connection per stream) that timestamps every
read, so that it costs the shared CPUs little; inter-token latency is per stream (last event - first event) /
(events - 1), so coalescing events into fewer writes does not flatter it. It prints figures; it is not a test.

    .venv/bin/python bench/stream_relay.py [--levels 100,1000] [--pacing-ms 10,100] [--rounds 2]
    .venv/bin/python bench/stream_relay.py --bed /tmp/h15-manual --port-base 21000 [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `bench` is importable

import grpc
import psutil

from bench.gateway_overhead import CLIENT_KEY, _cpu, _free_port, _heartbeat, _start, _stop, _wait_http

ROOT = Path(__file__).resolve().parents[1]
# The stream length: long enough that per-chunk cost dominates per-request cost.
STREAM_TOKENS = 256
# The per-request phase uses the original report's 16-token streams, so its figure compares with 1.8-2.0 ms.
SHORT_TOKENS = 16
_END = b"\r\n0\r\n\r\n"  # the last chunk of a chunked body


# ---- stand-in load generator ---------------------------------------------------------------------------
class _Stream(asyncio.Protocol):
    """One keep-alive connection; one streamed request at a time; timestamps the reads of its SSE events."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.head_done = False
        self.buf = bytearray()
        self.events = 0
        self.first = math.nan
        self.last = math.nan
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.head_done:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(self.buf[9:12])
            data = bytes(self.buf[end + 4:])
            self.head_done = True
            self.buf.clear()
            if self.status != 200:
                self._done()
                return
        n = data.count(b"data: ")
        if n:
            self.events += n
            if math.isnan(self.first):
                self.first = now
            self.last = now
        tail = self.tail + data[-16:]
        self.tail = tail[-16:]
        if self.tail.endswith(_END):
            self._done()

    def _done(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    async def request(self, payload: bytes) -> None:
        self.reset()
        self.waiter = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(payload)
        await self.waiter


@dataclass
class Round:
    """What one round of streams measured."""

    ttft: list[float] = field(default_factory=list)  # s, request sent -> first event
    itl: list[float] = field(default_factory=list)  # s, per stream: mean gap between events
    events: int = 0
    requests: int = 0
    errors: int = 0
    elapsed: float = 0.0
    cpu_s: float = 0.0  # the gateway process's CPU over the round


def _payload(url: str, key: str, body: bytes) -> bytes:
    parts = urlsplit(url)
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _connect(url: str, n: int) -> list[_Stream]:
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(n):
        _, conn = await loop.create_connection(_Stream, parts.hostname, parts.port)
        conns.append(conn)
    return conns


async def streams_at_once(url: str, key: str, body: bytes, n: int, gateway: psutil.Process) -> Round:
    """n streams started together, each one request; returns when the last has ended."""
    conns = await _connect(url, n)
    payload = _payload(url, key, body)
    out = Round()

    async def one(conn: _Stream) -> None:
        t0 = time.perf_counter()
        try:
            await conn.request(payload)
        except ConnectionError:
            out.errors += 1
            return
        if conn.status != 200 or conn.events < 2:
            out.errors += 1
            return
        out.requests += 1
        out.events += conn.events
        out.ttft.append(conn.first - t0)
        out.itl.append((conn.last - conn.first) / (conn.events - 1))

    cpu0, t0 = _cpu(gateway), time.perf_counter()
    await asyncio.gather(*(one(c) for c in conns))
    out.elapsed, out.cpu_s = time.perf_counter() - t0, _cpu(gateway) - cpu0
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    return out


async def closed_loop(url: str, key: str, body: bytes, users: int, duration_s: float,
                      gateway: psutil.Process) -> Round:
    """users streams, each sending its next request when its last ended, for duration_s."""
    conns = await _connect(url, users)
    payload = _payload(url, key, body)
    out = Round()
    stop_at = time.perf_counter() + duration_s

    async def user(conn: _Stream) -> None:
        while time.perf_counter() < stop_at:
            try:
                await conn.request(payload)
            except ConnectionError:
                out.errors += 1
                return
            if conn.status == 200:
                out.requests += 1
                out.events += conn.events
            else:
                out.errors += 1

    cpu0, t0 = _cpu(gateway), time.perf_counter()
    await asyncio.gather(*(user(c) for c in conns))
    out.elapsed, out.cpu_s = time.perf_counter() - t0, _cpu(gateway) - cpu0
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    return out


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def _spread(xs: list[float]) -> str:
    return f"{min(xs):.1f}-{max(xs):.1f}" if xs else "n/a"


@dataclass
class Gateway:
    """One gateway process under test: the current code, or a baseline checkout (`--baseline`)."""

    label: str
    url: str
    grpc: str
    proc: asyncio.subprocess.Process
    ps: psutil.Process
    log: Path


async def _gateway(tmp: str, label: str, pythonpath: str) -> Gateway:
    grpc_port, http_port = _free_port(), _free_port()
    config = Path(tmp) / f"slinfer-{label}.toml"
    config.write_text(
        f'[controller]\nlisten = "127.0.0.1:{grpc_port}"\nstate_dir = "{tmp}/state-{label}"\n'
        # Loopback only, and the heartbeat sends no token: the gateway's cost is measured, not auth.
        "insecure = true\n"
        f'slurm_bin_dir = "{tmp}/no-slurm"\nlog_level = "warning"\n\n'
        f'[gateway]\nlisten = "127.0.0.1:{http_port}"\napi_keys = ["{CLIENT_KEY}"]\n'
        f"max_outstanding_per_engine = 100000\nqueue_size = 100000\n\n"
        f'[[models]]\nname = "standin"\nsource = "/bench"\n')
    env = dict(os.environ)
    if pythonpath:
        # Found before the editable install's finder: the baseline's `slinfer` package is imported instead.
        env["PYTHONPATH"] = pythonpath
    log = Path(tmp) / f"gateway-{label}.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "bench" / "gateway_overhead.py"), "--serve-gateway", str(config),
            "--loop", "uvloop", stdout=out, stderr=out, env=env)
    url = f"http://127.0.0.1:{http_port}"
    await _wait_http(url, proc, log)
    return Gateway(label, url, f"127.0.0.1:{grpc_port}", proc, psutil.Process(proc.pid), log)


def _net(r: Round, idle_cpu_per_s: float) -> float:
    """The round's gateway CPU less what the gateway spends idle (its housekeeping) over as long."""
    return max(0.0, r.cpu_s - idle_cpu_per_s * r.elapsed)


async def standin_bench(args: argparse.Namespace) -> dict[str, object]:
    levels = [int(x) for x in args.levels.split(",")]
    pacings = [float(x) for x in args.pacing_ms.split(",")]
    if len(pacings) == 1:
        pacings *= len(levels)
    gateways: list[Gateway] = []
    results: dict[str, object] = {"levels": [], "per_request": {}}
    with tempfile.TemporaryDirectory(prefix="slinfer-stream-") as tmp:
        try:
            gateways.append(await _gateway(tmp, "gateway", ""))
            if args.baseline:
                gateways.append(await _gateway(tmp, "baseline", args.baseline))
            print(f"stream relay bench: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
                  f"{STREAM_TOKENS}-token streams from bench/standin_engine.py, {args.rounds} rounds per path "
                  f"(direct and {' and '.join(g.label for g in gateways)} take turns)"
                  + (f"; baseline = {args.baseline}" if args.baseline else ""), flush=True)
            # Idle CPU: what each gateway spends with no request (its autoscaler's and registry's timers).
            idle: dict[str, float] = {}
            c0 = {g.label: _cpu(g.ps) for g in gateways}
            await asyncio.sleep(3.0)
            for g in gateways:
                idle[g.label] = (_cpu(g.ps) - c0[g.label]) / 3.0
            print("idle gateway CPU: " + ", ".join(f"{k} {v * 1e3:.1f} ms/s" for k, v in idle.items()) +
                  " (subtracted below: 'net')")
            header = (f"{'path':>8} {'streams':>7} {'pace':>6} | {'CPU us/chunk':>12} {'net':>6} "
                      f"{'rounds (net)':>13} | {'chunks/s/core':>13} | {'TTFT':>8} {'added':>8} | "
                      f"{'ITL':>7} {'added':>7} | {'errors':>6}")
            print(header)
            print("-" * len(header))
            for level, pacing in zip(levels, pacings, strict=True):
                engine_port = _free_port()
                engine_url, engine_key = f"http://127.0.0.1:{engine_port}", "bench-engine-key"
                engine_log = Path(tmp) / f"engine-{level}.log"
                engine = await _start(engine_log, sys.executable, str(ROOT / "bench" / "standin_engine.py"),
                                      "--port", str(engine_port), "--api-key", engine_key, "--model", "standin",
                                      "--tokens", str(STREAM_TOKENS), "--token-delay-ms", str(pacing),
                                      "--honour-max-tokens")
                await _wait_http(engine_url, engine, engine_log)
                beats = [asyncio.create_task(_heartbeat(g.grpc, "standin", engine_url, engine_key)) for g in gateways]
                await asyncio.sleep(1.5)
                body = json.dumps({"model": "standin", "messages": [{"role": "user", "content": "Say hello."}],
                                   "max_tokens": STREAM_TOKENS, "stream": True}).encode()
                paths: list[tuple[str, str, str, psutil.Process]] = [("direct", engine_url, engine_key,
                                                                      gateways[0].ps)]
                paths += [(g.label, g.url, CLIENT_KEY, g.ps) for g in gateways]
                runs: dict[str, list[Round]] = {p[0]: [] for p in paths}
                for r in range(args.rounds):
                    turn = paths[r % len(paths):] + paths[:r % len(paths)]
                    for label, url, key, ps in turn:
                        runs[label].append(await streams_at_once(url, key, body, level, ps))
                        await asyncio.sleep(1.0)
                d_ttft = _mean([_mean(x.ttft) for x in runs["direct"]])
                d_itl = _mean([_mean(x.itl) for x in runs["direct"]])
                ms = 1000.0
                for label, *_ in paths:
                    rr = runs[label]
                    ttft, itl = _mean([_mean(x.ttft) for x in rr]), _mean([_mean(x.itl) for x in rr])
                    errors = sum(x.errors for x in rr)
                    row: dict[str, object] = {"path": label, "streams": level, "pacing_ms": pacing,
                                              "ttft_s": ttft, "itl_s": itl, "errors": errors}
                    if label == "direct":
                        print(f"{label:>8} {level:>7} {pacing:>4.0f}ms | {'':>12} {'':>6} {'':>13} | {'':>13} | "
                              f"{ttft * ms:>6.1f}ms {'':>8} | {itl * ms:>5.2f}ms {'':>7} | {errors:>6}", flush=True)
                    else:
                        raw = [x.cpu_s / x.events * 1e6 for x in rr if x.events]
                        net = [_net(x, idle[label]) / x.events * 1e6 for x in rr if x.events]
                        us, us_net = _mean(raw), _mean(net)
                        print(f"{label:>8} {level:>7} {pacing:>4.0f}ms | {us:>12.1f} {us_net:>6.1f} "
                              f"{_spread(net):>13} | {1e6 / us:>13.0f} | {ttft * ms:>6.1f}ms "
                              f"{(ttft - d_ttft) * ms:>+6.1f}ms | {itl * ms:>5.2f}ms {(itl - d_itl) * ms:>+5.2f}ms | "
                              f"{errors:>6}", flush=True)
                        row.update({"us_per_chunk": us, "us_per_chunk_net": us_net, "us_per_chunk_net_rounds": net,
                                    "chunks_per_s_per_core": 1e6 / us, "added_ttft_s": ttft - d_ttft,
                                    "added_itl_s": itl - d_itl})
                    results["levels"].append(row)  # type: ignore[attr-defined]
                if level == levels[0]:
                    # Per request: 16-token streams without pacing, closed loop, gateways taking turns.
                    short = json.dumps({"model": "standin", "messages": [{"role": "user", "content": "Hi."}],
                                        "max_tokens": SHORT_TOKENS, "stream": True}).encode()
                    per: dict[str, list[Round]] = {g.label: [] for g in gateways}
                    for r in range(args.rounds):
                        for g in gateways[r % len(gateways):] + gateways[:r % len(gateways)]:
                            per[g.label].append(await closed_loop(g.url, CLIENT_KEY, short, args.short_users,
                                                                  args.short_duration, g.ps))
                    for g in gateways:
                        rr = per[g.label]
                        raw = [x.cpu_s / x.requests * 1e6 for x in rr if x.requests]
                        net = [_net(x, idle[g.label]) / x.requests * 1e6 for x in rr if x.requests]
                        print(f"{g.label}: per {SHORT_TOKENS}-token stream ({args.short_users} users, closed loop): "
                              f"CPU {_mean(raw):.0f} us/request, net {_mean(net):.0f} (rounds {_spread(net)}), "
                              f"{_mean([x.requests / x.elapsed for x in rr]):.0f} streams/s, "
                              f"{sum(x.errors for x in rr)} errors", flush=True)
                        results["per_request"][g.label] = {  # type: ignore[index]
                            "us_per_request": _mean(raw), "us_per_request_net": _mean(net),
                            "us_per_request_net_rounds": net,
                            "streams_per_s": _mean([x.requests / x.elapsed for x in rr])}
                for beat in beats:
                    beat.cancel()
                    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                        await beat
                await _stop(engine)
            print(f"load average at the end {os.getloadavg()[0]:.2f}. CPU per chunk: the gateway's CPU over its "
                  "round over the SSE events its clients received (the requests' own cost included); net: less "
                  "its idle CPU over as long. TTFT and ITL: means over streams, 'added' against direct.")
        finally:
            for g in gateways:
                if g.proc.returncode is not None:
                    print(f"{g.label} exited {g.proc.returncode}: {g.log.read_text()[-3000:]}", file=sys.stderr)
            for g in reversed(gateways):
                await _stop(g.proc)
    return results


# ---- one real engine on a bed ----------------------------------------------------------------------------
async def engine_rounds(probe: object, rounds: int, requests: int, users: int, max_tokens: int) -> dict[str, object]:
    """Alternating direct/gateway rounds of streamed chat against the one READY engine of `probe`'s model
    (a bench.bedprobe.BedProbe whose replica count is pinned to 1)."""
    from bench.bedprobe import BedProbe
    from bench.loadgen import LoadGenerator, Stats
    from slinfer.dev import devcluster

    assert isinstance(probe, BedProbe)
    (engine,) = await probe.engines()
    pid = devcluster.daemon_pid(probe.bed, "controller")
    controller = psutil.Process(pid) if pid else None
    gateway = LoadGenerator(probe.gateway, probe.model, max_tokens=max_tokens)
    direct = LoadGenerator(engine.target, probe.model, max_tokens=max_tokens)
    rows: list[dict[str, object]] = []
    try:
        warm = [direct.body([{"role": "user", "content": f"warm {i}"}], True) for i in range(users)]
        for gen in (direct, gateway):
            await gen.through(warm, users, True)
        for r in range(rounds):
            for gen in (direct, gateway) if r % 2 == 0 else (gateway, direct):
                bodies = [gen.body([{"role": "user", "content": f"Question {r}-{i}: what is a pending job?"}], True)
                          for i in range(requests)]
                cpu0 = _cpu(controller)
                t0 = time.monotonic()
                samples = await gen.through(bodies, users, True)
                elapsed = time.monotonic() - t0
                cpu = _cpu(controller) - cpu0
                stats = Stats.of(samples)
                path = "gateway" if gen is gateway else "direct"
                rows.append({"round": r, "path": path, "throughput": len(samples) / elapsed,
                             "ttft_mean": stats.ttft_mean, "errors": stats.errors,
                             "controller_cpu_us_per_request": cpu / len(samples) * 1e6})
                print(f"round {r} {path:>7}: {len(samples) / elapsed:6.1f} req/s, mean TTFT "
                      f"{stats.ttft_mean * 1000:7.1f} ms, controller CPU {cpu / len(samples) * 1e6:6.0f} us/request,"
                      f" {stats.errors} errors", flush=True)
                await asyncio.sleep(1.0)
    finally:
        await gateway.close()
        await direct.close()
    pairs = [(d, g) for d, g in zip([x for x in rows if x["path"] == "direct"],
                                    [x for x in rows if x["path"] == "gateway"], strict=True)]
    tput = [float(g["throughput"]) / float(d["throughput"]) for d, g in pairs]  # type: ignore[arg-type]
    ttft = [float(g["ttft_mean"]) / float(d["ttft_mean"]) for d, g in pairs]  # type: ignore[arg-type]
    print(f"vs one real engine ({requests} streamed requests of {max_tokens} tokens, {users} concurrent, "
          f"{rounds} rounds): throughput {_mean(tput):.3f}x direct (rounds {min(tput):.3f}-{max(tput):.3f}), "
          f"mean TTFT {_mean(ttft):.3f}x direct (rounds {min(ttft):.3f}-{max(ttft):.3f})", flush=True)
    return {"rows": rows, "throughput_ratio": _mean(tput), "ttft_ratio": _mean(ttft),
            "throughput_ratio_rounds": tput, "ttft_ratio_rounds": ttft, "requests": requests, "users": users,
            "max_tokens": max_tokens}


def markdown(results: dict[str, Any]) -> str:
    """The results section of `make bench` (bench/run_all.py) for this benchmark's parts."""
    parts = []
    relay = results.get("stream_relay")
    if relay:
        parts.append("## Streaming through the gateway (bench/stream_relay.py)\n\nAgainst the engine stand-in, "
                     f"{STREAM_TOKENS}-token streams; the gateway's CPU per relayed chunk and per request, and "
                     "the TTFT and inter-token latency it adds:\n\n```\n" + str(relay.get("text", "")).strip() +
                     "\n```\n")
    engine = results.get("stream_relay_engine")
    if engine:
        parts.append(f"Against one real engine (1 replica pinned), {engine['requests']} streamed requests of "
                     f"{engine['max_tokens']} tokens per round, {engine['users']} concurrent: throughput "
                     f"{engine['throughput_ratio']:.3f}x direct, mean TTFT {engine['ttft_ratio']:.3f}x direct "
                     "(means over rounds that alternate which path goes first).\n")
    return "\n".join(parts)


async def bed_bench(args: argparse.Namespace) -> dict[str, object]:
    from bench.bedprobe import BedProbe
    from slinfer.dev import devcluster

    bed = devcluster.Bed(Path(args.bed).resolve(), args.port_base)
    async with BedProbe(bed, args.model) as probe:
        await probe.pin(1)
        await probe.wait_replicas(1, 600)
        await probe.wait_routable(1, 60)
        return await engine_rounds(probe, args.rounds, args.requests, args.users, args.max_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="100,1000", help="concurrent streams, comma-separated")
    parser.add_argument("--pacing-ms", default="10,100",
                        help="the stand-in's gap between chunks per level (one value: all levels)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per path (direct and gateway alternate)")
    parser.add_argument("--short-users", type=int, default=100)
    parser.add_argument("--short-duration", type=float, default=4.0)
    parser.add_argument("--baseline", metavar="PYTHONPATH", default="",
                        help="also measure a gateway importing `slinfer` from here (an older checkout), in turns")
    parser.add_argument("--bed", metavar="STATE_DIR", help="measure against one real engine of this running bed")
    parser.add_argument("--port-base", type=int, default=21000)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--requests", type=int, default=300, help="(--bed) streamed requests per round")
    parser.add_argument("--users", type=int, default=32, help="(--bed) concurrent users")
    parser.add_argument("--max-tokens", type=int, default=64, help="(--bed) tokens per answer")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        out = runner.run(bed_bench(args) if args.bed else standin_bench(args))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
