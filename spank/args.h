/* Plugin arguments from the plugstack.conf line (key=value). */
#ifndef SLINFER_ARGS_H
#define SLINFER_ARGS_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>

#define SLINFER_DEFAULT_RUNDIR "/run/slinfer"
#define SLINFER_DEFAULT_TIMEOUT 60
/* Longer than any sane prolog; Slurm's own PrologEpilogTimeout should stop it first. */
#define SLINFER_MAX_TIMEOUT 86400
/* Room for the pool_users= list: a few service accounts, comma-separated. */
#define SLINFER_POOL_USERS_MAX 1024

struct slinfer_args {
	char hook[PATH_MAX];      /* absolute path of slinfer-hook; "" when not given */
	char config[PATH_MAX];    /* absolute path passed as --config; "" when not given */
	char rundir[PATH_MAX];    /* env files live in RUNDIR/jobs/JOBID.env */
	unsigned int timeout;     /* seconds the prolog/epilog waits for the hook */
	/* Users who may give --inference-pool, comma-separated ([controller].user and [agent].pool_users of
	 * the config); "" when not given, and then only the agent refuses others, at the prolog. */
	char pool_users[SLINFER_POOL_USERS_MAX];
};

/*
 * Parse the plugstack arguments into args (defaults first). Returns 0, or -1 with one
 * line in err (starting "slinfer: ") naming the key at fault.
 */
int slinfer_args_parse(int ac, char **av, struct slinfer_args *args, char *err, size_t errlen);

/* Whether user may give --inference-pool: true where pool_users= was not given or names the user. */
bool slinfer_args_pool_user(const struct slinfer_args *args, const char *user);

#endif
