"""The control plane at a site's scale (issue 35.4 and 35.7): the real controller process against N nodes.

Each point starts `python -m slinfer.controller.main` (TLS on its gRPC port, certificates from
slinfer.tls.CertificateAuthority, no Slurm: its bin dir is empty, so the autoscaler submits nothing) with K client
keys already in its key database (written through the KeyStore's own schema in one transaction: the admin API
makes them one fsync each). In this process, over real gRPC and TLS:
- N simulated agents (8 READY pool engines each, host and GPU telemetry, as agent/reporter.py sends them), one
  Report stream each, every `--interval` seconds (the agents' heartbeat), spread over the interval;
- W simulated gateways watching the feed (GatewayFeed.Watch, one channel each, as gateway processes do);
- the admin API (CreateKey, Status) with the controller's token.
Measured per point, with the controller's process CPU time (user + system, psutil), not wall time, so the
others' load on the 2 shared cores matters less:
- CPU per agent report: (CPU over a reporting window - the idle rate of a window with the agents quiet) / reports;
  and the projection to every node reporting once a second (cores);
- resident memory (RSS) at the end of the steady window;
- feed bytes/s per watcher in the steady window (nothing but reports changing);
- p99 of the time for a change (a key made through the admin API) to reach every watcher, over `--changes`;
- admin API latency: CreateKey and Status, p50 and p99;
- the autoscaler's step: CPU of `Autoscaler.step()` in this process, against a Registry holding the same N x 8
  replicas and a stand-in Slurm that lists them at no cost (the real client's one `squeue` listing a step is
  measured by bench/slurm_step_cost.py).
Then the growth exponent of each figure (the slope of log(figure) against log(N)) over each sweep: nodes (at
1,000 keys, 1 watcher), keys (at 10 nodes) and watchers (at 100 nodes), and the corner of all three largest.

    .venv/bin/python bench/control_plane_scale.py [--quick] [--seconds 4] [--out bench/results/control_plane]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import signal
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from slinfer import tls  # noqa: E402
from slinfer.config import parse  # noqa: E402
from slinfer.controller.autoscaler import COMMENT_MARK, Autoscaler  # noqa: E402
from slinfer.controller.gateway import Demand  # noqa: E402
from slinfer.controller.keys import KeyInfo, KeyStore  # noqa: E402
from slinfer.controller.registry import Registry  # noqa: E402
from slinfer.controller.slurm import SlurmJob  # noqa: E402
from slinfer.v1 import (  # noqa: E402
    admin_pb2,
    admin_pb2_grpc,
    controller_pb2,
    controller_pb2_grpc,
    engine_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
)

TOKEN = "bench-control-plane-token"
# Engines per node: a node of 8 GPUs, one engine each (the issue's shape).
ENGINES = 8
# Catalog models; engine e of every node serves model e % MODELS, so each model has N x 8 / MODELS replicas.
MODELS = 8
# Agents per client channel: many streams share a connection, as agents behind one NAT would not; it keeps this
# process's own connections few (the controller's cost per stream is the same).
AGENTS_PER_CHANNEL = 250
# The full points of the issue; --quick keeps the smallest of each.
NODES = (10, 100, 1000, 5000)
KEYS = (1000, 20000, 100000)
WATCHERS = (1, 8, 32)
# The sweeps' fixed values.
BASE_KEYS, BASE_WATCHERS, KEYS_NODES, WATCHERS_NODES = 1000, 1, 10, 100
# Goals of issue 35.4.
GOAL_CORES_2000 = 0.5
GOAL_CHANGE_P99_MS = 100.0
GOAL_FEED_BPS = 10_000.0
GOAL_RSS_MB = 1024.0


@dataclass(frozen=True)
class Point:
    nodes: int
    keys: int
    watchers: int
    sweep: str


@dataclass
class _Watcher:
    bytes: int = 0
    messages: int = 0
    full: asyncio.Event = field(default_factory=asyncio.Event)
    seen: dict[str, float] = field(default_factory=dict)  # key name -> when it arrived


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def points(quick: bool) -> list[Point]:
    nodes, keys, watchers = (NODES[:2], KEYS[:1], WATCHERS[:2]) if quick else (NODES, KEYS, WATCHERS)
    out = [Point(n, BASE_KEYS, BASE_WATCHERS, "nodes") for n in nodes]
    out += [Point(KEYS_NODES, k, BASE_WATCHERS, "keys") for k in keys]
    out += [Point(WATCHERS_NODES, BASE_KEYS, w, "watchers") for w in watchers]
    if not quick:
        out.append(Point(NODES[-1], KEYS[-1], WATCHERS[-1], "corner"))
    return out


def fill_keys(path: Path, n: int) -> None:
    """n client keys in the controller's key database, in one transaction, through the store's own schema."""
    store = KeyStore(path)
    store.create("bench-seed", account="bench")  # makes the database and its tables
    now = time.time()
    rows = [KeyStore._row(hashlib.sha256(b"bench-key-%d" % i).digest(),
                          KeyInfo(key_id=f"b{i:011x}", name=f"user{i}", account=f"acct{i % 50}", created_at=now))
            for i in range(n - 1)]
    db = sqlite3.connect(store.path)
    with db:
        db.executemany("INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    db.close()


def write_config(tmp: Path, grpc_port: int, http_port: int, pki: dict[str, str], heartbeat_s: float = 1.0,
                 replicas: int = 0) -> Path:
    """The controller's config; with `replicas`, each model holds min = max = that many (--slurm-standin)."""
    bounds = f"min_replicas = {replicas}\nmax_replicas = {replicas}\n" if replicas else ""
    models = "".join(f'[[models]]\nname = "m{i}"\nsource = "/bench"\n{bounds}\n' for i in range(MODELS))
    path = tmp / "slinfer.toml"
    path.write_text(
        f'[controller]\nlisten = "127.0.0.1:{grpc_port}"\nstate_dir = "{tmp}/state"\ntoken = "{TOKEN}"\n'
        f'slurm_bin_dir = "{tmp}/no-slurm"\nlog_level = "warning"\nagent_timeout_s = 60.0\n'
        f'heartbeat_s = {heartbeat_s}\n'
        f'tls_cert = "{pki["cert"]}"\ntls_key = "{pki["key"]}"\ntls_ca = "{pki["ca"]}"\n\n'
        f'[gateway]\nlisten = "127.0.0.1:{http_port}"\n\n' + models)
    return path


def _pki(folder: Path) -> dict[str, str]:
    ca = tls.CertificateAuthority(folder)
    server = ca.issue("server", ["127.0.0.1", "localhost"])
    return {"ca": str(ca.cert_path), "cert": str(server.cert), "key": str(server.key)}


def agent_report(node: int) -> controller_pb2.AgentReport:
    """What one node's agent sends on each heartbeat (agent/reporter.py's fields), 8 READY pool engines."""
    engines = [engine_pb2.Engine(job_id=str(100000 + node * ENGINES + e), model=f"m{e % MODELS}",
                                 state=engine_pb2.READY, pool=True, user="slinfer",
                                 base_url=f"http://10.{node // 250}.{node % 250}.1:{8000 + e}",
                                 api_key=hashlib.sha256(b"%d-%d" % (node, e)).hexdigest()[:43],
                                 started_at=1.7e9, ready_at=1.7e9 + 30,
                                 load=engine_pb2.EngineLoad(running=3, waiting=1, kv_cache_usage=0.4))
               for e in range(ENGINES)]
    gpus = [controller_pb2.GpuTelemetry(index=str(g), name="NVIDIA H100 80GB HBM3", utilization=0.9,
                                        memory_used_bytes=70 << 30, memory_total_bytes=80 << 30)
            for g in range(ENGINES)]
    return controller_pb2.AgentReport(
        node=f"node{node:05d}", address=f"10.{node // 250}.{node % 250}.1", agent_id=f"agent-{node}",
        engines=engines, gpus=gpus, token=TOKEN,
        host=controller_pb2.HostTelemetry(load1=8.0, cpu_percent=40.0, memory_used_bytes=200 << 30,
                                          memory_total_bytes=512 << 30), sent_at=time.time())


class Agents:
    """N agents' Report streams; each sends its report every `interval` s while `running` is set."""

    def __init__(self, address: str, config: Any, nodes: int, interval: float) -> None:
        self._address, self._config, self._nodes, self._interval = address, config, nodes, interval
        self.reports = 0  # written on the streams (the controller acks each stream's first, as the agent needs)
        self.registered = 0
        self.errors: dict[str, int] = {}  # streams that ended, by gRPC status
        self._seen: set[str] = set()
        self.running = asyncio.Event()
        self.running.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._channels: list[grpc.aio.Channel] = []

    async def start(self) -> None:
        for first in range(0, self._nodes, AGENTS_PER_CHANNEL):
            channel = tls.aio_channel(self._address, self._config)
            self._channels.append(channel)
            stub = controller_pb2_grpc.RegistryStub(channel)
            for node in range(first, min(first + AGENTS_PER_CHANNEL, self._nodes)):
                self._tasks.append(asyncio.create_task(self._one(stub, node)))

    async def _one(self, stub: controller_pb2_grpc.RegistryStub, node: int) -> None:
        # Spread over the interval, as agents that started at different times are.
        await asyncio.sleep(self._interval * node / self._nodes)
        report = agent_report(node)
        delay = 0.5
        while True:
            try:
                await self._reports(stub, report, node)
            except grpc.aio.AioRpcError as exc:
                # As agent/reporter.py does: a stream the server refused or ended is opened again, with backoff.
                why = f"{exc.code().name}: {exc.details()}"[:80]
                self.errors[why] = self.errors.get(why, 0) + 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _reports(self, stub: controller_pb2_grpc.RegistryStub, report: controller_pb2.AgentReport,
                       node: int) -> None:
        call = stub.Report()
        next_at = time.monotonic()
        while True:
            if not self.running.is_set():
                await self.running.wait()
                # Spread over the interval again: resumed together, the agents would report in one burst (the
                # first change timed after the quiet window took 1.3-2.2 s at 5,000 nodes) and stay in step.
                await asyncio.sleep(self._interval * node / self._nodes)
                next_at = time.monotonic()
            await call.write(report)
            self.reports += 1
            if report.node not in self._seen:
                await call.read()  # the first report's ack: registered, as agent/reporter.py marks itself connected
                self._seen.add(report.node)
                self.registered += 1
            next_at = max(next_at + self._interval, time.monotonic())
            await asyncio.sleep(next_at - time.monotonic())

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self._channels:
            await channel.close()


async def _watch(address: str, config: Any, i: int, w: _Watcher) -> None:
    options = [("grpc.max_receive_message_length", 1 << 30)]
    creds = tls.channel_credentials(config)
    assert creds is not None
    async with grpc.aio.secure_channel(address, creds, options=options) as channel:
        stub = gateway_pb2_grpc.GatewayFeedStub(channel)
        # As a gateway process asks (routefeed.py): the full state in pages.
        async for m in stub.Watch(gateway_pb2.WatchRequest(gateway=f"bench-gw{i}", token=TOKEN, pages=True)):
            w.bytes += m.ByteSize()
            w.messages += 1
            at = time.monotonic()
            for k in m.keys:
                if k.name.startswith("change-"):
                    w.seen.setdefault(k.name, at)
            if m.full and not m.more:
                w.full.set()


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


# --heap: SIGUSR1 (sent where the RSS is read) makes the controller append a heap count to this file: what the
# feed holds (the Watch streams' locals, the delta log, the cached full state, by serialized bytes; an in-memory
# protobuf message takes ~3.4x its serialized size, bench/results/control_plane/heap.md) and glibc's malloc
# totals (in use, and freed but kept by the process). Protobuf's arenas are C memory, which tracemalloc misses.
HEAP_OUT = ""
# --stalls (a JSON line per phase: the event loop's stalls over SLINFER_BENCH_STALL_MS, with the frames the loop
# ran and the collector's time in each) and --slurm-standin (the controller's own autoscaler steps over every
# engine's job, listed at no cost) run the controller through the same probe.
STALLS = True
SLURM_STANDIN = False
HEAP_PROBE = """
import ctypes, gc, os, runpy, signal, sys, psutil
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
def size(v):
    if isinstance(v, bytes):
        return 1, len(v)
    if hasattr(v, "ByteSize"):
        return 1, v.ByteSize()
    if isinstance(v, list) and v and (isinstance(v[0], bytes) or hasattr(v[0], "ByteSize")):
        return len(v), sum(size(x)[1] for x in v)
    return 0, 0
import collections, json, time
pauses, started, gc_spans = [], [0.0], collections.deque(maxlen=4096)
def timed(phase, info):
    if phase == "start":
        started[0] = time.perf_counter()
    else:
        now = time.perf_counter()
        pauses.append((info["generation"], now - started[0]))
        gc_spans.append((info["generation"], started[0], now))
gc.callbacks.append(timed)
import collections, threading
stalls, main_id = [], threading.main_thread().ident
marked = []  # every stall over the threshold since the last SIGUSR2 (a phase mark): dicts, for --stalls
STALL_S = float(os.environ.get("SLINFER_BENCH_STALL_MS", "50")) / 1e3
def ours(code):
    return "slinfer" in code.co_filename or "/controller/" in code.co_filename
def watchdog():
    # The event loop's lag: a callback posted every 20 ms, and while it waits the main thread's innermost and
    # outermost slinfer frames sampled every 5 ms; a lag over 200 ms is a stall for --heap's count, one over
    # SLINFER_BENCH_STALL_MS (50) one for --stalls, kept with what the loop ran and the collector's time in it.
    while not loops or not loops[0].is_running():
        time.sleep(0.5)
    loop = loops[0]
    while True:
        done, seen, outer, start = threading.Event(), collections.Counter(), collections.Counter(), time.perf_counter()
        loop.call_soon_threadsafe(done.set)
        while not done.wait(0.005):
            f = sys._current_frames().get(main_id)
            inner, top = "(event loop, C)", "(event loop, C)"
            # Up to the asyncio machinery that ran the task: its outermost slinfer frame is the task's own.
            while f is not None and "/asyncio/" not in f.f_code.co_filename:
                if ours(f.f_code):
                    if inner == "(event loop, C)":
                        inner = f"{f.f_code.co_qualname}:{f.f_lineno}"
                    top = f.f_code.co_qualname
                f = f.f_back
            seen[inner] += 1
            outer[top] += 1
        end = time.perf_counter()
        lag = end - start
        if lag > 0.2:
            stalls.append((lag, seen.most_common(3)))
        if lag > STALL_S:
            in_gc = [(g, max(0.0, min(b, end) - max(a, start))) for g, a, b in list(gc_spans) if b > start]
            marked.append({"ms": round(1e3 * lag, 1), "at": time.time(), "outer": outer.most_common(3),
                           "inner": seen.most_common(3),
                           "gc_ms": round(1e3 * sum(t for _, t in in_gc), 1),
                           "gc_full_ms": round(1e3 * sum(t for g, t in in_gc if g == 2), 1)})
        time.sleep(0.02)
loops = []
import asyncio
import slinfer.controller.eventloop as eventloop
made_by = eventloop.loop_factory() or asyncio.new_event_loop
def kept():
    loops.append(made_by())
    return loops[-1]
eventloop.loop_factory = lambda: kept
threading.Thread(target=watchdog, daemon=True).start()
def dump(_sig, _frame):
    held, hub, streams = {}, None, 0
    for o in gc.get_objects():
        code = getattr(o, "ag_code", None)
        if code is not None and code.co_name == "Watch" and o.ag_frame is not None:
            streams += 1
            hub = o.ag_frame.f_locals.get("self", hub)
            for name, v in o.ag_frame.f_locals.items():
                n, b = size(v)
                if b:
                    c = held.setdefault("Watch stream local " + name, [0, 0, set()])
                    c[0] += n
                    c[1] += b
                    c[2].add(id(v))
    m = libc.mallinfo2()
    with open(os.environ["SLINFER_BENCH_HEAP_OUT"], "a") as out:
        mb = lambda n: f"{n / 2**20:.0f} MB"
        out.write(f"RSS {mb(psutil.Process().memory_info().rss)}; malloc: in use {mb(m.uordblks)} + mmapped "
                  f"{mb(m.hblkhd)} ({m.hblks} blocks), freed but kept {mb(m.fordblks)}\\n")
        gen2 = sorted((p for g, p in pauses if g == 2), reverse=True)
        out.write(f"garbage collections since the last count: {len(pauses)}, of them {len(gen2)} full, "
                  f"longest full {1e3 * (gen2[0] if gen2 else 0):.0f} ms, full total {1e3 * sum(gen2):.0f} ms; "
                  f"objects tracked {len(gc.get_objects())}\\n")
        pauses.clear()
        out.write(f"event loop stalls over 200 ms since the last count: {len(stalls)}\\n")
        for lag, seen in sorted(stalls, reverse=True)[:8]:
            out.write(f"  {1e3 * lag:.0f} ms: {seen}\\n")
        stalls.clear()
        out.write(f"{streams} Watch streams\\n")
        for k, (n, b, ids) in sorted(held.items(), key=lambda kv: -kv[1][1]):
            out.write(f"  {k}: {n} messages/pages, {b / 2**20:.1f} MB serialized, {len(ids)} distinct objects\\n")
        if hub is not None:
            feed = hub.feed
            log_bytes = sum(d.ByteSize() for d in feed._log)
            out.write(f"  feed log: {len(feed._log)} deltas, {log_bytes / 2**20:.1f} MB serialized\\n")
            snap = getattr(hub, "_snapshot", None)
            if snap is not None:
                out.write(f"  hub's cached full state: {snap.ByteSize() / 2**20:.1f} MB serialized\\n")
            pages = getattr(feed, "_pages", None)
            if pages:
                total = sum(len(p) for ps in pages.values() for p in ps)
                out.write(f"  feed's cached pages: {total / 2**20:.1f} MB\\n")
            out.write(f"  feed holds {len(feed._keys)} keys ({type(next(iter(feed._keys.values()), None)).__name__}),"
                      f" {len(feed._replicas)} replicas, version {feed.version}\\n")
def mark(_sig, _frame):
    # A phase's end: its stalls, labelled with what the bench wrote in the label file, as one JSON line.
    label = open(os.environ["SLINFER_BENCH_STALLS_OUT"] + ".label").read().strip()
    with open(os.environ["SLINFER_BENCH_STALLS_OUT"], "a") as out:
        out.write(json.dumps({"phase": label, "stalls": list(marked)}) + "\\n")
    marked.clear()
if os.environ.get("SLINFER_BENCH_HEAP_OUT"):
    signal.signal(signal.SIGUSR1, dump)
if os.environ.get("SLINFER_BENCH_STALLS_OUT"):
    signal.signal(signal.SIGUSR2, mark)
if os.environ.get("SLINFER_BENCH_JOBS"):
    # --slurm-standin: the controller's autoscaler lists every engine's job (N x 8, RUNNING, its own name and
    # comment), at no cost, as the in-process step below does; min = max replicas, so it submits and cancels nothing.
    from slinfer.controller import slurm as slurm_client
    from slinfer.controller.slurm import SlurmJob
    now, per_node, models, n = time.time(), 8, 8, int(os.environ["SLINFER_BENCH_JOBS"])
    listed = [SlurmJob(job_id=str(100000 + node * per_node + e), name=f"slinfer-m{e % models}",
                       comment=f"slinfer:autoscaler model=m{e % models}", state="RUNNING", node=f"node{node:05d}",
                       submit_time=now - 600, start_time=now - 590, end_time=now + 86400, nodes=f"node{node:05d}")
              for node in range(n) for e in range(per_node)]
    async def jobs(self, names=()):
        return listed
    async def leaving(self, nodelists):
        return {}
    async def no_problems(self, models):
        return []
    slurm_client.SlurmClient.jobs = jobs
    slurm_client.SlurmClient.leaving_nodes = leaving
    slurm_client.SlurmClient.site_order_problems = no_problems
sys.argv = ["slinfer-controller", *sys.argv[1:]]
runpy.run_module("slinfer.controller.main", run_name="__main__")
"""


@contextlib.asynccontextmanager
async def controller(config_path: Path, log: Path, in_process: bool, jobs: int = 0) -> AsyncIterator[psutil.Process]:
    """The controller: its own process (the benchmark), or a task in this one (the unit test's smoke run); with
    `jobs` (nodes), its autoscaler lists every engine's job through the probe's stand-in Slurm."""
    if in_process:
        from slinfer.config import load
        from slinfer.controller.main import serve
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(serve(load(config_path), stop, lambda _g, _h: ready.set()))
        await asyncio.wait({task, asyncio.create_task(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        try:
            yield psutil.Process()
        finally:
            stop.set()
            await task
        return
    with log.open("wb") as out:
        probe = bool(HEAP_OUT or STALLS or jobs)
        start = ["-c", HEAP_PROBE] if probe else ["-m", "slinfer.controller.main"]
        env = {**os.environ, "SLINFER_BENCH_HEAP_OUT": HEAP_OUT,
               "SLINFER_BENCH_STALLS_OUT": str(log.with_name("stalls.jsonl")) if STALLS else "",
               "SLINFER_BENCH_JOBS": str(jobs) if jobs else ""}
        proc = await asyncio.create_subprocess_exec(sys.executable, *start, "--config",
                                                    str(config_path), stdout=out, stderr=out, cwd=ROOT, env=env)
    try:
        yield psutil.Process(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await proc.wait()


async def _until(check: Callable[[], bool], limit_s: float, what: str,
                 progress: Callable[[], str] | None = None) -> float:
    start = last = time.monotonic()
    while not check():
        if time.monotonic() - start > limit_s:
            raise TimeoutError(f"{what}: not within {limit_s:.0f} s")
        if progress is not None and time.monotonic() - last > 10:
            last = time.monotonic()
            print(f"  ... {progress()}", file=sys.stderr, flush=True)
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def _say(p: Point, what: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {p.nodes} nodes, {p.keys} keys, {p.watchers} watchers: {what}",
          file=sys.stderr, flush=True)


async def run_point(p: Point, seconds: float, changes: int, interval: float = 1.0, min_rate: float = 0.0,
                    in_process: bool = False, heartbeat_s: float = 1.0, max_rate: float = 0.0) -> dict[str, Any]:
    # A few nodes at 1 Hz give too few reports for CPU time's 10 ms ticks: they report faster instead.
    if min_rate > 0:
        interval = min(interval, p.nodes / min_rate)
    # Many nodes at 1 Hz need more CPU than this process and the controller get on 2 shared cores (at 5,000 the
    # starved connections dropped their streams): they report less often; the CPU per report is what counts.
    if max_rate > 0:
        interval = max(interval, p.nodes / max_rate)
    with tempfile.TemporaryDirectory(prefix="slinfer-bench-cp-") as name:
        tmp = Path(name)
        pki = _pki(tmp / "pki")
        (tmp / "state").mkdir(mode=0o700)
        fill_keys(tmp / "state" / "keys.json", p.keys)
        grpc_port = _free_port()
        standin = p.nodes if SLURM_STANDIN and not in_process else 0
        config_path = write_config(tmp, grpc_port, _free_port(), pki, heartbeat_s,
                                   replicas=standin * ENGINES // MODELS)
        client_config = parse({"controller": {"token": TOKEN, "tls_ca": pki["ca"], "tls_cert": pki["cert"],
                                              "tls_key": pki["key"]}})
        address = f"127.0.0.1:{grpc_port}"
        stalls_out = tmp / "stalls.jsonl"

        def mark(label: str) -> None:
            # The probe writes the stalls since the last mark under this label (SIGUSR2).
            if STALLS and not in_process:
                stalls_out.with_name("stalls.jsonl.label").write_text(label)
                proc.send_signal(signal.SIGUSR2)

        async with controller(config_path, tmp / "controller.log", in_process, jobs=standin) as proc:
            # Status at 5,000 nodes with the autoscaler's 40,000 jobs is 6.4 MB, over gRPC's default 4 MB.
            admin_creds = tls.channel_credentials(client_config)
            assert admin_creds is not None
            admin_channel = grpc.aio.secure_channel(address, admin_creds,
                                                    options=[("grpc.max_receive_message_length", 1 << 30)])
            admin = admin_pb2_grpc.AdminStub(admin_channel)
            auth = (("authorization", f"Bearer {TOKEN}"),)
            await _until_up(admin, auth, proc, tmp / "controller.log")
            agents = Agents(address, client_config, p.nodes, interval)
            watchers = [_Watcher() for _ in range(p.watchers)]
            watch_tasks = [asyncio.create_task(_watch(address, client_config, i, w)) for i, w in enumerate(watchers)]
            try:
                await agents.start()
                _say(p, "controller up; agents and watchers connecting")
                register_s = await _until(lambda: agents.registered == p.nodes, 120 + p.nodes / 20,
                                          "every agent registered",
                                          lambda: f"{agents.registered} registered, streams failed: {agents.errors}")
                await _until(lambda: all(w.full.is_set() for w in watchers), 60, "every watcher's full state")
                _say(p, f"{p.nodes} agents registered in {register_s:.1f} s; every watcher has the full state")
                await asyncio.sleep(min(interval, 1.0))  # the first round of reports settles
                # The reporting window.
                sent, cpu, at = agents.reports, _cpu(proc), time.monotonic()
                fed = [w.bytes for w in watchers]
                await asyncio.sleep(seconds)
                busy_cpu, busy_s, reports = _cpu(proc) - cpu, time.monotonic() - at, agents.reports - sent
                feed_bps = statistics.mean((w.bytes - b) / busy_s for w, b in zip(watchers, fed, strict=True))
                rss = proc.memory_info().rss
                if HEAP_OUT:
                    proc.send_signal(signal.SIGUSR1)
                # A quiet window: what the controller spends with no report (feed heartbeats, sweeps, loops).
                agents.running.clear()
                await asyncio.sleep(min(interval, 1.0) + 0.1)  # reports in flight land
                cpu, at = _cpu(proc), time.monotonic()
                await asyncio.sleep(seconds / 2)
                idle_rate = (_cpu(proc) - cpu) / (time.monotonic() - at)
                agents.running.set()
                _say(p, f"{reports / busy_s:.0f} reports/s; timing {changes} changes")
                await asyncio.sleep(0.1)
                mark("setup")
                # Changes: one key each through the admin API, until every watcher has it.
                # First the changes alone (with the agents reporting), then each followed by a Status call, the
                # whole cluster's (0.3 s at 5,000 nodes): its garbage makes the controller's full collections.
                create_ms, status_ms, change_ms, with_status_ms = [], [], [], []
                # This process's own loop lag meanwhile (its agents and watchers share it): a watcher's arrival
                # time is read on it, so a lag here is a change's tail that is not the controller's.
                lags: list[float] = []
                lag_task = asyncio.create_task(_lag(lags))
                for i in range(2 * changes):
                    started = time.monotonic()
                    await admin.CreateKey(admin_pb2.CreateKeyRequest(name=f"change-{i}", account="bench"),
                                          metadata=auth)
                    create_ms.append(1e3 * (time.monotonic() - started))
                    await _until(lambda i=i: all(f"change-{i}" in w.seen for w in watchers), 30,
                                 f"change {i} at every watcher")
                    took = 1e3 * (max(w.seen[f"change-{i}"] for w in watchers) - started)
                    (change_ms if i < changes else with_status_ms).append(took)
                    if i == changes - 1:
                        mark("changes")
                    if i == changes - 1 and HEAP_OUT:
                        proc.send_signal(signal.SIGUSR1)  # the garbage collections of the changes alone
                        await asyncio.sleep(2.0)
                        mark("heap count")
                    if i >= changes:
                        started = time.monotonic()
                        await admin.Status(admin_pb2.StatusRequest(), metadata=auth)
                        status_ms.append(1e3 * (time.monotonic() - started))
                    await asyncio.sleep(0.05)
                rss_end = proc.memory_info().rss
                lag_task.cancel()
                mark("changes with Status")
                await asyncio.sleep(0.2)  # the probe writes its line
                stall_figures = _stalls(stalls_out)
                if HEAP_OUT:
                    proc.send_signal(signal.SIGUSR1)
                    await asyncio.sleep(2.0)  # its count is written before the controller stops
            finally:
                for t in watch_tasks:
                    t.cancel()
                await asyncio.gather(*watch_tasks, return_exceptions=True)
                await agents.close()
                await admin_channel.close()
    per_report = max(busy_cpu - idle_rate * busy_s, 0.0) / max(reports, 1)
    return {"nodes": p.nodes, "keys": p.keys, "watchers": p.watchers, "sweep": p.sweep,
            "register_s": register_s, "interval_s": interval,
            "stream_errors": sum(agents.errors.values()), "load_avg_1m": os.getloadavg()[0],
            "reports_per_s": reports / busy_s,
            "cpu_per_report_us": 1e6 * per_report, "idle_cores": idle_rate,
            "cores_at_1hz": idle_rate + per_report * p.nodes,
            "rss_mb": rss / 2**20, "rss_end_mb": rss_end / 2**20, "feed_bps": feed_bps,
            "change_p50_ms": statistics.median(change_ms), "change_p99_ms": _pct(change_ms, 99),
            "change_with_status_p50_ms": statistics.median(with_status_ms),
            "change_with_status_p99_ms": _pct(with_status_ms, 99),
            "create_key_p50_ms": statistics.median(create_ms), "create_key_p99_ms": _pct(create_ms, 99),
            "status_p50_ms": statistics.median(status_ms), "status_p99_ms": _pct(status_ms, 99),
            "change_ms": [round(x, 1) for x in change_ms],
            "change_with_status_ms": [round(x, 1) for x in with_status_ms],
            "create_key_ms": [round(x, 1) for x in create_ms], "autoscaler_in_loop": bool(standin),
            "bench_loop_lag_p99_ms": _pct(lags, 99) if lags else 0.0,
            "bench_loop_lag_max_ms": max(lags, default=0.0), **stall_figures}


async def _lag(out: list[float]) -> None:
    """This process's event loop lag: how late a 10 ms sleep wakes, in ms, appended until cancelled."""
    while True:
        at = time.monotonic()
        await asyncio.sleep(0.01)
        out.append(1e3 * (time.monotonic() - at - 0.01))


def _stalls(path: Path) -> dict[str, Any]:
    """The probe's stalls per phase (changes alone, changes with Status): how many, the longest, the collector's
    share, and the frames the loop ran in them, most sampled first."""
    out: dict[str, Any] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        phase = json.loads(line)
        if phase["phase"] not in ("changes", "changes with Status"):
            continue
        key = "stalls_" + phase["phase"].replace(" ", "_").lower()
        stalls = phase["stalls"]
        outer: dict[str, int] = {}
        for st in stalls:
            for name, n in st["outer"]:
                outer[name] = outer.get(name, 0) + n
        out[key] = {"count": len(stalls), "max_ms": max((st["ms"] for st in stalls), default=0.0),
                    "total_ms": round(sum(st["ms"] for st in stalls), 1),
                    "gc_ms": round(sum(st["gc_ms"] for st in stalls), 1),
                    "gc_full_ms": round(sum(st["gc_full_ms"] for st in stalls), 1),
                    "samples_by_outer_frame": dict(sorted(outer.items(), key=lambda kv: -kv[1])),
                    "longest": sorted(stalls, key=lambda st: -st["ms"])[:5]}
    return out


async def _until_up(admin: admin_pb2_grpc.AdminStub, auth: tuple[tuple[str, str], ...], proc: psutil.Process,
                    log: Path) -> None:
    for _ in range(300):
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            raise RuntimeError(f"the controller exited: {log.read_text()[-2000:] if log.exists() else ''}")
        with contextlib.suppress(grpc.aio.AioRpcError):
            await admin.Status(admin_pb2.StatusRequest(), metadata=auth, timeout=1.0)
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("the controller did not answer within 30 s")


class _ListingSlurm:
    """A Slurm that lists the given jobs at no cost, and is never asked to submit or cancel (min = max)."""

    def __init__(self, jobs: list[SlurmJob]) -> None:
        self._jobs = jobs

    async def submit(self, model: Any, job_name: str, comment: str) -> str:
        raise AssertionError("the bench's autoscaler holds min = max replicas: it submits nothing")

    async def jobs(self, names: Any = ()) -> list[SlurmJob]:
        return self._jobs

    async def cancel(self, job_id: str) -> None:
        raise AssertionError("the bench's autoscaler holds min = max replicas: it cancels nothing")


def autoscaler_step_ms(nodes: int, steps: int = 3) -> float:
    """CPU ms of one Autoscaler.step() over N x 8 replicas that are all its READY jobs (median of `steps`)."""
    per_model = nodes * ENGINES // MODELS
    config = parse({"models": [{"name": f"m{i}", "source": "/bench", "min_replicas": per_model,
                                "max_replicas": per_model} for i in range(MODELS)]})
    now = time.time()
    registry = Registry(agent_timeout_s=60.0)
    for node in range(nodes):
        registry.report(agent_report(node))
    jobs = [SlurmJob(job_id=r.job_id, name=f"slinfer-{r.model}", comment=f"{COMMENT_MARK} model={r.model}",
                     state="RUNNING", node=r.node, submit_time=now - 600, start_time=now - 590,
                     end_time=now + 86400, nodes=r.node) for r in registry.replicas()]
    scaler = Autoscaler(config.models, registry, lambda _m: Demand(in_flight=10, queued=0), _ListingSlurm(jobs),
                        settle_s=0.0)
    times = []

    async def go() -> None:
        for _ in range(steps + 1):
            started = time.process_time()
            await scaler.step()
            times.append(time.process_time() - started)

    asyncio.run(go())
    return 1e3 * statistics.median(times[1:])  # the first step adopts every job (logged once each)


def exponent(xs: list[float], ys: list[float]) -> float:
    """The least-squares slope of log(y) against log(x): 1 grows linearly, 2 quadratically, 0 not at all."""
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pairs) < 2:
        return float("nan")
    mx = statistics.mean(p[0] for p in pairs)
    my = statistics.mean(p[1] for p in pairs)
    var = sum((p[0] - mx) ** 2 for p in pairs)
    return sum((p[0] - mx) * (p[1] - my) for p in pairs) / var if var else float("nan")


FIGURES = (("cpu_per_report_us", "CPU per report (us)"), ("cores_at_1hz", "cores at 1 report/node/s"),
           ("rss_mb", "RSS (MB)"), ("autoscaler_step_ms", "autoscaler step (ms CPU)"),
           ("feed_bps", "feed B/s per watcher"), ("change_p99_ms", "change to all watchers p99 (ms)"),
           ("create_key_p99_ms", "admin CreateKey p99 (ms)"), ("status_p99_ms", "admin Status p99 (ms)"))
SWEEP_X = {"nodes": "nodes", "keys": "keys", "watchers": "watchers"}


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} MB"


def _pair(r: dict[str, Any], name: str) -> str:
    if f"{name}_p50_ms" not in r:  # rows measured before the two phases
        return "-"
    return f"{r[f'{name}_p50_ms']:.1f} / {r[f'{name}_p99_ms']:.1f} ms"


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| sweep | nodes | keys | watchers | reports/s | CPU/report | idle cores | cores at 1 Hz "
            "| RSS (steady / end) | autoscaler step | feed per watcher | change p50 / p99 "
            "| change p50 / p99 with Status | CreateKey p50 / p99 | Status p50 / p99 |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['sweep']} | {r['nodes']} | {r['keys']} | {r['watchers']} | {r['reports_per_s']:.0f} "
        f"| {r['cpu_per_report_us']:.0f} us | {r['idle_cores']:.3f} | {r['cores_at_1hz']:.2f} "
        f"| {r['rss_mb']:.0f} MB / {_mb(r.get('rss_end_mb'))} "
        f"| {r['autoscaler_step_ms']:.1f} ms | {r['feed_bps']:.0f} B/s "
        f"| {r['change_p50_ms']:.1f} / {r['change_p99_ms']:.1f} ms "
        f"| {_pair(r, 'change_with_status')} "
        f"| {r['create_key_p50_ms']:.1f} / {r['create_key_p99_ms']:.1f} ms "
        f"| {r['status_p50_ms']:.1f} / {r['status_p99_ms']:.1f} ms |\n" for r in rows)


def exponents(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for sweep, x in SWEEP_X.items():
        sel = [r for r in rows if r["sweep"] == sweep]
        if len(sel) >= 2:
            out[sweep] = {k: exponent([r[x] for r in sel], [r[k] for r in sel]) for k, _ in FIGURES}
    return out


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    from bench import plots  # matplotlib (Agg) as the other figures use it
    plt = plots.plt
    sweeps = [s for s in SWEEP_X if sum(r["sweep"] == s for r in rows) >= 2]
    if not sweeps:
        return
    fig, axes = plt.subplots(len(FIGURES), len(sweeps), figsize=(4 * len(sweeps), 2.2 * len(FIGURES)),
                             squeeze=False)
    for j, sweep in enumerate(sweeps):
        sel = [r for r in rows if r["sweep"] == sweep]
        x = [r[SWEEP_X[sweep]] for r in sel]
        for i, (key, label) in enumerate(FIGURES):
            ax = axes[i][j]
            y = [max(r[key], 1e-3) for r in sel]
            ax.loglog(x, y, "o-")
            ax.set_ylim(min(y) / 3, max(y) * 3)  # a flat figure looks flat, not magnified noise
            ax.yaxis.set_minor_formatter(plots.matplotlib.ticker.NullFormatter())
            ax.set_xlabel(sweep)
            ax.set_ylabel(label, fontsize=7)
            ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=plots.DPI, bbox_inches="tight")
    plt.close(fig)


def goals(rows: list[dict[str, Any]], exps: dict[str, dict[str, float]]) -> list[str]:
    lines = []
    node_rows = [r for r in rows if r["sweep"] in ("nodes", "corner")]
    if node_rows:
        per = statistics.median(r["cpu_per_report_us"] for r in node_rows if r["nodes"] >= 100) \
            if any(r["nodes"] >= 100 for r in node_rows) else node_rows[-1]["cpu_per_report_us"]
        idle = max(r["idle_cores"] for r in node_rows)
        cores = per * 1e-6 * 2000 + idle
        lines.append(f"2,000 nodes at 1 report/s: {per:.0f} us x 2000 + {idle:.3f} idle = {cores:.2f} cores "
                     f"(goal <= {GOAL_CORES_2000}): {'met' if cores <= GOAL_CORES_2000 else 'NOT met'}")
    w32 = [r for r in rows if r["watchers"] >= 32]
    if w32:
        worst = max(r["change_p99_ms"] for r in w32)
        lines.append(f"change to 32 watchers p99 {worst:.1f} ms (goal <= {GOAL_CHANGE_P99_MS:.0f}): "
                     f"{'met' if worst <= GOAL_CHANGE_P99_MS else 'NOT met'}")
        both = [r["change_with_status_p99_ms"] for r in w32 if "change_with_status_p99_ms" in r]
        if both:
            lines.append(f"the same with a Status call (the whole cluster) after each change: p99 {max(both):.1f} ms")
    k100 = [r for r in rows if r["keys"] >= 100000]
    if k100:
        worst = max(r["feed_bps"] for r in k100)
        lines.append(f"steady feed at 100,000 keys {worst:.0f} B/s per watcher (goal <= {GOAL_FEED_BPS:.0f}): "
                     f"{'met' if worst <= GOAL_FEED_BPS else 'NOT met'}")
    corner = [r for r in rows if r["sweep"] == "corner"]
    if corner:
        rss = corner[0]["rss_mb"]
        lines.append(f"RSS at 5,000 nodes and 100,000 keys {rss:.0f} MB (goal <= {GOAL_RSS_MB:.0f}): "
                     f"{'met' if rss <= GOAL_RSS_MB else 'NOT met'}")
    worst_exp = [(e, s, k) for s, d in exps.items() for k, e in d.items() if not math.isnan(e)]
    if worst_exp:
        e, s, k = max(worst_exp)
        lines.append(f"largest growth exponent {e:.2f} ({k} against {s}; goal <= 1, a measured figure near 0 "
                     "is noise-dominated)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer points: 10 and 100 nodes, 1,000 keys, 1 and 8 "
                        "watchers")
    parser.add_argument("--seconds", type=float, default=4.0, help="the reporting window of each point")
    parser.add_argument("--changes", type=int, default=30, help="changes timed per point (p99 over them)")
    parser.add_argument("--interval", type=float, default=1.0, help="each agent's report interval (s)")
    parser.add_argument("--min-rate", type=float, default=500.0, help="reports/s at least: fewer nodes than "
                        "this report more often than --interval, so the CPU per report has enough reports")
    parser.add_argument("--max-rate", type=float, default=1500.0, help="reports/s at most: more nodes than this "
                        "report less often than --interval (0: no cap)")
    parser.add_argument("--only", choices=("nodes", "keys", "watchers", "corner"), nargs="+", default=None,
                        help="run only these sweeps' points")
    parser.add_argument("--heap", default="", help="append the controller's heap count (what the feed holds, "
                        "malloc's totals) at the RSS reading to this file")
    parser.add_argument("--no-stalls", action="store_true", help="no event-loop stall probe in the controller")
    parser.add_argument("--stall-ms", type=float, default=50.0, help="a loop lag over this is a stall (--stalls)")
    parser.add_argument("--slurm-standin", action="store_true", help="the controller's own autoscaler steps over "
                        "every engine's job (N x 8), listed at no cost, while everything is measured")
    parser.add_argument("--out", type=Path, default=None, help="a folder for results.json, table.md and the plot")
    args = parser.parse_args()
    global HEAP_OUT, STALLS, SLURM_STANDIN
    HEAP_OUT = str(Path(args.heap).resolve()) if args.heap else ""
    STALLS, SLURM_STANDIN = not args.no_stalls, args.slurm_standin
    os.environ["SLINFER_BENCH_STALL_MS"] = str(args.stall_ms)
    rows = []
    for p in points(args.quick):
        if args.only and p.sweep not in args.only:
            continue
        r = asyncio.run(run_point(p, args.seconds, args.changes, args.interval, args.min_rate,
                                   max_rate=args.max_rate))
        r["autoscaler_step_ms"] = autoscaler_step_ms(p.nodes)
        rows.append(r)
        print(table([r]).splitlines()[-1], flush=True)
    write(rows, args.out)


def write(rows: list[dict[str, Any]], out: Path | None) -> None:
    """Prints the table, the exponents and the goals; with `out`, writes results.json, table.md and the plot."""
    exps = exponents(rows)
    text = table(rows) + "\nGrowth exponents (log-log slope against the sweep's variable):\n\n"
    text += "| figure | " + " | ".join(exps) + " |\n|---|" + "---|" * len(exps) + "\n"
    text += "".join(f"| {label} | " + " | ".join(f"{exps[s][k]:.2f}" for s in exps) + " |\n"
                    for k, label in FIGURES)
    text += "\n" + "\n".join(f"- {line}" for line in goals(rows, exps)) + "\n"
    print("\n" + text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"rows": rows, "exponents": exps}, indent=1))
        (out / "table.md").write_text(text)
        plot(rows, out / "control_plane_scale.png")
        print(f"wrote {out}/results.json, table.md, control_plane_scale.png")


if __name__ == "__main__":
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    main()
