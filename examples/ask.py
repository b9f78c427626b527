"""Asks a model a question with the official openai client and streams the answer to the terminal.

Inside an `sbatch --inference=MODEL` job it asks the job's own engine (the SPANK plugin set OPENAI_BASE_URL,
OPENAI_API_KEY and SLINFER_MODEL in the job's environment). Elsewhere it asks slinfer's gateway at
SLINFER_GATEWAY_URL with SLINFER_API_KEY (`eval "$(slinfer dev-cluster env)"` sets both) for `smollm2`, or
SLINFER_MODEL; with no engine up yet, the gateway holds the request while the controller's Slurm job starts one
(scale from zero), and this script shows the job's and the engine's state from the controller while it waits.
"""

import os
import sys
import threading
import time

from openai import OpenAI

from slinfer.cli import admin as admin_cli
from slinfer.cli import readiness

in_job = bool(os.environ.get("SLINFER_STATUS_FILE"))
if in_job:
    client, where = OpenAI(timeout=600), "this job's engine"
else:
    client = OpenAI(base_url=os.environ["SLINFER_GATEWAY_URL"], api_key=os.environ["SLINFER_API_KEY"], timeout=900)
    where = "the gateway"
model = os.environ.get("SLINFER_MODEL", "smollm2")
prompt = " ".join(sys.argv[1:]) or "What is the capital of France? Answer in one sentence."
first_token = threading.Event()


def show_progress() -> None:
    """Until the first token, the controller's view of the model's Slurm job and engine, once a second."""
    progress = readiness.Progress()
    while not first_token.wait(1.0):
        try:
            job, engine = readiness.pool_states(admin_cli.fetch_status(), model)
        except RuntimeError as exc:  # the controller is unreachable: say so, keep waiting for the gateway
            job, engine = "?", f"? ({exc})"
        if not first_token.is_set():
            progress.update(job, engine)
    progress.done("first token")


began = time.monotonic()
watcher = threading.Thread(target=show_progress, daemon=True)
if not in_job:
    watcher.start()
stream = client.chat.completions.create(model=model, max_tokens=200, temperature=0, stream=True,
                                        stream_options={"include_usage": True},
                                        messages=[{"role": "user", "content": prompt}])
usage = None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        if not first_token.is_set():
            first_token.set()
            if watcher.is_alive():
                watcher.join(timeout=5)  # let it finish its line before the answer starts
            print(f"{model} ({where}): ", end="", flush=True)
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.usage:
        usage = chunk.usage
first_token.set()
print(f"\n[{time.monotonic() - began:.1f}s", end="")
print(f"; {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens]" if usage else "]")
