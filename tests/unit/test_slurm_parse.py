"""The shared Slurm layer's parsers against real output captured from each release's daemons
(tests/fixtures/slurm/<release>/, recaptured by tests/fixtures/slurm/capture.py), and its one state table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slinfer.slurm import parse
from slinfer.slurm.states import JobState, Phase

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "slurm"
RELEASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "manifest.json").exists())


def test_every_supported_release_has_fixtures() -> None:
    assert {"22.05", "24.11", "26.05"} <= set(RELEASES), RELEASES


def load(release: str) -> tuple[dict[str, object], Path]:
    folder = FIXTURES / release
    return json.loads((folder / "manifest.json").read_text()), folder


@pytest.mark.parametrize("release", RELEASES)
def test_version(release: str) -> None:
    _, folder = load(release)
    assert parse.release((folder / "version.txt").read_text()) == release


@pytest.mark.parametrize("release", RELEASES)
def test_squeue_own_jobs(release: str) -> None:
    manifest, folder = load(release)
    jobs = {j.job_id: j for j in parse.squeue((folder / "squeue-user.txt").read_text())}
    expected = manifest["jobs"]
    assert isinstance(expected, dict)
    assert set(jobs) == {e["id"] for e in expected.values()}
    for kind, e in expected.items():
        job = jobs[e["id"]]
        assert (job.name, job.state, job.comment, job.user, job.uid) == (
            e["name"], e["state"], manifest["comment"], "root", manifest["uid"]), kind
        assert job.submit_time > 1.6e9
    running, held, ended = (jobs[expected[k]["id"]] for k in ("running", "held", "ended"))
    # The listing carries each job's QOS and its preemption notice (squeue --Format's QOS and PreemptTime).
    assert (running.qos, held.qos, ended.qos) == ("normal", "normal", "normal")
    assert running.preempt_time == held.preempt_time == ended.preempt_time == 0.0
    assert running.running and running.active and running.on_node and running.node == manifest["node"]
    assert running.start_time >= running.submit_time
    assert held.waiting and held.active and not held.on_node
    assert held.node == "" and held.start_time == 0 and held.reason == "JobHeldUser"
    assert not ended.active and not ended.holds_node and ended.job_state.phase is Phase.OVER


@pytest.mark.parametrize("release", RELEASES)
def test_squeue_listing_shows_a_preemption_notice(release: str) -> None:
    manifest, folder = load(release)
    jobs = {j.job_id: j for j in parse.squeue((folder / "squeue-user.txt").read_text())}
    e = manifest["jobs"]["preempted"]  # type: ignore[index]
    job = jobs[e["id"]]
    assert job.running and job.qos == e["qos"] == "scavenger"
    # Slurm's notice began after the job started (the high job came later), within the capture's minute.
    assert job.start_time <= job.preempt_time <= job.start_time + 60


@pytest.mark.parametrize("release", RELEASES)
def test_scontrol_job_matches_squeue(release: str) -> None:
    manifest, folder = load(release)
    from_squeue = {j.job_id: j for j in parse.squeue((folder / "squeue-user.txt").read_text())}
    for kind in ("running", "held", "ended", "preempted"):
        (job,) = parse.scontrol_jobs((folder / f"scontrol-job-{kind}.txt").read_text())
        other = from_squeue[job.job_id]
        assert (job.name, job.state, job.comment, job.uid, job.user, job.qos, job.preempt_time, job.nodes) == (
            other.name, other.state, other.comment, other.uid, other.user, other.qos, other.preempt_time,
            other.nodes), kind
        assert job.submit_time == other.submit_time and job.start_time == other.start_time
    (running,) = parse.scontrol_jobs((folder / "scontrol-job-running.txt").read_text())
    assert running.nodes == manifest["node"] and running.on_node


@pytest.mark.parametrize("release", RELEASES)
def test_node_record(release: str) -> None:
    manifest, folder = load(release)
    fields = parse.record((folder / "scontrol-node.txt").read_text().strip())
    assert fields["NodeName"] == manifest["node"]
    assert fields["Partitions"] == "debug"
    assert parse.gpu_count(fields["Gres"]) == 4
    assert (folder / "sinfo-node.txt").read_text().strip() in ("idle", "mixed", "allocated")


@pytest.mark.parametrize(("printed", "name", "phase"), [
    ("RUNNING", "RUNNING", Phase.RUNNING),
    (["RUNNING", "CONFIGURING"], "CONFIGURING", Phase.STARTING),  # v0.0.40+ lists base state and flags
    (["CANCELLED", "COMPLETING"], "COMPLETING", Phase.ENDING),
    (["PENDING", "REQUEUED"], "REQUEUED", Phase.WAITING),
    ("COMPLETING", "COMPLETING", Phase.ENDING),  # text output prints the flag alone
    ("CANCELLED by 0", "CANCELLED", Phase.OVER),  # scontrol's JobState
    ("PENDING,REQUEUED", "REQUEUED", Phase.WAITING),
    ("SOMETHING_NEW", "SOMETHING_NEW", Phase.OVER),  # unknown words never count as serving
    ("", "UNKNOWN", Phase.OVER),
])
def test_state_table(printed: object, name: str, phase: Phase) -> None:
    state = JobState.parse(printed)
    assert (state.name, state.phase) == (name, phase)


def test_state_classes_agree_with_what_each_part_needs() -> None:
    completing = JobState.parse(["COMPLETED", "COMPLETING"])
    assert not completing.active and completing.holds_node and not completing.on_node
    configuring = JobState.parse("CONFIGURING")
    assert configuring.waiting and configuring.on_node and configuring.active and not configuring.running
    suspended = JobState.parse("SUSPENDED")
    assert suspended.active and not suspended.running and not suspended.waiting


def test_record_keeps_spaces_and_lowercase_pairs_in_values() -> None:
    fields = parse.record("JobId=5 JobName=a b Comment=slinfer:autoscaler model=tiny JobState=RUNNING Reason=None")
    assert fields["JobName"] == "a b" and fields["Comment"] == "slinfer:autoscaler model=tiny"
    assert fields["JobState"] == "RUNNING"


def test_squeue_refuses_a_line_of_another_format() -> None:
    with pytest.raises(ValueError, match="fields"):
        parse.squeue("1 RUNNING root\n")


def test_times() -> None:
    assert parse.seconds("1796159531") == 1796159531.0
    assert parse.seconds("N/A") == parse.seconds("Unknown") == parse.seconds("NONE") == 0.0
    assert parse.seconds("2026-12-01T21:00:00") > 1.7e9
