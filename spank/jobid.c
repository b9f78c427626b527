/*
 * The job id of the job in hand. Responsible for: reading it from SPANK or the environment and
 * refusing what is not a job id. Not responsible for: anything done with it.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <slurm/slurm.h>
#include <slurm/spank.h>

#include "jobid.h"

int slinfer_job_id(spank_t sp, char *out, size_t outlen)
{
	uint32_t id = 0;
	const char *env;
	char *end = NULL;
	unsigned long n;

	if (spank_get_item(sp, S_JOB_ID, &id) == ESPANK_SUCCESS && id != 0) {
		snprintf(out, outlen, "%" PRIu32, id);
		return 0;
	}
	env = getenv("SLURM_JOB_ID");
	if (env == NULL || env[0] < '0' || env[0] > '9') {
		slurm_error("slinfer: cannot find the job id (no S_JOB_ID, SLURM_JOB_ID=%s)",
			    env != NULL ? env : "(unset)");
		return -1;
	}
	errno = 0;
	n = strtoul(env, &end, 10);
	if (errno != 0 || *end != '\0' || n == 0 || n > UINT32_MAX) {
		slurm_error("slinfer: invalid SLURM_JOB_ID=%s", env);
		return -1;
	}
	snprintf(out, outlen, "%lu", n);
	return 0;
}
