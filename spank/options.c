/*
 * Option table, registration loop and --inference / --inference-lora value validation.
 *
 * Responsible for: what the user may type after --inference and --inference-lora (the adapter
 * rule is written again in slinfer/inference_lora.py; tests/unit/test_inference_lora.py ties
 * them), and reading the options back on the node. Not responsible for: whether an adapter's
 * folder can be read (the agent checks that as the job's user). Not responsible for: whether the model exists (the hook checks the site catalog).
 */
#include "options.h"

#include <stdio.h>
#include <string.h>

/* How much of a refused value is echoed back; the rest is elided with "...". */
#define SHOWN_BYTES 40

enum { OPT_INFERENCE = 1, OPT_POOL = 2, OPT_LORA = 3 };

static struct slinfer_options seen;

static int option_cb(int val, const char *optarg, int remote);

static struct spank_option option_table[] = {
	{ "inference", "MODEL", "Run an LLM inference engine for MODEL inside this job (slinfer)", 1,
	  OPT_INFERENCE, option_cb },
	{ "inference-pool", NULL, "Publish this job's engine to the shared slinfer gateway", 0,
	  OPT_POOL, option_cb },
	{ "inference-lora", "NAME=PATH",
	  "Serve your LoRA adapter in folder PATH as model NAME on this job's engine (repeatable, slinfer)", 1,
	  OPT_LORA, option_cb },
	SPANK_OPTIONS_TABLE_END
};

static bool is_alnum(unsigned char c)
{
	/* Not isalnum(): the answer must not depend on the caller's locale. */
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

static bool is_allowed(unsigned char c)
{
	return is_alnum(c) || c == '.' || c == '_' || c == '-';
}

/* Writes one byte for a message: printable ASCII as is, '"' and '\' escaped, others as \xNN. */
static size_t show_byte(unsigned char c, char *out, size_t outlen)
{
	int n;

	if (c == '"' || c == '\\')
		n = snprintf(out, outlen, "\\%c", c);
	else if (c >= 0x20 && c < 0x7f)
		n = snprintf(out, outlen, "%c", c);
	else
		n = snprintf(out, outlen, "\\x%02x", c);
	if (n < 0 || (size_t)n >= outlen)
		return 0;
	return (size_t)n;
}

/* The value as shown in a message: at most SHOWN_BYTES bytes, escaped, then "..." if cut. */
static void show_value(const char *value, char *out, size_t outlen)
{
	size_t len = strlen(value);
	size_t shown = len > SHOWN_BYTES ? SHOWN_BYTES : len;
	size_t pos = 0;

	out[0] = '\0';
	for (size_t i = 0; i < shown; i++) {
		size_t n = show_byte((unsigned char)value[i], out + pos, outlen - pos);
		if (n == 0)
			return;
		pos += n;
	}
	if (shown < len && pos + 4 <= outlen)
		memcpy(out + pos, "...", 4);
}

int slinfer_model_check(const char *value, char *err, size_t errlen)
{
	char shown[SHOWN_BYTES * 4 + 4];
	char bad[8];
	size_t len;

	if (value == NULL || value[0] == '\0') {
		snprintf(err, errlen,
			 "slinfer: invalid --inference value \"\": the model name is empty "
			 "(use --inference=MODEL with a model of this cluster's catalog)");
		return -1;
	}
	show_value(value, shown, sizeof(shown));
	len = strlen(value);
	if (len > SLINFER_MODEL_MAX) {
		snprintf(err, errlen,
			 "slinfer: invalid --inference value \"%s\": it is %zu bytes long, at most %d are allowed",
			 shown, len, SLINFER_MODEL_MAX);
		return -1;
	}
	for (size_t i = 0; i < len; i++) {
		if (!is_allowed((unsigned char)value[i])) {
			if (show_byte((unsigned char)value[i], bad, sizeof(bad)) == 0)
				bad[0] = '\0';
			snprintf(err, errlen,
				 "slinfer: invalid --inference value \"%s\": character '%s' is not allowed "
				 "(use letters, digits, '.', '_', '-')",
				 shown, bad);
			return -1;
		}
	}
	if (!is_alnum((unsigned char)value[0])) {
		snprintf(err, errlen,
			 "slinfer: invalid --inference value \"%s\": it must start with a letter or a digit",
			 shown);
		return -1;
	}
	if (strstr(value, "..") != NULL) {
		snprintf(err, errlen, "slinfer: invalid --inference value \"%s\": it must not contain \"..\"",
			 shown);
		return -1;
	}
	return 0;
}

/* How a refused --inference-lora value is told to use the option. */
#define LORA_USAGE "use --inference-lora=NAME=PATH, PATH the adapter's absolute folder"

int slinfer_lora_check(const char *value, char *err, size_t errlen)
{
	char shown[SHOWN_BYTES * 4 + 4];
	char bad[8];
	const char *eq, *path;
	size_t name_len, path_len;

	if (value == NULL || value[0] == '\0') {
		snprintf(err, errlen, "slinfer: invalid --inference-lora value \"\": it is empty (" LORA_USAGE ")");
		return -1;
	}
	show_value(value, shown, sizeof(shown));
	eq = strchr(value, '=');
	if (eq == NULL) {
		snprintf(err, errlen, "slinfer: invalid --inference-lora value \"%s\": it is not NAME=PATH (" LORA_USAGE ")",
			 shown);
		return -1;
	}
	name_len = (size_t)(eq - value);
	path = eq + 1;
	path_len = strlen(path);
	if (name_len == 0) {
		snprintf(err, errlen, "slinfer: invalid --inference-lora value \"%s\": the adapter name is empty", shown);
		return -1;
	}
	if (name_len > SLINFER_LORA_NAME_MAX) {
		snprintf(err, errlen,
			 "slinfer: invalid --inference-lora value \"%s\": the adapter name is %zu bytes long, at most %d "
			 "are allowed",
			 shown, name_len, SLINFER_LORA_NAME_MAX);
		return -1;
	}
	for (size_t i = 0; i < name_len; i++) {
		if (!is_allowed((unsigned char)value[i])) {
			if (show_byte((unsigned char)value[i], bad, sizeof(bad)) == 0)
				bad[0] = '\0';
			snprintf(err, errlen,
				 "slinfer: invalid --inference-lora value \"%s\": character '%s' is not allowed in the "
				 "adapter name (use letters, digits, '.', '_', '-')",
				 shown, bad);
			return -1;
		}
	}
	if (path[0] != '/') {
		snprintf(err, errlen,
			 "slinfer: invalid --inference-lora value \"%s\": the path must be absolute (start with '/')",
			 shown);
		return -1;
	}
	if (path_len > SLINFER_LORA_PATH_MAX) {
		snprintf(err, errlen,
			 "slinfer: invalid --inference-lora value \"%s\": the path is %zu bytes long, at most %d are "
			 "allowed",
			 shown, path_len, SLINFER_LORA_PATH_MAX);
		return -1;
	}
	for (size_t i = 0; i < path_len; i++) {
		unsigned char c = (unsigned char)path[i];
		if (c < 0x20 || c == 0x7f) {
			if (show_byte(c, bad, sizeof(bad)) == 0)
				bad[0] = '\0';
			snprintf(err, errlen,
				 "slinfer: invalid --inference-lora value \"%s\": the path has a control character "
				 "('%s')",
				 shown, bad);
			return -1;
		}
	}
	return 0;
}

int slinfer_lora_add(struct slinfer_options *opts, const char *value, char *err, size_t errlen)
{
	size_t name_len;

	if (slinfer_lora_check(value, err, errlen) != 0)
		return -1;
	if (opts->nloras >= SLINFER_LORA_MAX) {
		snprintf(err, errlen, "slinfer: --inference-lora is given more than %d times, at most %d are allowed",
			 SLINFER_LORA_MAX, SLINFER_LORA_MAX);
		return -1;
	}
	name_len = (size_t)(strchr(value, '=') - value);
	for (int i = 0; i < opts->nloras; i++) {
		if (strncmp(opts->loras[i], value, name_len + 1) == 0) {
			snprintf(err, errlen, "slinfer: --inference-lora names adapter \"%.*s\" twice", (int)name_len,
				 value);
			return -1;
		}
	}
	/* Fits: the check bounds the name and the path. */
	snprintf(opts->loras[opts->nloras], sizeof(opts->loras[0]), "%s", value);
	opts->nloras++;
	return 0;
}

int slinfer_loras_joined(const struct slinfer_options *opts, char *out, size_t outlen)
{
	size_t pos = 0;

	if (outlen == 0)
		return -1;
	out[0] = '\0';
	for (int i = 0; i < opts->nloras; i++) {
		int n = snprintf(out + pos, outlen - pos, "%s%s", i ? "\n" : "", opts->loras[i]);
		if (n < 0 || (size_t)n >= outlen - pos)
			return -1;
		pos += (size_t)n;
	}
	return 0;
}

/* Records the model and whether it is valid; the message is kept for whoever reports it. */
static void set_model(struct slinfer_options *opts, const char *value)
{
	opts->inference = true;
	opts->model_valid = slinfer_model_check(value, opts->model_error, sizeof(opts->model_error)) == 0;
	if (opts->model_valid)
		snprintf(opts->model, sizeof(opts->model), "%s", value);
	else
		opts->model[0] = '\0';
}

static int option_cb(int val, const char *optarg, int remote)
{
	char lora_error[SHOWN_BYTES * 4 + 256];

	switch (val) {
	case OPT_INFERENCE:
		set_model(&seen, optarg);
		if (!seen.model_valid && !remote) {
			slurm_error("%s", seen.model_error);
			return -1;
		}
		/* Remote: slurmstepd; the value is read and checked again in user_init, where a
		 * refusal can reach the job's output instead of failing the step launch silently. */
		return 0;
	case OPT_POOL:
		seen.pool = true;
		return 0;
	case OPT_LORA:
		/* Remote: slurmstepd sees only the last value; the job's adapters reach the node
		 * through the prolog's environment (SLINFER_LORAS_ENV), and the agent checks them. */
		if (remote)
			return 0;
		if (slinfer_lora_add(&seen, optarg, lora_error, sizeof(lora_error)) != 0) {
			seen.lora_refused = true;
			slurm_error("%s", lora_error);
			return -1;
		}
		return 0;
	default:
		slurm_error("slinfer: unknown option value %d", val);
		return -1;
	}
}

const struct slinfer_options *slinfer_options_seen(void)
{
	return &seen;
}

int slinfer_options_register(spank_t sp)
{
	for (struct spank_option *opt = option_table; opt->name != NULL; opt++) {
		spank_err_t rc = spank_option_register(sp, opt);
		if (rc != ESPANK_SUCCESS) {
			slurm_error("slinfer: cannot register option --%s: %s", opt->name, spank_strerror(rc));
			return -1;
		}
	}
	return 0;
}

int slinfer_options_read(spank_t sp, struct slinfer_options *out)
{
	char *value = NULL;
	spank_err_t rc;

	memset(out, 0, sizeof(*out));
	rc = spank_option_getopt(sp, &option_table[0], &value);
	if (rc == ESPANK_SUCCESS) {
		set_model(out, value);
	} else if (rc != ESPANK_ERROR) {
		/* ESPANK_ERROR means "not given"; anything else is a broken call. */
		slurm_error("slinfer: cannot read option --inference: %s", spank_strerror(rc));
		return -1;
	}
	rc = spank_option_getopt(sp, &option_table[1], NULL);
	if (rc == ESPANK_SUCCESS) {
		out->pool = true;
	} else if (rc != ESPANK_ERROR) {
		slurm_error("slinfer: cannot read option --inference-pool: %s", spank_strerror(rc));
		return -1;
	}
	return 0;
}
