/* slurmd context: the job prolog and epilog, which run slinfer-hook as root. */
#ifndef SLINFER_PROLOG_H
#define SLINFER_PROLOG_H

#include <slurm/spank.h>

#include "args.h"

/* Start the job's engine through `HOOK prolog ...`. 0 on success or for jobs without
 * --inference; -1 fails the prolog (Slurm requeues the job and drains the node). */
int slinfer_prolog(spank_t sp, const struct slinfer_args *args);

/* Stop it through `HOOK epilog ...`. */
int slinfer_epilog(spank_t sp, const struct slinfer_args *args);

#endif
