"""The Slurm questions slinfer asks, each as narrow as the answer it needs, so that slurmctld's work does not
grow with the cluster's queue.

Responsible for: the argv of each read (a user's jobs by name, one job by id, one node, the node's state, the
release) with the filters every release applies on the server side: `--user` makes squeue send
REQUEST_JOB_USER_INFO and `--jobs ID` / `scontrol show job ID` REQUEST_JOB_INFO_SINGLE, so slurmctld packs
only those jobs. (`--json` on 22.05 ignores every filter, which is why none of these asks for JSON.)
Not responsible for: running them (runner.py) or parsing (parse.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from slinfer.slurm import parse
from slinfer.slurm.jobs import Job
from slinfer.slurm.runner import Query


def user_jobs(user: str, names: Sequence[str] = ()) -> Query[list[Job]]:
    """`user`'s jobs (with `names`, only those), finished ones included while Slurm keeps them (MinJobAge)."""
    argv = ["squeue", "--noheader", f"--user={user}", "--states=all", f"--Format={parse.SQUEUE_FORMAT}"]
    if names:
        argv.append("--name=" + ",".join(names))
    return Query(tuple(argv), parse.squeue)


def all_jobs() -> Query[list[Job]]:
    """Every job in the queue: for the bed's own teardown only, never for a service's polling."""
    return Query(("squeue", "--noheader", f"--Format={parse.SQUEUE_FORMAT}"), parse.squeue)


def job(job_id: str) -> Query[list[Job]]:
    """One job, as `scontrol -o show job ID` shows it (empty-handed it fails: Invalid job id)."""
    return Query(("scontrol", "-o", "show", "job", job_id), parse.scontrol_jobs)


def node(name: str) -> Query[dict[str, str]]:
    """One node's record: Partitions, Gres, State, ..."""
    return Query(("scontrol", "-o", "show", "node", name), parse.record)


def leaving_nodes(nodelist: str) -> Query[dict[str, str]]:
    """Which of these nodes (a hostlist expression) Slurm is emptying (drain, reboot ASAP), with why: one
    `scontrol show node` for every node that runs the controller's replicas."""
    return Query(("scontrol", "-o", "show", "node", nodelist), parse.leaving_nodes)


def node_state(name: str) -> Query[str]:
    """One node's state as sinfo shows it: idle, mixed, allocated, drained, down* ..."""
    return Query(("sinfo", "--noheader", "--Node", f"--nodes={name}", "--format=%T"), str.strip)


def node_reason(name: str) -> Query[str]:
    """Why a node is drained or down, as an administrator or Slurm itself set it ("Kill task failed", ...)."""
    return Query(("sinfo", "--noheader", "--Node", f"--nodes={name}", "--format=%E"), str.strip)


def hostnames(nodelist: str) -> Query[list[str]]:
    return Query(("scontrol", "show", "hostnames", nodelist), str.split)


def release() -> Query[str]:
    """The release ("24.11") of the clients that run."""
    return Query(("sinfo", "-V"), parse.release)
