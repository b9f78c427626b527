"""The model-name rule is written twice, in spank/options.c (sbatch refuses at submit) and slinfer/config.py (the
catalog and the agent): one table of cases runs through both, and they must give the same verdict and problem.
A catalog name that the plugin refuses would make every job the autoscaler submits fail at sbatch."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from slinfer.config import ConfigError, model_name_problem, parse

SPANK = Path(__file__).resolve().parents[2] / "spank"

# (name, valid): the table. Both implementations must agree with it and with each other.
CASES = [
    ("tiny", True), ("llama-3.1-8b", True), ("Qwen2.5_7B-Instruct", True), ("7b", True), ("a", True),
    ("a.b.c", True), ("m" * 128, True),
    ("", False), ("m" * 129, False), ("a..b", False), ("a...", False), ("x..", False), ("a;b", False),
    ("a b", False), ("../etc", False), ("-rf", False), (".hidden", False), ("_x", False), ("a\x01z", False),
    ("mod\u00e8le", False), ('a"b', False), ("a\\b", False), ("a\nb", False), ("$(id)", False), ("a/b", False),
    ("tiny;touch /tmp/x", False), ("A", True), ("Z9", True), ("9Z-._", True),
]


@pytest.fixture(scope="module")
def plugin_verdicts() -> dict[str, tuple[bool, str]]:
    """The plugin's own check (options.c through its test harness), per name: (valid, message)."""
    subprocess.run(["make", "-s", "-C", str(SPANK), "tests/test_slinfer"], check=True, capture_output=True)
    done = subprocess.run([str(SPANK / "tests" / "test_slinfer"), "--check-models"],
                          input=b"".join(name.encode() + b"\0" for name, _ in CASES), capture_output=True,
                          check=True, timeout=30)
    lines = done.stdout.decode().splitlines()
    assert len(lines) == len(CASES), lines
    return {name: (line == "ok", line.partition("\t")[2]) for (name, _), line in zip(CASES, lines, strict=True)}


@pytest.mark.parametrize(("name", "valid"), CASES)
def test_the_plugin_and_python_give_one_verdict_and_one_problem(
        plugin_verdicts: dict[str, tuple[bool, str]], name: str, valid: bool) -> None:
    plugin_valid, message = plugin_verdicts[name]
    problem = model_name_problem(name)
    assert plugin_valid is valid and (not problem) is valid, (name, message, problem)
    if not valid:
        assert message.startswith("slinfer: invalid --inference value") and problem in message, (message, problem)


def test_a_catalog_name_the_plugin_refuses_fails_the_config_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r'^models\[0\]\.name: .*must not contain ".."'):
        parse({"models": [{"name": "a..b", "source": "/m"}]})
    assert parse({"models": [{"name": "a.b", "source": "/m"}]}).models[0].name == "a.b"
