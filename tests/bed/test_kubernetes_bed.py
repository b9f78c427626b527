"""Flow 4 on the real bed: a real `sbatch --inference` job makes the node agent register its Node, renew its
Lease and create the engine's Pod in Kubernetes, and the Pod disappears when the job ends.

No API server can run here (docs/architecture/facts.md), so the agent talks to a recording server (PyPI kmock)
through the official client, as a separate process given a kubeconfig; the test asserts the requests it recorded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from slinfer.dev import devcluster
from slinfer.kube import labels as kubelabels
from tests.fakes.kuberecorder import Recorder, recording_api_server, write_kubeconfig
from tests.fakes.slurmbed import BED_USER, SlurmBed

pytestmark = pytest.mark.bed
NAMESPACE = "slinfer"
RECORDER_PORT = 26870  # within the test bed's port block (tests/conftest.py)


async def _run(bed: SlurmBed, *argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, env=bed.env(), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"{argv}: {err.decode()}"
    return out.decode()


async def _until(what: str, predicate: object, seconds: float) -> float:
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - began
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out after {seconds:.0f}s waiting for {what}")


@pytest.fixture
async def recorder(slurm_bed: SlurmBed, tmp_path: Path) -> AsyncIterator[Recorder]:
    config = slurm_bed.bed.config
    original = config.read_text()
    # The node must serve this test's engine alone (its Node goes once it serves nothing): no pool replica of
    # the autoscaler, nor any job an earlier test left.
    slurm_bed.admin("scale", "tiny", "0")
    slurm_bed.admin("scale", "smollm2", "0")
    slurm_bed.cleanup_jobs()
    await asyncio.to_thread(slurm_bed.wait_no_jobs)
    async with recording_api_server(port=RECORDER_PORT) as rec:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", rec.url)
        config.write_text(original + f'\n[kubernetes]\nenabled = true\nkubeconfig = "{kubeconfig}"\n'
                                     f'namespace = "{NAMESPACE}"\nrenew_interval_s = 2.0\n')
        # Only the agent reads the new section; the controller keeps running with the config it loaded.
        await asyncio.to_thread(devcluster.restart_agent, slurm_bed.bed)
        try:
            yield rec
        finally:
            config.write_text(original)
            await asyncio.to_thread(devcluster.restart_agent, slurm_bed.bed)
            slurm_bed.admin("scale", "tiny", "auto")
            slurm_bed.admin("scale", "smollm2", "auto")


async def test_a_real_job_registers_node_lease_and_pod_and_the_pod_goes_when_the_job_ends(
        slurm_bed: SlurmBed, recorder: Recorder) -> None:
    job = (await _run(slurm_bed, "runuser", "-u", BED_USER, "--", "sbatch", "--parsable", "--inference=tiny",
                      "--gres=gpu:1", "-o", f"{slurm_bed.jobs_dir}/job-%j.out", "--wrap",
                      "slinfer wait-ready --timeout 300 && echo READY && sleep 600")).strip()
    node = kubelabels.node_name(devcluster.NODE_NAME)

    def pod() -> dict[str, object] | None:
        pods = [r.body for r in recorder.requests() if r.method == "POST" and r.path.endswith("/pods")]
        return pods[0] if pods else None

    await _until("the engine's Pod", lambda: pod() is not None, 60)
    created = pod()
    assert created is not None
    labels = created["metadata"]["labels"]  # type: ignore[index]
    assert labels[kubelabels.JOB_ID] == job and labels[kubelabels.MODEL] == "tiny", labels
    assert created["spec"]["nodeName"] == node  # type: ignore[index]
    lines = [r.line for r in recorder.requests()]
    assert "POST /api/v1/nodes" in lines
    assert "POST /apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases" in lines

    await _until("the job's engine READY", lambda: "READY" in slurm_bed.output(job), 300)
    # Running/Ready with the node's address is patched onto the Pod's status.
    await _until("the Pod's Ready status", lambda: any(
        r.method == "PATCH" and r.path.endswith("/status") and "Ready" in str(r.body)
        and "127.0.0.1" in str(r.body) for r in recorder.requests() if "/pods/" in r.path), 30)
    def renewals() -> list[object]:
        return [r for r in recorder.requests() if r.method == "PATCH" and "/leases/" in r.path]

    seen = len(renewals())
    await _until("a Lease renewal", lambda: len(renewals()) > seen, 15)
    renew = renewals()[-1]
    renew_time = renew.body["spec"]["renewTime"]  # type: ignore[attr-defined]
    assert renew_time.endswith("Z") and len(renew_time.split(".")[1]) == 7, renew_time  # microseconds + Z

    pod_name = created["metadata"]["name"]  # type: ignore[index]
    await _run(slurm_bed, "scancel", job)
    await _until("the Pod's deletion", lambda: any(
        r.method == "DELETE" and r.path.endswith(f"/pods/{pod_name}") for r in recorder.requests()), 60)
    delete = next(r for r in recorder.requests()
                  if r.method == "DELETE" and r.path.endswith(f"/pods/{pod_name}"))
    assert delete.query.get("gracePeriodSeconds") == "0" or (delete.body or {}).get("gracePeriodSeconds") == 0
    assert recorder.stored("v1/pods", NAMESPACE, str(pod_name)) is None
    # The node serves nothing any more: its Node goes too.
    await _until("the Node's deletion", lambda: recorder.stored("v1/nodes", None, node) is None, 30)
