"""One agent per node: a second agent started beside a live one exits before touching anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from slinfer.agent.server import single_agent_lock


def test_a_second_agent_on_the_same_socket_exits_and_the_lock_frees_when_the_first_ends(tmp_path: Path) -> None:
    socket_path = tmp_path / "run" / "agent.sock"
    first = single_agent_lock(socket_path)
    with pytest.raises(SystemExit, match=r"another agent holds .*agent\.sock\.lock"):
        single_agent_lock(socket_path)
    # Another process (as the hook's agent would be) is refused too.
    probe = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                            "from slinfer.agent.server import single_agent_lock; "
                            f"single_agent_lock(Path({str(socket_path)!r}))"], capture_output=True, text=True)
    assert probe.returncode == 1 and "another agent holds" in probe.stderr
    os.close(first)  # the first agent ends: its lock goes with it
    os.close(single_agent_lock(socket_path))
