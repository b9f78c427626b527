"""Files handed to a job's user: the step environment the SPANK plugin reads, and the engine status that
`slinfer wait-ready` reads.

Both live in `<run_dir>/jobs/` (root-owned, 0711: users reach their own file by name but cannot list others'),
each owned by the job's user with mode 0400 and written without following links, because root writes them
in a folder whose names are predictable.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

from slinfer.atomicfile import write_atomic

# The keys the SPANK plugin accepts from an env file: spank/environ.c's accepted_keys[], tied by test_step_env_keys.py.
ENV_KEYS = ("OPENAI_BASE_URL", "OPENAI_API_KEY", "SLINFER_MODEL", "SLINFER_STATUS_FILE", "SLINFER_ERROR",
            "SLINFER_JOB_ENGINE")


# A Slurm job id, which also names the job's files: ASCII digits only (str.isdigit() would take '²' or '١٢٣').
SLURM_JOB_ID = re.compile(r"[0-9]{1,20}")


def jobs_dir(run_dir: str | Path) -> Path:
    folder = Path(run_dir) / "jobs"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o711)
    return folder


def status_path(run_dir: str | Path, job_id: str) -> Path:
    return jobs_dir(run_dir) / f"{job_id}.status"


def write_env_file(path: Path, values: Mapping[str, str], uid: int, gid: int) -> None:
    lines = []
    for key, value in values.items():
        if key not in ENV_KEYS:
            raise ValueError(f"{key} is not a key the SPANK plugin accepts")
        # One line per key: the plugin's format has no quoting.
        clean = " ".join(str(value).split("\n"))
        lines.append(f"{key}={clean}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(lines).encode(), 0o400, (uid, gid))


def write_status(path: Path, state: str, reason: str, base_url: str, model: str, uid: int, gid: int) -> None:
    payload = {"state": state, "reason": reason, "base_url": base_url, "model": model, "updated_at": time.time()}
    write_atomic(path, json.dumps(payload).encode(), 0o400, (uid, gid))

