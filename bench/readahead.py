"""Page-cache read-ahead against a cold page cache, alternating in one run: the bare engine of a catalog model
started after its files were evicted from the page cache, and started after the agent's read-ahead put them
back: `python bench/readahead.py [--rounds N] [--model smollm2]`.

Responsible for: the bed's config of its own (written, no daemon started), evicting the model's files
(POSIX_FADV_DONTNEED of clean pages, checked with util-linux's `fincore`), timing the agent's own read-ahead
(`PageCacheWarmer`), timing the engine to /health and to a first answer, reading vLLM's own weight-loading time
from its log, and printing every round and the medians. Not responsible for: the warm start (bench/warmstart.py);
a node whose disk is slower than this machine's, where the difference is larger, is not measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `bench` is importable

from bench.bare_engine import bare_start
from slinfer import config as slinfer_config
from slinfer.agent.pagecache import PageCacheWarmer, sized_files
from slinfer.dev import devcluster

# A smollm2 engine starts in about a minute here, several when other work shares the machine.
READY_TIMEOUT_S = 600.0
# vLLM's own account of reading the weights: "Loading weights took 1.23 seconds".
WEIGHTS_LINE = re.compile(rb"Loading weights took ([0-9.]+) seconds")


def resident_bytes(paths: list[Path]) -> int:
    """What the kernel holds of the files in its page cache."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *map(str, paths)],
                         check=True, capture_output=True, text=True).stdout
    return sum(int(line) for line in out.split())


def evict(paths: list[Path]) -> None:
    """Drops the files' clean pages from the page cache; fails as inconclusive where the kernel kept some."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    left = resident_bytes(paths)
    if left:
        raise RuntimeError(f"inconclusive: {left} bytes stayed resident after eviction")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="catalog model (default: smollm2)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--state-dir", type=Path, default=Path("/tmp/slinfer-bench-readahead"))
    ap.add_argument("--port-base", type=int, default=int(os.environ.get("SLINFER_BENCH_PORT_BASE", 15900)))
    args = ap.parse_args()
    bed = devcluster.Bed(args.state_dir, args.port_base)
    shutil.rmtree(bed.state, ignore_errors=True)
    devcluster.write_configs(bed)
    model = slinfer_config.load(bed.config).model(args.model)
    if model is None:
        raise SystemExit(f"{args.model} is not in the bed's catalog")
    paths, size = sized_files(model.source)
    print(f"{model.name}: {len(paths)} files, {size / 1e6:.1f} MB under {model.source}", flush=True)
    rows: dict[str, list[tuple[float, float, float]]] = {}
    warmer = PageCacheWarmer()
    for round_no in range(1, args.rounds + 1):
        for cache in ("cold", "read ahead"):
            evict(paths)
            if cache == "read ahead":
                result = asyncio.run(warmer.read_ahead(model, "bench"))
                if result is None or resident_bytes(paths) < size:
                    raise RuntimeError("the read-ahead left the model's files not resident")
                print(f"round {round_no} read-ahead: {result.bytes / 1e6:.1f} MB in {result.seconds:.2f} s "
                      f"({result.bytes / 1e6 / max(result.seconds, 1e-6):.0f} MB/s)", flush=True)
            log = bed.logs / f"bare-{round_no}-{cache.replace(' ', '-')}.log"
            ready, answer = bare_start(bed, model.name, READY_TIMEOUT_S, str(log))
            found = WEIGHTS_LINE.search(log.read_bytes())
            weights = float(found.group(1)) if found else float("nan")
            rows.setdefault(cache, []).append((weights, ready, answer))
            print(f"round {round_no} {cache:10}: weights {weights:5.2f} s, READY {ready:6.1f} s, first answer "
                  f"{answer:6.1f} s", flush=True)
    print(f"\n{'page cache':12}{'weights s':>10}{'READY s':>9}{'answer s':>10}{'rounds':>8}   (medians)")
    for cache, figures in rows.items():
        print(f"{cache:12}" + "".join(f"{statistics.median(f[i] for f in figures):>{w}.2f}"
                                      for i, w in ((0, 10), (1, 9), (2, 10))) + f"{len(figures):>8}")
    cold, ahead = (statistics.median(f[0] for f in rows[c]) for c in ("cold", "read ahead"))
    print(f"weight loading, read ahead / cold: {ahead / cold:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
