"""`sbatch --inference-lora=NAME=PATH`: a user's own LoRA adapter, served by the job's private engine (issue 33).

Responsible for: the rule of one value (the SPANK plugin's spank/options.c checks the same at submit, in the same
order and words; tests/unit/test_inference_lora.py runs one table of cases through both), a job's list of them
(how many, each name once, none that the engine already serves), how the list travels from the plugin to the
hook (the prolog's environment), and the engine's `--lora-modules` value for one adapter.
Not responsible for: whether the job's user can read the folder (agent/lorafiles.py checks that as the user),
or the engine's other LoRA flags (agent/launch.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

# Bytes an adapter's name may have: spank/options.h's SLINFER_LORA_NAME_MAX (it becomes a served model name).
LORA_NAME_MAX = 64
# Bytes an adapter's path may have: SLINFER_LORA_PATH_MAX (a folder's path, not its contents).
LORA_PATH_MAX = 1024
# Adapters one job may give: SLINFER_LORA_MAX (each one the engine keeps in memory).
LORA_MAX = 8
# Bytes of a refused value a message shows (options.c's SHOWN_BYTES); the rest is elided with "...".
SHOWN_BYTES = 40
# Where the hook finds the job's values, one NAME=PATH a line: the plugin's job-control variable
# (SLINFER_LORAS_ENV), which Slurm gives the prolog with the SPANK_ prefix.
PROLOG_ENV = "SPANK_SLINFER_LORAS"
# What a refused value is told to use.
USAGE = "use --inference-lora=NAME=PATH, PATH the adapter's absolute folder"
# The characters of a name besides ASCII letters and digits.
NAME_PUNCTUATION = b"._-"


def _shown_byte(byte: int) -> str:
    """A byte as the plugin's messages show it: printable ASCII as is, quote and backslash escaped, else \\xNN."""
    if byte in (0x22, 0x5C):
        return "\\" + chr(byte)
    return chr(byte) if 0x20 <= byte < 0x7F else f"\\x{byte:02x}"


def _shown(raw: bytes) -> str:
    text = "".join(_shown_byte(b) for b in raw[:SHOWN_BYTES])
    return text + "..." if len(raw) > SHOWN_BYTES else text


def _name_byte_ok(byte: int) -> bool:
    return (0x30 <= byte <= 0x39) or (0x41 <= byte <= 0x5A) or (0x61 <= byte <= 0x7A) or byte in NAME_PUNCTUATION


def value_problem(value: str) -> str:
    """"" for a valid NAME=PATH, else the problem as the plugin words it, without its "slinfer: " prefix."""
    raw = value.encode("utf-8", "surrogateescape")
    if not raw:
        return f'invalid --inference-lora value "": it is empty ({USAGE})'
    head = f'invalid --inference-lora value "{_shown(raw)}": '
    name, eq, path = raw.partition(b"=")
    if not eq:
        return head + f"it is not NAME=PATH ({USAGE})"
    if not name:
        return head + "the adapter name is empty"
    if len(name) > LORA_NAME_MAX:
        return head + f"the adapter name is {len(name)} bytes long, at most {LORA_NAME_MAX} are allowed"
    for byte in name:
        if not _name_byte_ok(byte):
            return head + (f"character '{_shown_byte(byte)}' is not allowed in the adapter name "
                           "(use letters, digits, '.', '_', '-')")
    if not path.startswith(b"/"):
        return head + "the path must be absolute (start with '/')"
    if len(path) > LORA_PATH_MAX:
        return head + f"the path is {len(path)} bytes long, at most {LORA_PATH_MAX} are allowed"
    for byte in path:
        if byte < 0x20 or byte == 0x7F:
            return head + f"the path has a control character ('{_shown_byte(byte)}')"
    return ""


def list_problem(pairs: Sequence[tuple[str, str]], served: Sequence[str]) -> str:
    """"" when a job's adapters (name, path) may be served beside `served` (the model and its catalog adapters),
    else why not, in words for the job's output."""
    if len(pairs) > LORA_MAX:
        return f"--inference-lora is given {len(pairs)} times, at most {LORA_MAX} are allowed"
    seen: set[str] = set()
    for name, path in pairs:
        if problem := value_problem(f"{name}={path}"):
            return problem
        if name in seen:
            return f'--inference-lora names adapter "{name}" twice'
        if name in served:
            return (f'--inference-lora name "{name}" is already served by this engine (the model or one of its '
                    "catalog adapters): choose another name")
        seen.add(name)
    return ""


def from_environment(env: Mapping[str, str]) -> list[tuple[str, str]]:
    """The job's adapters as the plugin passed them to the prolog: (name, path) per line, unchecked (a value
    without "=" keeps its whole text as the name and an empty path, which the check refuses), valid UTF-8."""
    text = env.get(PROLOG_ENV, "")
    pairs = []
    for line in text.split("\n") if text else []:
        # Bytes that are not UTF-8 (the plugin passes them) become U+FFFD: a protobuf string must be UTF-8, and
        # a hook that raised would fail the prolog and drain the node; such a path then names no folder.
        line = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        name, _, path = line.partition("=")
        pairs.append((name, path))
    return pairs


def module_arg(name: str, path: str) -> str:
    """One `--lora-modules` value: NAME=PATH, or vLLM's JSON form where the path has a comma (vLLM reads a value
    with a comma as JSON)."""
    if "," in path:
        return json.dumps({"name": name, "path": path})
    return f"{name}={path}"
