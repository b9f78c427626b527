"""The built RPMs (`make rpm [SLURM_RELEASE=...]`, into dist/ or $SLINFER_RPM_DIR), one pair per Slurm release:
what an EL administrator relies on is in them, and each plugin is the one for its release. packaging/ci-packages.sh
runs these right after building the RPMs for 22.05 and each release root; without built RPMs they skip, saying so,
or fail where SLINFER_REQUIRE_ARTEFACTS=1 (CI: tests/packaging/artefacts.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from slinfer.cli import doctor
from tests.packaging.artefacts import missing

REPO = Path(__file__).resolve().parents[2]
RPM_DIR = Path(os.environ.get("SLINFER_RPM_DIR", REPO / "dist"))
VERSION = re.search(r'^version = "(.*)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)  # type: ignore[union-attr]
PLUGIN = "/usr/lib64/slurm/spank_slinfer.so"
SNIPPET = "/etc/slurm/plugstack.conf.d/slinfer.conf"


def _releases() -> list[str]:
    found = sorted({m.group(1) for p in RPM_DIR.glob(f"slinfer-spank-{VERSION}-1.slurm*.x86_64.rpm")
                    if (m := re.search(r"-1\.slurm(\d+\.\d+)\.x86_64\.rpm$", p.name))})
    return found or ["none"]


@pytest.fixture(params=_releases())
def release(request: pytest.FixtureRequest) -> str:
    if request.param == "none":
        missing(f"no slinfer-spank RPM in {RPM_DIR}: run make rpm")
    if not shutil.which("rpm"):
        missing("rpm is not installed (apt-get install rpm)")
    return str(request.param)


def _rpm(name: str, release: str) -> Path:
    path = RPM_DIR / f"{name}-{VERSION}-1.slurm{release}.x86_64.rpm"
    assert path.is_file(), f"{path} is missing beside its slinfer-spank"
    return path


def _query(rpm: Path, *args: str) -> list[str]:
    out = subprocess.run(["rpm", "-qp", *args, str(rpm)], capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def _extract(rpm: Path, dest: Path, *paths: str) -> Path:
    """The named files of the package under dest (rpm2cpio | cpio, no install)."""
    dest.mkdir(parents=True, exist_ok=True)
    cpio = subprocess.Popen(["rpm2cpio", str(rpm)], stdout=subprocess.PIPE)
    subprocess.run(["cpio", "-idm", "--quiet", *[f".{p}" for p in paths]], stdin=cpio.stdout, cwd=dest, check=True)
    assert cpio.wait() == 0
    return dest


def _following(release: str) -> str:
    major, minor = release.split(".")
    return f"{major}.{int(minor) + 1:02d}"


def test_release_tag_carries_the_slurm_release(release: str) -> None:
    for name in ("slinfer", "slinfer-spank"):
        (tag,) = _query(_rpm(name, release), "--qf", "%{RELEASE}\n")
        assert tag == f"1.slurm{release}"


def test_spank_requires_exactly_its_slurm_release_and_the_same_build(release: str) -> None:
    spank = _rpm("slinfer-spank", release)
    requires = _query(spank, "--requires")
    assert f"slurm >= {release}" in requires
    assert f"slurm < {_following(release)}" in requires
    assert f"slinfer = {VERSION}-1.slurm{release}" in requires
    assert f"slinfer-spank = {VERSION}-1.slurm{release}" in _query(spank, "--provides")


def test_spank_ships_the_plugin_built_for_that_release(release: str, tmp_path: Path) -> None:
    spank = _rpm("slinfer-spank", release)
    assert sorted(_query(spank, "--list")) == [SNIPPET, PLUGIN]
    assert _query(spank, "--configfiles") == [SNIPPET]
    tree = _extract(spank, tmp_path, PLUGIN, SNIPPET)
    # What Slurm's loader compares: the plugin's embedded plugin_version against its own major.minor.
    built = doctor.version_text(doctor.elf_symbol_u32(tree / PLUGIN.lstrip("/"), "plugin_version"))
    assert built.startswith(f"{release}."), built
    lines = [line for line in (tree / SNIPPET.lstrip("/")).read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines == [f"required {PLUGIN} hook=/usr/libexec/slinfer/slinfer-hook "
                     "config=/etc/slinfer/slinfer.toml rundir=/run/slinfer timeout=60 pool_users=slinfer"]
    assert f"built against Slurm {release}" in (tree / SNIPPET.lstrip("/")).read_text()


def test_slinfer_requires_the_distributions_python_and_provides_no_library(release: str) -> None:
    rpm = _rpm("slinfer", release)
    requires = _query(rpm, "--requires")
    assert {"python3.11", "glibc", "libstdc++.so.6()(64bit)", "shadow-utils"} <= set(requires)
    # AutoReqProv is off: the venv's PyPI shared objects must not be offered to the rest of the system.
    provides = _query(rpm, "--provides")
    assert not [p for p in provides if ".so" in p], provides
    assert f"slinfer = {VERSION}-1.slurm{release}" in provides


def test_slinfer_files_units_commands_and_the_config(release: str, tmp_path: Path) -> None:
    rpm = _rpm("slinfer", release)
    files = set(_query(rpm, "--list"))
    for path in ("/usr/lib/systemd/system/slinfer-agent.service", "/usr/lib/systemd/system/slinfer-controller.service",
                 "/usr/bin/slinfer", "/usr/bin/slinfer-agent", "/usr/bin/slinfer-controller",
                 "/usr/libexec/slinfer/slinfer-hook", "/usr/libexec/slinfer/ensure-token",
                 "/etc/slinfer/slinfer.toml", "/var/lib/slinfer", "/opt/slinfer/bin/python3.11",
                 "/opt/slinfer/pyvenv.cfg", "/usr/share/doc/slinfer/README.md"):
        assert path in files, path
    # The application and its dependencies, but never the plugin (that is slinfer-spank's, per release).
    assert any(re.match(r"/opt/slinfer/lib/python3\.11/site-packages/slinfer/controller/main\.py$", f) for f in files)
    assert any(f.startswith("/opt/slinfer/lib/python3.11/site-packages/grpc/") for f in files)
    assert not [f for f in files if f.endswith("spank_slinfer.so")]
    assert _query(rpm, "--configfiles") == ["/etc/slinfer/slinfer.toml"]
    modes = {line.split()[-1]: line.split()[:2] for line in
             _query(rpm, "--qf", "[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILENAMES}\n]")}
    assert modes["/etc/slinfer/slinfer.toml"] == ["-rw-r-----", "root:slinfer"]
    assert modes["/var/lib/slinfer"] == ["drwx------", "slinfer:slinfer"]

    tree = _extract(rpm, tmp_path, "/usr/bin/slinfer", "/opt/slinfer/bin/slinfer-agent", "/opt/slinfer/bin/python3.11",
                    "/usr/lib/systemd/system/slinfer-agent.service")
    assert os.readlink(tree / "usr/bin/slinfer") == "/opt/slinfer/bin/slinfer"
    assert os.readlink(tree / "opt/slinfer/bin/python3.11") == "/usr/bin/python3.11"
    assert (tree / "opt/slinfer/bin/slinfer-agent").read_text().startswith("#!/opt/slinfer/bin/python\n")
    agent = (tree / "usr/lib/systemd/system/slinfer-agent.service").read_text()
    assert re.search(r"^KillMode=process$", agent, re.M)
    # Nothing names the build folder (the venv was relocated to /opt/slinfer).
    assert "build/rpm" not in (tree / "opt/slinfer/bin/slinfer-agent").read_text()
