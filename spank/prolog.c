/*
 * slurmd context (job prolog and epilog, as root). Responsible for: deciding whether a job
 * needs the hook, building its argv (hook.c's slinfer_hook_argv), running it and logging how
 * it ended. Not responsible for: what the hook does, or how a process is run (hook.c).
 */
#include <limits.h>
#include <stdbool.h>

#include <slurm/slurm.h>
#include <slurm/spank.h>

#include "environ.h"
#include "hook.h"
#include "jobid.h"
#include "options.h"
#include "prolog.h"

/* The hook's output goes to the slurmd log, where an administrator looks after a failure. */
static void log_hook_line(void *ctx, const char *line)
{
	const char *jobid = ctx;

	slurm_info("slinfer: job %s: hook: %s", jobid, line);
}

/* What both phases need before the hook runs; 1 when there is nothing to run. */
static int prepare(spank_t sp, const struct slinfer_args *args, bool prolog, struct slinfer_options *opts,
		   char *jobid, size_t jobidlen, char *envfile, size_t envlen)
{
	if (slinfer_options_read(sp, opts) != 0)
		return -1;
	if (!opts->inference)
		return 1;
	/* hook= is checked only for jobs that need it: a plugstack line without it must not
	 * drain nodes for jobs that never asked for an engine. */
	if (args->hook[0] == '\0') {
		slurm_error("slinfer: plugstack argument hook= is required (the path of slinfer-hook)");
		return -1;
	}
	if (slinfer_job_id(sp, jobid, jobidlen) != 0)
		return -1;
	if (prolog && !opts->model_valid) {
		/* Got past submit without the plugin: the user's mistake, so no drain; the job's
		 * steps fail with the same message from user_init/task_init. */
		slurm_error("slinfer: job %s: %s; no engine started", jobid, opts->model_error);
		return 1;
	}
	/* The epilog runs even for an invalid model: stopping what is not there is harmless, and
	 * a leftover engine must not go unnoticed. */
	if (slinfer_env_path(args->rundir, jobid, envfile, envlen) != 0) {
		slurm_error("slinfer: job %s: env file path under %s is too long", jobid, args->rundir);
		return -1;
	}
	return 0;
}

static int run_phase(spank_t sp, const struct slinfer_args *args, const char *phase)
{
	struct slinfer_options opts;
	char jobid[SLINFER_JOBID_MAX], envfile[PATH_MAX], err[PATH_MAX + 256];
	char *argv[SLINFER_HOOK_ARGV_MAX];
	bool prolog = phase[0] == 'p';
	int rc = prepare(sp, args, prolog, &opts, jobid, sizeof(jobid), envfile, sizeof(envfile));

	if (rc != 0)
		return rc < 0 ? -1 : 0;
	slinfer_hook_argv(args, phase, jobid, prolog ? &opts : NULL, envfile, argv);
	if (slinfer_hook_run(argv, args->timeout, log_hook_line, jobid, err, sizeof(err)) != 0) {
		slurm_error("%s (job %s, %s)", err, jobid, phase);
		return -1;
	}
	slurm_info("slinfer: job %s: %s hook done", jobid, phase);
	return 0;
}

int slinfer_prolog(spank_t sp, const struct slinfer_args *args)
{
	return run_phase(sp, args, "prolog");
}

int slinfer_epilog(spank_t sp, const struct slinfer_args *args)
{
	return run_phase(sp, args, "epilog");
}
