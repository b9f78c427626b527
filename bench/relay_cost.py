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
With `--baseline-rev REV` a second controller and tier run the relay's files (controller/upstream.py and
proxy.py) as they were at REV, the rest of the code as it is, in the same run; with `--nginx` nginx relays to
the same engine (a native data plane: `proxy_buffering off`, keep-alive upstream); with `--floor` a relay of
a few lines of Python on uvloop that writes each read to the other side and nothing else (the least any
Python relay on this loop can cost per chunk). `--rounds` repeats every path in turn; the summary is each
path's median over rounds. `--micro` measures the relay's Python alone, in this process: the CPU per read
of a vLLM-shaped 128-token stream fed to `EngineConnection` (the current one, and with `--baseline-rev` the
one at that revision) writing to a transport that only records, no sockets.
Not responsible for: a bed or plots.

    .venv/bin/python bench/relay_cost.py [--vllm] [--users 32] [--duration 8] [--baseline-rev HEAD~1]
        [--nginx] [--floor] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import statistics
import subprocess
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
# The relay's files: a baseline runs these as they were at its revision (the rest as it is now).
RELAY_FILES = ("controller/upstream.py", "controller/proxy.py")
# nginx as the data plane: one worker (as the tier's one worker), no buffering of the stream, keep-alive to
# the engine; the engine's key is put in by nginx, the client's not checked (its relay is what is measured).
NGINX_CONF = """worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    upstream engine {{ server {engine}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {key}";
            proxy_buffering off;
        }}
    }}
}}
"""


def baseline_tree(tmp: Path, rev: str) -> Path:
    """A PYTHONPATH folder whose `slinfer` is this checkout's with the relay's files as they were at `rev`."""
    root = tmp / "baseline"
    package = root / "slinfer"
    shutil.copytree(ROOT / "slinfer", package, ignore=shutil.ignore_patterns("__pycache__"))
    for sub in ("controller", "agent"):
        shutil.copytree(ROOT / sub, package / sub, ignore=shutil.ignore_patterns("__pycache__"))
    for path in RELAY_FILES:
        old = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True)
        (package / path.split("/", 1)[0] / path.split("/", 1)[1]).write_bytes(old.stdout)
    return root


async def _floor_relay(listen_port: int, engine_host: str, engine_port: int) -> None:
    """The floor: each client connection gets an engine connection; every read goes to the other side as it
    came, by `transport.write`, and nothing else happens (no parse, no routing, no metering)."""
    loop = asyncio.get_running_loop()

    class Side(asyncio.Protocol):
        def __init__(self) -> None:
            self.peer: asyncio.Transport | None = None
            self.transport: asyncio.Transport | None = None
            self.early: list[bytes] = []

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            if self.peer is not None:
                self.peer.write(data)
            else:
                self.early.append(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.peer is not None:
                self.peer.close()

    class Client(Side):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.connecting = loop.create_task(self._connect())

        async def _connect(self) -> None:
            _, engine = await loop.create_connection(Side, engine_host, engine_port)
            engine.peer = self.transport
            self.peer = engine.transport
            for data in self.early:
                self.peer.write(data)  # type: ignore[union-attr]
            self.early.clear()

    server = await loop.create_server(Client, "127.0.0.1", listen_port)
    await server.serve_forever()


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
            await _reads_per_event(engine_url, key, model)
            http_port, controller = await bp.gateway(model, "/bench", "uvloop", engine_url, key)
            tier_port, tier = await bp.tier(1)
            paths = [("direct", engine_url, key, None),
                     ("built-in", f"http://127.0.0.1:{http_port}", CLIENT_KEY, psutil.Process(controller.pid)),
                     ("tier", f"http://127.0.0.1:{tier_port}", CLIENT_KEY, psutil.Process(tier.pid))]
            if args.baseline_rev:
                paths += await _baseline(bp, model, engine_url, key, args.baseline_rev)
            engine_hostport = engine_url.removeprefix("http://")
            if args.nginx:
                port = _free_port()
                (bp.tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=bp.tmp, engine=engine_hostport,
                                                                     port=port, key=key))
                nginx = await bp.start("nginx", "nginx", "-c", str(bp.tmp / "nginx.conf"))
                await overhead._wait_http(f"http://127.0.0.1:{port}", nginx, bp.logs[-1])
                paths.append(("nginx", f"http://127.0.0.1:{port}", key, psutil.Process(nginx.pid)))
            if args.floor:
                port = _free_port()
                host, _, eport = engine_hostport.rpartition(":")
                floor = await bp.start("floor", sys.executable, __file__, "--serve-floor", str(port), host, eport)
                await overhead._wait_http(f"http://127.0.0.1:{port}", floor, bp.logs[-1])
                paths.append(("python floor", f"http://127.0.0.1:{port}", key, psutil.Process(floor.pid)))
            for tokens, _round, (path, url, k, proc) in [(t, r, p) for t in TOKENS for r in range(args.rounds)
                                                         for p in paths]:
                body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello."}],
                                   "max_tokens": tokens, "ignore_eos": True, "stream": True}).encode()
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


async def _reads_per_event(engine_url: str, key: str, model: str) -> None:
    """Prints how the engine's stream reaches a reader: reads and SSE events of one 64-token stream, and how
    many of the reads the raw pass-through wrote verbatim (one whole clean chunk each)."""
    from slinfer.controller.upstream import EnginePool
    from slinfer.controller.usage import Meter, UsageFilter

    class Sink:
        def __init__(self) -> None:
            self.writes = 0

        def write(self, data: bytes) -> None:
            self.writes += 1

        def is_closing(self) -> bool:
            return False

        def get_write_buffer_size(self) -> int:
            return 0

    pool = EnginePool(engine_url, 5.0)
    conn = await pool.connect()
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 64,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()
    reads: list[bytes] = []
    received = conn.data_received

    def counting(data: bytes) -> None:
        reads.append(data)
        received(data)

    conn.data_received = counting  # type: ignore[method-assign]
    conn.start(pool.request_bytes("/v1/chat/completions", key, body))
    await conn.head(60.0)
    usage = UsageFilter(Meter())
    usage(await conn.chunk(60.0))
    sink = Sink()
    conn.relay_to(sink, True, None, usage)  # type: ignore[arg-type]
    while not await conn.relayed(60.0):
        pass
    events = sum(r.count(b"\n\n") for r in reads)
    print(f"# {engine_url}: one 64-token stream came in {len(reads)} reads holding {events} events; "
          f"{sink.writes} reads passed verbatim; usage exact: {usage.meter.reported}", flush=True)
    pool.discard(conn)


async def _baseline(bp: BenchProcesses, model: str, engine_url: str, key: str,
                    rev: str) -> list[tuple[str, str, str, psutil.Process | None]]:
    """The built-in gateway and a tier running the relay's files as at `rev`: a second controller (its own
    folder and config) fed the same engine; PYTHONPATH (and, for `-m`, the working folder) put them first."""
    tree = baseline_tree(bp.tmp, rev)
    base = BenchProcesses(str(bp.tmp / "base"))
    base.tmp.mkdir()
    saved, cwd = os.environ.get("PYTHONPATH"), os.getcwd()
    os.environ["PYTHONPATH"] = str(tree)
    os.chdir(tree)
    try:
        http_port, controller = await base.gateway(model, "/bench", "uvloop", engine_url, key)
        tier_port, tier = await base.tier(1)
    finally:
        os.chdir(cwd)
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    # Stopped with the rest.
    bp.procs += base.procs
    bp.logs += base.logs
    bp.tasks += base.tasks
    return [(f"built-in @{rev}", f"http://127.0.0.1:{http_port}", CLIENT_KEY, psutil.Process(controller.pid)),
            (f"tier @{rev}", f"http://127.0.0.1:{tier_port}", CLIENT_KEY, psutil.Process(tier.pid))]


def _vllm_reads(tokens: int) -> list[bytes]:
    """A 128-token chat stream as vLLM's reads bring it: the head with the role chunk, one chunk per token,
    the usage chunk, then [DONE] and the terminator (bench/standin_engine.py's event sizes)."""
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    cid = b'"id":"chatcmpl-0123456789abcdef0123456789abcdef","object":"chat.completion.chunk","created":1765000000'
    def frame(data: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(data), data)
    role = b'data: {' + cid + b',"model":"tiny","choices":[{"index":0,"delta":{"role":"assistant","content":""},' \
        b'"logprobs":null,"finish_reason":null}]}\n\n'
    token = b'data: {' + cid + b',"model":"tiny","choices":[{"index":0,"delta":{"content":" word"},' \
        b'"logprobs":null,"finish_reason":null,"token_ids":null}]}\n\n'
    usage = b'data: {' + cid + b',"model":"tiny","choices":[],"usage":{"prompt_tokens":12,"total_tokens":140,' \
        b'"completion_tokens":128}}\n\n'
    return [head + frame(role)] + [frame(token)] * tokens + [frame(usage), frame(b"data: [DONE]\n\n") + b"0\r\n\r\n"]


async def _micro_one(module: object, reads: list[bytes], streams: int) -> float:
    """CPU seconds per read after the first (the relay's share) over `streams` streams."""
    from slinfer.controller.usage import Meter, UsageFilter

    class Sink:
        def write(self, data: bytes) -> None:
            pass

        def is_closing(self) -> bool:
            return False

        def get_write_buffer_size(self) -> int:
            return 0

    class Engine:
        def write(self, data: bytes) -> None:
            pass

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

    relayed, spent = 0, 0.0
    for _ in range(streams):
        conn = module.EngineConnection()  # type: ignore[attr-defined]
        conn.connection_made(Engine())
        conn.start(b"POST / HTTP/1.1\r\n\r\n")
        conn.data_received(reads[0])
        await conn.head(1.0)
        usage = UsageFilter(Meter())
        usage(await conn.chunk(1.0))
        conn.relay_to(Sink(), True, None, usage)
        t0 = time.process_time()
        for data in reads[1:]:
            conn.data_received(data)
        spent += time.process_time() - t0
        relayed += len(reads) - 1
        assert conn._done and usage.meter.reported
    return spent / relayed


def micro(args: argparse.Namespace) -> None:
    import importlib.util

    from slinfer.controller import upstream

    modules = [("now", upstream)]
    if args.baseline_rev:
        old = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.baseline_rev}:controller/upstream.py"],
                             check=True, capture_output=True).stdout
        with tempfile.NamedTemporaryFile("wb", suffix=".py", delete=False) as f:
            f.write(old)
        spec = importlib.util.spec_from_file_location("upstream_baseline", f.name)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        os.unlink(f.name)
        modules.append((f"@{args.baseline_rev}", module))
    reads = _vllm_reads(128)
    print("| relay code | µs of CPU per read (the relay's Python, no sockets), 5 runs |")
    print("|---|---|")
    for label, module in modules * 1:
        runs = [1e6 * asyncio.run(_micro_one(module, reads, 300)) for _ in range(5)]
        print(f"| {label} | {statistics.median(runs):.2f} (min {min(runs):.2f}) |", flush=True)


def summary(rows: list[dict[str, object]]) -> str:
    """Each (engine, tokens, path)'s median over its rounds."""
    groups: dict[tuple[object, object, object], list[dict[str, object]]] = {}
    for r in rows:
        groups.setdefault((r["engine"], r["tokens"], r["path"]), []).append(r)
    out = ["| engine | tokens | path | rounds | gateway µs/chunk | gateway ms/request | ITL p99 ms "
           "| ITL p99 added ms |", "|---|---|---|---|---|---|---|---|"]
    for (engine, tokens, path), rs in groups.items():
        med = {k: statistics.median(float(r[k]) for r in rs)  # type: ignore[arg-type]
               for k in ("us_per_chunk", "ms_per_request", "itl_p99_ms")}
        direct = groups.get((engine, tokens, "direct"))
        added = med["itl_p99_ms"] - statistics.median(float(r["itl_p99_ms"]) for r in direct) if direct else math.nan  # type: ignore[arg-type]
        out.append(f"| {engine} | {tokens} | {path} | {len(rs)} | {med['us_per_chunk']:.1f} "
                   f"| {med['ms_per_request']:.2f} | {med['itl_p99_ms']:.2f} | {added:+.2f} |")
    return "\n".join(out)


def _line(r: dict[str, object]) -> str:
    return (f"| {r['engine']} | {r['tokens']} | {r['path']} | {r['requests']} ({r['errors']} errors) "
            f"| {r['events_per_s']:.0f} | {r['us_per_chunk']:.1f} | {r['ms_per_request']:.2f} "
            f"| {r['itl_mean_ms']:.2f} | {r['itl_p99_ms']:.2f} |")


_saved_heartbeat = overhead._heartbeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm", action="store_true", help="also against a real vLLM engine (tiny)")
    parser.add_argument("--vllm-only", action="store_true", help="against the real vLLM engine only")
    parser.add_argument("--model-dir", default=str(ROOT / ".venv" / "share" / "slinfer" / "models" / "tiny"))
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--pacing-ms", type=float, default=5.0, help="the stand-in's time between tokens")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--baseline-rev", default="", help="also the relay's files as at this git revision")
    parser.add_argument("--nginx", action="store_true", help="also nginx as the data plane")
    parser.add_argument("--floor", action="store_true", help="also a bare Python relay (the floor)")
    parser.add_argument("--micro", action="store_true", help="the relay's Python alone, per read, in process")
    parser.add_argument("--rounds", type=int, default=1, help="each path this many times, in turn")
    parser.add_argument("--serve-floor", nargs=3, metavar=("PORT", "ENGINE_HOST", "ENGINE_PORT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.micro:
        micro(args)
        return
    if args.serve_floor:
        import uvloop

        port, host, eport = args.serve_floor
        uvloop.run(_floor_relay(int(port), host, int(eport)))
        return
    # BenchProcesses.gateway() registers the engine through the module's heartbeat: the service user's own.
    overhead._heartbeat = _heartbeat
    print("| engine | tokens | path | requests | chunks/s | gateway µs/chunk | gateway ms/request "
          "| ITL mean ms | ITL p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = [] if args.vllm_only else asyncio.run(one_engine("stand-in", "standin", args))
    if args.vllm or args.vllm_only:
        overhead._heartbeat = _heartbeat
        rows += asyncio.run(one_engine("vllm", "tiny", args))
    print()
    print(summary(rows), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
