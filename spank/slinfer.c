/*
 * slinfer SPANK plugin: the exported slurm_spank_* callbacks, dispatching on spank_context().
 *
 * Responsible for: --inference/--inference-pool at submit, running slinfer-hook in the job
 * prolog and epilog, and giving every job step the engine's environment (or failing its tasks
 * with the reason). Not responsible for: starting engines, reading the site catalog, talking to
 * the network; the hook and the node agent do that.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <slurm/slurm.h>
#include <slurm/spank.h>

#include "args.h"
#include "environ.h"
#include "hook.h"
#include "options.h"

SPANK_PLUGIN(slinfer, 1);

/* Plugstack arguments; parsed again in each callback that uses them, because Slurm 22.05 does
 * not call slurm_spank_init before job_prolog/job_epilog in the job-script context. */
static struct slinfer_args args;

/* Remote context: the line task_init prints before failing the task; "" when all is well. */
static char task_error[2048];

/* The job id as decimal text, from the SPANK handle or, failing that, SLURM_JOB_ID. */
static int job_id(spank_t sp, char *out, size_t outlen)
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

/* hook= is checked only for jobs that need it: a plugstack line without it must not drain
 * nodes for jobs that never asked for an engine. */
static int require_hook(void)
{
	if (args.hook[0] == '\0') {
		slurm_error("slinfer: plugstack argument hook= is required (the path of slinfer-hook)");
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
	const struct slinfer_options *opts = slinfer_options_seen();
	spank_context_t ctx = spank_context();

	(void)sp;
	(void)ac;
	(void)av;
	if (ctx != S_CTX_ALLOCATOR && ctx != S_CTX_LOCAL)
		return 0;
	if (opts->inference && !opts->model_valid)
		return -1; /* the option callback printed why */
	if (opts->pool && !opts->inference) {
		slurm_error("slinfer: --inference-pool needs --inference=MODEL");
		return -1;
	}
	return 0;
}

/* The hook's output goes to the slurmd log, where an administrator looks after a failure. */
static void log_hook_line(void *ctx, const char *line)
{
	const char *jobid = ctx;

	slurm_info("slinfer: job %s: hook: %s", jobid, line);
}

/* Common part of prolog and epilog: run argv, log how it ended. */
static int run_hook(const char *phase, const char *jobid, char **argv)
{
	char err[PATH_MAX + 256];

	if (slinfer_hook_run(argv, args.timeout, log_hook_line, (void *)jobid, err, sizeof(err)) != 0) {
		slurm_error("%s (job %s, %s)", err, jobid, phase);
		return -1;
	}
	slurm_info("slinfer: job %s: %s hook done", jobid, phase);
	return 0;
}

int slurm_spank_job_prolog(spank_t sp, int ac, char **av)
{
	struct slinfer_options opts;
	char jobid[16], envfile[PATH_MAX];
	char *argv[16];
	int n = 0;

	if (load_args(ac, av) != 0 || slinfer_options_read(sp, &opts) != 0)
		return -1;
	if (!opts.inference)
		return 0;
	if (require_hook() != 0)
		return -1;
	if (job_id(sp, jobid, sizeof(jobid)) != 0)
		return -1;
	if (!opts.model_valid) {
		/* Got past submit without the plugin: the user's mistake, so no drain; the job's
		 * steps fail with the same message from user_init/task_init. */
		slurm_error("slinfer: job %s: %s; no engine started", jobid, opts.model_error);
		return 0;
	}
	if (slinfer_env_path(args.rundir, jobid, envfile, sizeof(envfile)) != 0) {
		slurm_error("slinfer: job %s: env file path under %s is too long", jobid, args.rundir);
		return -1;
	}
	argv[n++] = args.hook;
	argv[n++] = "prolog";
	argv[n++] = "--job-id";
	argv[n++] = jobid;
	argv[n++] = "--model";
	argv[n++] = opts.model;
	if (opts.pool)
		argv[n++] = "--pool";
	argv[n++] = "--env-file";
	argv[n++] = envfile;
	if (args.config[0] != '\0') {
		argv[n++] = "--config";
		argv[n++] = args.config;
	}
	argv[n] = NULL;
	return run_hook("prolog", jobid, argv);
}

int slurm_spank_job_epilog(spank_t sp, int ac, char **av)
{
	struct slinfer_options opts;
	char jobid[16], envfile[PATH_MAX];
	char *argv[16];
	int n = 0;

	if (load_args(ac, av) != 0 || slinfer_options_read(sp, &opts) != 0)
		return -1;
	if (!opts.inference)
		return 0;
	if (require_hook() != 0)
		return -1;
	if (job_id(sp, jobid, sizeof(jobid)) != 0)
		return -1;
	if (slinfer_env_path(args.rundir, jobid, envfile, sizeof(envfile)) != 0) {
		slurm_error("slinfer: job %s: env file path under %s is too long", jobid, args.rundir);
		return -1;
	}
	/* Run even for an invalid model: stopping what is not there is harmless, and a leftover
	 * engine must not go unnoticed. */
	argv[n++] = args.hook;
	argv[n++] = "epilog";
	argv[n++] = "--job-id";
	argv[n++] = jobid;
	argv[n++] = "--env-file";
	argv[n++] = envfile;
	if (args.config[0] != '\0') {
		argv[n++] = "--config";
		argv[n++] = args.config;
	}
	argv[n] = NULL;
	return run_hook("epilog", jobid, argv);
}

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

int slurm_spank_user_init(spank_t sp, int ac, char **av)
{
	struct slinfer_options opts;
	char jobid[16], envfile[PATH_MAX];
	uint32_t stepid = 0;
	uid_t uid = 0;
	spank_err_t rc;

	task_error[0] = '\0';
	if (spank_context() != S_CTX_REMOTE)
		return 0;
	if (load_args(ac, av) != 0) {
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
	if (job_id(sp, jobid, sizeof(jobid)) != 0 ||
	    slinfer_env_path(args.rundir, jobid, envfile, sizeof(envfile)) != 0) {
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

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	size_t len, off = 0;

	(void)sp;
	(void)ac;
	(void)av;
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
