"""The warm template's key handoff, before and after issue 27, in one run: the template of commit 245d680^ (the
job's environment inside the JSON spawn request) against today's (the environment as a memfd beside the
request, read by the child after it dropped to the job's user), in alternating rounds:
`python bench/template_handoff.py [--rounds N]`. Prints, per version, the median and p90 of the time from the
spawn request to the child's first line of work (a stand-in engine that writes a file and exits) and the ratio.

Responsible for: both templates started the same way (preloading json only, so the fork is what is timed), the
same requests, the same uid. Not responsible for: vLLM's own start after the fork (bench/warmstart.py times a
real engine's READY; the handoff is a fixed cost before it).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slinfer.agent import warmstart

REPO = Path(__file__).resolve().parents[1]
# The last commit whose template took the environment inside the request.
BEFORE = "245d680^"
ENGINE = "import os, sys\nopen(sys.argv[1], 'w').write(os.environ['VLLM_API_KEY'])\n"


def _start(script: Path, folder: Path, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    sock = folder / f"{name}.sock"
    proc = subprocess.Popen([sys.executable, str(script), "--socket", str(sock), "--preload", "json"],
                            env={**os.environ, "PYTHONPATH": str(folder)}, stdout=subprocess.DEVNULL)
    while not sock.exists():
        time.sleep(0.01)
    return proc, sock


def _old_spawn(sock: Path, request: dict[str, object], env: dict[str, str]) -> None:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(sock))
        conn.sendall(json.dumps({**request, "env": env}).encode() + b"\n")
        conn.recv(65536)


def _new_spawn(sock: Path, request: dict[str, object], env: dict[str, str]) -> None:
    fd = warmstart.env_descriptor(env)
    try:
        warmstart.call(sock, request, fds=[fd])
    finally:
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="slinfer-handoff-"))
    folder.chmod(0o777)  # the engine writes here as the job's uid
    (folder / "fakeengine.py").write_text(ENGINE)
    old_script = folder / "old_template.py"
    old_script.write_text(subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE}:agent/enginetemplate.py"],
                                         check=True, capture_output=True, text=True).stdout)
    templates = {"before (env in the request)": (*_start(old_script, folder, "old"), _old_spawn),
                 "after (env as a memfd)": (*_start(warmstart.TEMPLATE_SCRIPT, folder, "new"), _new_spawn)}
    uid = 65534 if os.geteuid() == 0 else os.getuid()
    times: dict[str, list[float]] = {name: [] for name in templates}
    try:
        for n in range(args.rounds):
            for name, (_, sock, spawn) in templates.items():
                out = folder / f"out-{n}-{len(times[name])}-{name[:5]}"
                request = warmstart.spawn_request([str(out)], uid=uid, gid=uid, groups=[uid], cwd=str(folder),
                                                  log_path=folder / "engine.log")
                request["module"] = "fakeengine"
                key = os.urandom(24).hex()
                began = time.perf_counter()
                spawn(sock, request, {"PATH": "/usr/bin:/bin", "VLLM_API_KEY": key})
                deadline = time.monotonic() + 30
                while not (out.exists() and out.read_text() == key):
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{name}: the engine did not run (see {folder / 'engine.log'})")
                    time.sleep(0.0002)
                times[name].append((time.perf_counter() - began) * 1000)
    finally:
        for proc, _, _ in templates.values():
            proc.kill()
        subprocess.run(["rm", "-rf", str(folder)], check=False)
    medians = {}
    for name, values in times.items():
        values.sort()
        medians[name] = statistics.median(values)
        print(f"{name:30s} spawn to the engine's first work: median {medians[name]:.2f} ms, "
              f"p90 {values[int(0.9 * (len(values) - 1))]:.2f} ms over {len(values)}")
    before, after = medians.values()
    print(f"after / before: x{after / before:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
