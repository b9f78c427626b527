"""The built .debs (`make deb`, into dist/ or $SLINFER_DEB_DIR): what an administrator relies on is in them.
packaging/ci-packages.sh runs these right after the build; without built packages they skip, saying so, or fail
where SLINFER_REQUIRE_ARTEFACTS=1 (CI: tests/packaging/artefacts.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from slinfer import config as config_mod
from tests.packaging.artefacts import missing

REPO = Path(__file__).resolve().parents[2]
DEB_DIR = Path(os.environ.get("SLINFER_DEB_DIR", REPO / "dist"))
HEADER = Path("/usr/include/slurm/slurm_version.h")
PLUGIN_DIR = "/usr/lib/x86_64-linux-gnu/slurm-wlm"


def _deb(name: str) -> Path:
    # The system's release only: `make deb-spank` puts other releases' slinfer-spank (+slurmR) beside it.
    found = sorted(p for p in DEB_DIR.glob(f"{name}_*_amd64.deb") if "+slurm" not in p.name)
    if not found:
        missing(f"no {name} .deb in {DEB_DIR}: run make deb")
    return found[-1]


def _field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("debs")
    for name in ("slinfer", "slinfer-spank"):
        subprocess.run(["dpkg-deb", "-x", str(_deb(name)), str(root)], check=True)
    return root


def test_spank_package_depends_on_the_slurm_release_it_was_built_for() -> None:
    number = int(re.search(r"SLURM_VERSION_NUMBER (0x[0-9a-fA-F]+)", HEADER.read_text()).group(1), 16)  # type: ignore[union-attr]
    release = f"{number >> 16}.{(number >> 8) & 0xFF:02d}"
    following = f"{number >> 16}.{((number >> 8) & 0xFF) + 1:02d}"
    depends = _field(_deb("slinfer-spank"), "Depends")
    assert f"slurm-wlm-basic-plugins (>= {release}), slurm-wlm-basic-plugins (<< {following})" in depends
    version = _field(_deb("slinfer-spank"), "Version")
    assert f"slinfer (= {version})" in depends


def test_slinfer_package_runs_on_debians_python_and_ships_the_config_as_conffile() -> None:
    deb = _deb("slinfer")
    assert "python3.11" in _field(deb, "Depends")
    conffiles = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True, text=True,
                               check=True).stdout.split()
    assert conffiles == ["/etc/slinfer/slinfer.toml"]


def test_packaged_config_loads_and_its_example_catalog_is_commented(tree: Path) -> None:
    path = tree / "etc/slinfer/slinfer.toml"
    config = config_mod.parse(tomllib.loads(path.read_text()), str(path))
    assert config.models == []
    text = path.read_text()
    assert "# [[models]]" in text and "# python = " in text
    # The commented example is itself valid config once uncommented.
    example = re.sub(r"^# ?", "", text[text.index("# [[models]]"):], flags=re.M)
    example = "\n".join(line for line in example.splitlines() if not line.startswith("#"))
    models = config_mod.parse(tomllib.loads(example)).models
    assert [m.name for m in models] == ["llama-3.1-8b", "qwen2.5-72b"]
    assert models[1].engine_command[0] == "apptainer"


def test_commands_and_hook_link_into_the_private_environment(tree: Path) -> None:
    for link, target in [("usr/bin/slinfer", "opt/slinfer/bin/slinfer"),
                         ("usr/bin/slinfer-agent", "opt/slinfer/bin/slinfer-agent"),
                         ("usr/bin/slinfer-controller", "opt/slinfer/bin/slinfer-controller"),
                         ("usr/bin/slinfer-gateway", "opt/slinfer/bin/slinfer-gateway"),
                         ("usr/libexec/slinfer/slinfer-hook", "opt/slinfer/bin/slinfer-hook")]:
        assert os.readlink(tree / link) == f"/{target}"
        script = (tree / target).read_text()
        assert script.startswith("#!/opt/slinfer/bin/python\n"), script[:80]
    assert os.readlink(tree / "opt/slinfer/bin/python3.11") == "/usr/bin/python3.11"
    cfg = (tree / "opt/slinfer/pyvenv.cfg").read_text()
    assert "home = /usr/bin" in cfg and "/opt/slinfer" in cfg


def test_nothing_in_the_package_names_the_build_folder(tree: Path) -> None:
    found = subprocess.run(["grep", "-rlI", "build/deb/", str(tree / "opt/slinfer")], capture_output=True,
                           text=True, check=False)
    assert found.stdout == ""
    assert not list((tree / "opt/slinfer").rglob("__pycache__"))


def test_units_and_plugstack_snippet(tree: Path) -> None:
    agent = (tree / "lib/systemd/system/slinfer-agent.service").read_text()
    # Restarting the agent must leave engines running; the next agent re-adopts them.
    assert re.search(r"^KillMode=process$", agent, re.M)
    assert re.search(r"^ExecStart=/usr/bin/slinfer-agent --config /etc/slinfer/slinfer.toml$", agent, re.M)
    assert not re.search(r"^RuntimeDirectory=", agent, re.M)
    controller = (tree / "lib/systemd/system/slinfer-controller.service").read_text()
    assert re.search(r"^ExecStart=/usr/bin/slinfer-controller ", controller, re.M)
    assert re.search(r"^User=slinfer$", controller, re.M)
    assert "u slinfer " in (tree / "usr/lib/sysusers.d/slinfer.conf").read_text()
    gateway = (tree / "lib/systemd/system/slinfer-gateway.service").read_text()
    assert re.search(r"^ExecStart=/usr/bin/slinfer-gateway --config /etc/slinfer/slinfer.toml --workers ", gateway,
                     re.M)
    assert re.search(r"^ExecReload=/bin/kill -HUP \$MAINPID$", gateway, re.M)  # the rolling restart
    assert json.loads((tree / "usr/share/slinfer/grafana/slinfer-dashboard.json").read_text())["panels"]
    for unit in (agent, controller, gateway):
        (doc,) = re.findall(r"^Documentation=file://(\S+)$", unit, re.M)
        assert (tree / doc.lstrip("/")).is_file(), doc

    lines = [line for line in (tree / "etc/slurm/plugstack.conf.d/slinfer.conf").read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines == [f"required {PLUGIN_DIR}/spank_slinfer.so hook=/usr/libexec/slinfer/slinfer-hook "
                     "config=/etc/slinfer/slinfer.toml rundir=/run/slinfer timeout=60 pool_users=slinfer"]
    assert (tree / PLUGIN_DIR.lstrip("/") / "spank_slinfer.so").is_file()


def test_the_postinst_generates_the_token_with_the_packaged_script(tree: Path) -> None:
    script = tree / "usr/libexec/slinfer/ensure-token"
    assert script.is_file() and script.stat().st_mode & 0o111
    postinst = subprocess.run(["dpkg-deb", "-I", str(_deb("slinfer")), "postinst"], capture_output=True, text=True,
                              check=True).stdout
    assert "/usr/libexec/slinfer/ensure-token /etc/slinfer/slinfer.toml" in postinst
