"""An engine that cannot be started as the job's user fails that job, never the prolog: the node is not drained,
the job ends FAILED, and its output carries the reason. The fault is forced: the catalog gains, for this module
only, a model whose engine command is not executable (mode 0644, as the bed's venv interpreter under /root was
for an unprivileged user) and one whose command does not exist."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from slinfer.dev import devcluster
from tests.fakes.slurmbed import SlurmBed, engine_pids

pytestmark = pytest.mark.bed


@pytest.fixture(scope="module")
def broken_models(slurm_bed: SlurmBed) -> Iterator[dict[str, Path]]:
    bed = slurm_bed.bed
    not_executable = bed.state / "engine-not-executable"
    not_executable.write_text("#!/bin/sh\nexit 0\n")
    not_executable.chmod(0o644)
    missing = bed.state / "no-such-engine"
    missing.unlink(missing_ok=True)
    models = {"unrunnable": not_executable, "unfindable": missing}
    original = bed.config.read_text()
    extra = "".join(f'\n[[models]]\nname = "{name}"\nsource = "/nonexistent"\ngpus = 1\n'
                    f'engine_command = ["{path}"]\n' for name, path in models.items())
    bed.config.write_text(original + extra)
    devcluster.restart_agent(bed)
    try:
        yield models
    finally:
        bed.config.write_text(original)
        devcluster.restart_agent(bed)


@pytest.mark.parametrize(("model", "error"), [("unrunnable", "Permission denied"),
                                              ("unfindable", "No such file or directory")])
def test_an_engine_that_cannot_start_fails_the_job_and_the_node_stays_idle(
        slurm_bed: SlurmBed, broken_models: dict[str, Path], model: str, error: str) -> None:
    job = slurm_bed.sbatch(f"--inference={model}", "--gres=gpu:1", script="echo SCRIPT_RAN")
    assert slurm_bed.wait_state(job, {"FAILED", "COMPLETED"}, 90) == "FAILED", slurm_bed.output(job)
    out = slurm_bed.output(job)
    assert "engine could not be started" in out and error in out and str(broken_models[model]) in out, out
    assert "SCRIPT_RAN" not in out
    assert slurm_bed.wait_node_idle() == "idle", "a failed engine spawn drained the node"
    assert engine_pids(job) == []
