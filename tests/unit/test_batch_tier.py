"""The Batch API across a real controller (controller/main.py's serve) and a gateway tier worker: a file
uploaded and a batch created through the tier are the controller's gateway's too (the spool, not a process's
memory, holds them), and the controller's scheduler submits the batch (here to an `sbatch` that refuses it,
whose words the batch's errors carry)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from pathlib import Path

import aiohttp
import openai

from slinfer.backoff import BackoffPolicy
from slinfer.config import load
from slinfer.controller import main as controller_main
from slinfer.controller.gateway_main import serve_worker

REFUSAL = "sbatch: error: Batch job submission failed: Invalid qos specification"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_batch_made_through_the_tier_is_the_controllers_and_its_scheduler_submits_it(tmp_path: Path,
                                                                                          monkeypatch) -> None:
    monkeypatch.setattr(controller_main, "AGENT_RECONNECT", BackoffPolicy(0.05, 0.05))
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f"#!/bin/sh\ncat > {tmp_path}/script\necho \"$@\" > {tmp_path}/argv\necho '{REFUSAL}' >&2\n"
                      "exit 1\n")
    sbatch.chmod(0o755)
    grpc_port, http_port, tier_port = _free_port(), _free_port(), _free_port()
    config_path = tmp_path / "slinfer.toml"
    config_path.write_text(f"""
[controller]
listen = "127.0.0.1:{grpc_port}"
address = "127.0.0.1:{grpc_port}"
state_dir = "{tmp_path / 'state'}"
token = "t"
slurm_bin_dir = "{bin_dir}"
heartbeat_s = 0.05

[gateway]
listen = "127.0.0.1:{http_port}"
api_keys = ["batch-key"]

[batch]
qos = "nope"

[[models]]
name = "m"
source = "/models/m"
""")
    config = load(str(config_path))
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}

    async def scenario() -> tuple[str, str, str]:
        stop_controller, stop_tier = asyncio.Event(), asyncio.Event()
        up = asyncio.Event()
        controller = asyncio.create_task(controller_main.serve(config, stop_controller,
                                                               on_ready=lambda _g, _h: up.set()))
        await asyncio.wait_for(up.wait(), 30)
        tier = asyncio.create_task(serve_worker(config, f"127.0.0.1:{tier_port}", "batch-tier", stop_tier,
                                                reuse_port=False))
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(300):
                    with contextlib.suppress(aiohttp.ClientConnectionError):
                        async with http.get(f"http://127.0.0.1:{tier_port}/healthz") as resp:
                            if (await resp.json()).get("controller") == "connected":
                                break
                    await asyncio.sleep(0.05)
            via_tier = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{tier_port}/v1", api_key="batch-key",
                                          max_retries=0)
            direct = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="batch-key",
                                        max_retries=0)
            f = await via_tier.files.create(file=("in.jsonl", json.dumps(line).encode() + b"\n"), purpose="batch")
            assert (await direct.files.retrieve(f.id)).bytes == f.bytes
            batch = await via_tier.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                  completion_window="1h")
            for _ in range(100):
                seen = await direct.batches.retrieve(batch.id)
                if seen.status == "failed":
                    break
                await asyncio.sleep(0.1)
            from_tier = await via_tier.batches.retrieve(batch.id)
            # Closed before the stop: a draining gateway waits for its clients' kept-alive connections.
            await via_tier.close()
            await direct.close()
            return seen.status, from_tier.errors.data[0].message if from_tier.errors else "", batch.id
        finally:
            stop_tier.set()
            await asyncio.wait_for(tier, 40)
            stop_controller.set()
            await asyncio.wait_for(controller, 40)

    status, message, batch_id = asyncio.run(scenario())
    assert status == "failed" and REFUSAL in message
    argv = (tmp_path / "argv").read_text().split()
    assert {"--inference=m", "--requeue", "--qos=nope"} <= set(argv)
    spool = tmp_path / "state" / "batch"
    assert (tmp_path / "script").read_text().endswith(f"-m slinfer.batchrun --dir {spool}/batches/{batch_id}\n")
