"""packaging/ensure-token.sh, the postinst's token step, run for real on config files: it generates a token
the controller accepts when none is set, fills in an empty `token = ""`, and leaves a set token (an upgrade,
a site's own) byte for byte alone."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from slinfer import config as config_mod

SCRIPT = Path(__file__).resolve().parents[2] / "packaging" / "ensure-token.sh"
EXAMPLE = SCRIPT.parent / "etc" / "slinfer.toml"


def _run(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(SCRIPT), str(path)], capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize("text", [EXAMPLE.read_text(), '[controller]\ntoken = ""\nlisten = "0.0.0.0:8790"\n',
                                  '[gateway]\nlisten = "0.0.0.0:8000"\n', "[controller] # head node\n"])
def test_a_config_without_a_token_gets_one_that_the_controller_accepts(tmp_path: Path, text: str) -> None:
    path = tmp_path / "slinfer.toml"
    path.write_text(text)
    done = _run(path)
    assert done.returncode == 0, done.stderr
    assert "generated [controller].token" in done.stdout
    config = config_mod.load(path)
    config_mod.require_token(config)
    assert len(config.controller.token) == 64 and int(config.controller.token, 16) >= 0
    # Run again, as an upgrade's postinst does: nothing changes.
    before = path.read_bytes()
    assert _run(path).returncode == 0 and path.read_bytes() == before


def test_two_installs_get_different_tokens(tmp_path: Path) -> None:
    tokens = set()
    for name in ("a.toml", "b.toml"):
        path = tmp_path / name
        path.write_text(EXAMPLE.read_text())
        assert _run(path).returncode == 0
        tokens.add(config_mod.load(path).controller.token)
    assert len(tokens) == 2


def test_a_sites_own_token_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "slinfer.toml"
    path.write_text('[controller]\naddress = "head01:8790"\ntoken = "the-sites-own"\n')
    before = path.read_bytes()
    done = _run(path)
    assert done.returncode == 0 and done.stdout == "" and path.read_bytes() == before


def test_a_missing_config_fails(tmp_path: Path) -> None:
    done = _run(tmp_path / "absent.toml")
    assert done.returncode == 1 and "does not exist" in done.stderr
