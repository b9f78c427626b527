/* The per-job env file that the hook writes and every job step reads. */
#ifndef SLINFER_ENVIRON_H
#define SLINFER_ENVIRON_H

#include <stddef.h>
#include <sys/types.h>

/* Larger files are refused: the contract is a handful of short lines. */
#define SLINFER_ENV_MAX_BYTES (64 * 1024)

/* Called for each accepted KEY=VALUE; a non-zero return stops loading with that error. */
typedef int (*slinfer_env_set_f)(void *ctx, const char *key, const char *value);

enum slinfer_env_result {
	SLINFER_ENV_OK,       /* loaded; err holds SLINFER_ERROR's text when the hook set one */
	SLINFER_ENV_MISSING,  /* no file: the prolog set up no engine for this job on this node */
	SLINFER_ENV_REFUSED,  /* unusable file (owner, type, size, read error); err says why */
};

/* Write RUNDIR/jobs/JOBID.env into out. Returns 0, or -1 when it does not fit. */
int slinfer_env_path(const char *rundir, const char *jobid, char *out, size_t outlen);

/*
 * Parse env-file text buf[0..len) (buf has room for len + 1 bytes; name is for warnings):
 * lines KEY=VALUE, the value runs to the newline, no quoting, empty lines skipped. Accepted
 * keys go to set(); other keys and malformed lines are skipped with a logged warning. A
 * non-empty SLINFER_ERROR becomes the line "slinfer: TEXT" in err (err is "" otherwise).
 * Returns 0, or -1 with err set when set() failed.
 */
int slinfer_env_parse(const char *name, char *buf, size_t len, slinfer_env_set_f set, void *ctx,
		      char *err, size_t errlen);

/*
 * Messages in err are whole lines for the job's output, starting "slinfer: ".
 * Open path without following a symlink, insist on a regular file owned by root or job_uid and
 * writable by nobody else, at most SLINFER_ENV_MAX_BYTES, and parse it.
 */
enum slinfer_env_result slinfer_env_load(const char *path, uid_t job_uid, slinfer_env_set_f set,
					 void *ctx, char *err, size_t errlen);

#endif
