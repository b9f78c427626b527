"""Parsers of what Slurm's text clients print, the same on 22.05, 24.11 and 26.05.

Responsible for: squeue lines in slinfer's own `--Format` (SQUEUE_FORMAT), `scontrol -o show job|node` records,
`sinfo -V` / `slurmctld -V` versions, and times (unix seconds under SLURM_TIME_FORMAT=%s, or ISO local time).
Text output is used rather than `--json`: its shape has not changed across these releases and its filters are
honoured on every one (22.05's `--json` ignores them), while the JSON schema changed in every release.
Not responsible for: running the commands (runner.py) or choosing their filters (queries.py).
"""

from __future__ import annotations

import functools
import re
from datetime import datetime

from slinfer.slurm.jobs import Job
from slinfer.slurm.states import JobState

# Fields are separated by the ASCII unit separator, which no job name or comment a user types contains; the
# free-text fields (name, comment) come last, so that even a separator inside them cannot shift the others.
SEP = "\x1f"
# squeue's --Format (-O) fields, each printed whole (size 0) and followed by SEP: everything the controller reads
# in one listing, QOS and PreemptTime included, which --format's letters cannot all give (no letter for
# PreemptTime). JobArrayID is %i (array tasks as 12_3); EndTime is the time limit's end while running; the same
# names on 22.05, 24.11 and 26.05 (checked against each release's squeue(1) and real output).
SQUEUE_FIELDS = ("JobArrayID", "State", "UserName", "UserID", "BatchHost", "NodeList", "SubmitTime", "StartTime",
                 "EndTime", "Reason", "QOS", "PreemptTime", "Name", "Comment")
SQUEUE_FORMAT = ",".join(f"{field}:0{SEP}" for field in SQUEUE_FIELDS)
# A key of an `scontrol -o` record: capitalised, so that "model=tiny" inside a comment is not taken for one.
_KEY = re.compile(r"(?:^|(?<=\s))([A-Z][A-Za-z0-9_:/.]*)=")
_VERSION = re.compile(r"\b(\d+)\.(\d+)\.(\d+)\b")
# What the clients print for a time that is not set.
_NO_TIME = frozenset({"", "N/A", "NONE", "UNKNOWN", "0"})


def seconds(value: str) -> float:
    """A time as squeue or scontrol prints it: unix seconds (SLURM_TIME_FORMAT=%s) or ISO local time."""
    value = value.strip()
    if value.upper() in _NO_TIME:
        return 0.0
    if value.isdigit():
        return float(value)
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return 0.0


def _host(value: str) -> str:
    return "" if value.strip().lower() in ("", "n/a", "(null)", "none") else value.strip()


@functools.lru_cache(maxsize=256)
def _state(word: str) -> tuple[str, bool]:
    """A state word's name and whether it waits, parsed once: a listing of 40,000 jobs repeats a few words."""
    parsed = JobState.parse(word)
    return parsed.name, parsed.waiting


def squeue(out: str) -> list[Job]:
    """The jobs in `squeue --noheader --Format=SQUEUE_FORMAT` output (every field ends in SEP)."""
    jobs = []
    n = len(SQUEUE_FIELDS)
    for line in out.splitlines():
        if not line.strip():
            continue
        parts = line.removesuffix(SEP).split(SEP, n - 1)
        if len(parts) != n or not line.endswith(SEP):
            raise ValueError(f"squeue line has {len(parts)} fields, not {n} each ending in the separator: {line!r}")
        job_id, state, user, uid, batch, nodes, submit, start, end, reason, qos, preempt, name, comment = parts
        state_name, waiting = _state(state)
        jobs.append(Job(job_id=job_id.strip(), name=name, comment="" if comment == "(null)" else comment,
                        state=state_name, node=_host(batch) or _host(nodes),
                        submit_time=seconds(submit), start_time=seconds(start) if not waiting else 0.0,
                        end_time=seconds(end) if not waiting else 0.0,
                        reason="" if reason.strip() == "None" else reason.strip(), user=user.strip(),
                        uid=int(uid) if uid.strip().isdigit() else -1, nodes=_host(nodes),
                        preempt_time=seconds(preempt),
                        qos="" if qos.strip() in ("", "(null)") else qos.strip()))
    return jobs


def record(line: str) -> dict[str, str]:
    """One `scontrol -o show ...` record as {key: value}; values may hold spaces."""
    fields: dict[str, str] = {}
    matches = list(_KEY.finditer(line))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        fields[m.group(1)] = line[m.end():end].strip()
    return fields


def scontrol_jobs(out: str) -> list[Job]:
    """The jobs in `scontrol -o show job [ID]` output (one record a line)."""
    jobs = []
    for line in out.splitlines():
        f = record(line)
        if "JobId" not in f:
            continue
        parsed = JobState.parse(f.get("JobState", ""))
        owner = re.match(r"([^()]*)\((\d+)\)", f.get("UserId", ""))
        job_id = f["JobId"]
        if f.get("ArrayJobId") and f.get("ArrayTaskId"):
            job_id = f"{f['ArrayJobId']}_{f['ArrayTaskId']}"
        jobs.append(Job(job_id=job_id, name=f.get("JobName", ""),
                        comment="" if f.get("Comment", "(null)") == "(null)" else f.get("Comment", ""),
                        state=parsed.name, node=_host(f.get("BatchHost", "")),
                        submit_time=seconds(f.get("SubmitTime", "")),
                        start_time=0.0 if parsed.waiting else seconds(f.get("StartTime", "")),
                        end_time=0.0 if parsed.waiting else seconds(f.get("EndTime", "")),
                        reason="" if f.get("Reason", "None") == "None" else f.get("Reason", ""),
                        user=owner.group(1) if owner else "", uid=int(owner.group(2)) if owner else -1,
                        nodes=_host(f.get("NodeList", "")),
                        preempt_time=seconds(f.get("PreemptTime", "")),
                        qos="" if f.get("QOS", "(null)") in ("", "(null)") else f["QOS"]))
    return jobs


def gpu_count(gres: str) -> int:
    """GPUs in a node's Gres= (gpu:4, gpu:a100:2(S:0-1), ...)."""
    return sum(int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))


def release(version_text: str) -> str:
    """`slurm 22.05.8` or `slurm-wlm 26.05.5` -> "22.05"; empty when there is no version."""
    m = _VERSION.search(version_text)
    return f"{m.group(1)}.{m.group(2)}" if m else ""


# A hostlist expression's bracket group: "node[01-03,7]" (zero padding kept from the range's first bound).
_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def hostnames(expr: str) -> list[str]:
    """The host names of a Slurm hostlist expression ("gpu[01-02],login1", "rack[1-2]-n[1-2]"), in order, as
    `scontrol show hostnames` gives them, without a command per job."""
    names: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(expr + ","):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            part = expr[start:i].strip()
            start = i + 1
            if part:
                names.extend(_expand(part))
    return names


def _expand(part: str) -> list[str]:
    found = _BRACKET.search(part)
    if found is None:
        return [part]
    head, tail = part[:found.start()], part[found.end():]
    out: list[str] = []
    for piece in found.group(1).split(","):
        low, _, high = piece.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"not a hostlist range: {piece!r} in {part!r}")
        width = len(low) if low.startswith("0") else 0
        for n in range(int(low), int(high or low) + 1):
            out.extend(_expand(f"{head}{n:0{width}d}{tail}"))
    return out


# Node state flags that mean the node is to be emptied: an administrator's drain (`scontrol update
# state=drain`), and `scontrol reboot ASAP`, which sets DRAIN with REBOOT_REQUESTED until the reboot is issued.
LEAVING_FLAGS = frozenset({"DRAIN", "REBOOT_REQUESTED", "REBOOT_ISSUED"})


def leaving_nodes(out: str) -> dict[str, str]:
    """From `scontrol -o show node LIST`: each node that Slurm is emptying, with why (its state and reason)."""
    leaving = {}
    for line in out.splitlines():
        f = record(line)
        name, state = f.get("NodeName", ""), f.get("State", "")
        if name and LEAVING_FLAGS & set(state.upper().split("+")):
            reason = f.get("Reason", "")
            leaving[name] = state + (f" ({reason})" if reason and reason != "(null)" else "")
    return leaving
