"""Asks for a chat completion with the official openai client.

Inside an `sbatch --inference=MODEL` job it asks the job's own engine (the SPANK plugin set OPENAI_BASE_URL,
OPENAI_API_KEY and SLINFER_MODEL in the job's environment). Elsewhere it asks slinfer's gateway at
SLINFER_GATEWAY_URL with SLINFER_API_KEY (`eval "$(slinfer dev-cluster env)"` sets both); with no engine up
yet, the gateway holds the request while the controller's Slurm job starts one (scale from zero).
"""

import os
import sys
import time

from openai import OpenAI

if os.environ.get("SLINFER_STATUS_FILE"):
    client, where = OpenAI(timeout=600), "this job's engine"
else:
    client = OpenAI(base_url=os.environ["SLINFER_GATEWAY_URL"], api_key=os.environ["SLINFER_API_KEY"], timeout=600)
    where = "the gateway"
prompt = " ".join(sys.argv[1:]) or "Hello!"
began = time.monotonic()
reply = client.chat.completions.create(model=os.environ.get("SLINFER_MODEL", "tiny"), max_tokens=16,
                                       messages=[{"role": "user", "content": prompt}])
print(f"model {reply.model} ({where}) answered in {time.monotonic() - began:.1f}s: "
      f"{reply.choices[0].message.content!r}")
print(f"usage: {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens")
