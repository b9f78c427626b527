"""Whether the job's user can read the folders of the job's own LoRA adapters (`--inference-lora`, issue 33).

Responsible for: reading each adapter's folder with the job's user's credentials, never root's: a child process
that drops to the user's uid, gid and groups before it runs (as the engine will), opens the folder's
adapter_config.json and its weights, and reports what it could not open in words for the job's output.
Not responsible for: the value's own rule (slinfer/inference_lora.py), what vLLM makes of the files (a
malformed adapter fails the engine's start, which the engine manager reports), or starting the engine.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

# How long the check may take: one small interpreter opening a few files; a hung network filesystem must not
# hold the prolog (which waits for the agent) for long.
CHECK_TIMEOUT_S = 20.0
# The files vLLM reads from an adapter's folder: its config, and its weights in one of two formats.
CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

# Run by the job's user's interpreter (-I -S: no site, no user paths), one folder per argument; prints one line
# per folder it cannot use and exits 1 if any. A constant: the paths reach it as arguments only.
CHECK = f"""
import os, sys
bad = []
for folder in sys.argv[1:]:
    try:
        if not os.path.isdir(folder):
            os.stat(folder)
            raise NotADirectoryError(20, "not a folder", folder)
        with open(os.path.join(folder, {CONFIG_FILE!r}), "rb") as f:
            f.read(1)
        for name in {WEIGHT_FILES!r}:
            path = os.path.join(folder, name)
            if os.path.lexists(path):
                with open(path, "rb") as f:
                    f.read(1)
                break
        else:
            raise FileNotFoundError(2, "no " + " or ".join({WEIGHT_FILES!r}) + " in it", folder)
    except OSError as exc:
        bad.append(folder + "\\t" + (exc.strerror or str(exc)) + ": " + str(exc.filename or folder))
print("\\n".join(bad))
sys.exit(1 if bad else 0)
"""


def unreadable(adapters: Sequence[tuple[str, str]], *, python: str, uid: int, gid: int, user: str) -> str:
    """"" when the user (uid:gid with the user's groups) can open every adapter's files, else why not, one
    sentence naming the adapter, the path and the error. Run as root, the check drops to the user first;
    otherwise (tests as an ordinary user) it runs with the caller's own credentials."""
    if not adapters:
        return ""
    who = user or str(uid)
    drop: dict[str, object] = {}
    if os.geteuid() == 0:
        try:
            groups = os.getgrouplist(user, gid) if user else [gid]
        except OSError:
            groups = [gid]
        drop = {"user": uid, "group": gid, "extra_groups": groups}
    argv = [python, "-I", "-S", "-c", CHECK, *(path for _, path in adapters)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=CHECK_TIMEOUT_S,
                              cwd="/", env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
                              check=False,
                              **drop)  # type: ignore[call-overload]
    except subprocess.TimeoutExpired:
        return f"--inference-lora: reading the adapters' folders as {who} took over {CHECK_TIMEOUT_S:.0f} s"
    except OSError as exc:
        return f"--inference-lora: cannot check the adapters' folders as {who}: {exc}"
    if done.returncode == 0:
        return ""
    names = {path: name for name, path in adapters}
    for line in done.stdout.splitlines():
        path, tab, why = line.partition("\t")
        if tab and path in names:
            return f"--inference-lora {names[path]}={path}: {who} cannot read it ({why})"
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return f"--inference-lora: the check of the adapters' folders as {who} failed ({tail})"
