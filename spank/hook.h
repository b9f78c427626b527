/* Running the slinfer-hook executable from the job prolog and epilog. */
#ifndef SLINFER_HOOK_H
#define SLINFER_HOOK_H

#include <stddef.h>

/*
 * Run argv[0] (an absolute path) with argv and the caller's environment: fork and execve, no
 * shell, stdin from /dev/null, stdout/stderr inherited, every other descriptor closed. Wait at
 * most timeout_s seconds; past that the hook is killed with SIGKILL.
 * Returns 0 when the hook exited with status 0, -1 otherwise with one line in err saying why
 * (exit status, signal, timeout, or why it could not be executed).
 */
int slinfer_hook_run(char *const argv[], unsigned int timeout_s, char *err, size_t errlen);

#endif
