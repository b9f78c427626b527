/*
 * slinfer SPANK plugin: only the exported slurm_spank_* callbacks, dispatching on
 * spank_context() to one module per context: allocator.c (sbatch/salloc/srun), prolog.c
 * (slurmd's job prolog and epilog), step.c (slurmstepd).
 *
 * Responsible for: --inference/--inference-pool/--inference-lora at submit, running slinfer-hook in the job
 * prolog and epilog, and giving every job step the engine's environment (or failing its tasks
 * with the reason). Not responsible for: starting engines, reading the site catalog, talking to
 * the network; the hook and the node agent do that.
 */
#include <limits.h>
#include <stddef.h>

#include <slurm/slurm.h>
#include <slurm/spank.h>

#include "allocator.h"
#include "args.h"
#include "options.h"
#include "prolog.h"
#include "step.h"

SPANK_PLUGIN(slinfer, 1);

/* Plugstack arguments; parsed again in each callback that uses them, because Slurm 22.05 does
 * not call slurm_spank_init before job_prolog/job_epilog in the job-script context. */
static struct slinfer_args args;

/* Parse the plugstack arguments into args. */
static int load_args(int ac, char **av)
{
	char err[PATH_MAX + 256];

	if (slinfer_args_parse(ac, av, &args, err, sizeof(err)) != 0) {
		slurm_error("%s", err);
		return -1;
	}
	return 0;
}

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	slurm_debug("slinfer: init in context %d", (int)spank_context());
	if (slinfer_options_register(sp) != 0)
		return -1;
	return load_args(ac, av);
}

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
	spank_context_t ctx = spank_context();

	(void)ac;
	(void)av;
	if (ctx != S_CTX_ALLOCATOR && ctx != S_CTX_LOCAL)
		return 0;
	return slinfer_allocator_check(sp, &args);
}

int slurm_spank_job_prolog(spank_t sp, int ac, char **av)
{
	if (load_args(ac, av) != 0)
		return -1;
	return slinfer_prolog(sp, &args);
}

int slurm_spank_job_epilog(spank_t sp, int ac, char **av)
{
	if (load_args(ac, av) != 0)
		return -1;
	return slinfer_epilog(sp, &args);
}

int slurm_spank_user_init(spank_t sp, int ac, char **av)
{
	if (spank_context() != S_CTX_REMOTE)
		return 0;
	return slinfer_step_user_init(sp, load_args(ac, av) == 0 ? &args : NULL);
}

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	(void)sp;
	(void)ac;
	(void)av;
	return slinfer_step_task_init();
}
