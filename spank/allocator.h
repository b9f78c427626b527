/* Allocator context (sbatch, salloc, srun on the submit host): checks the options together. */
#ifndef SLINFER_ALLOCATOR_H
#define SLINFER_ALLOCATOR_H

#include <slurm/spank.h>

#include "args.h"

/* After all options are parsed: 0 when they go together and the submitting user may give them
 * (args' pool_users=), -1 (after printing why) otherwise. The job's --inference-lora values go
 * to its prolog through sp's job-control environment. */
int slinfer_allocator_check(spank_t sp, const struct slinfer_args *args);

#endif
