"""LoRA adapters on one vLLM engine of the tiny model (issue 33): what serving them costs.

Responsible for: measuring, on this machine's CPU vLLM, (1) the engine's start (to /health) without and with
--enable-lora; (2) the time to load an adapter at run time through /v1/load_lora_adapter; (3) throughput
(completion tokens per second) of the base model alone against a mixed load of the base and 4 adapters, on
the same LoRA engine in the same run; and checking that an adapter's temperature-0 answer differs from the
base's. It starts its engines itself (the argv the agent would run: agent/launch.py), with random adapters
(slinfer.dev.tinylora). Prints the figures; `--json` writes them too.
Not responsible for: the gateway's own cost (bench/gateway_overhead.py) or Slurm (the bed tests).
Run: `.venv/bin/python -m bench.adapters [--requests 48] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from slinfer.agent.launch import engine_command, lora_env
from slinfer.config import AdapterConfig, Config, ModelConfig
from slinfer.dev import devcluster, tinylora

# The bed's engine settings for the tiny model (slinfer/dev/templates/slinfer.toml.in), so figures compare.
ENGINE_ARGS = ["--max-model-len", "512", "--dtype", "float32", "--enforce-eager"]
ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1",
              "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1", "DO_NOT_TRACK": "1"}
# Adapters in the mixed load (the figure), and how many the engine starts with (the last is loaded live).
ADAPTERS = 4
# A start slower than this is a failure (two cores shared with other work can take a minute).
START_TIMEOUT_S = 300.0
PROMPT = "The quick brown fox"


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Engine:
    def __init__(self, model: ModelConfig, log: Path) -> None:
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = Config()
        argv = engine_command(config, model, "127.0.0.1", self.port, 1, "bench")
        argv[0] = str(devcluster.engine_python())
        env = {**os.environ, **ENGINE_ENV, **lora_env(model), "CUDA_VISIBLE_DEVICES": "0"}
        self.began = time.monotonic()
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    async def ready(self, session: aiohttp.ClientSession) -> float:
        while time.monotonic() - self.began < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}")
            try:
                async with session.get(f"{self.url}/health") as reply:
                    if reply.status == 200:
                        return time.monotonic() - self.began
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError(f"vLLM not ready within {START_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)


async def _complete(session: aiohttp.ClientSession, url: str, model: str, max_tokens: int) -> tuple[str, int]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    async with session.post(f"{url}/v1/completions", json=body) as reply:
        data = await reply.json()
        if reply.status != 200:
            raise RuntimeError(f"{model}: {reply.status} {data}")
    return data["choices"][0]["text"], int(data["usage"]["completion_tokens"])


async def _throughput(session: aiohttp.ClientSession, url: str, models: list[str], requests: int,
                      concurrency: int, max_tokens: int) -> float:
    """Completion tokens per second of `requests` requests, `concurrency` at a time, models taken in turn."""
    queue = list(range(requests))
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while queue:
            i = queue.pop()
            tokens += (await _complete(session, url, models[i % len(models)], max_tokens))[1]

    began = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tokens / (time.monotonic() - began)


async def run(requests: int, concurrency: int, max_tokens: int, workdir: Path) -> dict[str, float | bool]:
    tiny = devcluster.tiny_model_path()
    adapters = [AdapterConfig(f"a{i}", str(tinylora.generate(tiny, workdir / f"a{i}", seed=i + 1)))
                for i in range(ADAPTERS)]
    plain = ModelConfig(name="tiny", source=str(tiny), engine_args=ENGINE_ARGS)
    # The engine starts with all but the last adapter; the last is loaded at run time.
    lora = ModelConfig(name="tiny", source=str(tiny), engine_args=ENGINE_ARGS, adapters=adapters[:-1],
                       max_loras=ADAPTERS, max_lora_rank=tinylora.RANK)
    figures: dict[str, float | bool] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        engine = Engine(plain, workdir / "plain.log")
        try:
            figures["start_s_plain"] = await engine.ready(session)
            await _complete(session, engine.url, "tiny", 4)
        finally:
            engine.stop()
        engine = Engine(lora, workdir / "lora.log")
        try:
            figures["start_s_lora"] = await engine.ready(session)
            base_text, _ = await _complete(session, engine.url, "tiny", 8)
            last = adapters[-1]
            began = time.monotonic()
            async with session.post(f"{engine.url}/v1/load_lora_adapter",
                                    json={"lora_name": last.name, "lora_path": last.source}) as reply:
                if reply.status != 200:
                    raise RuntimeError(f"load: {reply.status} {await reply.text()}")
            figures["load_ms"] = (time.monotonic() - began) * 1000
            texts = [(await _complete(session, engine.url, a.name, 8))[0] for a in adapters]
            figures["adapters_differ_from_base"] = all(t != base_text for t in texts)
            await _throughput(session, engine.url, ["tiny"], concurrency, concurrency, max_tokens)  # warm-up
            figures["tok_s_base"] = await _throughput(session, engine.url, ["tiny"], requests, concurrency,
                                                      max_tokens)
            names = ["tiny"] + [a.name for a in adapters]
            figures["tok_s_mixed"] = await _throughput(session, engine.url, names, requests, concurrency,
                                                       max_tokens)
            figures["tok_s_base_again"] = await _throughput(session, engine.url, ["tiny"], requests, concurrency,
                                                            max_tokens)
        finally:
            engine.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="slinfer-bench-adapters-") as tmp:
        figures = asyncio.run(run(args.requests, args.concurrency, args.max_tokens, Path(tmp)))
    print(f"engine start to /health: {figures['start_s_plain']:.1f} s plain, "
          f"{figures['start_s_lora']:.1f} s with --enable-lora ({ADAPTERS - 1} adapters)")
    print(f"runtime load of one adapter (/v1/load_lora_adapter): {figures['load_ms']:.0f} ms")
    print(f"adapters' temperature-0 answers differ from the base's: {figures['adapters_differ_from_base']}")
    print(f"throughput, same LoRA engine, {args.requests} requests x {args.max_tokens} tokens, "
          f"{args.concurrency} at a time: base alone {figures['tok_s_base']:.1f} tok/s, base + {ADAPTERS} "
          f"adapters mixed {figures['tok_s_mixed']:.1f} tok/s ({figures['tok_s_mixed'] / figures['tok_s_base']:.2f}x), "
          f"base alone again {figures['tok_s_base_again']:.1f} tok/s")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
