"""`--inference-lora=NAME=PATH` (issue 33): the rule of one value is written twice, in spank/options.c (sbatch
refuses at submit) and slinfer/inference_lora.py (the agent, for a job that got past sbatch): one table of cases
runs through both, which must give the same verdict and the same message. Also the list rules, the names the
two sides share (the limits, the prolog's variable), and the engine's --lora-modules value."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from slinfer import inference_lora as lora

SPANK = Path(__file__).resolve().parents[2] / "spank"

# (value, the problem's tail, or "" where valid): the table both implementations must follow.
CASES = [
    ("mine=/home/alice/adapter", ""), ("a=/", ""), ("A.b_c-9=/x y/z", ""), ("x=/a=b", ""), ("x=/a,b", ""),
    ("n" * 64 + "=/p", ""), ("x=/" + "p" * 1023, ""), ("x=/caf\u00e9", ""), ("..=/p", ""),
    ("", "it is empty (use --inference-lora=NAME=PATH, PATH the adapter's absolute folder)"),
    ("mine", "it is not NAME=PATH (use --inference-lora=NAME=PATH, PATH the adapter's absolute folder)"),
    ("/home/alice/adapter", "it is not NAME=PATH (use --inference-lora=NAME=PATH, PATH the adapter's absolute "
                            "folder)"),
    ("=/p", "the adapter name is empty"),
    ("n" * 65 + "=/p", "the adapter name is 65 bytes long, at most 64 are allowed"),
    ("a b=/p", "character ' ' is not allowed in the adapter name (use letters, digits, '.', '_', '-')"),
    ("a;b=/p", "character ';' is not allowed in the adapter name (use letters, digits, '.', '_', '-')"),
    ("a/b=/p", "character '/' is not allowed in the adapter name (use letters, digits, '.', '_', '-')"),
    ('a"b=/p', "character '\\\"' is not allowed in the adapter name (use letters, digits, '.', '_', '-')"),
    ("mod\u00e8le=/p", "character '\\xc3' is not allowed in the adapter name (use letters, digits, '.', '_', "
                       "'-')"),
    ("mine=", "the path must be absolute (start with '/')"),
    ("mine=adapter", "the path must be absolute (start with '/')"),
    ("mine=~/adapter", "the path must be absolute (start with '/')"),
    ("x=/" + "p" * 1024, "the path is 1025 bytes long, at most 1024 are allowed"),
    ("x=/a\nb", "the path has a control character ('\\x0a')"),
    ("x=/a\x7fb", "the path has a control character ('\\x7f')"),
    ("x=/a\tb", "the path has a control character ('\\x09')"),
]


@pytest.fixture(scope="module")
def plugin_verdicts() -> dict[str, tuple[bool, str]]:
    """The plugin's own check (options.c through its test harness), per value: (valid, message)."""
    subprocess.run(["make", "-s", "-C", str(SPANK), "tests/test_slinfer"], check=True, capture_output=True)
    done = subprocess.run([str(SPANK / "tests" / "test_slinfer"), "--check-loras"],
                          input=b"".join(v.encode() + b"\0" for v, _ in CASES), capture_output=True, check=True,
                          timeout=30)
    lines = done.stdout.decode().splitlines()
    assert len(lines) == len(CASES), lines
    return {value: (line == "ok", line.partition("\t")[2]) for (value, _), line in zip(CASES, lines, strict=True)}


@pytest.mark.parametrize(("value", "problem"), CASES)
def test_the_plugin_and_python_give_one_verdict_and_one_message(
        plugin_verdicts: dict[str, tuple[bool, str]], value: str, problem: str) -> None:
    plugin_ok, message = plugin_verdicts[value]
    python = lora.value_problem(value)
    assert plugin_ok is (not problem) and (not python) is (not problem), (value, message, python)
    if problem:
        assert python.endswith(problem), python
        assert message == f"slinfer: {python}"


def test_a_long_refused_value_is_shown_cut_in_both() -> None:
    value = "n" * 70 + "=/p"
    assert lora.value_problem(value) == (f'invalid --inference-lora value "{"n" * 40}...": the adapter name is 70 '
                                         "bytes long, at most 64 are allowed")


def test_the_limits_and_the_prologs_variable_are_the_plugins() -> None:
    header = (SPANK / "options.h").read_text()
    defines = dict(re.findall(r"#define (SLINFER_LORA\w*) (\S+)", header))
    assert int(defines["SLINFER_LORA_NAME_MAX"]) == lora.LORA_NAME_MAX
    assert int(defines["SLINFER_LORA_PATH_MAX"]) == lora.LORA_PATH_MAX
    assert int(defines["SLINFER_LORA_MAX"]) == lora.LORA_MAX
    assert "SPANK_" + json.loads(defines["SLINFER_LORAS_ENV"]) == lora.PROLOG_ENV
    shown = re.search(r"#define SHOWN_BYTES (\d+)", (SPANK / "options.c").read_text())
    assert shown is not None and int(shown.group(1)) == lora.SHOWN_BYTES


def test_the_list_from_the_prologs_environment() -> None:
    env = {lora.PROLOG_ENV: "mine=/home/a/x\nother=/p=q\nbroken"}
    assert lora.from_environment(env) == [("mine", "/home/a/x"), ("other", "/p=q"), ("broken", "")]
    assert lora.from_environment({}) == [] and lora.from_environment({lora.PROLOG_ENV: ""}) == []
    assert lora.list_problem(lora.from_environment(env), ["tiny"]).endswith(
        "\"broken=\": the path must be absolute (start with '/')")


def test_a_jobs_list_is_bounded_names_each_adapter_once_and_clashes_with_nothing_served() -> None:
    served = ["tiny-lora", "tiny-lora-a1"]
    eight = [(f"a{i}", f"/p/{i}") for i in range(lora.LORA_MAX)]
    assert lora.list_problem(eight, served) == ""
    assert lora.list_problem([*eight, ("a9", "/p")], served) == "--inference-lora is given 9 times, at most 8 are " \
                                                                "allowed"
    assert lora.list_problem([("x", "/a"), ("x", "/b")], served) == '--inference-lora names adapter "x" twice'
    for name in served:
        assert f'name "{name}" is already served by this engine' in lora.list_problem([(name, "/a")], served)
    assert lora.list_problem([("x", "rel")], served).endswith("the path must be absolute (start with '/')")


def test_the_engines_value_is_name_equals_path_or_json_where_vllm_would_misread_it() -> None:
    assert lora.module_arg("mine", "/home/a/x=y") == "mine=/home/a/x=y"
    assert json.loads(lora.module_arg("mine", "/home/a/x,y")) == {"name": "mine", "path": "/home/a/x,y"}
