/* Fake SPANK host: records registrations and log lines so tests can assert on them. */
#include "fake_spank.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

struct fake_spank fake;

void fake_reset(void)
{
	memset(&fake, 0, sizeof(fake));
	fake.register_rc = ESPANK_SUCCESS;
}

spank_err_t spank_option_register(spank_t sp, struct spank_option *opt)
{
	(void)sp;
	if (fake.register_rc != ESPANK_SUCCESS)
		return fake.register_rc;
	if (fake.nregistered < FAKE_MAX_OPTIONS)
		fake.registered[fake.nregistered++] = *opt;
	return ESPANK_SUCCESS;
}

spank_err_t spank_option_getopt(spank_t sp, struct spank_option *opt, char **optarg)
{
	(void)sp;
	(void)opt;
	(void)optarg;
	return ESPANK_NOT_AVAIL;
}

const char *spank_strerror(spank_err_t err)
{
	return err == ESPANK_SUCCESS ? "Success" : "fake spank error";
}

void slurm_error(const char *format, ...)
{
	va_list ap;

	va_start(ap, format);
	vsnprintf(fake.last_error, sizeof(fake.last_error), format, ap);
	va_end(ap);
	fake.nerrors++;
}

void slurm_info(const char *format, ...)
{
	va_list ap;

	va_start(ap, format);
	vsnprintf(fake.last_info, sizeof(fake.last_info), format, ap);
	va_end(ap);
	fake.ninfos++;
}
