"""Replicas on nodes that Slurm empties (an administrator's drain, `scontrol reboot ASAP`): hostlists expanded
as `scontrol show hostnames` does, `scontrol -o show node` records read for the flags that mean "emptying", and
the autoscaler's handover: a replacement first, then the drain, within the lead, with a positive control (a node
that is not leaving keeps its replica). Slurm is SlurmDouble; the bed test is in tests/bed/test_multinode.py."""

from __future__ import annotations

import logging

import pytest

from slinfer.controller.autoscaler import FINAL_DRAIN_S, Autoscaler
from slinfer.controller.nodedrain import NODE_CHECK_S
from slinfer.slurm import parse
from tests.fakes.slurm_double import Demand
from tests.unit.test_autoscaler import Bed

# `scontrol -o show node` lines as Slurm 22.05 printed them on the bed (other fields cut for width): a node in
# use that an administrator drained (`scontrol update state=drain reason=...`), the same node after
# `scontrol reboot ASAP nextstate=resume reason="kernel update"`, and in use as usual.
DRAINING = ("NodeName=node1 Arch=x86_64 CoresPerSocket=1  CPUAlloc=1 CPUEfctv=8 CPUTot=8 Gres=gpu:4 "
            "NodeAddr=127.0.0.1 State=MIXED+DRAIN ThreadsPerCore=1 Partitions=debug  "
            "Reason=maintenance: new driver [root@2026-12-07T07:39:26]")
REBOOT = ("NodeName=node2 Arch=x86_64 CoresPerSocket=1  CPUAlloc=1 CPUEfctv=8 CPUTot=8 Gres=gpu:4 "
          "State=MIXED+DRAIN+REBOOT_REQUESTED ThreadsPerCore=1 NextState=RESUME Partitions=debug  "
          "Reason=kernel update [root@2026-12-07T07:39:55]")
IN_USE = ("NodeName=node3 Arch=x86_64 CoresPerSocket=1  CPUAlloc=1 CPUEfctv=8 CPUTot=8 Gres=gpu:4 State=MIXED "
          "ThreadsPerCore=1 Partitions=debug")


def _watch_nodes(bed: Bed) -> None:
    """The bed's autoscaler, asking SlurmDouble about nodes as main.py wires it (SlurmClient is both)."""
    bed.scaler = Autoscaler([bed.model], bed.registry, lambda m: bed.demand.get(m, Demand()), bed.slurm,
                            clock=bed.clock, settle_s=0.0, nodes=bed.slurm)


def test_hostlists_expand_as_scontrol_show_hostnames_does() -> None:
    assert parse.hostnames("node1") == ["node1"]
    assert parse.hostnames("gpu[01-03,7],login1") == ["gpu01", "gpu02", "gpu03", "gpu7", "login1"]
    assert parse.hostnames("rack[1-2]-n[1-2]") == ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]
    with pytest.raises(ValueError, match="not a hostlist range"):
        parse.hostnames("node[a-b]")


def test_a_drain_and_a_reboot_asap_are_leaving_and_a_node_in_use_is_not() -> None:
    leaving = parse.leaving_nodes("\n".join([DRAINING, REBOOT, IN_USE]))
    assert set(leaving) == {"node1", "node2"}
    assert leaving["node1"].startswith("MIXED+DRAIN (maintenance: new driver")
    assert leaving["node2"].startswith("MIXED+DRAIN+REBOOT_REQUESTED (kernel update")


async def test_a_replica_on_a_leaving_node_is_replaced_then_drained_and_the_other_stays(
        caplog: pytest.LogCaptureFixture) -> None:
    bed = Bed(min_replicas=2)
    _watch_nodes(bed)
    await bed.step()
    first, second = [job_id for job_id in bed.slurm.active()]
    bed.ready(first, node="node1")
    bed.ready(second, node="node3")
    await bed.step(NODE_CHECK_S)
    assert len(bed.slurm.active()) == 2 and not bed.slurm.cancels
    bed.slurm.leaving = {"node1": "MIXED+DRAIN (maintenance)"}
    with caplog.at_level(logging.INFO, "slinfer.controller.autoscaler"):
        await bed.step(NODE_CHECK_S)
    assert "Slurm empties its node (node1: MIXED+DRAIN (maintenance))" in caplog.text
    # The replacement is asked for at once; the leaving replica still serves until it is READY.
    (replacement,) = [j for j in bed.slurm.active() if j not in (first, second)]
    assert not bed.registry.get(first).draining
    bed.ready(replacement, node="node4")
    with caplog.at_level(logging.INFO, "slinfer.controller.autoscaler"):
        await bed.step()
    assert bed.registry.get(first).draining, "the leaving replica was not drained once its replacement served"
    assert "its node's handover limit" in caplog.text and "replacement ready" in caplog.text
    # Idle, it is cancelled: the node can be emptied. The replica on node3 (not leaving) was never touched.
    await bed.step()
    assert bed.slurm.cancels == [first]
    assert not bed.registry.get(second).draining
    assert bed.scaler.decisions[("tiny", "drain_node_leaving")] == 1


async def test_without_a_replacement_the_replica_leaves_within_the_lead() -> None:
    bed = Bed(min_replicas=1, max_replicas=1)
    _watch_nodes(bed)
    await bed.step()
    (job,) = bed.slurm.active()
    bed.ready(job, node="node2")
    await bed.step(NODE_CHECK_S)
    bed.slurm.leaving = {"node2": "MIXED+DRAIN+REBOOT_REQUESTED (Reboot ASAP)"}
    await bed.step(NODE_CHECK_S)
    noticed = bed.clock.now
    lead = bed.scaler.lead_time("tiny")
    # max_replicas 1: no replacement can be submitted; the replica keeps serving until FINAL_DRAIN_S before the
    # handover limit, then is drained and, idle, cancelled.
    while not bed.registry.get(job).draining:
        assert bed.clock.now - noticed <= lead - FINAL_DRAIN_S + 2.0, "the replica outstayed its handover limit"
        await bed.step()
    assert bed.clock.now - noticed >= lead - FINAL_DRAIN_S - 2.0, "drained before its handover limit required it"
    await bed.step()
    assert bed.slurm.cancels == [job]


async def test_slurm_is_asked_about_nodes_at_most_every_node_check_s() -> None:
    bed = Bed(min_replicas=1)
    _watch_nodes(bed)
    await bed.step()
    (job,) = bed.slurm.active()
    bed.ready(job, node="node3")
    for _ in range(int(3 * NODE_CHECK_S / 2.0)):
        await bed.step()
    assert 2 <= len(bed.slurm.nodes_asked) <= 4, bed.slurm.nodes_asked
    assert bed.slurm.nodes_asked[-1] == ["node3"]
