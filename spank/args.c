/*
 * Plugstack arguments: hook=, config=, rundir=, timeout=, pool_users=.
 *
 * Responsible for: turning the plugstack.conf words into checked settings, refusing unknown
 * keys, repeated keys and malformed values. Not responsible for: whether the hook exists or the
 * rundir is there (found out when they are used, with the path in the message).
 */
#include "args.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { KEY_HOOK, KEY_CONFIG, KEY_RUNDIR, KEY_TIMEOUT, KEY_POOL_USERS, KEY_COUNT };

static const char *const key_names[KEY_COUNT] = { "hook", "config", "rundir", "timeout", "pool_users" };

/* An absolute path without control bytes that fits into PATH_MAX. */
static int parse_path(const char *key, const char *value, char *out, char *err, size_t errlen)
{
	if (value[0] != '/') {
		snprintf(err, errlen, "slinfer: plugstack argument %s=%s: must be an absolute path", key,
			 value);
		return -1;
	}
	for (const char *p = value; *p != '\0'; p++) {
		if ((unsigned char)*p < 0x20 || *p == 0x7f) {
			snprintf(err, errlen,
				 "slinfer: plugstack argument %s: path contains a control character", key);
			return -1;
		}
	}
	if (strlen(value) >= PATH_MAX) {
		snprintf(err, errlen, "slinfer: plugstack argument %s: path is longer than %d bytes", key,
			 PATH_MAX - 1);
		return -1;
	}
	strcpy(out, value);
	return 0;
}

static int parse_timeout(const char *value, unsigned int *out, char *err, size_t errlen)
{
	char *end = NULL;
	unsigned long n;

	/* strtoul accepts sign and spaces; a timeout is plain digits only. */
	if (value[0] < '0' || value[0] > '9')
		goto bad;
	errno = 0;
	n = strtoul(value, &end, 10);
	if (errno != 0 || *end != '\0' || n == 0 || n > SLINFER_MAX_TIMEOUT)
		goto bad;
	*out = (unsigned int)n;
	return 0;
bad:
	snprintf(err, errlen,
		 "slinfer: plugstack argument timeout=%s: must be a whole number of seconds from 1 to %d",
		 value, SLINFER_MAX_TIMEOUT);
	return -1;
}

static bool is_name_byte(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
	       c == '_' || c == '-';
}

/* User names separated by single commas: no empty name, nothing but a name's bytes. */
static int parse_pool_users(const char *value, char *out, char *err, size_t errlen)
{
	size_t len = strlen(value);

	if (len >= SLINFER_POOL_USERS_MAX) {
		snprintf(err, errlen, "slinfer: plugstack argument pool_users: longer than %d bytes",
			 SLINFER_POOL_USERS_MAX - 1);
		return -1;
	}
	for (size_t i = 0; i < len; i++) {
		bool comma = value[i] == ',';

		if ((!comma && !is_name_byte(value[i])) ||
		    (comma && (i == 0 || i + 1 == len || value[i + 1] == ','))) {
			snprintf(err, errlen,
				 "slinfer: plugstack argument pool_users=%s: must be user names separated by "
				 "single commas",
				 value);
			return -1;
		}
	}
	memcpy(out, value, len + 1);
	return 0;
}

bool slinfer_args_pool_user(const struct slinfer_args *args, const char *user)
{
	const char *p = args->pool_users;
	size_t n = strlen(user);

	if (p[0] == '\0')
		return true;
	while (*p != '\0') {
		const char *end = strchr(p, ',');
		size_t len = end != NULL ? (size_t)(end - p) : strlen(p);

		if (len == n && strncmp(p, user, n) == 0)
			return true;
		p += len + (end != NULL ? 1 : 0);
	}
	return false;
}

int slinfer_args_parse(int ac, char **av, struct slinfer_args *args, char *err, size_t errlen)
{
	bool seen[KEY_COUNT] = { false };

	memset(args, 0, sizeof(*args));
	strcpy(args->rundir, SLINFER_DEFAULT_RUNDIR);
	args->timeout = SLINFER_DEFAULT_TIMEOUT;

	for (int i = 0; i < ac; i++) {
		const char *arg = av[i];
		const char *eq = strchr(arg, '=');
		size_t keylen;
		int key = -1;
		const char *value;

		if (eq == NULL) {
			snprintf(err, errlen,
				 "slinfer: plugstack argument \"%s\": expected key=value (keys: hook, config, rundir, timeout, pool_users)",
				 arg);
			return -1;
		}
		keylen = (size_t)(eq - arg);
		for (int k = 0; k < KEY_COUNT; k++) {
			if (strlen(key_names[k]) == keylen && strncmp(arg, key_names[k], keylen) == 0)
				key = k;
		}
		if (key < 0) {
			snprintf(err, errlen,
				 "slinfer: unknown plugstack argument \"%.*s\" (keys: hook, config, rundir, timeout, pool_users)",
				 (int)keylen, arg);
			return -1;
		}
		if (seen[key]) {
			snprintf(err, errlen, "slinfer: plugstack argument %s is given twice", key_names[key]);
			return -1;
		}
		seen[key] = true;
		value = eq + 1;
		if (value[0] == '\0') {
			snprintf(err, errlen, "slinfer: plugstack argument %s has an empty value",
				 key_names[key]);
			return -1;
		}
		switch (key) {
		case KEY_HOOK:
			if (parse_path("hook", value, args->hook, err, errlen) != 0)
				return -1;
			break;
		case KEY_CONFIG:
			if (parse_path("config", value, args->config, err, errlen) != 0)
				return -1;
			break;
		case KEY_RUNDIR:
			if (parse_path("rundir", value, args->rundir, err, errlen) != 0)
				return -1;
			break;
		case KEY_POOL_USERS:
			if (parse_pool_users(value, args->pool_users, err, errlen) != 0)
				return -1;
			break;
		default:
			if (parse_timeout(value, &args->timeout, err, errlen) != 0)
				return -1;
			break;
		}
	}
	return 0;
}
