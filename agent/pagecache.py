"""Page-cache read-ahead: a catalog model's files read into this node's memory before its engine loads them.

Responsible for: finding the files under a model's local `source`, reading them sequentially in large chunks
(vLLM maps its weights and faults them in page by page, slow on a cold disk or a network filesystem), one model
at a time, skipping a model this node does not serve (another partition) or whose files would crowd out the
node's available memory, and logging each read or skip with its numbers. Not responsible for: choosing the
models (the catalog's `readahead`), or keeping the pages resident: the kernel may evict them under pressure,
and the next job of that model reads them again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slinfer.config import ModelConfig

log = logging.getLogger(__name__)

# One read per chunk keeps the system calls few without holding much memory of the agent's own.
CHUNK_BYTES = 8 << 20
# Reading more than this share of the memory still available would evict what running jobs and engines use.
MAX_AVAILABLE_SHARE = 0.5


@dataclass(frozen=True)
class ReadAhead:
    model: str
    files: int
    bytes: int
    seconds: float


def model_files(source: str) -> list[Path]:
    """The regular files of a model's local source (a folder, searched through, or one file); none for a hub
    id or a path missing on this node. Symbolic links are followed: a hub cache links to its blobs."""
    root = Path(source)
    if root.is_file():
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file())


def sized_files(source: str) -> tuple[list[Path], int]:
    """The model's files and their bytes in all: listing and stat calls, slow on a network filesystem."""
    paths = model_files(source)
    return paths, sum(p.stat().st_size for p in paths)


def available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes: what the kernel could give without swapping."""
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable")


def read_files(paths: list[Path]) -> int:
    """Reads every file to its end, telling the kernel the reads are sequential (a larger read-ahead window);
    returns the bytes read. The data itself is dropped: only the page cache keeps it."""
    buffer = bytearray(CHUNK_BYTES)
    total = 0
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while count := os.readv(fd, [buffer]):
                total += count
        finally:
            os.close(fd)
    return total


class PageCacheWarmer:
    """Reads catalog models ahead on this node, one at a time, never in the event loop's thread."""

    def __init__(self, memory: Callable[[], int] = available_memory,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._memory = memory
        self._clock = clock
        self._lock = asyncio.Lock()

    def _skip_reason(self, model: ModelConfig, paths: list[Path], size: int) -> str:
        if not paths:
            return f"its source {model.source!r} is no file or folder on this node"
        available = self._memory()
        if size > MAX_AVAILABLE_SHARE * available:
            return (f"its {len(paths)} files hold {size / 1e9:.2f} GB, more than {MAX_AVAILABLE_SHARE:.0%} of the "
                    f"{available / 1e9:.2f} GB of memory available")
        return ""

    async def read_ahead(self, model: ModelConfig, why: str) -> ReadAhead | None:
        """Reads the model's files, or logs why not (None). A file that cannot be read is logged, never
        raised: read-ahead only ever saves time."""
        async with self._lock:
            try:
                paths, size = await asyncio.to_thread(sized_files, model.source)
                reason = self._skip_reason(model, paths, size)
                if reason:
                    log.info("model %s: no read-ahead (%s): %s", model.name, why, reason)
                    return None
                began = self._clock()
                read = await asyncio.to_thread(read_files, paths)
            except OSError as exc:
                log.warning("model %s: read-ahead (%s) failed: %s", model.name, why, exc)
                return None
            seconds = self._clock() - began
            log.info("model %s: read ahead (%s): %d files, %.1f MB in %.2f s (%.0f MB/s)", model.name, why,
                     len(paths), read / 1e6, seconds, read / 1e6 / max(seconds, 1e-6))
            return ReadAhead(model.name, len(paths), read, seconds)

    async def read_catalog(self, models: list[ModelConfig], partitions: list[str]) -> list[ReadAhead]:
        """The agent's start: every catalog model that asks for read-ahead and that this node serves (its
        partition is one of the node's `partitions`; with none known, every model is taken as served here)."""
        done = []
        for model in models:
            if not model.readahead:
                continue
            if model.partition and partitions and model.partition not in partitions:
                log.info("model %s: no read-ahead (agent start): its partition %r is not one of this node's (%s)",
                         model.name, model.partition, ", ".join(partitions))
                continue
            if (result := await self.read_ahead(model, "agent start")) is not None:
                done.append(result)
        return done
