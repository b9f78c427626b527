"""The controller's hands on Slurm: `sbatch`, the query for its own jobs, and `scancel`, run as argv lists.

Responsible for: building the `sbatch` command of a catalog model's pool job (the batch script only holds the
job while the agent's engine serves), asking Slurm about the controller's own jobs only, with a bounded number of
calls a step whatever the number of jobs, and cancelling a job. Measured on 22.05 with 5,000 foreign jobs
(bench/slurm_polling.py): listing a user's jobs (`squeue --user`, REQUEST_JOB_USER_INFO) walks the whole job
table (0.43 -> 1.71 ms of slurmctld time a call), while one job by id (`scontrol show job ID`,
REQUEST_JOB_INFO_SINGLE) is a hash lookup; but each client run costs the controller a fork (0.54 ms CPU, 2.5 ms
wall), so asking by id costs a step 22 s of CPU at 40,000 jobs (bench/control_plane_scale.py). So a step asks by
id while the controller knows at most BY_ID_MAX jobs of its own, and otherwise lists them in one `squeue` whose
--Format carries every field the controller reads (QOS and PreemptTime included: slinfer.slurm.parse): at most
BY_ID_MAX calls a step. It also lists when its view may miss a job (at start, to find a previous controller's;
after a failed sbatch, which may have submitted all the same; after a pause longer than STALE_S, such as a standby
that leads again).
Not responsible for: deciding what to submit or cancel (the autoscaler), recognising which of its user's jobs
are the autoscaler's (the caller matches name and comment), or running and parsing Slurm's clients
(slinfer.slurm). Submission goes through `sbatch` because only it passes SPANK options such as `--inference` to
the prolog (docs/architecture/design.md).
"""

from __future__ import annotations

import getpass
import logging
import re
import shlex
import time
from collections.abc import Callable, Mapping, Sequence

from slinfer.config import ModelConfig
from slinfer.slurm import accounts, parse, queries
from slinfer.slurm.jobs import Job as SlurmJob
from slinfer.slurm.runner import Runner, SlurmError

__all__ = ["SlurmClient", "SlurmError", "SlurmJob", "pool_flags"]

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"^[0-9]+(_[0-9]+)?$")
# A node name as Slurm allows it in slurm.conf (never an option: it reaches scontrol as an argument).
NODE_NAME = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*$")
# A view of the jobs last refreshed longer ago than this is not trusted (the autoscaler asks every 2 s; a
# standby that leads again, or a stalled loop, may have missed another controller's submissions): list again.
STALE_S = 30.0
# Up to this many known jobs a step asks about each by id (a hash lookup in slurmctld, no walk of a large queue);
# beyond, one listing costs less than the forks (one client run ~ 2.5 ms wall against a walk of ~ 2 ms at 5,000
# foreign jobs), so a step never runs more than this many clients whatever the number of jobs.
BY_ID_MAX = 4


def pool_flags(model: ModelConfig) -> list[str]:
    """The SPANK options that make a job serve `model` to the gateway."""
    return [f"--inference={model.name}", "--inference-pool"]


class SlurmClient:
    """Runs Slurm's commands for the controller through one Runner (a subprocess with a time limit each)."""

    def __init__(
        self,
        bin_dir: str = "",
        env: Mapping[str, str] | None = None,
        *,
        job_command: Sequence[str] = ("slinfer", "hold"),
        job_output: str = "/dev/null",
        timeout_s: float = 30.0,
        user: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not job_command:
            raise ValueError("job_command must not be empty")
        self.runner = Runner(bin_dir, env, timeout_s=timeout_s)
        self._job_command = list(job_command)
        self._job_output = job_output
        # The jobs sbatch submits belong to the user the controller runs as.
        self.user = user or getpass.getuser()
        if self.user == "root":
            # squeue treats uid 0 as no user filter at all: every listing would pack the whole queue.
            log.warning("the controller runs as root: its squeue --user=root listings return the whole queue; "
                        "run it as its own service user (packaging/systemd/slinfer-controller.service)")
        self._clock = clock
        self._listed = False
        self._asked_at = 0.0
        # Jobs this client knows to be its own and not over: submitted by it or found by the last listing.
        self._known: set[str] = set()
        self.listings = 0
        self.by_id_max = BY_ID_MAX

    def batch_script(self) -> str:
        return "#!/bin/sh\nexec " + shlex.join(self._job_command) + "\n"

    def submit_argv(self, model: ModelConfig, job_name: str, comment: str) -> list[str]:
        argv = ["sbatch", "--parsable", *pool_flags(model),
                f"--job-name={job_name}", f"--comment={comment}", f"--output={self._job_output}"]
        if model.nodes > 1:
            # One engine across the job's nodes: one rank (one prolog, one agent) on each, `gpus` on each.
            argv += [f"--nodes={model.nodes}", "--ntasks-per-node=1"]
        if model.gpus > 0:
            argv.append(f"--gres=gpu:{model.gpus}")
        if model.partition:
            argv.append(f"--partition={model.partition}")
        if model.account:
            argv.append(f"--account={model.account}")
        if model.qos:
            argv.append(f"--qos={model.qos}")
        argv.append(f"--time={model.time_limit}")
        argv.extend(model.sbatch_args)
        return argv

    async def submit(self, model: ModelConfig, job_name: str, comment: str) -> str:
        """Submits a pool job for `model` and returns its job id."""
        argv = self.submit_argv(model, job_name, comment)
        try:
            out = await self.runner.arun(argv, self.batch_script())
        except SlurmError:
            # A timed-out sbatch may have submitted the job: only a listing can tell.
            self._listed = False
            raise
        # --parsable prints "JOBID" or "JOBID;CLUSTER".
        job_id = out.strip().split(";", 1)[0]
        if not JOB_ID.match(job_id):
            raise SlurmError(self.runner.argv(argv), 0, f"unexpected sbatch output {out!r}")
        self._known.add(job_id)
        return job_id

    async def jobs(self, names: Sequence[str] = ()) -> list[SlurmJob]:
        """The controller's own jobs: its user's jobs of `names` (all its user's jobs without names), in one
        listing when its view may miss one or it knows more than BY_ID_MAX (see the module docstring), otherwise
        the jobs it knows, by id. Asked by id, a job is listed once more after it is over, then forgotten; a
        listing shows it while Slurm keeps it (MinJobAge)."""
        now = self._clock()
        stale = now - self._asked_at > STALE_S
        self._asked_at = now
        if not self._listed or stale or len(self._known) > self.by_id_max:
            query = queries.user_jobs(self.user, names)
            try:
                found = await self.runner.aget(query)
            except ValueError as exc:
                raise SlurmError(self.runner.argv(query.argv), 0, f"unexpected squeue output: {exc}") from exc
            self._listed = True
            self.listings += 1
            # Jobs submitted since the listing began are not in it yet: they stay known.
            self._known = {j.job_id for j in found if j.holds_node} | (self._known - {j.job_id for j in found})
            return found
        found = await self.jobs_by_id(sorted(self._known, key=_id_order))
        self._known = {j.job_id for j in found if j.holds_node}
        return found

    async def site_order_problems(self, models: Sequence[ModelConfig]) -> list[str]:
        """What stops this user from submitting each model's jobs under its account, partition and QOS, checked
        against slurmdbd's associations and the partitions' allow/deny lists (slinfer.slurm.accounts); each
        problem names the model, the config key and what is missing. Models that name none of them are not
        checked; a Slurm without accounting (sacctmgr fails) is logged and not checked."""
        wanted = [accounts.Wanted(i, m.name, m.account, m.partition,
                                  [(key, getattr(m, key)) for key in ("qos", "burst_qos") if getattr(m, key, "")])
                  for i, m in enumerate(models) if m.account or m.partition or m.qos or getattr(m, "burst_qos", "")]
        if not wanted:
            return []
        try:
            rows = await self.runner.aget(accounts.associations(self.user))
            default = (await self.runner.aget(accounts.default_account(self.user))
                       if any(not w.account for w in wanted) else "")
        except SlurmError as exc:
            log.warning("the catalog's accounts, partitions and QOS are not checked: sacctmgr failed (%s)", exc)
            return []
        partitions: dict[str, dict[str, str] | None] = {}
        for name in {w.partition for w in wanted if w.partition}:
            try:
                partitions[name] = await self.runner.aget(accounts.partition(name))
            except SlurmError:
                partitions[name] = None
        found = [p for w in wanted for p in accounts.problems(self.user, w, rows, default, partitions)]
        if not found:
            log.info("the controller's user %s may submit every model's jobs where the catalog says (%s)", self.user,
                     "; ".join(f"{w.model}: {w.account or default}/{w.partition or '-'}/"
                               f"{','.join(q for _, q in w.qos) or '-'}" for w in wanted))
        return found

    async def cancel(self, job_id: str) -> None:
        if not JOB_ID.match(job_id):
            raise ValueError(f"{job_id!r} is not a Slurm job id")
        await self.runner.arun(["scancel", job_id])

    async def leaving_nodes(self, nodelists: Sequence[str]) -> dict[str, str]:
        """Of the nodes in these hostlists (the controller's running jobs'), those Slurm is emptying (an
        administrator's drain, `scontrol reboot ASAP`), each with its state and reason; one scontrol call."""
        wanted = sorted({n for nodelist in nodelists for n in parse.hostnames(nodelist)})
        if not wanted:
            return {}
        if any(not NODE_NAME.match(n) for n in wanted):
            raise ValueError(f"not a node name in {wanted!r}")
        try:
            return await self.runner.aget(queries.leaving_nodes(",".join(wanted)))
        except ValueError as exc:
            raise SlurmError(self.runner.argv(["scontrol", "show", "node"]), 0,
                             f"unexpected scontrol output: {exc}") from exc

    async def jobs_by_id(self, job_ids: Sequence[str]) -> list[SlurmJob]:
        """These jobs (any user's), one `scontrol show job ID` each: slurmctld answers each from its job table
        without packing the queue. An id Slurm no longer knows is left out."""
        found: list[SlurmJob] = []
        for job_id in job_ids:
            if not JOB_ID.match(job_id):
                raise ValueError(f"{job_id!r} is not a Slurm job id")
            try:
                found.extend(await self.runner.aget(queries.job(job_id)))
            except SlurmError as exc:
                if "Invalid job id" not in exc.stderr:
                    raise
        return found


def _id_order(job_id: str) -> tuple[int, int]:
    base, _, task = job_id.partition("_")
    return int(base), int(task or 0)
