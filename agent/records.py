"""The agent's on-disk record of each engine, so that a restarted agent re-adopts engines that still run.

One JSON file per job under `<run_dir>/engines/`, written atomically. This module does not decide what a
record means; the engine manager does.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slinfer.atomicfile import write_atomic

log = logging.getLogger(__name__)


@dataclass
class EngineRecord:
    job_id: str
    model: str
    uid: int
    gid: int
    user: str
    gpus: list[str]
    pool: bool
    partition: str
    work_dir: str
    host: str
    port: int
    api_key: str
    pid: int = 0
    create_time: float = 0.0
    session_id: int = 0
    state: int = 0
    reason: str = ""
    started_at: float = 0.0
    ready_at: float = 0.0
    restarts: int = 0
    argv: list[str] = field(default_factory=list)
    # How the engine was started: "warm" (forked from the engine template) or "cold" (its command exec'd).
    start_path: str = ""
    # "https" when the engine serves the node's certificate ([agent].engine_tls_cert).
    scheme: str = "http"
    # An engine across nodes: this node's rank of nnodes, rank 0's address and torch.distributed port, and (on
    # rank 0) the other ranks' node addresses, whose connections show that they are still in the engine.
    rank: int = 0
    nnodes: int = 1
    head: str = ""
    master_port: int = 0
    peers: list[str] = field(default_factory=list)
    # The job's own LoRA adapters (--inference-lora), [name, path] each: a restarted engine serves them too.
    loras: list[list[str]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


class RecordStore:
    """Reads and writes engine records; the folder is root-only because records hold API keys."""

    @classmethod
    def of_run_dir(cls, run_dir: str | Path) -> RecordStore:
        """The agent's store under its run folder, where the agent and the hook both find it."""
        return cls(Path(run_dir) / "engines")

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)

    def _path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.json"

    def save(self, record: EngineRecord) -> None:
        write_atomic(self._path(record.job_id), json.dumps(asdict(record)).encode())

    def delete(self, job_id: str) -> None:
        self._path(job_id).unlink(missing_ok=True)

    def load_all(self) -> list[EngineRecord]:
        records = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                records.append(EngineRecord(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError) as exc:
                log.error("ignoring unreadable engine record %s: %s", path, exc)
        return records
