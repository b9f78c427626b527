"""The start benchmarks' baseline: one model's engine started bare, with no Slurm and no agent.

Responsible for: running the engine command the agent would run for a catalog model of the bed's config (its
template, engine_args and engine_env; one GPU, a free loopback port), timing it to /health and to a first chat
answer, and stopping its whole process group. Not responsible for: the slinfer side of a comparison (each
benchmark times its own), bringing the bed up, or anything with more than one GPU.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

from slinfer import config as slinfer_config
from slinfer.agent.launch import engine_command
from slinfer.dev import devcluster


def bare_start(bed: devcluster.Bed, model_name: str, timeout_s: float,
               log_path: str = os.devnull) -> tuple[float, float]:
    """Seconds from the bare engine's start to its /health answering, and to its first chat answer; the
    engine's output goes to `log_path`."""
    cfg = slinfer_config.load(bed.config)
    model = next(m for m in cfg.models if m.name == model_name)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = engine_command(cfg, model, "127.0.0.1", port, 1, "bare")
    env = {**os.environ, **cfg.agent.engine_env, **model.engine_env, "CUDA_VISIBLE_DEVICES": "0"}
    began = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        ready = 0.0
        while time.monotonic() - began < timeout_s:
            try:
                if not ready:
                    with urllib.request.urlopen(f"{base}/health", timeout=2) as reply:
                        if reply.status == 200:
                            ready = time.monotonic() - began
                body = json.dumps({"model": model.name, "max_tokens": 4, "temperature": 0,
                                   "messages": [{"role": "user", "content": "hello"}]}).encode()
                request = urllib.request.Request(f"{base}/v1/chat/completions", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as reply:
                    if json.loads(reply.read())["usage"]["completion_tokens"] > 0:
                        return ready, time.monotonic() - began
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"bare vLLM exited with {proc.returncode}") from None
            time.sleep(0.2)
        raise RuntimeError(f"bare vLLM not ready within {timeout_s:.0f} s")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
