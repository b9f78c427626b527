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

struct slinfer_args {
	char hook[PATH_MAX];      /* absolute path of slinfer-hook; "" when not given */
	char config[PATH_MAX];    /* absolute path passed as --config; "" when not given */
	char rundir[PATH_MAX];    /* env files live in RUNDIR/jobs/JOBID.env */
	unsigned int timeout;     /* seconds the prolog/epilog waits for the hook */
};

/*
 * Parse the plugstack arguments into args (defaults first). Returns 0, or -1 with one
 * line in err (starting "slinfer: ") naming the key at fault.
 */
int slinfer_args_parse(int ac, char **av, struct slinfer_args *args, char *err, size_t errlen);

#endif
