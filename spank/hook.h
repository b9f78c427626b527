/* Running the slinfer-hook executable from the job prolog and epilog. */
#ifndef SLINFER_HOOK_H
#define SLINFER_HOOK_H

#include <stddef.h>

#include "args.h"
#include "options.h"

/* Receives each line the hook writes to stdout or stderr, without the newline. */
typedef void (*slinfer_hook_line_f)(void *ctx, const char *line);

/* Lines longer than this are passed on in pieces of this size. */
#define SLINFER_HOOK_LINE_MAX 1024
/* Output past this many bytes is read and dropped, so a chatty hook cannot flood the log. */
#define SLINFER_HOOK_OUTPUT_MAX (64 * 1024)

/*
 * Run argv[0] (an absolute path) with argv and the caller's environment: fork and execve, no
 * shell, stdin from /dev/null, stdout and stderr into one pipe whose lines go to on_line while
 * the hook runs, every other descriptor closed. Wait at most timeout_s seconds; past that the
 * hook is killed with SIGKILL. The pipe is closed when the hook exits: a process it leaves
 * running must not keep writing to it.
 * Returns 0 when the hook exited with status 0, -1 otherwise with one line in err saying why
 * (exit status, signal, timeout, or why it could not be executed).
 */
int slinfer_hook_run(char *const argv[], unsigned int timeout_s, slinfer_hook_line_f on_line,
		     void *ctx, char *err, size_t errlen);

/* Room for the longest argv slinfer_hook_argv builds, with its NULL. */
#define SLINFER_HOOK_ARGV_MAX 16

/*
 * The hook's argv for phase ("prolog" or "epilog"), the one place both are spelled:
 *   HOOK prolog --job-id JOBID --model MODEL [--pool] --env-file ENVFILE [--config PATH]
 *   HOOK epilog --job-id JOBID --env-file ENVFILE [--config PATH]
 * opts gives --model and --pool (prolog; NULL for the epilog). argv points into its arguments.
 */
void slinfer_hook_argv(const struct slinfer_args *args, const char *phase, const char *jobid,
		       const struct slinfer_options *opts, const char *envfile,
		       char *argv[SLINFER_HOOK_ARGV_MAX]);

#endif
