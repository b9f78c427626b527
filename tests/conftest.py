"""Fixtures shared by all tests. `slurm_bed` is one real dev-cluster (munged, slurmctld, slurmd, the compiled
SPANK plugin, the agent and the controller) for the whole test session, in its own folder and ports so that a
developer's `make demo` bed is left alone."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from slinfer.dev import devcluster
from tests.fakes.slurmbed import SlurmBed

TEST_STATE = Path(os.environ.get("SLINFER_TEST_STATE", "/tmp/slinfer-test"))
TEST_PORT_BASE = int(os.environ.get("SLINFER_TEST_PORT_BASE", 26800))
# The two-node bed beside the session's one-node bed: head ports base+100.., node subnet and job ids of its own.
MULTI_STATE = Path(f"{TEST_STATE}-multi")
MULTI_PORT_BASE = TEST_PORT_BASE + 100
MULTI_NODES = 2


@pytest.fixture(scope="session")
def slurm_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmBed]:
    bed = devcluster.Bed(TEST_STATE, TEST_PORT_BASE)
    devcluster.down(bed)
    shutil.rmtree(TEST_STATE, ignore_errors=True)
    devcluster.up(bed, controller=os.path.exists(Path(devcluster.REPO_ROOT, "controller", "main.py")))
    # The bed's unprivileged users write their jobs' output here: a folder they can reach, unlike pytest's own.
    jobs_dir = TEST_STATE / "job-output"
    jobs_dir.mkdir()
    jobs_dir.chmod(0o1777)
    try:
        yield SlurmBed(bed, jobs_dir)
    finally:
        left = devcluster.down(bed)
        assert not left, f"dev-cluster down left processes {left}"


@pytest.fixture(scope="module")
def multi() -> Iterator[SlurmBed]:
    """A bed of two compute nodes, each a slurmd and an agent in namespaces of its own on a bridge, for one
    module: it goes down with nothing left, its links restored first if a test took a node off the network."""
    bed = devcluster.Bed(MULTI_STATE, MULTI_PORT_BASE, nodes=MULTI_NODES)
    devcluster.down(bed)
    shutil.rmtree(MULTI_STATE, ignore_errors=True)
    devcluster.up(bed)
    jobs_dir = MULTI_STATE / "job-output"
    jobs_dir.mkdir()
    jobs_dir.chmod(0o1777)
    try:
        yield SlurmBed(bed, jobs_dir)
    finally:
        net = bed.network
        assert net is not None
        if net.left():  # a test that took a node off the network and failed before it went down
            for i in net.indexes:
                net.set_link(i, True)
        left = devcluster.down(bed)
        assert not left, f"dev-cluster down left processes {left}"
        assert not net.left(), f"dev-cluster down left {net.left()}"


@pytest.fixture(autouse=True)
def node_left_usable(request: pytest.FixtureRequest) -> Iterator[None]:
    """A bed test must not leave the node drained or down: that would fail every later test for a reason not
    theirs. One that does fails here with Slurm's reason and slurmd's log of the test, and the node is resumed."""
    if "slurm_bed" not in request.fixturenames:
        yield
        return
    slurm_bed: SlurmBed = request.getfixturevalue("slurm_bed")
    log_offset = slurm_bed.slurmd_log_size()
    yield
    state = slurm_bed.node_state()
    if "drain" not in state and "down" not in state:
        return
    reason = slurm_bed.node_reason()
    log = slurm_bed.slurmd_log_since(log_offset)
    slurm_bed.resume_node()
    pytest.fail(f"the test left the node {state} ({reason!r}); slurmd logged meanwhile:\n{log[-6000:]}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `disruptive` (after a restart of Slurm's daemons, or a job ended by its time limit under
    load, Slurm 22.05 may keep the finished job COMPLETING for minutes) run last, so that the node's state does
    not leak into the tests that check the node is idle."""
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)
