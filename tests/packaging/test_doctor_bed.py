"""`slinfer doctor` against the real bed (Slurm, munge, the compiled plugin, the agent, the controller, vLLM):
every check passes, and breaking one real part turns exactly its line to FAIL."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.fakes.slurmbed import SlurmBed

pytestmark = pytest.mark.bed

CHECKS = ["config", "plugin", "plugin-version", "hook", "agent", "tls", "controller", "engine-hop", "engine tiny",
          "engine smollm2", "engine tiny-tp2", "engine tiny-2node", "engine tiny-embed",
          "engine tiny-lora",
          "containment", "engine-python", "pool", "munge"]
# The bed's engines serve plain HTTP on loopback: doctor says so on a NOTE line, which does not fail it.
NOTES = {"engine-hop"}


def _doctor(bed: SlurmBed, *extra: str) -> subprocess.CompletedProcess[str]:
    return bed.run(sys.executable, "-m", "slinfer.cli.main", "doctor", "--config", str(bed.bed.config), *extra,
                   check=False, timeout=300)


def test_every_check_is_ok_on_the_bed(slurm_bed: SlurmBed) -> None:
    done = _doctor(slurm_bed)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == [f"{'NOTE' if check in NOTES else 'OK  '} {check}"
                                                         for check in CHECKS]
    assert "tls: mutual TLS; CA " in done.stdout
    assert f"controller: 127.0.0.1:{slurm_bed.bed.controller_port} answers gRPC over TLS" in done.stdout
    assert f"agent: {slurm_bed.bed.run_dir}/agent.sock (root, 0600) answers ListEngines" in done.stdout
    assert f"munge: munge -n | unmunge via {slurm_bed.bed.munge_socket}: Success" in done.stdout
    assert "containment: engines join their job's extern-step cgroups" in done.stdout
    # The warm template may run the bed's venv as root (root's alone), and sbatch and the agent agree on the pool.
    assert "and its import path are root's alone" in done.stdout
    assert "pool: only root may publish an engine to the shared pool (sbatch and the agent agree)" in done.stdout


def test_a_stopped_munged_fails_the_munge_line_only(slurm_bed: SlurmBed, tmp_path_factory: pytest.TempPathFactory
                                                    ) -> None:
    """The bed's slurm.conf names its munged socket (AuthInfo=socket=): doctor must use that one. A copy of the
    config pointing at a socket with nothing behind it fails that line, with the fix."""
    conf = slurm_bed.bed.conf.read_text()
    broken = tmp_path_factory.mktemp("conf") / "slurm.conf"
    broken.write_text(conf.replace(f"AuthInfo=socket={slurm_bed.bed.munge_socket}",
                                   f"AuthInfo=socket={broken.parent}/no-munged.socket"))
    done = subprocess.run(
        [sys.executable, "-m", "slinfer.cli.main", "doctor", "--config", str(slurm_bed.bed.config), "--skip", "plugin",
         "--skip", "plugin-version", "--skip", "engines"],
        env={**slurm_bed.env(), "SLURM_CONF": str(broken)}, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["OK   config", "OK   hook", "OK   agent", "OK   tls",
                                                         "OK   controller", "NOTE engine-hop",
                                                         "OK   containment", "OK   engine-python", "OK   pool",
                                                         "FAIL munge"], done.stdout
    assert f"{broken.parent}/no-munged.socket failed" in lines[-1] and "-- fix: systemctl start munge" in lines[-1]
