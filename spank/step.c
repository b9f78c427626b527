/*
 * Remote context (slurmstepd). Responsible for: giving every step of an --inference job the
 * variables of its env file, and failing its tasks with a readable line when that cannot be
 * done. Not responsible for: the env file's format and safety checks (environ.c).
 */
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#include <slurm/slurm.h>
#include <slurm/spank.h>

#include "environ.h"
#include "jobid.h"
#include "options.h"
#include "step.h"

/* The line task_init prints before failing the task; "" when all is well. */
static char task_error[2048];

static int set_step_env(void *ctx, const char *key, const char *value)
{
	spank_t sp = ctx;
	spank_err_t rc = spank_setenv(sp, key, value, 1);

	if (rc != ESPANK_SUCCESS) {
		slurm_error("slinfer: cannot set %s: %s", key, spank_strerror(rc));
		return -1;
	}
	return 0;
}

int slinfer_step_user_init(spank_t sp, const struct slinfer_args *args)
{
	struct slinfer_options opts;
	char jobid[SLINFER_JOBID_MAX], envfile[PATH_MAX];
	uint32_t stepid = 0;
	uid_t uid = 0;
	spank_err_t rc;

	task_error[0] = '\0';
	if (args == NULL) {
		snprintf(task_error, sizeof(task_error), "slinfer: the plugin is misconfigured on this "
							 "node (see the slurmd log)");
		return 0;
	}
	/* Errors past this point fail the tasks with a message (task_init), not the step launch,
	 * which would only leave a line in the slurmd log. */
	if (slinfer_options_read(sp, &opts) != 0) {
		snprintf(task_error, sizeof(task_error), "slinfer: cannot read the job's options");
		return 0;
	}
	if (!opts.inference)
		return 0;
	rc = spank_get_item(sp, S_JOB_STEPID, &stepid);
	if (rc == ESPANK_SUCCESS && stepid == SLURM_EXTERN_CONT)
		return 0; /* the extern step runs no user task */
	if (!opts.model_valid) {
		snprintf(task_error, sizeof(task_error), "%s", opts.model_error);
		return 0;
	}
	rc = spank_get_item(sp, S_JOB_UID, &uid);
	if (rc != ESPANK_SUCCESS) {
		slurm_error("slinfer: cannot get the job's uid: %s", spank_strerror(rc));
		snprintf(task_error, sizeof(task_error), "slinfer: cannot get the job's uid");
		return 0;
	}
	if (slinfer_job_id(sp, jobid, sizeof(jobid)) != 0 ||
	    slinfer_env_path(args->rundir, jobid, envfile, sizeof(envfile)) != 0) {
		snprintf(task_error, sizeof(task_error), "slinfer: cannot find this job's env file");
		return 0;
	}
	switch (slinfer_env_load(envfile, uid, set_step_env, sp, task_error, sizeof(task_error))) {
	case SLINFER_ENV_OK:
		if (task_error[0] != '\0')
			slurm_info("%s (job %s, reported by the engine's setup)", task_error, jobid);
		break;
	/* slurm_info: the slurmd log only; slurm_error would also land in the job's output,
	 * next to the line task_init prints. */
	case SLINFER_ENV_MISSING:
		slurm_info("slinfer: job %s: %s is missing", jobid, envfile);
		break;
	default:
		slurm_info("%s (job %s)", task_error, jobid);
		break;
	}
	return 0;
}

int slinfer_step_task_init(void)
{
	size_t len, off = 0;

	if (task_error[0] == '\0')
		return 0;
	len = strlen(task_error);
	if (len + 1 < sizeof(task_error)) {
		task_error[len++] = '\n';
		task_error[len] = '\0';
	}
	while (off < len) {
		ssize_t n = write(STDERR_FILENO, task_error + off, len - off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break; /* the task fails below either way */
		off += (size_t)n;
	}
	return -1;
}
