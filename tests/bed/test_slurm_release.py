"""The bed on the Slurm release it runs (the system's 22.05, or SLINFER_SLURM=/opt/slurm/24.11|26.05): its
clients, `dev-cluster status`/`env` and `slinfer doctor` all name that one release, and the plugin loaded is
the one built for it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from slinfer.dev import devcluster
from slinfer.slurm import parse
from tests.fakes.slurmbed import SlurmBed

pytestmark = pytest.mark.bed

SLINFER = str(Path(sys.executable).parent / "slinfer")


def _cli(bed: SlurmBed, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SLINFER, *args], env=bed.env(), capture_output=True, text=True, timeout=120, check=False)


def test_clients_status_and_env_name_the_release(slurm_bed: SlurmBed) -> None:
    release = slurm_bed.bed.release()
    root = slurm_bed.bed.slurm_root
    assert release == (root.release if root else "22.05")
    # The clients the bed's users get are that release's, and so is the daemon that answers them.
    assert parse.release(slurm_bed.run("sbatch", "--version").stdout) == release
    ping = slurm_bed.run("scontrol", "show", "config").stdout
    assert re.search(rf"^SLURM_VERSION\s*=\s*{re.escape(release)}\.", ping, re.M), ping[:300]
    status = json.loads(_cli(slurm_bed, "dev-cluster", "status", "--state-dir", str(slurm_bed.bed.state),
                             "--port-base", str(slurm_bed.bed.port_base)).stdout)
    assert release in status["slurm"]
    env = _cli(slurm_bed, "dev-cluster", "env", "--state-dir", str(slurm_bed.bed.state)).stdout
    if root is not None:
        assert f'export PATH="{slurm_bed.bed.slurm_bin}:' in env


def test_doctor_names_the_plugins_release(slurm_bed: SlurmBed) -> None:
    done = _cli(slurm_bed, "doctor", "--config", str(slurm_bed.bed.config), "--skip", "controller",
                "--skip", "engines", "--skip", "munge")
    line = next((x for x in done.stdout.splitlines() if "plugin-version" in x), "")
    release = slurm_bed.bed.release()
    assert line.startswith("OK"), done.stdout + done.stderr
    assert str(devcluster.plugin_path(slurm_bed.bed)) in line
    assert f"built for Slurm {release}." in line and f"running {release}." in line
