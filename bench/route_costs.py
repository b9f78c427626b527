"""What each route costs through the gateway against the same real vLLM engine reached directly, in one run.

For every route of the gateway's route table that the tiny model serves (chat, completions and responses,
plain and streamed; tokenize; detokenize), it loads the engine directly, then through a real
`slinfer-controller` (its gateway in front of the engine, which is registered the way a node agent does), with
the same body, concurrency and duration, and prints p50 latency and throughput both ways and their ratios
(gateway / direct). The baseline is measured in the same run on the same engine, so the ratios hold on a busy
machine too. By default it starts its own vLLM engine on the tiny model (about 3 GB, 35 s or more);
`--engine-url URL` (its key in `$ENGINE_API_KEY`, never in argv) measures an engine that already runs (its
served name in `--model`).

    .venv/bin/python bench/route_costs.py [--concurrency 4] [--duration 5]
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
import urllib.error
import urllib.request
from pathlib import Path

import grpc

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gateway_overhead import (
    CLIENT_KEY,
    Result,
    _free_port,
    _heartbeat,
    _start,
    _stop,
    _wait_http,
    load,
)
from slinfer.controller.routes import BY_PATH

ROOT = Path(__file__).resolve().parents[1]
# A generative engine serves no embeddings (vLLM answers its own error), so that route is not measured here.
SKIPPED = {"/v1/embeddings"}
# The engine has this long to load the model (vLLM on a busy 2-core machine takes minutes).
ENGINE_START_S = 600.0


def bodies(model: str, max_tokens: int, tokens: list[int]) -> list[tuple[str, str, bytes]]:
    """(label, route, body) of each measured case."""
    chat = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": max_tokens,
            "temperature": 0}
    completion = {"model": model, "prompt": "Say hello.", "max_tokens": max_tokens, "temperature": 0}
    response = {"model": model, "input": "Say hello.", "max_output_tokens": max_tokens, "temperature": 0}
    cases = [
        ("chat", "/v1/chat/completions", chat),
        ("chat stream", "/v1/chat/completions", {**chat, "stream": True}),
        ("completions", "/v1/completions", completion),
        ("completions stream", "/v1/completions", {**completion, "stream": True}),
        ("responses", "/v1/responses", response),
        ("responses stream", "/v1/responses", {**response, "stream": True}),
        ("tokenize", "/tokenize", {"model": model, "prompt": "Slurm schedules GPUs for inference."}),
        ("detokenize", "/detokenize", {"model": model, "tokens": tokens}),
    ]
    assert {route for _, route, _ in cases} == set(BY_PATH) - SKIPPED, "a route of the table is not measured"
    return [(label, route, json.dumps(body).encode()) for label, route, body in cases]


def _post(url: str, key: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


async def _wait_healthy(url: str, proc: asyncio.subprocess.Process, log: Path) -> None:
    deadline = time.monotonic() + ENGINE_START_S
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"the engine exited with {proc.returncode}: {log.read_text()[-3000:]}")
        if await asyncio.to_thread(_healthy, url):
            return
        await asyncio.sleep(1.0)
    raise RuntimeError(f"the engine at {url} was not healthy within {ENGINE_START_S:.0f} s")


async def bench(args: argparse.Namespace) -> None:
    procs: list[tuple[asyncio.subprocess.Process, Path]] = []
    tasks: list[asyncio.Task[None]] = []
    with tempfile.TemporaryDirectory(prefix="slinfer-routes-") as tmp:
        try:
            if args.engine_url:
                engine_url = args.engine_url.rstrip("/").removesuffix("/v1")
                engine_key = os.environ.get("ENGINE_API_KEY", "")
            else:
                port = _free_port()
                engine_url, engine_key = f"http://127.0.0.1:{port}", "bench-engine-key"
                log = Path(tmp) / "engine.log"
                # The key travels in the environment, never in argv (vLLM reads VLLM_API_KEY).
                env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_API_KEY": engine_key,
                       "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
                with log.open("wb") as out:
                    proc = await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model_dir,
                        "--served-model-name", args.model, "--host", "127.0.0.1", "--port", str(port),
                        "--max-model-len", "512", "--dtype", "float32", "--enforce-eager", env=env, stdout=out,
                        stderr=out)
                procs.append((proc, log))
                began = time.monotonic()
                await _wait_healthy(engine_url, proc, log)
                print(f"engine ready after {time.monotonic() - began:.0f} s", flush=True)
            grpc_port, http_port = _free_port(), _free_port()
            config = Path(tmp) / "slinfer.toml"
            config.write_text(
                f'[controller]\nlisten = "127.0.0.1:{grpc_port}"\nstate_dir = "{tmp}/state"\n'
                # Loopback only, and the heartbeat sends no token: the gateway's cost is measured, not auth.
                "insecure = true\n"
                f'slurm_bin_dir = "{tmp}/no-slurm"\nlog_level = "warning"\n\n'
                f'[gateway]\nlisten = "127.0.0.1:{http_port}"\napi_keys = ["{CLIENT_KEY}"]\n'
                f"max_outstanding_per_engine = 100000\nqueue_size = 100000\n\n"
                f'[[models]]\nname = "{args.model}"\nsource = "/bench"\n')
            gateway_log = Path(tmp) / "gateway.log"
            gateway = await _start(gateway_log, sys.executable, str(ROOT / "bench" / "gateway_overhead.py"),
                                   "--serve-gateway", str(config))
            procs.append((gateway, gateway_log))
            gateway_url = f"http://127.0.0.1:{http_port}"
            await _wait_http(gateway_url, gateway, gateway_log)
            tasks.append(asyncio.create_task(_heartbeat(f"127.0.0.1:{grpc_port}", args.model, engine_url,
                                                        engine_key)))
            await asyncio.sleep(1.5)
            probe = json.dumps({"model": args.model, "prompt": "Slurm and GPUs"}).encode()
            status, raw = await asyncio.to_thread(_post, f"{engine_url}/tokenize", engine_key, probe)
            if status != 200:
                raise RuntimeError(f"the engine's /tokenize answered {status}: {raw[:300]!r}")
            cases = bodies(args.model, args.max_tokens, json.loads(raw)["tokens"])
            for label, route, body in cases:  # each case works both ways before it is timed
                for url, key in ((engine_url, engine_key), (gateway_url, CLIENT_KEY)):
                    status, raw = await asyncio.to_thread(_post, url + route, key, body)
                    if status != 200:
                        raise RuntimeError(f"{label}: {url}{route} answered {status}: {raw[:300]!r}")
            print(f"engine: real vLLM, model {args.model}, {engine_url}; {os.cpu_count()} CPUs, load average "
                  f"{os.getloadavg()[0]:.2f}; concurrency {args.concurrency}; {args.rounds} rounds of "
                  f"{args.duration:.0f} s per route and path (each after {args.warmup:.0f} s warm-up), alternating "
                  f"which goes first; max_tokens={args.max_tokens}", flush=True)
            header = (f"{'route':<19} | {'direct p50':>10} {'req/s':>7} | {'gateway p50':>11} {'req/s':>7} | "
                      f"{'p50 ratio':>9} {'req/s ratio':>11} {'added p50':>9} | {'errors':>6}")
            print(header)
            print("-" * len(header))
            for label, route, body in cases:
                # Rounds alternate which path goes first, so a load spike from elsewhere hits both alike.
                direct, via = Result([], 0, 0.0), Result([], 0, 0.0)
                for n in range(args.rounds):
                    paths = [(direct, engine_url, engine_key), (via, gateway_url, CLIENT_KEY)]
                    for total, url, key in paths if n % 2 == 0 else paths[::-1]:
                        got = await load(url, key, body, args.concurrency, args.duration, args.warmup, route)
                        total.latencies.extend(got.latencies)
                        total.errors += got.errors
                        total.elapsed += got.elapsed
                ms = 1000.0
                p50_ratio = via.pct(.5) / direct.pct(.5) if direct.latencies else float("nan")
                rate_ratio = via.throughput / direct.throughput if direct.throughput else float("nan")
                print(f"{label:<19} | {direct.pct(.5) * ms:>8.2f}ms {direct.throughput:>7.1f} | "
                      f"{via.pct(.5) * ms:>9.2f}ms {via.throughput:>7.1f} | {p50_ratio:>9.3f} {rate_ratio:>11.3f} "
                      f"{(via.pct(.5) - direct.pct(.5)) * ms:>7.2f}ms | {direct.errors + via.errors:>6}", flush=True)
            print("Ratios are gateway / direct on the same engine in this run: p50 ratio above 1 and req/s ratio "
                  "below 1 are the gateway's cost; streamed routes are timed to the stream's end.")
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await task
            for proc, log in procs:
                if proc.returncode is not None:
                    print(f"{log.name}: exited with {proc.returncode}:\n{log.read_text()[-3000:]}", file=sys.stderr)
            for proc, _ in reversed(procs):
                await _stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=4, help="closed-loop users per route and path")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per route and path")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per route, alternating which path goes first")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--engine-url", default="", help="an engine that runs (http://HOST:PORT); default: start one")
    parser.add_argument("--model", default="tiny", help="the engine's served model name")
    parser.add_argument("--model-dir", default=str(Path(sys.prefix) / "share" / "slinfer" / "models" / "tiny"),
                        help="the model folder an engine started here serves")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
