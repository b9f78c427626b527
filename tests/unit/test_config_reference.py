"""The generated configuration reference (docs/admin/config-reference.md) is current with slinfer/config.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

from slinfer import config

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "tools" / "gen_config_reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_the_committed_reference_is_current():
    gen = _generator()
    assert gen.OUTPUT.read_text() == gen.render(), "run: .venv/bin/python tools/gen_config_reference.py"


def test_every_key_of_every_section_is_in_the_reference():
    text = (ROOT / "docs" / "admin" / "config-reference.md").read_text()
    for header, cls in [("[controller]", config.ControllerConfig), ("[gateway]", config.GatewayConfig),
                        ("[agent]", config.AgentConfig), ("[kubernetes]", config.KubernetesConfig),
                        ("[[models]]", config.ModelConfig)]:
        assert f"## `{header}`" in text
        names = ([f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls)
                 else list(cls.__struct_fields__))
        section = text.split(f"## `{header}`", 1)[1].split("\n## ", 1)[0]
        for name in names:
            assert f"| `{name}` |" in section, f"{header}.{name} missing from the reference"


def test_a_comment_and_a_default_reach_the_page():
    gen = _generator()
    keys = {k.name: k for _, cls, ks in gen.sections() if cls == "ModelConfig" for k in ks}
    assert keys["name"].default is None and keys["source"].default is None  # required
    assert keys["time_limit"].default == '"04:00:00"'
    assert keys["target_outstanding"].doc == "Outstanding requests per replica the autoscaler aims at."


def test_the_check_mode_fails_on_a_stale_page(tmp_path, monkeypatch):
    gen = _generator()
    stale = tmp_path / "ref.md"
    stale.write_text(gen.render().replace("| `heartbeat_s` |", "| `heartbeat_seconds` |"))
    monkeypatch.setattr(gen, "OUTPUT", stale)
    assert gen.main(["--check"]) == 1
    stale.write_text(gen.render())
    assert gen.main(["--check"]) == 0
