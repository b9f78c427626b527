/* Remote context (slurmstepd, as the job's user): the engine's environment for every step. */
#ifndef SLINFER_STEP_H
#define SLINFER_STEP_H

#include <stdbool.h>

#include <slurm/spank.h>

#include "args.h"

/* user_init: load the job's env file into the step's environment, or remember why not. args is
 * NULL when the plugstack arguments did not parse. Always 0: errors fail the tasks instead. */
int slinfer_step_user_init(spank_t sp, const struct slinfer_args *args);

/* task_init: 0, or -1 after writing the remembered error to the task's stderr. */
int slinfer_step_task_init(void);

#endif
