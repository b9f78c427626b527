/*
 * Per-job env file: RUNDIR/jobs/JOBID.env, written by the hook (root) in the prolog and read
 * in every job step.
 *
 * Responsible for: opening it safely, accepting only the keys of the contract, and turning a
 * missing file or SLINFER_ERROR into the message the job's output shows. Not responsible for:
 * writing the file or deciding what the values are (the hook and the agent do).
 */
#include "environ.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <slurm/spank.h>

static const char *const accepted_keys[] = {
	"OPENAI_BASE_URL", "OPENAI_API_KEY",	  "SLINFER_MODEL",
	"SLINFER_STATUS_FILE", "SLINFER_ERROR", "SLINFER_JOB_ENGINE",
};

static const char missing_text[] =
	"slinfer: no engine was set up for this job on this node (see the slurmd log)";

static bool accepted(const char *key)
{
	for (size_t i = 0; i < sizeof(accepted_keys) / sizeof(accepted_keys[0]); i++) {
		if (strcmp(key, accepted_keys[i]) == 0)
			return true;
	}
	return false;
}

int slinfer_env_path(const char *rundir, const char *jobid, char *out, size_t outlen)
{
	int n = snprintf(out, outlen, "%s/jobs/%s.env", rundir, jobid);

	return (n < 0 || (size_t)n >= outlen) ? -1 : 0;
}

int slinfer_env_parse(const char *name, char *buf, size_t len, slinfer_env_set_f set, void *ctx,
		      char *err, size_t errlen)
{
	size_t pos = 0;
	int lineno = 0;

	err[0] = '\0';
	while (pos < len) {
		char *line = buf + pos;
		char *nl = memchr(line, '\n', len - pos);
		size_t linelen = nl != NULL ? (size_t)(nl - line) : len - pos;
		char *eq;

		pos += linelen + 1;
		lineno++;
		if (linelen == 0)
			continue;
		if (memchr(line, '\0', linelen) != NULL) {
			slurm_info("slinfer: warning: %s line %d contains a NUL byte, ignored", name, lineno);
			continue;
		}
		line[linelen] = '\0'; /* over the newline, or buf[len] which the caller provides */
		eq = strchr(line, '=');
		if (eq == NULL || eq == line) {
			slurm_info("slinfer: warning: %s line %d is not KEY=VALUE, ignored", name, lineno);
			continue;
		}
		*eq = '\0';
		if (!accepted(line)) {
			slurm_info("slinfer: warning: %s line %d: key %.64s is not accepted, ignored", name,
				   lineno, line);
			continue;
		}
		if (set(ctx, line, eq + 1) != 0) {
			snprintf(err, errlen, "slinfer: cannot set %s in the job's environment", line);
			return -1;
		}
		if (strcmp(line, "SLINFER_ERROR") == 0 && eq[1] != '\0')
			snprintf(err, errlen, "slinfer: %s", eq + 1);
	}
	return 0;
}

enum slinfer_env_result slinfer_env_load(const char *path, uid_t job_uid, slinfer_env_set_f set,
					 void *ctx, char *err, size_t errlen)
{
	/* One spare byte so the last line can be terminated in place. */
	static char buf[SLINFER_ENV_MAX_BYTES + 1];
	struct stat st;
	size_t len = 0;
	int fd;

	fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0) {
		int e = errno;
		if (e == ENOENT) {
			snprintf(err, errlen, "%s", missing_text);
			return SLINFER_ENV_MISSING;
		}
		snprintf(err, errlen, "slinfer: cannot open %s: %s", path,
			 e == ELOOP ? "it is a symbolic link" : strerror(e));
		return SLINFER_ENV_REFUSED;
	}
	if (fstat(fd, &st) != 0) {
		snprintf(err, errlen, "slinfer: cannot stat %s: %s", path, strerror(errno));
		goto refused;
	}
	if (!S_ISREG(st.st_mode)) {
		snprintf(err, errlen, "slinfer: %s is not a regular file", path);
		goto refused;
	}
	if (st.st_uid != 0 && st.st_uid != job_uid) {
		snprintf(err, errlen, "slinfer: %s is owned by uid %u, expected root or the job's uid %u",
			 path, (unsigned)st.st_uid, (unsigned)job_uid);
		goto refused;
	}
	if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
		snprintf(err, errlen, "slinfer: %s is writable by group or others (mode %04o)", path,
			 (unsigned)(st.st_mode & 07777));
		goto refused;
	}
	if (st.st_size > SLINFER_ENV_MAX_BYTES) {
		snprintf(err, errlen, "slinfer: %s is %lld bytes, at most %d are read", path,
			 (long long)st.st_size, SLINFER_ENV_MAX_BYTES);
		goto refused;
	}
	/* Read to EOF rather than trusting st_size: the file may still be growing. */
	for (;;) {
		ssize_t n = read(fd, buf + len, SLINFER_ENV_MAX_BYTES + 1 - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			snprintf(err, errlen, "slinfer: cannot read %s: %s", path, strerror(errno));
			goto refused;
		}
		if (n == 0)
			break;
		len += (size_t)n;
		if (len > SLINFER_ENV_MAX_BYTES) {
			snprintf(err, errlen, "slinfer: %s is larger than %d bytes", path,
				 SLINFER_ENV_MAX_BYTES);
			goto refused;
		}
	}
	if (close(fd) != 0) {
		snprintf(err, errlen, "slinfer: cannot close %s: %s", path, strerror(errno));
		return SLINFER_ENV_REFUSED;
	}
	buf[len] = '\0';
	if (slinfer_env_parse(path, buf, len, set, ctx, err, errlen) != 0)
		return SLINFER_ENV_REFUSED;
	return SLINFER_ENV_OK;
refused:
	close(fd);
	return SLINFER_ENV_REFUSED;
}
