"""The real model served by slinfer beside the same model on a bare vLLM, measured in the same run.

Responsible for: on a running dev-cluster bed, the time from `slinfer scale smollm2 1` until the gateway routes
to the replica (sbatch, prolog, agent, engine start), and completion tokens/s through the gateway at 1 and 32
concurrent streams; then, with that replica gone, the same model started bare (`python -m
vllm.entrypoints.openai.api_server` with the bed's engine arguments and environment): its time to `/health` and
its tokens/s at the same concurrencies, asked directly. Prints both and their ratios (slinfer / bare).
Not responsible for: bringing the bed up (`slinfer dev-cluster up --state-dir DIR --port-base N`) or deciding
anything; it is a benchmark that prints figures, not a test.

    .venv/bin/python bench/smollm2_serving.py --state-dir /tmp/bench-bed --port-base 12000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai

from slinfer import config as configmod
from slinfer.dev import devcluster

MODEL = "smollm2"
PROMPT = [{"role": "user", "content": "Write a long story about a cluster of computers."}]
# Streams long enough that start-up and the first token weigh little against decoding.
MAX_TOKENS = 128


async def tokens_per_s(base_url: str, api_key: str, streams: int) -> tuple[float, int]:
    """(completion tokens/s, tokens) of `streams` concurrent streams, each running to MAX_TOKENS."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=900, max_retries=0)

    async def one() -> int:
        stream = await client.chat.completions.create(
            model=MODEL, messages=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        used = 0
        async for chunk in stream:
            if chunk.usage:
                used = chunk.usage.completion_tokens
        return used

    began = time.perf_counter()
    counts = await asyncio.gather(*(one() for _ in range(streams)))
    elapsed = time.perf_counter() - began
    await client.close()
    return sum(counts) / elapsed, sum(counts)


def _slinfer(bed: devcluster.Bed, *args: str) -> None:
    subprocess.run([str(Path(sys.executable).parent / "slinfer"), *args], env={**os.environ, **bed.env()},
                   check=True, capture_output=True, timeout=30)


def _ready_replicas(bed: devcluster.Bed) -> int:
    request = urllib.request.Request(f"{bed.gateway_url}/models",
                                     headers={"Authorization": f"Bearer {devcluster.DEV_API_KEY}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        models = json.load(response)["data"]
    return int(next(m for m in models if m["id"] == MODEL).get("ready_replicas", 0))


def _wait(what: str, predicate: object, timeout: float) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - began
        time.sleep(0.25)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def measure_slinfer(bed: devcluster.Bed, levels: list[int]) -> tuple[float, dict[int, float]]:
    _slinfer(bed, "scale", MODEL, "1")
    began = time.monotonic()
    try:
        ready = _wait("a routable smollm2 replica", lambda: _ready_replicas(bed) == 1, 900)
        print(f"slinfer: routable {ready:.1f}s after `slinfer scale {MODEL} 1` (began {began:.0f})", flush=True)
        rates = {}
        for n in levels:
            rates[n], total = asyncio.run(tokens_per_s(bed.gateway_url, devcluster.DEV_API_KEY, n))
            print(f"slinfer: {n} streams: {rates[n]:.1f} tokens/s ({total} tokens)", flush=True)
        return ready, rates
    finally:
        _slinfer(bed, "scale", MODEL, "0")
        _wait("the replica to end", lambda: _ready_replicas(bed) == 0, 120)
        time.sleep(5)  # its processes leave the CPUs before the bare run starts
        _slinfer(bed, "scale", MODEL, "auto")


def measure_bare(bed: devcluster.Bed, levels: list[int], port: int) -> tuple[float, dict[int, float]]:
    """The same model, arguments and engine environment as the bed's catalog, without Slurm or slinfer."""
    cfg = configmod.load(str(bed.config))
    model = cfg.model(MODEL)
    assert model is not None
    env = {**os.environ, **cfg.agent.engine_env, **model.engine_env}
    key = "bench-bare-key"
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model.source,
            "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), *model.engine_args]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        began = time.monotonic()
        # The key goes through the environment, never argv (vLLM reads VLLM_API_KEY).
        proc = subprocess.Popen(argv, env={**env, "VLLM_API_KEY": key}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            ready = _wait("the bare engine's /health", lambda: _healthy(url) or proc.poll() is not None, 900)
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"bare vLLM exited: {log.read()[-2000:].decode(errors='replace')}")
            print(f"bare: /health answers {ready:.1f}s after start (began {began:.0f})", flush=True)
            rates = {}
            for n in levels:
                rates[n], total = asyncio.run(tokens_per_s(f"{url}/v1", key, n))
                print(f"bare: {n} streams: {rates[n]:.1f} tokens/s ({total} tokens)", flush=True)
            return ready, rates
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, default=devcluster.DEFAULT_STATE_DIR)
    parser.add_argument("--port-base", type=int, default=16800)
    parser.add_argument("--levels", default="1,32", help="concurrent streams, comma-separated")
    parser.add_argument("--bare-port", type=int, default=0, help="the bare engine's port (default: port base+950)")
    args = parser.parse_args()
    bed = devcluster.Bed(args.state_dir.resolve(), args.port_base)
    levels = [int(n) for n in args.levels.split(",")]
    ours_ready, ours = measure_slinfer(bed, levels)
    bare_ready, bare = measure_bare(bed, levels, args.bare_port or args.port_base + 950)
    print(f"\n{MODEL}: {MAX_TOKENS}-token streams, temperature 0; same machine, same run, one engine at a time")
    print(f"{'':24}{'slinfer':>10}{'bare vLLM':>11}{'ratio':>8}")
    print(f"{'ready (s)':24}{ours_ready:10.1f}{bare_ready:11.1f}{ours_ready / bare_ready:8.2f}")
    for n in levels:
        print(f"{f'tokens/s, {n} streams':24}{ours[n]:10.1f}{bare[n]:11.1f}{ours[n] / bare[n]:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
