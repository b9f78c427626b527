"""The bed's node-state reader fails loudly when Slurm cannot answer, instead of answering "no state"."""

from __future__ import annotations

from pathlib import Path

import pytest

from slinfer.dev import devcluster


def test_node_state_raises_when_sinfo_fails(tmp_path: Path) -> None:
    # A bed whose slurmctld is not running: the real sinfo cannot reach it and exits non-zero.
    bed = devcluster.Bed(tmp_path / "no-bed", 29000)
    bed.conf.parent.mkdir(parents=True)
    bed.conf.write_text(f"ClusterName=gone\nSlurmctldHost=gone(127.0.0.1)\nSlurmctldPort={bed.slurmctld_port}\n"
                        f"NodeName={devcluster.NODE_NAME} CPUs=1\nPartitionName=p Nodes={devcluster.NODE_NAME}\n")
    with pytest.raises(RuntimeError, match=r"sinfo failed \(exit \d+\)"):
        devcluster.node_state(bed)


def test_status_reports_the_sinfo_failure_in_place_of_a_state(tmp_path: Path) -> None:
    bed = devcluster.Bed(tmp_path / "no-bed", 29000)
    assert devcluster.status(bed)["node"] == "slurmctld not running"


def test_waiting_names_the_last_failure_when_it_times_out() -> None:
    def broken() -> bool:
        raise RuntimeError("sinfo failed (exit 1): cannot reach slurmctld")

    with pytest.raises(RuntimeError, match=r"waiting for the node.*last: sinfo failed"):
        devcluster._wait_for("the node", broken, 0.5)
