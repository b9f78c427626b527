"""Tokens/s of the same lines as a batch (the OpenAI Batch API: a Slurm job with its own engine, issue 31) and
through the online gateway, in one run; and the time from `create` to the first line done.

    SLINFER_API_KEY=... python bench/batch_throughput.py --url http://127.0.0.1:PORT/v1 \\
        --spool STATE/controller/batch [--lines 1000] [--max-tokens 64] [--concurrency 256] [--model tiny]

The per-line overhead: `--lines 10000 --max-tokens 1` (2.4 MB of lines, one job: the bed's [batch] has
max_file_bytes 4 MiB and lines_per_task 10,000).

Online: the lines as chat requests through the gateway, `--concurrency` in flight (after one warm-up request,
so a replica is up). Batch: the same lines uploaded and run as a batch; its tokens/s end to end (from create
to completed: Slurm, the engine's start, the answers) and while answering (the runner's own figure, read
from the batch's `finished` marker in the spool). Both use `ignore_eos`, so every line makes max_tokens.
With `--bare`, the same lines also go through vLLM's own offline runner (`vllm.entrypoints.openai.run_batch`,
its engine built from the site config's model: source, engine_args, [agent].engine_env and python), pinned to
one CPU as the batch job's cgroup is (`taskset -c --bare-cpu`); its figure is wall time, its engine's start
included (it cannot use a running engine).
Pin the model to one replica first (`slinfer scale MODEL 1`) on a bed with a GPU left for the batch's job,
so that both sides run one engine (the autoscaler would otherwise give the online side two).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import openai


def make_lines(n: int, model: str, max_tokens: int) -> list[dict[str, object]]:
    return [{"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
                      "messages": [{"role": "user", "content": f"Write about item {i}."}]}} for i in range(n)]


async def online(url: str, key: str, lines: list[dict[str, object]], concurrency: int) -> tuple[float, int, int]:
    """(seconds, completion tokens, failures) for the lines through the gateway."""
    headers = {"Authorization": f"Bearer {key}"}
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async with session.post(f"{url}/chat/completions", json=lines[0]["body"]) as warm:
            await warm.read()
        queue = list(reversed(lines))
        tokens = failures = 0

        async def worker() -> None:
            nonlocal tokens, failures
            while queue:
                line = queue.pop()
                async with session.post(f"{url}/chat/completions", json=line["body"]) as response:
                    body = await response.json(content_type=None)
                    if response.status == 200:
                        tokens += int(body["usage"]["completion_tokens"])
                    else:
                        failures += 1

        began = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(lines)))))
        return time.monotonic() - began, tokens, failures


def batch(url: str, key: str, spool: Path, lines: list[dict[str, object]]) -> dict[str, float]:
    client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)
    data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    f = client.files.create(file=("bench.jsonl", data), purpose="batch")
    began = time.monotonic()
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="2h")
    output = spool / "batches" / b.id / "output.jsonl"
    first = 0.0
    while True:
        if not first and output.exists() and output.stat().st_size:
            first = time.monotonic() - began
        got = client.batches.retrieve(b.id)
        if got.status in ("completed", "failed", "cancelled", "expired"):
            break
        time.sleep(0.2)
    total = time.monotonic() - began
    if got.status != "completed":
        raise SystemExit(f"batch {b.id} ended {got.status}: {got.errors}")
    tokens = sum(json.loads(x)["response"]["body"]["usage"]["completion_tokens"]
                 for x in client.files.content(got.output_file_id).content.splitlines())
    marker = json.loads((spool / "batches" / b.id / "finished").read_text())
    return {"first_s": first or total, "total_s": total, "tokens": tokens,
            "answer_s": marker["answer_ms"] / 1000, "engine_wait_s": marker["engine_wait_ms"] / 1000,
            "failed": got.request_counts.failed}


def bare(config_path: str, model: str, lines: list[dict[str, object]], cpu: int) -> dict[str, float]:
    """vLLM's run_batch on the lines: (wall seconds, completion tokens), its engine as the site config says."""
    from slinfer.config import load

    config = load(config_path)
    m = config.model(model)
    assert m is not None, f"{model} is not in {config_path}"
    with tempfile.TemporaryDirectory(prefix="bench-run-batch-") as tmp:
        src, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        src.write_bytes(b"".join(json.dumps(x).encode() + b"\n" for x in lines))
        argv = ["taskset", "-c", str(cpu), config.agent.python or sys.executable, "-m",
                "vllm.entrypoints.openai.run_batch", "-i", str(src), "-o", str(out), "--model", m.source,
                "--served-model-name", model, *m.engine_args]
        env = {**os.environ, **config.agent.engine_env}
        began = time.monotonic()
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=3600)
        wall = time.monotonic() - began
        if done.returncode != 0:
            raise SystemExit(f"run_batch failed ({done.returncode}): {done.stderr[-2000:]}")
        tokens = sum(json.loads(x)["response"]["body"]["usage"]["completion_tokens"]
                     for x in out.read_text().splitlines() if x.strip())
    return {"wall_s": wall, "tokens": tokens}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("SLINFER_GATEWAY_URL", ""))
    parser.add_argument("--spool", required=True, type=Path, help="[batch].spool (the runner's marker is read there)")
    parser.add_argument("--lines", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--bare", action="store_true", help="also vLLM's run_batch on the same lines")
    parser.add_argument("--bare-cpu", type=int, default=1, help="the CPU run_batch is pinned to")
    parser.add_argument("--config", default=os.environ.get("SLINFER_CONFIG", ""), help="the site config (--bare)")
    args = parser.parse_args()
    key = os.environ.get("SLINFER_API_KEY", "")
    if not args.url or not key:
        print("set SLINFER_GATEWAY_URL (or --url) and SLINFER_API_KEY", file=sys.stderr)
        return 2
    url = args.url.rstrip("/")
    lines = make_lines(args.lines, args.model, args.max_tokens)
    seconds, tokens, failures = asyncio.run(online(url, key, lines, args.concurrency))
    b = batch(url, key, args.spool, lines)
    print(f"{args.lines} lines x {args.max_tokens} tokens of {args.model}, {args.concurrency} in flight")
    print(f"online  : {tokens / seconds:8.0f} tokens/s ({tokens} tokens in {seconds:.2f} s, {failures} failed)")
    print(f"batch   : {b['tokens'] / b['answer_s']:8.0f} tokens/s while answering ({b['tokens']:.0f} tokens in "
          f"{b['answer_s']:.2f} s, {b['failed']:.0f} failed)")
    print(f"batch   : {b['tokens'] / b['total_s']:8.0f} tokens/s end to end (create -> completed {b['total_s']:.1f} s, "
          f"the job's engine start {b['engine_wait_s']:.1f} s)")
    print(f"create -> first line done: {b['first_s']:.1f} s")
    # Per line: what each line costs beyond its tokens, with max_tokens 1 (the figure the issue asks at 10,000).
    print(f"per line: {1000 * b['answer_s'] / args.lines:.2f} ms in the batch while answering, "
          f"{1000 * seconds / args.lines:.2f} ms online ({args.lines} lines, {args.concurrency} in flight)")
    if args.bare:
        r = bare(args.config, args.model, lines, args.bare_cpu)
        print(f"run_batch: {r['tokens'] / r['wall_s']:8.0f} tokens/s end to end ({r['tokens']:.0f} tokens in "
              f"{r['wall_s']:.1f} s, its engine's start included, on CPU {args.bare_cpu})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
