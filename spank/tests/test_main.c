/*
 * Test harness for the pure parts of the plugin: --inference validation, option registration,
 * plugstack arguments, env-file parsing/loading, the hook's argv and the hook runner (real
 * processes).
 * Prints "N passed, M failed" last and exits non-zero when anything failed.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "args.h"
#include "environ.h"
#include "fake_spank.h"
#include "hook.h"
#include "options.h"

static int passed, failed;

#define CHECK(cond)                                                                   \
	do {                                                                          \
		if (cond) {                                                           \
			passed++;                                                     \
		} else {                                                              \
			failed++;                                                     \
			fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); \
		}                                                                     \
	} while (0)

#define CHECK_STR(got, want)                                                              \
	do {                                                                              \
		const char *g_ = (got), *w_ = (want);                                     \
		if (strcmp(g_, w_) == 0) {                                                \
			passed++;                                                         \
		} else {                                                                  \
			failed++;                                                         \
			fprintf(stderr, "FAIL %s:%d:\n  got  %s\n  want %s\n", __FILE__, \
				__LINE__, g_, w_);                                        \
		}                                                                         \
	} while (0)

static char err[8192];

/* ---- --inference values ---- */

static void expect_model_ok(const char *value)
{
	err[0] = '\0';
	CHECK(slinfer_model_check(value, err, sizeof(err)) == 0);
	CHECK_STR(err, "");
}

static void expect_model_bad(const char *value, const char *message)
{
	CHECK(slinfer_model_check(value, err, sizeof(err)) == -1);
	CHECK_STR(err, message);
}

static void test_model_values(void)
{
	char longest[SLINFER_MODEL_MAX + 1], too_long[SLINFER_MODEL_MAX + 2], bad_late[61];

	expect_model_ok("tiny");
	expect_model_ok("llama-3.1-8b");
	expect_model_ok("Qwen2.5_7B-Instruct");
	expect_model_ok("7b");
	expect_model_ok("a");
	memset(longest, 'm', SLINFER_MODEL_MAX);
	longest[SLINFER_MODEL_MAX] = '\0';
	expect_model_ok(longest);

	expect_model_bad("a;b", "slinfer: invalid --inference value \"a;b\": character ';' is not "
				"allowed (use letters, digits, '.', '_', '-')");
	expect_model_bad("", "slinfer: invalid --inference value \"\": the model name is empty (use "
			     "--inference=MODEL with a model of this cluster's catalog)");
	expect_model_bad(NULL, "slinfer: invalid --inference value \"\": the model name is empty (use "
			       "--inference=MODEL with a model of this cluster's catalog)");
	memset(too_long, 'x', SLINFER_MODEL_MAX + 1);
	too_long[SLINFER_MODEL_MAX + 1] = '\0';
	expect_model_bad(too_long, "slinfer: invalid --inference value "
				   "\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...\": it is 129 bytes "
				   "long, at most 128 are allowed");
	/* Only the first 40 bytes are echoed, even when the bad byte is further on. */
	memset(bad_late, 'b', 60);
	bad_late[50] = '$';
	bad_late[60] = '\0';
	expect_model_bad(bad_late, "slinfer: invalid --inference value "
				   "\"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb...\": character '$' is not "
				   "allowed (use letters, digits, '.', '_', '-')");
	expect_model_bad("a b", "slinfer: invalid --inference value \"a b\": character ' ' is not "
				"allowed (use letters, digits, '.', '_', '-')");
	expect_model_bad("../etc", "slinfer: invalid --inference value \"../etc\": character '/' is "
				   "not allowed (use letters, digits, '.', '_', '-')");
	expect_model_bad("a\x01z", "slinfer: invalid --inference value \"a\\x01z\": character '\\x01' "
				   "is not allowed (use letters, digits, '.', '_', '-')");
	expect_model_bad("mod\xc3\xa8le", "slinfer: invalid --inference value \"mod\\xc3\\xa8le\": "
					  "character '\\xc3' is not allowed (use letters, digits, "
					  "'.', '_', '-')");
	expect_model_bad("a\"b", "slinfer: invalid --inference value \"a\\\"b\": character '\\\"' is "
				 "not allowed (use letters, digits, '.', '_', '-')");
	expect_model_bad("a\nb", "slinfer: invalid --inference value \"a\\x0ab\": character '\\x0a' is "
				 "not allowed (use letters, digits, '.', '_', '-')");
	expect_model_bad("-rf", "slinfer: invalid --inference value \"-rf\": it must start with a "
				"letter or a digit");
	expect_model_bad(".hidden", "slinfer: invalid --inference value \".hidden\": it must start "
				    "with a letter or a digit");
	expect_model_bad("_x", "slinfer: invalid --inference value \"_x\": it must start with a "
			       "letter or a digit");
	expect_model_bad("a..b", "slinfer: invalid --inference value \"a..b\": it must not contain "
				 "\"..\"");
	expect_model_bad("a...", "slinfer: invalid --inference value \"a...\": it must not contain "
				 "\"..\"");
}

/* ---- option registration and callbacks ---- */

static void test_options(void)
{
	const struct slinfer_options *seen;
	struct spank_option *inference, *pool, *lora;

	fake_reset();
	CHECK(slinfer_options_register(NULL) == 0);
	CHECK(fake.nregistered == 3);
	inference = &fake.registered[0];
	pool = &fake.registered[1];
	lora = &fake.registered[2];
	CHECK_STR(inference->name, "inference");
	CHECK_STR(inference->arginfo, "MODEL");
	CHECK_STR(inference->usage, "Run an LLM inference engine for MODEL inside this job (slinfer)");
	CHECK(inference->has_arg == 1);
	CHECK(inference->cb != NULL);
	CHECK_STR(pool->name, "inference-pool");
	CHECK(pool->arginfo == NULL);
	CHECK_STR(pool->usage, "Publish this job's engine to the shared slinfer gateway");
	CHECK(pool->has_arg == 0);

	/* At submit (not remote) a bad value is refused with the validator's line. */
	CHECK(inference->cb(inference->val, "a;b", 0) != 0);
	CHECK(fake.nerrors == 1);
	CHECK_STR(fake.last_error, "slinfer: invalid --inference value \"a;b\": character ';' is not "
				   "allowed (use letters, digits, '.', '_', '-')");
	seen = slinfer_options_seen();
	CHECK(seen->inference && !seen->model_valid);

	/* In slurmstepd (remote) it is accepted here and re-checked in user_init. */
	CHECK(inference->cb(inference->val, "a;b", 1) == 0);
	CHECK(fake.nerrors == 1);
	CHECK(!seen->model_valid);

	CHECK(inference->cb(inference->val, "tiny", 0) == 0);
	CHECK(seen->inference && seen->model_valid);
	CHECK_STR(seen->model, "tiny");
	CHECK(!seen->pool);
	CHECK(pool->cb(pool->val, NULL, 0) == 0);
	CHECK(seen->pool);

	CHECK_STR(lora->name, "inference-lora");
	CHECK_STR(lora->arginfo, "NAME=PATH");
	CHECK(lora->has_arg == 1);
	/* At submit each value is checked and kept; in slurmstepd (remote) nothing is kept. */
	CHECK(lora->cb(lora->val, "mine=/home/a/adapter", 1) == 0);
	CHECK(seen->nloras == 0 && !seen->lora_refused);
	CHECK(lora->cb(lora->val, "mine=/home/a/adapter", 0) == 0);
	CHECK(lora->cb(lora->val, "two=/home/a/b", 0) == 0);
	CHECK(seen->nloras == 2 && !seen->lora_refused);
	CHECK_STR(seen->loras[1], "two=/home/a/b");
	CHECK(fake.nerrors == 1);
	CHECK(lora->cb(lora->val, "mine=relative", 0) != 0);
	CHECK(fake.nerrors == 2 && seen->lora_refused);
	CHECK_STR(fake.last_error, "slinfer: invalid --inference-lora value \"mine=relative\": the path must be "
				   "absolute (start with '/')");
	CHECK(seen->nloras == 2);
	CHECK(seen->model_valid); /* a refused adapter leaves the model's verdict alone */

	fake_reset();
	fake.register_rc = ESPANK_BAD_ARG;
	CHECK(slinfer_options_register(NULL) == -1);
	CHECK_STR(fake.last_error, "slinfer: cannot register option --inference: fake spank error");
}

/* ---- --inference-lora values: one job's list ---- */

static void test_lora_list(void)
{
	struct slinfer_options o;
	char value[64], joined[SLINFER_LORA_MAX * SLINFER_LORA_VALUE_MAX];

	memset(&o, 0, sizeof(o));
	CHECK(slinfer_loras_joined(&o, joined, sizeof(joined)) == 0);
	CHECK_STR(joined, "");
	for (int i = 0; i < SLINFER_LORA_MAX; i++) {
		snprintf(value, sizeof(value), "a%d=/p/%d", i, i);
		CHECK(slinfer_lora_add(&o, value, err, sizeof(err)) == 0);
	}
	CHECK(o.nloras == SLINFER_LORA_MAX);
	CHECK(slinfer_lora_add(&o, "one-more=/p", err, sizeof(err)) == -1);
	CHECK_STR(err, "slinfer: --inference-lora is given more than 8 times, at most 8 are allowed");
	CHECK(slinfer_loras_joined(&o, joined, sizeof(joined)) == 0);
	CHECK_STR(joined, "a0=/p/0\na1=/p/1\na2=/p/2\na3=/p/3\na4=/p/4\na5=/p/5\na6=/p/6\na7=/p/7");
	CHECK(slinfer_loras_joined(&o, joined, 10) == -1);

	memset(&o, 0, sizeof(o));
	CHECK(slinfer_lora_add(&o, "mine=/a", err, sizeof(err)) == 0);
	/* A name that starts another's is not the same name. */
	CHECK(slinfer_lora_add(&o, "min=/b", err, sizeof(err)) == 0);
	CHECK(slinfer_lora_add(&o, "mine2=/b", err, sizeof(err)) == 0);
	CHECK(slinfer_lora_add(&o, "mine=/c", err, sizeof(err)) == -1);
	CHECK_STR(err, "slinfer: --inference-lora names adapter \"mine\" twice");
	CHECK(slinfer_lora_add(&o, "bad name=/c", err, sizeof(err)) == -1);
	CHECK_STR(err, "slinfer: invalid --inference-lora value \"bad name=/c\": character ' ' is not allowed in "
		       "the adapter name (use letters, digits, '.', '_', '-')");
	CHECK(o.nloras == 3);
}

/* ---- plugstack arguments ---- */

static int parse(struct slinfer_args *a, int ac, char **av)
{
	err[0] = '\0';
	return slinfer_args_parse(ac, av, a, err, sizeof(err));
}

static void expect_args_bad(const char *arg, const char *message)
{
	struct slinfer_args a;
	char *av[] = { (char *)"hook=/usr/bin/slinfer-hook", (char *)arg };

	CHECK(parse(&a, 2, av) == -1);
	CHECK_STR(err, message);
}

static void test_args(void)
{
	struct slinfer_args a;
	char *all[] = { "hook=/usr/libexec/slinfer/slinfer-hook", "config=/etc/slinfer/slinfer.toml",
			"rundir=/var/run/slinfer", "timeout=120" };
	char *dup[] = { "timeout=5", "timeout=6" };
	char long_path[PATH_MAX + 16] = "hook=/";
	char *longv[] = { long_path };

	CHECK(parse(&a, 0, NULL) == 0);
	CHECK_STR(a.hook, "");
	CHECK_STR(a.config, "");
	CHECK_STR(a.rundir, "/run/slinfer");
	CHECK(a.timeout == 60);

	CHECK(parse(&a, 4, all) == 0);
	CHECK_STR(a.hook, "/usr/libexec/slinfer/slinfer-hook");
	CHECK_STR(a.config, "/etc/slinfer/slinfer.toml");
	CHECK_STR(a.rundir, "/var/run/slinfer");
	CHECK(a.timeout == 120);

	expect_args_bad("hooks=/x", "slinfer: unknown plugstack argument \"hooks\" (keys: hook, "
				    "config, rundir, timeout, pool_users)");
	expect_args_bad("=/x", "slinfer: unknown plugstack argument \"\" (keys: hook, config, rundir, "
			       "timeout, pool_users)");
	expect_args_bad("verbose", "slinfer: plugstack argument \"verbose\": expected key=value (keys: "
				   "hook, config, rundir, timeout, pool_users)");
	expect_args_bad("config=etc/slinfer.toml", "slinfer: plugstack argument "
						   "config=etc/slinfer.toml: must be an absolute path");
	expect_args_bad("rundir=run", "slinfer: plugstack argument rundir=run: must be an absolute "
				      "path");
	expect_args_bad("config=", "slinfer: plugstack argument config has an empty value");
	expect_args_bad("config=/a\tb", "slinfer: plugstack argument config: path contains a control "
					"character");
	expect_args_bad("hook=/other", "slinfer: plugstack argument hook is given twice");
	expect_args_bad("timeout=0", "slinfer: plugstack argument timeout=0: must be a whole number "
				     "of seconds from 1 to 86400");
	expect_args_bad("timeout=-5", "slinfer: plugstack argument timeout=-5: must be a whole number "
				      "of seconds from 1 to 86400");
	expect_args_bad("timeout=+5", "slinfer: plugstack argument timeout=+5: must be a whole number "
				      "of seconds from 1 to 86400");
	expect_args_bad("timeout=10s", "slinfer: plugstack argument timeout=10s: must be a whole "
				       "number of seconds from 1 to 86400");
	expect_args_bad("timeout=86401", "slinfer: plugstack argument timeout=86401: must be a whole "
					 "number of seconds from 1 to 86400");
	expect_args_bad("timeout=99999999999999999999999", "slinfer: plugstack argument "
							   "timeout=99999999999999999999999: must be "
							   "a whole number of seconds from 1 to 86400");
	CHECK(parse(&a, 2, dup) == -1);
	CHECK_STR(err, "slinfer: plugstack argument timeout is given twice");

	/* pool_users=: names separated by single commas; membership is by whole name. */
	CHECK(parse(&a, 0, NULL) == 0);
	CHECK(a.pool_users[0] == '\0' && slinfer_args_pool_user(&a, "anyone"));
	{
		char *pool[] = { "pool_users=slinfer,svc.2" };

		CHECK(parse(&a, 1, pool) == 0);
		CHECK_STR(a.pool_users, "slinfer,svc.2");
		CHECK(slinfer_args_pool_user(&a, "slinfer"));
		CHECK(slinfer_args_pool_user(&a, "svc.2"));
		CHECK(!slinfer_args_pool_user(&a, "slinfe"));
		CHECK(!slinfer_args_pool_user(&a, "slinfer,svc.2"));
		CHECK(!slinfer_args_pool_user(&a, "svc"));
		CHECK(!slinfer_args_pool_user(&a, "alice"));
	}
	expect_args_bad("pool_users=a,,b", "slinfer: plugstack argument pool_users=a,,b: must be user "
					   "names separated by single commas");
	expect_args_bad("pool_users=a,", "slinfer: plugstack argument pool_users=a,: must be user names "
					 "separated by single commas");
	expect_args_bad("pool_users=,a", "slinfer: plugstack argument pool_users=,a: must be user names "
					 "separated by single commas");
	expect_args_bad("pool_users=a b", "slinfer: plugstack argument pool_users=a b: must be user "
					  "names separated by single commas");

	memset(long_path + 6, 'p', PATH_MAX);
	long_path[PATH_MAX + 6] = '\0';
	CHECK(parse(&a, 1, longv) == -1);
	CHECK_STR(err, "slinfer: plugstack argument hook: path is longer than 4095 bytes");
}

/* ---- env file ---- */

struct recorded {
	char lines[16][256];
	int n;
	const char *fail_on; /* key whose set() fails */
};

static int record_set(void *ctx, const char *key, const char *value)
{
	struct recorded *r = ctx;

	if (r->fail_on != NULL && strcmp(key, r->fail_on) == 0)
		return -1;
	if (r->n < 16)
		snprintf(r->lines[r->n++], sizeof(r->lines[0]), "%s=%s", key, value);
	return 0;
}

static void test_env_parse(void)
{
	char text[] = "OPENAI_BASE_URL=http://10.0.0.5:8000/v1\n"
		      "\n"
		      "PATH=/evil\n"
		      "not a pair\n"
		      "OPENAI_API_KEY=sk-a=b c\n"
		      "=novalue\n"
		      "SLINFER_MODEL=\n"
		      "SLINFER_STATUS_FILE=/run/slinfer/jobs/7.status\n"
		      "SLINFER_JOB_ENGINE=7-0";
	char errtext[] = "SLINFER_ERROR=model 'nosuch' is not in this cluster's catalog (known: tiny)\n";
	char nul[] = "OPENAI_API_KEY=a\0b\nSLINFER_MODEL=tiny\n";
	char failing[] = "SLINFER_MODEL=tiny\nOPENAI_API_KEY=k\n";
	struct recorded r;

	memset(&r, 0, sizeof(r));
	fake_reset();
	CHECK(slinfer_env_parse("t.env", text, strlen(text), record_set, &r, err, sizeof(err)) == 0);
	CHECK(r.n == 5);
	CHECK_STR(r.lines[0], "OPENAI_BASE_URL=http://10.0.0.5:8000/v1");
	CHECK_STR(r.lines[1], "OPENAI_API_KEY=sk-a=b c");
	CHECK_STR(r.lines[2], "SLINFER_MODEL=");
	CHECK_STR(r.lines[3], "SLINFER_STATUS_FILE=/run/slinfer/jobs/7.status");
	CHECK_STR(r.lines[4], "SLINFER_JOB_ENGINE=7-0");
	CHECK_STR(err, "");
	CHECK(fake.ninfos == 3); /* PATH, "not a pair", "=novalue" */

	memset(&r, 0, sizeof(r));
	fake_reset();
	CHECK(slinfer_env_parse("t.env", text + 0, 0, record_set, &r, err, sizeof(err)) == 0);
	CHECK(r.n == 0);

	memset(&r, 0, sizeof(r));
	CHECK(slinfer_env_parse("t.env", errtext, strlen(errtext), record_set, &r, err,
				sizeof(err)) == 0);
	CHECK_STR(err, "slinfer: model 'nosuch' is not in this cluster's catalog (known: tiny)");
	CHECK(r.n == 1);

	memset(&r, 0, sizeof(r));
	fake_reset();
	CHECK(slinfer_env_parse("t.env", nul, sizeof(nul) - 1, record_set, &r, err, sizeof(err)) == 0);
	CHECK(r.n == 1);
	CHECK_STR(r.lines[0], "SLINFER_MODEL=tiny");
	CHECK_STR(fake.last_info, "slinfer: warning: t.env line 1 contains a NUL byte, ignored");

	memset(&r, 0, sizeof(r));
	r.fail_on = "OPENAI_API_KEY";
	CHECK(slinfer_env_parse("t.env", failing, strlen(failing), record_set, &r, err,
				sizeof(err)) == -1);
	CHECK_STR(err, "slinfer: cannot set OPENAI_API_KEY in the job's environment");
}

static char tmpdir[] = "/tmp/slinfer-spank-test.XXXXXX";

static void write_file(const char *path, const char *text, mode_t mode)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, mode);

	CHECK(fd >= 0);
	if (fd < 0)
		return;
	CHECK(write(fd, text, strlen(text)) == (ssize_t)strlen(text));
	CHECK(fchmod(fd, mode) == 0);
	close(fd);
}

static void test_env_load(void)
{
	char path[PATH_MAX], link[PATH_MAX], fifo[PATH_MAX], want[PATH_MAX + 256];
	uid_t me = geteuid();
	struct recorded r;
	char *big;

	CHECK(slinfer_env_path("/run/slinfer", "42", path, sizeof(path)) == 0);
	CHECK_STR(path, "/run/slinfer/jobs/42.env");
	CHECK(slinfer_env_path("/run/slinfer", "42", path, 10) == -1);

	snprintf(path, sizeof(path), "%s/1.env", tmpdir);
	memset(&r, 0, sizeof(r));
	CHECK(slinfer_env_load(path, me, record_set, &r, err, sizeof(err)) == SLINFER_ENV_MISSING);
	CHECK_STR(err, "slinfer: no engine was set up for this job on this node (see the slurmd log)");

	write_file(path, "OPENAI_BASE_URL=http://h:1/v1\nSLINFER_MODEL=tiny", 0600);
	memset(&r, 0, sizeof(r));
	CHECK(slinfer_env_load(path, me, record_set, &r, err, sizeof(err)) == SLINFER_ENV_OK);
	CHECK_STR(err, "");
	CHECK(r.n == 2);
	CHECK_STR(r.lines[1], "SLINFER_MODEL=tiny");

	/* Owner must be root or the job's user. */
	if (me == 0) {
		CHECK(chown(path, 4242, 4242) == 0);
		CHECK(slinfer_env_load(path, 4243, record_set, &r, err, sizeof(err)) ==
		      SLINFER_ENV_REFUSED);
		snprintf(want, sizeof(want), "slinfer: %s is owned by uid 4242, expected root or the "
					     "job's uid 4243", path);
		CHECK_STR(err, want);
		CHECK(slinfer_env_load(path, 4242, record_set, &r, err, sizeof(err)) == SLINFER_ENV_OK);
		CHECK(chown(path, 0, 0) == 0);
	} else {
		CHECK(slinfer_env_load(path, me + 1, record_set, &r, err, sizeof(err)) ==
		      SLINFER_ENV_REFUSED);
	}

	CHECK(chmod(path, 0620) == 0);
	CHECK(slinfer_env_load(path, me, record_set, &r, err, sizeof(err)) == SLINFER_ENV_REFUSED);
	snprintf(want, sizeof(want), "slinfer: %s is writable by group or others (mode 0620)", path);
	CHECK_STR(err, want);
	CHECK(chmod(path, 0600) == 0);

	snprintf(link, sizeof(link), "%s/2.env", tmpdir);
	CHECK(symlink(path, link) == 0);
	CHECK(slinfer_env_load(link, me, record_set, &r, err, sizeof(err)) == SLINFER_ENV_REFUSED);
	snprintf(want, sizeof(want), "slinfer: cannot open %s: it is a symbolic link", link);
	CHECK_STR(err, want);

	snprintf(fifo, sizeof(fifo), "%s/3.env", tmpdir);
	CHECK(mkfifo(fifo, 0600) == 0);
	CHECK(slinfer_env_load(fifo, me, record_set, &r, err, sizeof(err)) == SLINFER_ENV_REFUSED);
	snprintf(want, sizeof(want), "slinfer: %s is not a regular file", fifo);
	CHECK_STR(err, want);

	big = malloc(SLINFER_ENV_MAX_BYTES + 2);
	CHECK(big != NULL);
	if (big != NULL) {
		memset(big, 'a', SLINFER_ENV_MAX_BYTES + 1);
		big[SLINFER_ENV_MAX_BYTES + 1] = '\0';
		snprintf(path, sizeof(path), "%s/4.env", tmpdir);
		write_file(path, big, 0600);
		CHECK(slinfer_env_load(path, me, record_set, &r, err, sizeof(err)) ==
		      SLINFER_ENV_REFUSED);
		snprintf(want, sizeof(want), "slinfer: %s is 65537 bytes, at most 65536 are read",
			 path);
		CHECK_STR(err, want);
		/* Exactly the limit is fine. */
		big[SLINFER_ENV_MAX_BYTES] = '\0';
		write_file(path, big, 0600);
		CHECK(slinfer_env_load(path, me, record_set, &r, err, sizeof(err)) == SLINFER_ENV_OK);
		free(big);
	}
}

/* ---- hook runner ---- */

struct lines {
	char text[8][SLINFER_HOOK_LINE_MAX + 1];
	int n;
};

static struct lines got;

static void record_line(void *ctx, const char *line)
{
	struct lines *l = ctx;

	if (l->n < 8)
		snprintf(l->text[l->n], sizeof(l->text[0]), "%s", line);
	l->n++;
}

static int run(char **argv, unsigned int timeout)
{
	err[0] = '\0';
	memset(&got, 0, sizeof(got));
	return slinfer_hook_run(argv, timeout, record_line, &got, err, sizeof(err));
}

static double seconds_since(const struct timespec *t0)
{
	struct timespec t1;

	clock_gettime(CLOCK_MONOTONIC, &t1);
	return (double)(t1.tv_sec - t0->tv_sec) + (double)(t1.tv_nsec - t0->tv_nsec) / 1e9;
}

static void test_hook(void)
{
	char *ok[] = { "/bin/true", NULL };
	char *fails[] = { "/bin/sh", "-c", "exit 3", NULL };
	char *missing[] = { "/nonexistent/slinfer-hook", NULL };
	char plain[PATH_MAX], want[PATH_MAX + 256];
	char *not_exec[] = { plain, NULL };
	char *sleeper[] = { "/bin/sleep", "30", NULL };
	char *signalled[] = { "/bin/sh", "-c", "kill -TERM $$", NULL };
	/* argv reaches the hook word for word: no shell splits or globs it. */
	char *words[] = { "/bin/sh", "-c", "[ $# -eq 3 ] && [ \"$1\" = 'a b' ] && [ \"$2\" = '*' ] "
					    "&& [ \"$3\" = '$(id)' ]",
			  "sh", "a b", "*", "$(id)", NULL };
	char *stdin_null[] = { "/bin/sh", "-c", "[ \"$(readlink /proc/self/fd/0)\" = /dev/null ]",
			       NULL };
	char *fd_closed[] = { "/bin/sh", "-c", "[ ! -e /proc/self/fd/57 ]", NULL };
	char *env_kept[] = { "/bin/sh", "-c", "[ \"$SLINFER_TEST_VAR\" = 'x y' ]", NULL };
	char *chatty[] = { "/bin/sh", "-c", "echo out; echo err >&2; printf 'no newline'", NULL };
	char *long_line[] = { "/bin/sh", "-c", "head -c 1500 /dev/zero | tr '\\0' x", NULL };
	char *flood[] = { "/bin/sh", "-c", "head -c 200000 /dev/zero | tr '\\0' '\\n'", NULL };
	/* Like a hook that starts the agent without redirecting its output. */
	char *leaves_child[] = { "/bin/sh", "-c", "sleep 3 & echo started", NULL };
	struct timespec t0;
	int fd;

	CHECK(run(ok, 5) == 0);
	CHECK_STR(err, "");
	CHECK(run(fails, 5) == -1);
	CHECK_STR(err, "slinfer: hook /bin/sh exited with status 3");
	CHECK(run(missing, 5) == -1);
	CHECK_STR(err, "slinfer: cannot execute hook /nonexistent/slinfer-hook: No such file or "
		       "directory");
	snprintf(plain, sizeof(plain), "%s/plain", tmpdir);
	write_file(plain, "#!/bin/sh\nexit 0\n", 0644);
	CHECK(run(not_exec, 5) == -1);
	snprintf(want, sizeof(want), "slinfer: cannot execute hook %s: Permission denied", plain);
	CHECK_STR(err, want);
	CHECK(run(signalled, 5) == -1);
	CHECK_STR(err, "slinfer: hook /bin/sh was killed by signal 15 (Terminated)");
	CHECK(run(words, 5) == 0);
	CHECK(run(stdin_null, 5) == 0);

	fd = dup2(STDERR_FILENO, 57); /* inheritable, as a daemon's stray descriptor would be */
	CHECK(fd == 57);
	CHECK(run(fd_closed, 5) == 0);
	close(57);

	CHECK(setenv("SLINFER_TEST_VAR", "x y", 1) == 0);
	CHECK(run(env_kept, 5) == 0);
	unsetenv("SLINFER_TEST_VAR");

	clock_gettime(CLOCK_MONOTONIC, &t0);
	CHECK(run(sleeper, 1) == -1);
	CHECK(seconds_since(&t0) < 3.0);
	CHECK_STR(err, "slinfer: hook /bin/sleep did not finish within 1 s and was killed");

	CHECK(run(chatty, 5) == 0);
	CHECK(got.n == 3);
	CHECK_STR(got.text[0], "out");
	CHECK_STR(got.text[1], "err");
	CHECK_STR(got.text[2], "no newline");

	CHECK(run(long_line, 5) == 0);
	CHECK(got.n == 2);
	CHECK(strlen(got.text[0]) == SLINFER_HOOK_LINE_MAX);
	CHECK(strlen(got.text[1]) == 1500 - SLINFER_HOOK_LINE_MAX);

	CHECK(run(flood, 10) == 0);
	CHECK(got.n == SLINFER_HOOK_OUTPUT_MAX); /* one empty line per byte, capped */

	clock_gettime(CLOCK_MONOTONIC, &t0);
	CHECK(run(leaves_child, 10) == 0);
	CHECK(seconds_since(&t0) < 3.0);
	CHECK(got.n == 1);
	CHECK_STR(got.text[0], "started");

	/* A host that ignores SIGCHLD must not make the hook's status disappear. */
	signal(SIGCHLD, SIG_IGN);
	CHECK(run(fails, 5) == -1);
	CHECK_STR(err, "slinfer: hook /bin/sh exited with status 3");
	CHECK(signal(SIGCHLD, SIG_DFL) == SIG_IGN); /* and the host's setting is restored */
}

/* ---- the hook's argv, one builder for prolog and epilog ---- */

static void join_argv(char *const argv[], char *out, size_t outlen)
{
	size_t off = 0;

	out[0] = '\0';
	for (int i = 0; argv[i] != NULL && off < outlen; i++)
		off += (size_t)snprintf(out + off, outlen - off, "%s%s", i ? " " : "", argv[i]);
}

static void test_hook_argv(void)
{
	struct slinfer_args a;
	struct slinfer_options o;
	char *argv[SLINFER_HOOK_ARGV_MAX];
	char line[4096];

	memset(&a, 0, sizeof(a));
	memset(&o, 0, sizeof(o));
	snprintf(a.hook, sizeof(a.hook), "/usr/libexec/slinfer/slinfer-hook");
	snprintf(o.model, sizeof(o.model), "tiny");
	o.inference = o.model_valid = true;

	slinfer_hook_argv(&a, "prolog", "42", &o, "/run/slinfer/jobs/42.env", argv);
	join_argv(argv, line, sizeof(line));
	CHECK_STR(line, "/usr/libexec/slinfer/slinfer-hook prolog --job-id 42 --model tiny "
			"--env-file /run/slinfer/jobs/42.env");

	o.pool = true;
	snprintf(a.config, sizeof(a.config), "/etc/slinfer/slinfer.toml");
	slinfer_hook_argv(&a, "prolog", "42", &o, "/run/slinfer/jobs/42.env", argv);
	join_argv(argv, line, sizeof(line));
	CHECK_STR(line, "/usr/libexec/slinfer/slinfer-hook prolog --job-id 42 --model tiny --pool "
			"--env-file /run/slinfer/jobs/42.env --config /etc/slinfer/slinfer.toml");

	slinfer_hook_argv(&a, "epilog", "42", NULL, "/run/slinfer/jobs/42.env", argv);
	join_argv(argv, line, sizeof(line));
	CHECK_STR(line, "/usr/libexec/slinfer/slinfer-hook epilog --job-id 42 "
			"--env-file /run/slinfer/jobs/42.env --config /etc/slinfer/slinfer.toml");
}

static void cleanup(void)
{
	char cmd[PATH_MAX];
	const char *names[] = { "1.env", "2.env", "3.env", "4.env", "plain" };

	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		snprintf(cmd, sizeof(cmd), "%s/%s", tmpdir, names[i]);
		unlink(cmd);
	}
	rmdir(tmpdir);
}

/*
 * `test_slinfer --check-models` / `--check-loras`: the model-name rule or the --inference-lora rule as a
 * filter, for tests/unit/test_model_names.py and tests/unit/test_inference_lora.py, which run one table of
 * cases through this and through Python (slinfer/config.py, slinfer/inference_lora.py). Reads NUL-terminated
 * values on stdin, prints "ok" or "bad<TAB>message" per value.
 */
static int check_values(int (*check)(const char *, char *, size_t))
{
	static char value[4096];
	size_t len = 0;
	int c;

	while ((c = getchar()) != EOF) {
		if (c != '\0') {
			if (len + 1 >= sizeof(value))
				return 2;
			value[len++] = (char)c;
			continue;
		}
		value[len] = '\0';
		len = 0;
		if (check(value, err, sizeof(err)) == 0)
			printf("ok\n");
		else
			printf("bad\t%s\n", err);
	}
	return fflush(stdout) == 0 ? 0 : 2;
}

int main(int argc, char **argv)
{
	if (argc == 2 && strcmp(argv[1], "--check-models") == 0)
		return check_values(slinfer_model_check);
	if (argc == 2 && strcmp(argv[1], "--check-loras") == 0)
		return check_values(slinfer_lora_check);
	if (mkdtemp(tmpdir) == NULL) {
		perror("mkdtemp");
		return 2;
	}
	test_model_values();
	test_options();
	test_lora_list();
	test_args();
	test_env_parse();
	test_env_load();
	test_hook();
	test_hook_argv();
	cleanup();
	printf("%d passed, %d failed\n", passed, failed);
	return failed == 0 ? 0 : 1;
}
