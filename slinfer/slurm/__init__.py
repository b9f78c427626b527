"""One Slurm layer for the agent, the controller, the bed and the benchmarks.

Responsible for: the job model (`Job`), the table of job states (`states`), the subprocess runner with a time
limit (`runner`), and the parsers of what Slurm's clients print (`parse`) on every supported release
(22.05, 24.11, 26.05).
Not responsible for: deciding anything about the jobs, or submitting them (controller/slurm.py builds the
controller's `sbatch` command on top of this layer).
"""

from slinfer.slurm.jobs import Job
from slinfer.slurm.runner import Runner, SlurmError
from slinfer.slurm.states import JobState

__all__ = ["Job", "JobState", "Runner", "SlurmError"]
