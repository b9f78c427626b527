/*
 * Allocator context. Responsible for: refusing a submission whose slinfer options do not go
 * together, and --inference-pool from a user whom pool_users= does not name. Not responsible
 * for: each option's own value check (options.c's callbacks); the agent checks the pool rule
 * again at the prolog, since a user can submit with a plugstack of their own.
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

int slinfer_allocator_check(const struct slinfer_args *args)
{
	const struct slinfer_options *opts = slinfer_options_seen();
	char user[256];

	if (opts->inference && !opts->model_valid)
		return -1; /* the option callback printed why */
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
	return 0;
}
