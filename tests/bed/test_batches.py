"""The OpenAI Batch API on the real bed (issue 31), through the official openai client: each batch is a Slurm
job (`sbatch --inference=tiny --requeue`, submitted by the controller) whose runner answers the lines with the
job's own vLLM engine; completion with every line once (three that the engine refuses in the error file, the
others answered) and its usage in the ledger, cancel mid-way, a requeue mid-way, and the upload's refusals (bad
lines, another key, oversize)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from slinfer.dev import devcluster
from tests.fakes.slurmbed import SlurmBed, wait_until

pytestmark = pytest.mark.bed
MODEL = "tiny"
# Every batch of this module must end within this (its engine's start included, on the bed's shared CPUs).
BATCH_BOUND_S = 420.0
# Lines of the mid-way tests: from SLOW_TOKENS to SLOW_TOKENS + 199 * SPREAD tokens (tiny's context is 512),
# so that the test acts while lines are still being answered.
SLOW_TOKENS, SPREAD = 100, 2


@dataclass
class Keys:
    alice: openai.OpenAI
    alice_id: str
    bob: openai.OpenAI


def _key(bed: SlurmBed, name: str, account: str) -> tuple[str, str]:
    out = bed.run(sys.executable, "-m", "slinfer.cli.main", "keys", "create", name, "--account", account).stdout
    key_id, secret = re.search(r"key id: (\S+)", out), re.search(r"secret: (\S+)", out)
    assert key_id and secret, out
    return key_id.group(1), secret.group(1)


@pytest.fixture(scope="module")
def keys(slurm_bed: SlurmBed) -> Iterator[Keys]:
    slurm_bed.cleanup_jobs()
    url = f"http://127.0.0.1:{slurm_bed.bed.gateway_port}/v1"
    alice_id, alice = _key(slurm_bed, "batch-alice", "physics")
    _, bob = _key(slurm_bed, "batch-bob", "chem")
    yield Keys(openai.OpenAI(base_url=url, api_key=alice, max_retries=0, timeout=60), alice_id,
               openai.OpenAI(base_url=url, api_key=bob, max_retries=0, timeout=60))
    slurm_bed.cleanup_jobs()


def lines(n: int, max_tokens: int, prefix: str = "r", spread: int = 0) -> bytes:
    """n chat lines; with `spread`, line i asks max_tokens + spread * i tokens and ignores EOS, so that the
    lines end one after another over the run (the mid-way tests act between the first and the last)."""
    return b"".join(json.dumps({"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": MODEL, "max_tokens": max_tokens + spread * i, "temperature": 0,
                                         **({"ignore_eos": True} if spread else {}),
                                         "messages": [{"role": "user", "content": f"line {i}"}]}}).encode() + b"\n"
                    for i in range(n))


def folder(bed: SlurmBed, batch_id: str) -> Path:
    return bed.bed.state / "controller" / "batch" / "batches" / batch_id


def done_lines(bed: SlurmBed, batch_id: str) -> int:
    try:
        return (folder(bed, batch_id) / "output.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def until_over(client: openai.OpenAI, batch_id: str, bound: float = BATCH_BOUND_S):
    deadline = time.monotonic() + bound
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status} after {bound:.0f} s"
        time.sleep(0.5)


def answered_ids(client: openai.OpenAI, file_id: str | None) -> Counter[str]:
    if file_id is None:
        return Counter()
    return Counter(json.loads(x)["custom_id"] for x in client.files.content(file_id).content.splitlines())


def test_a_batch_of_200_lines_completes_each_line_once_and_is_charged(keys: Keys, slurm_bed: SlurmBed) -> None:
    # The site lets the service's user (root on the bed) submit in physics, as a site that wants batches charged
    # to the users' own accounts does; the other tests run without it (the service's own account pays).
    slurm_bed.run("sacctmgr", "-i", "add", "user", "root", "account=physics", "qos=normal")
    # The batch's job is checked by what slurmctld knows, which slurmdbd pushes to it. (CI once saw the job recorded
    # with QOS "Unknown", not reproduced here in 7 tries: the assertion below shows the QOS ids if it comes back.)
    wait_until("slurmctld to know root's physics association", lambda: "Account=physics UserName=root(0)" in
               slurm_bed.run("scontrol", "show", "assoc_mgr", "users=root", "accounts=physics", "flags=assoc").stdout,
               30, 0.2)
    try:
        _complete_200(keys, slurm_bed)
    finally:
        slurm_bed.cleanup_jobs()
        wait_until("no job left to hold root's physics association", lambda: not slurm_bed.run(
            "squeue", "-h", "-u", "root", "-A", "physics").stdout.strip(), 60, 0.5)
        slurm_bed.run("sacctmgr", "-i", "delete", "user", "where", "name=root", "account=physics")


# Lines the gateway's checks let through and the engine refuses (400: more tokens than tiny's context of 512):
# they go to the error file, and the other lines are answered.
REFUSED = {"r50", "r100", "r150"}


def _with_refused_lines(text: bytes) -> bytes:
    out = []
    for raw in text.splitlines():
        line = json.loads(raw)
        if line["custom_id"] in REFUSED:
            line["body"]["max_tokens"] = 100_000
        out.append(json.dumps(line).encode() + b"\n")
    return b"".join(out)


def _complete_200(keys: Keys, slurm_bed: SlurmBed) -> None:
    f = keys.alice.files.create(file=("in.jsonl", _with_refused_lines(lines(200, 8))), purpose="batch")
    began = time.monotonic()
    batch = keys.alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h")
    assert batch.status == "validating" and batch.request_counts.total == 200
    wait_until("the batch's first answered line", lambda: done_lines(slurm_bed, batch.id) > 0, BATCH_BOUND_S, 0.2)
    first = time.monotonic() - began
    done = until_over(keys.alice, batch.id)
    took = time.monotonic() - began
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (197, 3)
    outputs = [json.loads(x) for x in keys.alice.files.content(done.output_file_id).content.splitlines()]
    assert Counter(o["custom_id"] for o in outputs) == Counter(f"r{i}" for i in range(200) if f"r{i}" not in REFUSED)
    assert all(o["response"]["status_code"] == 200 for o in outputs)
    errors = [json.loads(x) for x in keys.alice.files.content(done.error_file_id).content.splitlines()]
    assert Counter(e["custom_id"] for e in errors) == Counter(REFUSED), errors
    assert all(e["response"]["status_code"] == 400 for e in errors), errors
    # The job: the key's account where the service may use it, the catalog's QOS, requeue allowed, in sacct.
    job_id = done.model_extra["slurm"]["job_id"]
    acct = slurm_bed.run("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State,Account,QOS,QOSRAW").stdout
    qos = slurm_bed.run("sacctmgr", "-n", "-P", "show", "qos", "format=Name,ID").stdout
    assert f"{job_id}|COMPLETED|physics|normal|" in acct, (acct, qos)
    assert done.model_extra["slurm"]["account"] == "physics"
    # The ledger: one request per line on alice's key, with the engine's own token counts.
    prompt = sum(o["response"]["body"]["usage"]["prompt_tokens"] for o in outputs)
    completion = sum(o["response"]["body"]["usage"]["completion_tokens"] for o in outputs)
    out = slurm_bed.run(sys.executable, "-m", "slinfer.cli.main", "usage", "--key", keys.alice_id,
                        "--format", "csv").stdout
    header, *rows = [r.split(",") for r in out.splitlines() if r.strip()]
    charged = [dict(zip(header, r, strict=True)) for r in rows]
    assert sum(int(r["requests"]) for r in charged) == 200, out
    assert (sum(int(r["prompt_tokens"]) for r in charged), sum(int(r["completion_tokens"]) for r in charged)) == (
        prompt, completion)
    assert {r["account"] for r in charged} == {"physics"}
    # `slinfer batches` lists it with its counts and Slurm state.
    listed = subprocess.run([sys.executable, "-m", "slinfer.cli.main", "batches", "--url", str(keys.alice.base_url)],
                            env={**slurm_bed.env(), "SLINFER_API_KEY": keys.alice.api_key}, capture_output=True,
                            text=True, check=True, timeout=60).stdout
    assert batch.id in listed and "completed" in listed and "200/200" in listed, listed
    print(f"\nbatch of 200 lines (max_tokens 8): create -> first line done {first:.1f} s (engine start included), "
          f"-> completed {took:.1f} s; {prompt}+{completion} tokens; account {done.model_extra['slurm']['account']}")


def test_cancel_mid_way_keeps_the_answers_made(keys: Keys, slurm_bed: SlurmBed) -> None:
    f = keys.alice.files.create(file=("in.jsonl", lines(200, SLOW_TOKENS, "c", SPREAD)), purpose="batch")
    batch = keys.alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h")
    wait_until("a first answered line", lambda: done_lines(slurm_bed, batch.id) > 0, BATCH_BOUND_S, 0.1)
    assert keys.alice.batches.cancel(batch.id).status == "cancelling"
    ended = until_over(keys.alice, batch.id, 120)
    assert ended.status == "cancelled", ended
    made = answered_ids(keys.alice, ended.output_file_id)
    assert 0 < sum(made.values()) < 200 and max(made.values()) == 1, made
    job_id = ended.model_extra["slurm"]["job_id"]
    assert "CANCELLED" in slurm_bed.run("sacct", "-X", "-n", "-j", job_id, "-o", "State").stdout
    # Without the service's association in physics, Slurm charges the service's own default account, and the
    # batch says so.
    assert ended.model_extra["slurm"]["account"] == "(the service's default)"
    default = slurm_bed.run("sacctmgr", "-n", "-P", "show", "user", "root", "format=DefaultAccount").stdout.strip()
    assert slurm_bed.run("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "Account").stdout.strip() == default
    assert default and default != "physics"
    print(f"\ncancelled mid-way with {sum(made.values())} of 200 lines answered")


def test_a_requeued_batch_job_resumes_and_answers_each_line_once(keys: Keys, slurm_bed: SlurmBed) -> None:
    f = keys.alice.files.create(file=("in.jsonl", lines(200, SLOW_TOKENS, "q", SPREAD)), purpose="batch")
    batch = keys.alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h")
    wait_until("a first answered line", lambda: done_lines(slurm_bed, batch.id) > 0, BATCH_BOUND_S, 0.1)
    job_id = keys.alice.batches.retrieve(batch.id).model_extra["slurm"]["job_id"]
    slurm_bed.run("scontrol", "requeue", job_id)
    before = done_lines(slurm_bed, batch.id)
    assert before < 200, "the batch finished before the requeue: no resume was tested"
    # A requeued job waits for its BeginTime (about 2 minutes): the test lets it start at once, as an admin may.
    wait_until("the requeued job pending", lambda: slurm_bed.state(job_id) in ("PENDING", "REQUEUED"), 60, 0.2)
    slurm_bed.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
    done = until_over(keys.alice, batch.id)
    assert done.status == "completed", done
    jobs = done.model_extra["slurm"]["jobs"]
    assert answered_ids(keys.alice, done.output_file_id) + answered_ids(keys.alice, done.error_file_id) == Counter(
        f"q{i}" for i in range(200))
    log = (folder(slurm_bed, batch.id) / "job.log").read_text()
    runs = [int(n) for n in re.findall(r"(\d+) lines to answer", log)]
    assert len(runs) == 2 and runs[0] == 200 and runs[1] < 200, log  # the second run only asked what was left
    marker = json.loads((folder(slurm_bed, batch.id) / "finished").read_text())
    # The same job finished the batch, no follow-up. Started at once, its rerun got no prolog from slurmd (the
    # job's credential still cached), hence no engine, and failed: the scheduler requeued it, Slurm held it until
    # slurmd forgot it, and its next run (restart 2) got its engine. Where the rerun did get its engine, restart 1.
    assert jobs == [job_id] and marker["restart_count"] >= 1, (marker, jobs, log)
    print(f"\nrequeued after {before} lines: the last run asked {runs[1]}; each of 200 answered once; "
          f"jobs {jobs}, restart count {marker['restart_count']}, requeued again by the scheduler "
          f"{done.model_extra['slurm'].get('requeues', 0)} times")


def _controller_with(bed: SlurmBed, config: str) -> None:
    """The controller restarted on `config` (the bed's file rewritten), once its start check passed."""
    offset = (bed.bed.logs / "controller.out").stat().st_size
    bed.bed.config.write_text(config)
    devcluster.stop_daemon(bed.bed, "controller")
    devcluster.start_controller(bed.bed)
    wait_until("the restarted controller's start check", lambda: "may submit every model's jobs" in
               (bed.bed.logs / "controller.out").read_text()[offset:], 60)


# The array test's file: two tasks of 50 lines (two engines at once, the least that is an array).
ARRAY_LINES, PER_TASK = 100, 50


def test_a_file_above_lines_per_task_runs_as_a_job_array_merged_in_order(keys: Keys, slurm_bed: SlurmBed) -> None:
    original = slurm_bed.bed.config.read_text()
    assert "\n[batch]\n" in original, "the bed's config no longer has a [batch] section"
    # The bed's [batch] names its own lines_per_task: this test's replaces it (a second one is invalid TOML, and
    # every hook that read the file would fail).
    ours = f"lines_per_task = {PER_TASK}"
    changed = (re.sub(r"(?m)^lines_per_task = \d+$", ours, original, count=1) if re.search(
        r"(?m)^lines_per_task = ", original) else original.replace("\n[batch]\n", f"\n[batch]\n{ours}\n", 1))
    _controller_with(slurm_bed, changed)
    try:
        began = time.monotonic()
        f = keys.alice.files.create(file=("in.jsonl", lines(ARRAY_LINES, 4, "a")), purpose="batch")
        batch = keys.alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                          completion_window="1h")
        done = until_over(keys.alice, batch.id)
        took = time.monotonic() - began
    finally:
        _controller_with(slurm_bed, original)
    assert done.status == "completed", done
    slurm = done.model_extra["slurm"]
    assert slurm["tasks"] == 2 and slurm["jobs"] == [slurm["job_id"]], slurm
    # The merged output: every line once, in the file's order (the tasks ran side by side).
    content = keys.alice.files.content(done.output_file_id).content.splitlines()
    assert [json.loads(x)["custom_id"] for x in content] == [f"a{i}" for i in range(ARRAY_LINES)]
    assert done.request_counts.completed == ARRAY_LINES
    # Slurm ran it as an array of two tasks, each its own engine and its own slice.
    job_id = slurm["job_id"]
    acct = slurm_bed.run("sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State").stdout.split()
    assert sorted(acct) == [f"{job_id}_0|COMPLETED", f"{job_id}_1|COMPLETED"], acct
    for task in (0, 1):
        log = (folder(slurm_bed, batch.id) / f"job-{task}.log").read_text()
        assert f"{PER_TASK} lines to answer" in log, log
    print(f"\narray of 2 tasks of {PER_TASK} lines: create -> completed {took:.1f} s (two engines' starts)")


def test_uploads_refused_bad_lines_another_key_oversize(keys: Keys, slurm_bed: SlurmBed) -> None:
    good = lines(6, 4)
    bad = good.splitlines()
    bad[2], bad[4], bad[5] = b"{not json", b'{"custom_id": "x"}', b"[]"
    with pytest.raises(openai.BadRequestError) as caught:
        keys.alice.files.create(file=("bad.jsonl", b"\n".join(bad) + b"\n"), purpose="batch")
    assert "Line 3 " in str(caught.value)
    mine = keys.alice.files.create(file=("ok.jsonl", good), purpose="batch")  # positive control
    with pytest.raises(openai.NotFoundError):
        keys.bob.files.content(mine.id)
    with pytest.raises(openai.NotFoundError):
        keys.bob.batches.create(input_file_id=mine.id, endpoint="/v1/chat/completions", completion_window="1h")
    big = b"".join(lines(1, 4, f"b{i}-") for i in range(25000))
    assert 4 << 20 < len(big) < 5 << 20  # the bed's [batch].max_file_bytes is 4 MiB
    with pytest.raises(openai.APIStatusError) as over:
        keys.alice.files.create(file=("big.jsonl", big), purpose="batch")
    assert over.value.status_code == 413
