/*
 * Allocator context. Responsible for: refusing a submission whose slinfer options do not go
 * together, and --inference-pool from a user whom pool_users= does not name; handing the job's
 * --inference-lora values to its prolog (job-control environment). Not responsible for: each
 * option's own value check (options.c's callbacks); the agent checks the pool rule and the
 * adapters again at the prolog, since a user can submit with a plugstack of their own.
 */
#include <pwd.h>
#include <stdlib.h>
#include <unistd.h>

#include <slurm/slurm.h>

#include "allocator.h"
#include "options.h"

/* The submitting user's name into out; -1 when the uid has none. */
static int user_name(char *out, size_t outlen)
{
	struct passwd pw, *found = NULL;
	char buf[4096];

	if (getpwuid_r(getuid(), &pw, buf, sizeof(buf), &found) != 0 || found == NULL)
		return -1;
	if ((size_t)snprintf(out, outlen, "%s", pw.pw_name) >= outlen)
		return -1;
	return 0;
}

/* The job's adapters into its prolog's environment (SPANK_ + SLINFER_LORAS_ENV). */
static int pass_loras(spank_t sp, const struct slinfer_options *opts)
{
	static char joined[SLINFER_LORA_MAX * SLINFER_LORA_VALUE_MAX];
	spank_err_t rc;

	if (slinfer_loras_joined(opts, joined, sizeof(joined)) != 0) {
		slurm_error("slinfer: --inference-lora values do not fit in %zu bytes", sizeof(joined));
		return -1;
	}
	rc = spank_job_control_setenv(sp, SLINFER_LORAS_ENV, joined, 1);
	if (rc != ESPANK_SUCCESS) {
		slurm_error("slinfer: cannot pass --inference-lora to the job: %s", spank_strerror(rc));
		return -1;
	}
	return 0;
}

int slinfer_allocator_check(spank_t sp, const struct slinfer_args *args)
{
	const struct slinfer_options *opts = slinfer_options_seen();
	char user[256];

	if (opts->inference && !opts->model_valid)
		return -1; /* the option callback printed why */
	if (opts->lora_refused)
		return -1; /* likewise */
	if (opts->nloras > 0 && !opts->inference) {
		slurm_error("slinfer: --inference-lora needs --inference=MODEL");
		return -1;
	}
	if (opts->pool && !opts->inference) {
		slurm_error("slinfer: --inference-pool needs --inference=MODEL");
		return -1;
	}
	if (opts->pool && args->pool_users[0] != '\0') {
		if (user_name(user, sizeof(user)) != 0) {
			slurm_error("slinfer: --inference-pool: uid %u has no user name", (unsigned int)getuid());
			return -1;
		}
		if (!slinfer_args_pool_user(args, user)) {
			slurm_error("slinfer: --inference-pool is refused for user %s: only the slinfer "
				    "service (%s) may publish an engine to the shared pool, whose engines read "
				    "every tenant's prompts; submit without --inference-pool for an engine of "
				    "your own",
				    user, args->pool_users);
			return -1;
		}
	}
	if (opts->nloras > 0)
		return pass_loras(sp, opts);
	return 0;
}
