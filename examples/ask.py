"""Asks slinfer's gateway for a chat completion with the official openai client.

Uses SLINFER_GATEWAY_URL and SLINFER_API_KEY (`eval "$(slinfer dev-cluster env)"` sets both). With no engine
up yet, the gateway holds the request while the controller's Slurm job starts one (scale from zero).
"""

import os
import sys
import time

from openai import OpenAI

client = OpenAI(base_url=os.environ["SLINFER_GATEWAY_URL"], api_key=os.environ["SLINFER_API_KEY"], timeout=600)
prompt = " ".join(sys.argv[1:]) or "Hello!"
began = time.monotonic()
reply = client.chat.completions.create(model=os.environ.get("SLINFER_MODEL", "tiny"), max_tokens=16,
                                       messages=[{"role": "user", "content": prompt}])
print(f"model {reply.model} answered in {time.monotonic() - began:.1f}s: {reply.choices[0].message.content!r}")
print(f"usage: {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens")
