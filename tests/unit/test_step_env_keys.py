"""The step environment's keys are written twice, in agent/jobfiles.py and spank/environ.c; they must agree."""

from __future__ import annotations

import re
from pathlib import Path

from slinfer.agent.jobfiles import ENV_KEYS

ENVIRON_C = Path(__file__).resolve().parents[2] / "spank" / "environ.c"


def test_agent_writes_exactly_the_keys_the_plugin_accepts() -> None:
    source = ENVIRON_C.read_text()
    table = re.search(r"accepted_keys\[\]\s*=\s*\{(.*?)\};", source, re.S)
    assert table is not None, "spank/environ.c no longer has accepted_keys[]"
    plugin_keys = re.findall(r'"([A-Z0-9_]+)"', table.group(1))
    assert plugin_keys, "accepted_keys[] is empty or unreadable"
    assert list(ENV_KEYS) == plugin_keys
