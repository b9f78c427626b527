/* The id of the job a callback runs for. */
#ifndef SLINFER_JOBID_H
#define SLINFER_JOBID_H

#include <stddef.h>

#include <slurm/spank.h>

/* Room for any uint32 job id as decimal text. */
#define SLINFER_JOBID_MAX 16

/* The job id as decimal text, from S_JOB_ID or, failing that, SLURM_JOB_ID (job prolog/epilog).
 * Returns 0, or -1 after logging why with slurm_error. */
int slinfer_job_id(spank_t sp, char *out, size_t outlen);

#endif
