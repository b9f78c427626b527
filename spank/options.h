/* Options that slinfer adds to sbatch/salloc/srun and their value checks. */
#ifndef SLINFER_OPTIONS_H
#define SLINFER_OPTIONS_H

#include <stdbool.h>
#include <stddef.h>

#include <slurm/spank.h>

/* Longest accepted model name, in bytes. */
#define SLINFER_MODEL_MAX 128

/* What the user asked for on the command line (or, on the node, in the job). */
struct slinfer_options {
	bool inference;             /* --inference was given */
	bool pool;                  /* --inference-pool was given */
	char model[SLINFER_MODEL_MAX + 1];
	bool model_valid;           /* model passed slinfer_model_check() */
	char model_error[512];      /* why it did not, when !model_valid */
};

/*
 * Check a --inference value. Returns 0 when it is a valid model name, -1 otherwise with
 * one line in err (starting "slinfer: invalid --inference value") naming the problem.
 */
int slinfer_model_check(const char *value, char *err, size_t errlen);

/* Register --inference and --inference-pool; call from slurm_spank_init in every context. */
int slinfer_options_register(spank_t sp);

/*
 * Values seen by the option callbacks in this process (sbatch/salloc/srun and slurmstepd).
 * The callbacks validate only when not remote; remote values are re-read with
 * slinfer_options_read().
 */
const struct slinfer_options *slinfer_options_seen(void);

/*
 * Read the options of the job with spank_option_getopt() (job prolog/epilog and remote
 * context) and validate the model again. Returns 0, or -1 when the options cannot be read.
 */
int slinfer_options_read(spank_t sp, struct slinfer_options *out);

#endif
