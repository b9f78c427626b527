/*
 * Allocator context. Responsible for: refusing a submission whose slinfer options do not go
 * together. Not responsible for: each option's own value check (options.c's callbacks).
 */
#include <slurm/slurm.h>

#include "allocator.h"
#include "options.h"

int slinfer_allocator_check(void)
{
	const struct slinfer_options *opts = slinfer_options_seen();

	if (opts->inference && !opts->model_valid)
		return -1; /* the option callback printed why */
	if (opts->pool && !opts->inference) {
		slurm_error("slinfer: --inference-pool needs --inference=MODEL");
		return -1;
	}
	return 0;
}
