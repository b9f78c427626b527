/* Options that slinfer adds to sbatch/salloc/srun and their value checks. */
#ifndef SLINFER_OPTIONS_H
#define SLINFER_OPTIONS_H

#include <stdbool.h>
#include <stddef.h>

#include <slurm/spank.h>

/* Longest accepted model name, in bytes. */
#define SLINFER_MODEL_MAX 128
/* Longest --inference-lora adapter name, in bytes (it becomes a model name the engine serves). */
#define SLINFER_LORA_NAME_MAX 64
/* Longest --inference-lora adapter path, in bytes: a folder path, not a file's contents. */
#define SLINFER_LORA_PATH_MAX 1024
/* How many --inference-lora one job may give: each is an adapter the engine keeps in memory. */
#define SLINFER_LORA_MAX 8
/* One NAME=PATH value with its NUL. */
#define SLINFER_LORA_VALUE_MAX (SLINFER_LORA_NAME_MAX + 1 + SLINFER_LORA_PATH_MAX + 1)
/* The job-control variable (SPANK_ + this in the prolog's environment) with the job's adapters, one
 * NAME=PATH a line: spank_option_getopt() keeps only an option's last value, so a repeated option
 * travels this way. agent/hook.py reads it (slinfer/inference_lora.py spells the same name). */
#define SLINFER_LORAS_ENV "SLINFER_LORAS"

/* What the user asked for on the command line (or, on the node, in the job). */
struct slinfer_options {
	bool inference;             /* --inference was given */
	bool pool;                  /* --inference-pool was given */
	char model[SLINFER_MODEL_MAX + 1];
	bool model_valid;           /* model passed slinfer_model_check() */
	char model_error[512];      /* why it did not, when !model_valid */
	int nloras;                 /* --inference-lora values accepted so far */
	char loras[SLINFER_LORA_MAX][SLINFER_LORA_VALUE_MAX];
	bool lora_refused;          /* a --inference-lora value was refused (the callback said why) */
};

/*
 * Check a --inference value. Returns 0 when it is a valid model name, -1 otherwise with
 * one line in err (starting "slinfer: invalid --inference value") naming the problem.
 */
int slinfer_model_check(const char *value, char *err, size_t errlen);

/*
 * Check one --inference-lora value, NAME=PATH: NAME of letters, digits, '.', '_', '-' (1 to
 * SLINFER_LORA_NAME_MAX bytes), PATH absolute, at most SLINFER_LORA_PATH_MAX bytes, no control
 * character. Returns 0, or -1 with one line in err (starting "slinfer: invalid --inference-lora
 * value") naming the problem.
 */
int slinfer_lora_check(const char *value, char *err, size_t errlen);

/*
 * Add a checked value to opts (at most SLINFER_LORA_MAX, each NAME once). Returns 0, or -1 with
 * one line in err naming the problem.
 */
int slinfer_lora_add(struct slinfer_options *opts, const char *value, char *err, size_t errlen);

/* opts' adapters joined, one NAME=PATH a line, into out. Returns 0, or -1 when it does not fit. */
int slinfer_loras_joined(const struct slinfer_options *opts, char *out, size_t outlen);

/* Register --inference, --inference-pool and --inference-lora; call from slurm_spank_init in every context. */
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
