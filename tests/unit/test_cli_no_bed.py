"""The production CLI does not import the development bed (issue 28): `slinfer`, its help and a node's
commands leave slinfer.dev unloaded; only `dev-cluster` imports it (the positive control)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import contextlib, io, json, sys
from slinfer.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
    try:
        main.main(json.loads(sys.argv[1]))
    except SystemExit:
        pass
print(json.dumps({"dev": sorted(m for m in sys.modules if m == "slinfer.dev" or m.startswith("slinfer.dev.")),
                  "out": out.getvalue()}))
"""


def loaded(argv: list[str]) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True,
                          timeout=60, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_cli_does_not_import_the_bed() -> None:
    done = subprocess.run([sys.executable, "-c", "import sys, slinfer.cli.main; "
                           "print([m for m in sys.modules if m.startswith('slinfer.dev')])"],
                          capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["models", "--help"], ["wait-ready", "--help"], ["status", "--help"]])
def test_help_does_not_import_the_bed(argv: list[str]) -> None:
    result = loaded(argv)
    assert "usage: slinfer" in str(result["out"])
    assert result["dev"] == []


def test_top_level_help_still_lists_dev_cluster() -> None:
    assert "dev-cluster" in str(loaded(["--help"])["out"])


def test_dev_cluster_imports_the_bed_and_parses_its_options() -> None:
    result = loaded(["dev-cluster", "--help"])
    assert "slinfer.dev.devcluster" in result["dev"]
    assert "--state-dir" in str(result["out"]) and "--no-controller" in str(result["out"])
