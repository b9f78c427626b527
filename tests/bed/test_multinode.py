"""A bed of two compute nodes, each a slurmd and an agent in network, UTS and mount namespaces of its own on a
bridge (`slinfer dev-cluster up --nodes 2`): the controller's replicas land on both nodes and the head's gateway
serves from both; a node taken off the network stops being routed to within agent_timeout_s, only requests in
flight there fail, replacement capacity gets READY on the other node, and the bed goes down leaving nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

import psutil
import pytest

from slinfer.config import load as load_config
from slinfer.controller.nodedrain import NODE_CHECK_S
from slinfer.dev import devcluster
from tests.bed.test_controller import MODEL, Load
from tests.conftest import MULTI_STATE
from tests.fakes.slurmbed import SlurmBed, engine_pids, wait_until

pytestmark = pytest.mark.bed

# How long the gateway may keep routing to a node whose agent fell silent: the registry drops its engines once
# the last report is agent_timeout_s old; one more second covers the agent's report interval and our polling.
ROUTING_SLACK_S = 1.0
# A request stuck on the lost node gives up after this; requests on a live engine take well under a second.
CLIENT_TIMEOUT_S = 20.0


def _gateway_metrics(bed: SlurmBed) -> str:
    # The controller's own gateway: its registry's replica states.
    with urllib.request.urlopen(f"http://127.0.0.1:{bed.bed.builtin_gateway_port}/metrics", timeout=5) as response:
        return response.read().decode()


def _replicas_in(bed: SlurmBed, state: str) -> int:
    found = re.search(rf'^slinfer_replicas\{{model="{MODEL}",state="{state}"\}} (\S+)$', _gateway_metrics(bed),
                      re.MULTILINE)
    return int(float(found.group(1))) if found else 0


def _jobs(bed: SlurmBed) -> dict[str, tuple[str, str]]:
    """The controller's live jobs: id -> (state, node)."""
    out = bed.run("squeue", "-h", "-o", "%i %j %T %N").stdout
    return {p[0]: (p[2], p[3] if len(p) > 3 else "") for p in (line.split() for line in out.splitlines())
            if len(p) >= 3 and p[1] == f"slinfer-{MODEL}"}


def _engine_env(bed: SlurmBed, job_id: str, node: str) -> dict[str, str]:
    path = bed.bed.node_run_dir(node) / "jobs" / f"{job_id}.env"
    if not path.exists():
        return {}
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def _engine_counts(bed: SlurmBed, node: str, base_url: str) -> float:
    """Requests an engine has received (finished + running + waiting), from its own /metrics, read inside the
    node's network namespace, so it answers while the node is off the bridge."""
    net = bed.bed.network
    assert net is not None
    fetch = ("import sys, urllib.request; "
             "sys.stdout.write(urllib.request.urlopen(sys.argv[1] + '/metrics', timeout=5).read().decode())")
    ns = f"--net=/run/netns/{net.namespace(bed.bed.node_index(node))}"
    base = base_url.removesuffix("/v1")
    text = subprocess.run(["nsenter", ns, "--", sys.executable, "-c", fetch, base], capture_output=True,
                          text=True, check=True, timeout=30).stdout
    names = ("vllm:request_success_total", "vllm:num_requests_running", "vllm:num_requests_waiting")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(names))


def _netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def _ready_after_submit(bed: SlurmBed, job_id: str) -> float:
    """The controller's own measure of sbatch -> READY for a job (its log line, from Slurm's submit time; the
    autoscaler's next step writes it, a moment after the registry shows the replica READY)."""
    found: list[re.Match[str]] = []

    def logged() -> bool:
        text = (bed.bed.logs / "controller.out").read_text(errors="replace")
        found[:] = list(re.finditer(rf"job {job_id} READY (\S+)s after submit", text))
        return bool(found)

    wait_until(f"the controller's READY line for job {job_id}", logged, 10, 0.2)
    return float(found[0].group(1))


def test_two_replicas_on_two_nodes_serve_through_the_head(multi: SlurmBed) -> None:
    bed = multi.bed
    net = bed.network
    assert net is not None
    # Each node is its own host: its slurmd runs in its namespace with its own host name and config.
    for node in bed.node_names:
        pid = devcluster.daemon_pid(bed, bed.daemon_name("slurmd", node))
        assert pid and _netns_inode(pid) != _netns_inode(os.getpid())
        host = subprocess.run(["nsenter", f"--uts=/proc/{pid}/ns/uts", "hostname"], capture_output=True,
                              text=True, check=True).stdout.strip()
        assert host == node
        seen = subprocess.run(["nsenter", f"--mount=/proc/{pid}/ns/mnt", "cat", str(bed.config)],
                              capture_output=True, text=True, check=True).stdout
        assert f'node_name = "{node}"' in seen and f'address = "{bed.node_address(node)}"' in seen
    # `slinfer doctor` on a node checks that node: its agent's socket, the controller over the bridge, its munge.
    node = bed.node_names[1]
    doctor = subprocess.run(devcluster.in_node(bed, node, [f"{sys.prefix}/bin/slinfer", "doctor", "--config",
                                                           str(bed.config), "--skip", "engines"]),
                            env=multi.env(), capture_output=True, text=True, timeout=120)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert f"{bed.node_run_dir(node)}/agent.sock" in doctor.stdout
    assert f"controller: {bed.head_address}:{bed.controller_port} answers" in doctor.stdout, doctor.stdout
    began = time.monotonic()
    multi.admin("scale", MODEL, "2")
    wait_until("two READY replicas", lambda: _replicas_in(multi, "READY") == 2, 300)
    jobs = _jobs(multi)
    assert len(jobs) == 2, jobs
    nodes = {node for _, node in jobs.values()}
    assert nodes == set(bed.node_names), f"both replicas should spread over the nodes: {jobs}"
    urls = {}
    for job_id, (_, node) in jobs.items():
        env = _engine_env(multi, job_id, node)
        assert env["OPENAI_BASE_URL"].startswith(f"http://{bed.node_address(node)}:"), env
        urls[job_id] = (node, env["OPENAI_BASE_URL"])
        # The engine runs inside its node: the same network namespace as that node's slurmd.
        pids = engine_pids(job_id, run_dir=bed.node_run_dir(node))
        slurmd = devcluster.daemon_pid(bed, bed.daemon_name("slurmd", node))
        assert pids and all(_netns_inode(p) == _netns_inode(slurmd) for p in pids), (job_id, node, pids)
        print(f"\njob {job_id} on {node} ({bed.node_address(node)}): sbatch -> READY "
              f"{_ready_after_submit(multi, job_id):.1f}s (controller's measure)")
    print(f"scale 2 -> both READY in {time.monotonic() - began:.1f}s")

    before = {job: _engine_counts(multi, node, url) for job, (node, url) in urls.items()}
    load = Load(multi, concurrency=6, max_tokens=8).start()
    time.sleep(8)
    load.stop()
    after = {job: _engine_counts(multi, node, url) for job, (node, url) in urls.items()}
    served = {job: after[job] - before[job] for job in urls}
    assert load.outcomes["ok"] > 10 and set(load.outcomes) == {"ok"}, (load.outcomes, load.errors[:3])
    assert all(n > 0 for n in served.values()), f"the gateway should route to both nodes: {served}"
    assert sum(served.values()) == load.outcomes["ok"], (served, load.outcomes)
    print(f"{load.outcomes['ok']} requests through the head's gateway, per engine: "
          + ", ".join(f"{urls[j][0]}={n:.0f}" for j, n in served.items()))


def _outstanding(bed: SlurmBed, job_id: str) -> int:
    """The gateway's requests in flight on a job's replica (`slinfer status`), 0 once it is not listed."""
    out = bed.run(sys.executable, "-m", "slinfer.cli.main", "status", "--json", timeout=30).stdout
    return max((int(r.get("outstanding", 0)) for r in json.loads(out).get("replicas", [])
                if r.get("jobId") == job_id), default=0)


def _node_state(bed: SlurmBed, node: str) -> str:
    record = bed.run("scontrol", "-o", "show", "node", node).stdout
    return next(f[len("State="):] for f in record.split() if f.startswith("State="))


def test_a_reboot_asap_moves_the_replica_to_the_other_node_with_no_failed_request(multi: SlurmBed) -> None:
    """`scontrol reboot ASAP` of the node a replica runs on: the controller notices it (within NODE_CHECK_S),
    submits the replacement at once (Slurm places it on the other node), drains the old replica once the new one
    is READY, and cancels it idle; no request fails. Another user's job on that node keeps it busy, so that Slurm
    never issues the reboot to this machine: the test cancels the reboot at the end. The path without a
    replacement (a one-node site) is in tests/unit/test_nodedrain.py."""
    multi.admin("scale", MODEL, "1")
    wait_until("one replica", lambda: len(_jobs(multi)) == 1 and _replicas_in(multi, "READY") == 1, 300)
    ((job, (_, node)),) = _jobs(multi).items()
    (other,) = [n for n in multi.bed.node_names if n != node]
    keeper = multi.sbatch(f"--nodelist={node}", "--job-name=keeper", script="sleep 900",
                          user=devcluster.BED_USERS[1])
    load = Load(multi, concurrency=4, max_tokens=8)
    try:
        wait_until("the other user's job running", lambda: multi.state(keeper) == "RUNNING", 60)
        load.start()
        # Positive control: nothing moves while the node is not leaving.
        time.sleep(NODE_CHECK_S + 2)
        assert list(_jobs(multi)) == [job], _jobs(multi)
        multi.run("scontrol", "reboot", "ASAP", "nextstate=resume", "reason=slinfer-test kernel update", node)
        state = _node_state(multi, node)
        assert "REBOOT_REQUESTED" in state and "DRAIN" in state, f"the reboot was not requested: {state}"
        moved = wait_until("the replica moved to the other node",
                           lambda: [n for _, n in _jobs(multi).values()] == [other]
                           and _replicas_in(multi, "READY") == 1, 300)
        time.sleep(3)
        load.stop()
        replacement = list(_jobs(multi))
        print(f"\nreboot ASAP of {node}: job {job} replaced by {replacement} on {other}, the node free of slinfer "
              f"{moved:.1f}s after the request; requests {dict(load.outcomes)}")
        assert load.outcomes["ok"] > 20 and set(load.outcomes) == {"ok"}, (load.outcomes, load.errors[:3])
        assert "REBOOT_REQUESTED" in _node_state(multi, node), "the reboot was cancelled by something else"
    finally:
        load.stop()
        multi.run("scontrol", "cancel_reboot", node, check=False)
        multi.run("scancel", keeper, check=False)
        # Until it is gone: while it completes it still counts as the node's load, and the next test's second
        # replica would go to the other node by LLN's tie (seen in CI: both replicas on one node).
        wait_until("the other user's job gone from its node",
                   lambda: (job := multi.job(keeper)) is None or not job.holds_node, 120)


def test_a_node_lost_to_the_network_is_routed_around_and_replaced(multi: SlurmBed) -> None:
    bed = multi.bed
    net = bed.network
    assert net is not None
    timeout_s = load_config(str(bed.config)).controller.agent_timeout_s
    multi.admin("scale", MODEL, "2")  # as the test before does: this one must not depend on it having run
    wait_until("two READY replicas", lambda: _replicas_in(multi, "READY") == 2, 300)
    jobs = _jobs(multi)
    by_node = {node: job for job, (_, node) in jobs.items()}
    # The second node goes: for the first seconds Slurm still counts it up (SlurmdTimeout), and between two
    # equally loaded nodes LLN picks the first, so the controller's replacement lands on the survivor at once.
    survivor, lost = bed.node_names
    assert set(by_node) == {survivor, lost}, jobs
    urls = {node: _engine_env(multi, job, node)["OPENAI_BASE_URL"] for node, job in by_node.items()}
    before = {node: _engine_counts(multi, node, url) for node, url in urls.items()}

    load = Load(multi, concurrency=6, max_tokens=8, timeout_s=CLIENT_TIMEOUT_S).start()
    time.sleep(4)
    # The gateway's own count of requests in flight on the lost node's replica, sampled until it stops routing
    # there: besides those its engine took in, it counts those sent after the link went, which never reach it.
    stuck: list[int] = []
    sampling = threading.Event()

    def sample_stuck() -> None:
        while not sampling.is_set():
            stuck.append(_outstanding(multi, by_node[lost]))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample_stuck, daemon=True)
    sampler.start()
    t_loss = time.monotonic()
    net.set_link(bed.node_index(lost), False)
    wait_until("the gateway to see the node lost", lambda: _replicas_in(multi, "LOST") >= 1, timeout_s + 30, 0.1)
    t_stop = time.monotonic()
    sampling.set()
    sampler.join(30)
    lost_received = _engine_counts(multi, lost, urls[lost]) - before[lost]
    # The lost node's engine dies with it: the bed keeps at most two engines (each about 3 GB) on this machine.
    for pid in engine_pids(by_node[lost], run_dir=bed.node_run_dir(lost)):
        psutil.Process(pid).kill()

    wait_until("replacement capacity READY", lambda: _replicas_in(multi, "READY") >= 2, 300)
    t_ready = time.monotonic()
    replacement = {job: node for job, (state, node) in _jobs(multi).items()
                   if job not in jobs and state == "RUNNING"}
    # Every request stuck on the lost node has given up by then (the replacement mostly took longer already).
    time.sleep(max(0.0, t_stop + CLIENT_TIMEOUT_S + 2 - time.monotonic()))
    load.stop()
    survivor_received = _engine_counts(multi, survivor, urls[survivor]) - before[survivor]
    assert replacement and set(replacement.values()) == {survivor}, (replacement, _jobs(multi))
    assert "drain" not in devcluster.node_state(bed, survivor) and "down" not in devcluster.node_state(bed, survivor)

    failed = [(b, o) for b, _, o in load.log if o != "ok"]
    ok = load.outcomes["ok"]
    new_url = _engine_env(multi, *next(iter(replacement.items())))["OPENAI_BASE_URL"]
    replacement_received = _engine_counts(multi, survivor, new_url)
    # Requests the lost engine took in but whose answers never came back: the only ones allowed to fail.
    delivered_by_lost = ok - survivor_received - replacement_received
    undelivered = lost_received - delivered_by_lost
    in_flight_there = max(stuck, default=0)
    print(f"\nnode {lost} off the network: no routing there {t_stop - t_loss:.1f}s after the loss "
          f"(agent_timeout_s {timeout_s:g}); replacement on {survivor} READY {t_ready - t_loss:.1f}s after; "
          f"requests lost {len(failed)} of {len(load.log)} (taken in by its engine and never answered: "
          f"{undelivered:.0f}; in flight there by the gateway's count, at most: {in_flight_there})")
    assert t_stop - t_loss <= timeout_s + ROUTING_SLACK_S
    assert all(began < t_stop for began, _ in failed), f"a request started after routing stopped failed: {failed}"
    # Only requests in flight on the lost node fail: those its engine took in and never answered, and those the
    # gateway sent after the link went (lost on the way, which the engine cannot count).
    assert len(failed) <= max(undelivered, in_flight_there), (failed, load.errors[:3], lost_received,
                                                               delivered_by_lost, stuck)
    assert ok > 20

    net.set_link(bed.node_index(lost), True)
    left = devcluster.down(bed)
    assert not left, f"dev-cluster down left processes {left}"
    assert not net.left(), f"dev-cluster down left {net.left()}"
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(MULTI_STATE) in " ".join(p.info["cmdline"] or [])]
    # The lost node's slurmstepds outlive its slurmd, and nothing in their argv names the bed.
    steps = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])]
    outlived = [s for s in steps if s.startswith("slurmstepd") and any(f"[{j}." in s for j in {*jobs, *replacement})]
    assert not outlived, f"slurmstepds of the bed's jobs outlived it: {outlived}"
    assert devcluster.status(bed)["network"] == []
