"""Each release's slinfer-spank .deb (`make deb-spank SLURM_RELEASE=...`, into dist/ or $SLINFER_DEB_DIR) installs
with dpkg into that release's root (/opt/slurm/RELEASE, `make slurm`) and its plugin loads in that root's Slurm.

The root itself is never changed: the install goes into an overlay on top of it (other beds use the root). The
`slinfer` package the .deb depends on is built for Debian 12's python3.11, which these roots do not carry, so dpkg
is told to ignore that one dependency, and only that one: the pin on the release's Slurm is checked as it is.
Run by packaging/ci-packages.sh; as root (mount, chroot); without a root or a .deb they skip, saying so, or fail
where SLINFER_REQUIRE_ARTEFACTS=1 (CI: tests/packaging/artefacts.py).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.packaging.artefacts import missing

REPO = Path(__file__).resolve().parents[2]
DEB_DIR = Path(os.environ.get("SLINFER_DEB_DIR", REPO / "dist"))
ROOTS = Path("/opt/slurm")
PLUGIN = "/usr/lib/x86_64-linux-gnu/slurm-wlm/spank_slinfer.so"
# The system's own 22.05 plugin (make spank): what the root's loader must refuse.
OTHER_PLUGIN = REPO / "spank" / "spank_slinfer.so"
# A site's slurm.conf in its smallest form: sbatch --help reads it, and the plugin stack, without a slurmctld.
SLURM_CONF = ("ClusterName=pkgtest\nSlurmctldHost=localhost\nPlugStackConfig=/etc/slurm/plugstack.conf\n"
              "NodeName=n1 CPUs=1\nPartitionName=p Nodes=n1\n")


def _releases() -> list[str]:
    found = sorted(p.parent.name for p in ROOTS.glob("*/.complete"))
    return found or ["none"]


@pytest.fixture(params=_releases())
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """(release, the .deb, the merged overlay of that release's root)."""
    if request.param == "none":
        missing(f"no Slurm release root under {ROOTS}: make slurm SLURM_RELEASE=24.11")
    if os.geteuid() != 0:
        missing("needs root (overlay mount, chroot)")
    release = str(request.param)
    debs = sorted(DEB_DIR.glob(f"slinfer-spank_*+slurm{release}_amd64.deb"))
    if not debs:
        missing(f"no slinfer-spank .deb for {release} in {DEB_DIR}: make deb-spank SLURM_RELEASE={release}")
    for name in ("upper", "work", "merged"):
        (tmp_path / name).mkdir()
    merged = tmp_path / "merged"
    # The root's own files only: overlayfs does not carry the bed's bind mounts under it.
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={ROOTS / release},upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}",
                    str(merged)], check=True)
    try:
        yield release, debs[-1], merged
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def _in(merged: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["chroot", str(merged), *argv], capture_output=True, text=True, check=check, timeout=60)


def test_the_release_deb_installs_into_its_root_and_its_plugin_loads_there(root: tuple[str, Path, Path]) -> None:
    release, deb, merged = root
    assert _in(merged, "slurmd", "-V").stdout.startswith(f"slurm-wlm {release}.")
    (merged / "tmp" / deb.name).write_bytes(deb.read_bytes())
    _in(merged, "dpkg", "-i", "--ignore-depends=slinfer", f"/tmp/{deb.name}")
    assert _in(merged, "dpkg-query", "-W", "-f=${Status}", "slinfer-spank").stdout == "install ok installed"

    # The Slurm pin is met by the root's Slurm (dpkg checked it; so do we, by the numbers).
    depends = _in(merged, "dpkg-query", "-W", "-f=${Depends}", "slinfer-spank").stdout
    pins = re.findall(r"slurm-wlm-basic-plugins \((>=|<<) ([\d.]+)\)", depends)
    assert [op for op, _ in pins] == [">=", "<<"], depends
    have = _in(merged, "dpkg-query", "-W", "-f=${Version}", "slurm-wlm-basic-plugins").stdout
    for op, version in pins:
        assert _in(merged, "dpkg", "--compare-versions", have, {">=": "ge", "<<": "lt"}[op], version,
                   check=False).returncode == 0, (have, op, version)

    # Debian's plugstack.conf includes plugstack.conf.d/*.conf, where the package put its line.
    (merged / "etc/slurm/slurm.conf").write_text(SLURM_CONF)
    loaded = _in(merged, "sbatch", "--help", check=False)
    assert loaded.returncode == 0, loaded.stderr
    assert "--inference=MODEL" in loaded.stdout and "--inference-pool" in loaded.stdout

    # The same check refuses a plugin of another release: the pass above is the release's own plugin loading.
    if not OTHER_PLUGIN.is_file():
        missing(f"{OTHER_PLUGIN} is not built (make spank): the negative check needs it")
    (merged / PLUGIN.lstrip("/")).write_bytes(OTHER_PLUGIN.read_bytes())
    refused = _in(merged, "sbatch", "--help", check=False)
    assert refused.returncode != 0
    assert "Incompatible" in refused.stderr, refused.stderr
