"""The batch runner (slinfer/batchrun.py) against a stand-in engine: every line once, resume, refusals."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from slinfer import batchrun

KEY = "engine-key"


def write_input(folder: Path, n: int, url: str = "/v1/chat/completions") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"r{i}" for i in range(n)]
    (folder / batchrun.INPUT).write_bytes(b"".join(json.dumps(
        {"custom_id": c, "method": "POST", "url": url,
         "body": {"model": "standin", "messages": [{"role": "user", "content": c}], "max_tokens": 4}}).encode()
        + b"\n" for c in ids))
    return ids


def ids_in(folder: Path, name: str) -> Counter[str]:
    return Counter(str(x["custom_id"]) for x in batchrun.answered(folder / name))


async def test_every_line_is_answered_once_in_openai_format(tmp_path, standins):
    engine = await standins(api_key=KEY)
    ids = write_input(tmp_path, 40)
    counts = await batchrun.run(tmp_path, engine.base_url + "/v1", KEY, concurrency=8, wait_s=5)
    assert {k: counts[k] for k in ("asked", "completed", "failed")} == {"asked": 40, "completed": 40, "failed": 0}
    assert counts["answer_ms"] >= 0 and counts["engine_wait_ms"] >= 0
    assert ids_in(tmp_path, batchrun.OUTPUT) == Counter(ids)
    assert engine.seen.requests == 40
    first = next(batchrun.answered(tmp_path / batchrun.OUTPUT))
    assert first["response"]["status_code"] == 200  # type: ignore[index]
    assert first["response"]["body"]["usage"]["completion_tokens"] > 0  # type: ignore[index]
    assert str(first["id"]).startswith("batch_req_") and first["error"] is None
    assert batchrun.todo(tmp_path) == []


async def test_a_resumed_run_asks_only_the_lines_left_and_cuts_a_torn_tail(tmp_path, standins):
    engine = await standins(api_key=KEY)
    ids = write_input(tmp_path, 30)
    # A previous run (killed): 10 answered, one refused, and the 12th cut mid-write.
    done = b"".join(batchrun.result_line({"custom_id": c}, 200, {"id": "x"}) for c in ids[:10])
    (tmp_path / batchrun.OUTPUT).write_bytes(done + batchrun.result_line({"custom_id": ids[11]}, 200, {})[:25])
    (tmp_path / batchrun.ERRORS).write_bytes(batchrun.result_line({"custom_id": ids[10]}, 400, {}))
    assert len(batchrun.todo(tmp_path)) == 19  # the torn r11 counts as not answered
    counts = await batchrun.run(tmp_path, engine.base_url + "/v1", KEY, concurrency=4, wait_s=5)
    assert counts["asked"] == 19 and engine.seen.requests == 19
    answered = ids_in(tmp_path, batchrun.OUTPUT) + ids_in(tmp_path, batchrun.ERRORS)
    assert answered == Counter(ids)  # every line, once
    assert (tmp_path / batchrun.OUTPUT).read_bytes().endswith(b"\n")


async def test_lines_the_engine_refuses_go_to_the_error_file_and_the_rest_go_on(tmp_path, standins):
    engine = await standins(api_key=KEY)
    good = write_input(tmp_path, 5)
    bad = json.dumps({"custom_id": "bad", "method": "POST", "url": "/v1/nothing-here", "body": {}}).encode()
    with (tmp_path / batchrun.INPUT).open("ab") as f:
        f.write(bad + b"\n")
    counts = await batchrun.run(tmp_path, engine.base_url, KEY, concurrency=3, wait_s=5)
    assert (counts["asked"], counts["completed"], counts["failed"]) == (6, 5, 1)
    assert ids_in(tmp_path, batchrun.OUTPUT) == Counter(good)
    errors = list(batchrun.answered(tmp_path / batchrun.ERRORS))
    assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [("bad", 404)]  # type: ignore[index]


async def test_an_engine_that_fails_every_request_puts_every_line_in_errors(tmp_path, standins):
    engine = await standins(api_key=KEY)
    engine.fail = "status_500"
    ids = write_input(tmp_path, 4)
    counts = await batchrun.run(tmp_path, engine.base_url, KEY, concurrency=2, wait_s=5)
    assert counts["failed"] == 4 and ids_in(tmp_path, batchrun.ERRORS) == Counter(ids)
    assert not (tmp_path / batchrun.OUTPUT).read_bytes()


def test_main_without_an_engine_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    write_input(tmp_path, 1)
    assert batchrun.main(["--dir", str(tmp_path)]) == 2
    assert "OPENAI_BASE_URL" in capsys.readouterr().err
    assert not (tmp_path / batchrun.FINISHED).exists()


def test_an_array_task_answers_its_slice_and_the_merge_keeps_the_files_order(tmp_path, monkeypatch, capsys):
    ids = write_input(tmp_path, 7)
    # Outside an array task (no SLURM_ARRAY_TASK_ID) --lines-per-task is refused, nothing is written.
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    assert batchrun.main(["--dir", str(tmp_path), "--base-url", "http://127.0.0.1:9/v1",
                          "--lines-per-task", "3"]) == 2
    assert "SLURM_ARRAY_TASK_ID" in capsys.readouterr().err
    assert [x["custom_id"] for x in batchrun.todo(tmp_path, 2, 3)] == ["r6"]
    assert [x["custom_id"] for x in batchrun.todo(tmp_path, 1, 3)] == ["r3", "r4", "r5"]
    # Tasks' answers in completion order, one torn tail, one line twice: merged once each, in the file's order.
    for task, order in ((0, [2, 0, 1]), (1, [5, 3, 4]), (2, [6])):
        with (tmp_path / f"output.{task}.jsonl").open("wb") as f:
            for i in order:
                f.write(batchrun.result_line({"custom_id": ids[i]}, 200, {}))
    (tmp_path / "errors.1.jsonl").write_bytes(b'{"custom_id": "r')  # torn by a kill
    with (tmp_path / "output.1.jsonl").open("ab") as f:
        f.write(batchrun.result_line({"custom_id": "r5"}, 200, {}))
    assert batchrun.merge(tmp_path, 3) == (7, 0)
    assert [x["custom_id"] for x in batchrun.answered(tmp_path / batchrun.OUTPUT)] == ids
    assert (tmp_path / batchrun.ERRORS).read_bytes() == b""
