"""Soak: many concurrent streaming clients through the real gateway to the stand-in engine for minutes.

Starts `bench/standin_engine.py` and the real controller (`slinfer.controller.main.serve`, as
bench/gateway_overhead.py does, with its usage ledger and limits wired), registers the engine over a real
Registry stream, then runs `--clients` closed-loop streaming chat clients (one keep-alive connection each) for
`--duration` seconds. A request is ok when its answer is 200 and its stream ends with `data: [DONE]` and no
error event; anything else is a failure, counted by kind. No request may hang: each has `--request-timeout`.

Prints requests sent / ok / failed, the gateway's resident size and open file descriptors before the load,
every `--sample` seconds during it, and after it (clients gone), and exits 1 when a request failed, the
descriptors were not released, or the resident size grew by more than `--max-rss-growth-mib` from the first
sample under load to the last. It is a benchmark that prints figures, not a test.

    .venv/bin/python bench/soak.py [--duration 180] [--clients 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.gateway_overhead import CLIENT_KEY, BenchProcesses, response_span, run_fast


class _StreamConn(asyncio.Protocol):
    """One keep-alive connection; one request at a time; hands back (status, body) once the body is complete."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        span = response_span(self.buf, streaming=True)
        if span is None:
            return
        end, total = span
        status = int(self.buf[9:12])
        body = bytes(self.buf[end + 4:total])
        del self.buf[:total]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    async def request(self, payload: bytes, timeout_s: float) -> tuple[int, bytes]:
        self.waiter = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(payload)
        async with asyncio.timeout(timeout_s):
            return await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Tally:
    def __init__(self) -> None:
        self.sent = 0
        self.ok = 0
        self.failed: Counter[str] = Counter()

    def judge(self, status: int, body: bytes) -> None:
        if status != 200:
            self.failed[f"status {status}"] += 1
        elif b'"error"' in body:
            self.failed["error event in stream"] += 1
        elif b"data: [DONE]" not in body:
            self.failed["stream without [DONE]"] += 1
        else:
            self.ok += 1


async def load(host: str, port: int, payload: bytes, clients: int, duration: float, timeout_s: float,
               tally: Tally) -> None:
    loop = asyncio.get_running_loop()
    stop_at = time.monotonic() + duration

    async def client() -> None:
        conn: _StreamConn | None = None
        while time.monotonic() < stop_at:
            if conn is None or conn.lost:
                try:
                    _, conn = await loop.create_connection(_StreamConn, host, port)
                except OSError as exc:
                    tally.failed[f"connect: {type(exc).__name__}"] += 1
                    conn = None
                    await asyncio.sleep(0.5)
                    continue
            tally.sent += 1
            try:
                status, body = await conn.request(payload, timeout_s)
            except TimeoutError:
                tally.failed[f"no answer within {timeout_s:g} s"] += 1
                conn.close()
                conn = None
                continue
            except ConnectionError:
                tally.failed["connection lost"] += 1
                conn = None
                continue
            tally.judge(status, body)
        if conn is not None:
            conn.close()

    # Connections open gradually, as real clients arrive, rather than 1000 SYNs in one burst.
    tasks = []
    for _ in range(clients):
        tasks.append(asyncio.create_task(client()))
        await asyncio.sleep(0.002)
    await asyncio.gather(*tasks)


def _connections(proc: psutil.Process, gateway_port: int, engine_port: int) -> tuple[int, int]:
    """(open connections of clients to the gateway, connections of the gateway to the engine)."""
    clients = upstream = 0
    for c in proc.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN:
            continue
        if c.laddr and c.laddr.port == gateway_port:
            clients += 1
        elif c.raddr and c.raddr.port == engine_port:
            upstream += 1
    return clients, upstream


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


async def soak(args: argparse.Namespace) -> int:
    body = json.dumps({"model": args.model, "messages": [{"role": "user", "content": "Say hello."}],
                       "max_tokens": args.tokens, "stream": True}).encode()
    with tempfile.TemporaryDirectory(prefix="slinfer-soak-") as tmp:
        children = BenchProcesses(tmp)
        try:
            engine_key = "soak-engine-key"
            engine_url, engine_port, _ = await children.standin(
                args.model, engine_key, "--tokens", str(args.tokens), "--token-delay-ms", str(args.token_delay_ms))
            http_port, gateway = await children.gateway(args.model, "/soak", "uvloop", engine_url, engine_key)
            await asyncio.sleep(2.0)
            gw = psutil.Process(gateway.pid)
            before_rss, before_fds = gw.memory_info().rss, gw.num_fds()
            print(f"soak: {args.clients} concurrent streaming clients for {args.duration:.0f} s through the gateway "
                  f"to the stand-in engine ({args.tokens} chunks, {args.token_delay_ms:g} ms apart); "
                  f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
            print(f"before: gateway RSS {_mib(before_rss)}, open fds {before_fds}", flush=True)
            payload = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{http_port}\r\n"
                       f"Authorization: Bearer {CLIENT_KEY}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n").encode() + body
            tally = Tally()
            samples: list[tuple[float, int, int]] = []
            started = time.monotonic()

            async def sample() -> None:
                while True:
                    await asyncio.sleep(args.sample)
                    rss, fds = gw.memory_info().rss, gw.num_fds()
                    t = time.monotonic() - started
                    samples.append((t, rss, fds))
                    print(f"  t={t:5.0f} s  sent {tally.sent:>8}  ok {tally.ok:>8}  failed "
                          f"{sum(tally.failed.values()):>4}  gateway RSS {_mib(rss)}  fds {fds}", flush=True)

            sampler = asyncio.create_task(sample())
            await load("127.0.0.1", http_port, payload, args.clients, args.duration, args.request_timeout, tally)
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            elapsed = time.monotonic() - started
            await asyncio.sleep(5.0)  # the gateway notices closed connections and frees them
            after_rss, after_fds = gw.memory_info().rss, gw.num_fds()
            clients_left, upstream_idle = _connections(gw, http_port, engine_port)
            failed = sum(tally.failed.values())
            print(f"requests: sent {tally.sent}, ok {tally.ok}, failed {failed} "
                  f"({tally.ok / elapsed:.0f} ok/s over {elapsed:.0f} s)"
                  + (f"; failures: {dict(tally.failed)}" if failed else ""))
            peak_rss = max((s[1] for s in samples), default=after_rss)
            peak_fds = max((s[2] for s in samples), default=after_fds)
            print(f"gateway RSS: before {_mib(before_rss)}, peak under load {_mib(peak_rss)}, after "
                  f"{_mib(after_rss)}")
            print(f"gateway open fds: before {before_fds}, peak under load {peak_fds}, after {after_fds} "
                  f"({clients_left} client connections left, {upstream_idle} idle keep-alive connections to the "
                  f"engine, which the engine closes after its keep-alive timeout)")
            problems = []
            if failed or tally.ok == 0:
                problems.append(f"{failed} failed requests")
            if clients_left or after_fds - upstream_idle > before_fds + 2:
                problems.append(f"fds not released ({before_fds} -> {after_fds}, {clients_left} client "
                                f"connections, {upstream_idle} pooled to the engine)")
            if len(samples) >= 2:
                growth = samples[-1][1] - samples[0][1]
                print(f"gateway RSS under load: first sample {_mib(samples[0][1])} at t={samples[0][0]:.0f} s, "
                      f"last {_mib(samples[-1][1])} at t={samples[-1][0]:.0f} s ({growth / 2**20:+.1f} MiB)")
                if growth > args.max_rss_growth_mib * 2**20:
                    problems.append(f"RSS grew {_mib(growth)} under steady load")
            print("result: " + ("OK" if not problems else "FAILED: " + "; ".join(problems)), flush=True)
            return 1 if problems else 0
        finally:
            await children.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load (default 180)")
    parser.add_argument("--clients", type=int, default=1000, help="concurrent streaming clients (default 1000)")
    parser.add_argument("--tokens", type=int, default=16, help="chunks per stream")
    parser.add_argument("--token-delay-ms", type=float, default=20.0, help="the stand-in's pause between chunks")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="a request not done by then failed")
    parser.add_argument("--sample", type=float, default=15.0, help="seconds between RSS/fd samples")
    parser.add_argument("--max-rss-growth-mib", type=float, default=32.0,
                        help="resident growth under load, first to last sample, that fails the soak")
    parser.add_argument("--model", default="standin")
    args = parser.parse_args()
    sys.exit(run_fast(soak(args)))


if __name__ == "__main__":
    main()
