"""The batch runner: inside a batch's Slurm job, answers the batch's input lines with the job's private engine.

    python -m slinfer.batchrun --dir SPOOL/batches/BATCH_ID [--concurrency N]

The job is `sbatch --inference=MODEL`: the engine is the job's own (started by the agent, its address and key
in OPENAI_BASE_URL / OPENAI_API_KEY), so this runner waits for it, then keeps `--concurrency` requests in
flight (the engine batches them at full width) until every line is answered.

Responsible for: resuming where a previous run of the same batch stopped (a requeued or preempted job): the
custom_ids already in the output or error file are not asked again, and a last line torn by a kill is cut
before anything is appended, so each line ends up in exactly one of the two files exactly once; appending each
answer (2xx) to output.jsonl and each refusal (the engine's 4xx/5xx, or no answer after retries) to
errors.jsonl in OpenAI's batch output format, as it comes; the `finished` marker once no line is left.

Not responsible for: validating the lines (the upload did: controller/files.py); the batch's state, its
usage in the ledger, cancelling (controller/batches.py); starting the engine (the agent, through --inference).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp

# Requests in flight at once by default: enough to fill vLLM's default batch (max_num_seqs 256 on a GPU).
DEFAULT_CONCURRENCY = 256
# How long the engine may take to become ready (a model's load from a cold filesystem).
ENGINE_WAIT_S = 1800.0
ENGINE_POLL_S = 0.5
# A line whose request fails without an answer (connection lost) is tried this often before it is an error.
ATTEMPTS = 3
# One request's limit: a long generation at full batch width is slow, but not this slow.
REQUEST_TIMEOUT_S = 3600.0

INPUT = "input.jsonl"
OUTPUT = "output.jsonl"
ERRORS = "errors.jsonl"
FINISHED = "finished"


def task_names(task: int | None) -> tuple[str, str, str]:
    """(output, errors, finished marker) of the whole batch (task None) or of one array task: a task answers
    its slice of the input into files of its own, so that tasks on several nodes never append to one file
    (O_APPEND is not atomic across the nodes of a parallel filesystem); the scheduler merges them."""
    if task is None:
        return OUTPUT, ERRORS, FINISHED
    return f"output.{task}.jsonl", f"errors.{task}.jsonl", f"{FINISHED}.{task}"


def input_lines(folder: Path, task: int | None = None, per_task: int = 0) -> list[dict[str, object]]:
    """The input's lines, or array task `task`'s slice of `per_task` lines (the task-th, in input order)."""
    lines = [json.loads(raw) for raw in (folder / INPUT).read_bytes().split(b"\n") if raw.strip()]
    if task is None:
        return lines
    return lines[task * per_task:(task + 1) * per_task]


def cut_torn_tail(path: Path) -> None:
    """Cuts a last line that a kill left without its newline (it is asked again, and written whole)."""
    try:
        with path.open("rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        return


def answered(path: Path) -> Iterator[dict[str, object]]:
    """The complete lines of an output or error file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    for raw in data.split(b"\n")[:-1] if not data.endswith(b"\n") else data.split(b"\n"):
        if raw.strip():
            yield json.loads(raw)


def done_ids(folder: Path, task: int | None = None) -> set[str]:
    """The custom_ids already written to the output or the error file (of the batch, or of one task)."""
    return {str(x["custom_id"]) for name in task_names(task)[:2] for x in answered(folder / name)}


def todo(folder: Path, task: int | None = None, per_task: int = 0) -> list[dict[str, object]]:
    """The input lines (of the batch, or of one array task's slice) not yet answered, in input order; cuts torn
    tails first."""
    for name in task_names(task)[:2]:
        cut_torn_tail(folder / name)
    done = done_ids(folder, task)
    return [x for x in input_lines(folder, task, per_task) if x["custom_id"] not in done]


def merge(folder: Path, tasks: int) -> tuple[int, int]:
    """Writes output.jsonl and errors.jsonl from the array tasks' files, each in the input's order of
    custom_ids; returns their line counts. Torn tails are cut first; a line seen twice is kept once."""
    order = {str(x["custom_id"]): i for i, x in enumerate(input_lines(folder))}
    counts = []
    for kind in (0, 1):
        seen: dict[str, bytes] = {}
        for task in range(tasks):
            path = folder / task_names(task)[kind]
            cut_torn_tail(path)
            for x in answered(path):
                seen.setdefault(str(x["custom_id"]), json.dumps(x, separators=(",", ":")).encode() + b"\n")
        ordered = sorted(seen, key=lambda c: order.get(c, len(order)))
        tmp = folder / (task_names(None)[kind] + ".merging")
        tmp.write_bytes(b"".join(seen[c] for c in ordered))
        os.chmod(tmp, 0o600)
        os.replace(tmp, folder / task_names(None)[kind])
        counts.append(len(ordered))
    return counts[0], counts[1]


def result_line(line: dict[str, object], status: int, body: object, error: object = None) -> bytes:
    """One line of OpenAI's batch output format."""
    request_id = body.get("id", "") if isinstance(body, dict) else ""
    out = {"id": "batch_req_" + secrets.token_hex(12), "custom_id": line["custom_id"],
           "response": {"status_code": status, "request_id": request_id, "body": body}, "error": error}
    return json.dumps(out, separators=(",", ":")).encode() + b"\n"


class Appender:
    """An append-only file written one whole line per write(2): a kill tears at most the last line."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.lines = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        self.lines += 1

    def close(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)


async def wait_for_engine(session: aiohttp.ClientSession, root: str, wait_s: float = ENGINE_WAIT_S) -> float:
    """Seconds until the engine at `root` (its address, without /v1) answers `/v1/models` (its API is up)."""
    started = time.monotonic()
    while True:
        try:
            async with session.get(f"{root}/v1/models") as response:
                if response.status == 200:
                    return time.monotonic() - started
        except aiohttp.ClientError:
            pass
        if time.monotonic() - started > wait_s:
            raise TimeoutError(f"the engine at {root} was not ready within {wait_s:.0f} s")
        await asyncio.sleep(ENGINE_POLL_S)


async def run(folder: Path, base: str, api_key: str, concurrency: int = DEFAULT_CONCURRENCY,
              wait_s: float = ENGINE_WAIT_S, task: int | None = None, per_task: int = 0) -> dict[str, int]:
    """Answers every line (of the batch, or of array task `task`'s slice) not yet answered; returns counts of
    this run."""
    lines = todo(folder, task, per_task)
    out_name, err_name, _ = task_names(task)
    output, errors = Appender(folder / out_name), Appender(folder / err_name)
    base = base.rstrip("/")
    root = base[:-3] if base.endswith("/v1") else base
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=concurrency)
    counts = {"asked": len(lines), "completed": 0, "failed": 0}
    try:
        async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as session:
            waited = await wait_for_engine(session, root, wait_s)
            counts["engine_wait_ms"] = round(waited * 1000)
            answering = time.monotonic()
            print(f"batchrun: engine ready after {waited:.1f} s; {len(lines)} lines to answer", flush=True)
            queue: asyncio.Queue[dict[str, object]] = asyncio.Queue()
            for line in lines:
                queue.put_nowait(line)

            async def worker() -> None:
                while not queue.empty():
                    line = queue.get_nowait()
                    status, body = await ask(session, root, line)
                    if 200 <= status < 300:
                        output.write(result_line(line, status, body))
                        counts["completed"] += 1
                    else:
                        errors.write(result_line(line, status, body))
                        counts["failed"] += 1

            await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(lines))))))
            counts["answer_ms"] = round((time.monotonic() - answering) * 1000)
    finally:
        output.close()
        errors.close()
    return counts


async def ask(session: aiohttp.ClientSession, root: str, line: dict[str, object]) -> tuple[int, object]:
    """The engine's status and JSON body for one line; a line with no answer after ATTEMPTS is a 503."""
    last = ""
    for attempt in range(ATTEMPTS):
        try:
            async with session.post(root + str(line["url"]), json=line["body"]) as response:
                try:
                    body: object = await response.json(content_type=None)
                except ValueError:
                    body = {"error": {"message": (await response.text())[:1000], "type": "engine_error"}}
                return response.status, body
        except (aiohttp.ClientError, TimeoutError) as exc:
            last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.5 * (attempt + 1))
    return 503, {"error": {"message": f"no answer from the engine after {ATTEMPTS} tries ({last})",
                           "type": "engine_unavailable"}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slinfer.batchrun", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="the batch's folder in the spool")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    parser.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", ""))
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""))
    parser.add_argument("--lines-per-task", type=int, default=0,
                        help="an array task's slice: task SLURM_ARRAY_TASK_ID answers lines [id*N, (id+1)*N)")
    args = parser.parse_args(argv)
    if not args.base_url:
        print("batchrun: no engine: OPENAI_BASE_URL is not set (submit with --inference=MODEL)", file=sys.stderr)
        return 2
    task: int | None = None
    if args.lines_per_task > 0:
        raw = os.environ.get("SLURM_ARRAY_TASK_ID", "")
        if not raw.isdigit():
            print("batchrun: --lines-per-task needs SLURM_ARRAY_TASK_ID (an array task)", file=sys.stderr)
            return 2
        task = int(raw)
    folder = Path(args.dir)
    started = time.monotonic()
    counts = asyncio.run(run(folder, args.base_url, args.api_key, args.concurrency, task=task,
                             per_task=args.lines_per_task))
    left = todo(folder, task, args.lines_per_task)
    if left:
        print(f"batchrun: {len(left)} lines still unanswered", file=sys.stderr)
        return 1
    marker = {**counts, "seconds": round(time.monotonic() - started, 3), "finished_at": time.time(),
              "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
              **({"task": task} if task is not None else {})}
    (folder / task_names(task)[2]).write_text(json.dumps(marker))
    print(f"batchrun: done {json.dumps(marker)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
