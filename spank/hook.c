/*
 * Fork + execve of slinfer-hook with a deadline.
 *
 * Responsible for: starting the hook without a shell and with a clean descriptor table, waiting
 * for it at most the configured time, killing it past that, and saying precisely how it ended.
 * Not responsible for: what the hook does, or children it detaches (the agent it may start must
 * leave the hook's session and descriptors itself).
 */
#include "hook.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

/* Signals whose disposition the hook should not inherit from slurmd/slurmstepd. */
static const int reset_signals[] = { SIGHUP, SIGINT, SIGQUIT, SIGPIPE, SIGALRM, SIGTERM,
				     SIGUSR1, SIGUSR2, SIGCHLD, SIGTSTP, SIGTTIN, SIGTTOU };

static long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Between fork and execve: only async-signal-safe calls, no allocation, no stdio. */
static void child_exec(char *const argv[], int devnull, int report)
{
	struct sigaction dfl;
	sigset_t none;
	int err;

	memset(&dfl, 0, sizeof(dfl));
	dfl.sa_handler = SIG_DFL;
	for (size_t i = 0; i < sizeof(reset_signals) / sizeof(reset_signals[0]); i++)
		(void)sigaction(reset_signals[i], &dfl, NULL);
	sigemptyset(&none);
	if (sigprocmask(SIG_SETMASK, &none, NULL) != 0)
		goto fail;

	/* Keep our two descriptors clear of 0-2, which are about to be replaced. */
	if (report < 3 && (report = fcntl(report, F_DUPFD_CLOEXEC, 3)) < 0)
		goto fail;
	if (devnull < 3 && (devnull = fcntl(devnull, F_DUPFD_CLOEXEC, 3)) < 0)
		goto fail;
	if (dup2(devnull, STDIN_FILENO) < 0)
		goto fail;
	/* stdout/stderr stay slurmd's (the journal under systemd) unless closed or close-on-exec. */
	for (int fd = STDOUT_FILENO; fd <= STDERR_FILENO; fd++) {
		int flags = fcntl(fd, F_GETFD);
		if ((flags < 0 || (flags & FD_CLOEXEC)) && dup2(devnull, fd) < 0)
			goto fail;
	}
	if (syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC) != 0) {
		long max = sysconf(_SC_OPEN_MAX);
		if (max < 0 || max > 1048576)
			max = 1048576;
		for (int fd = 3; fd < max; fd++) {
			if (fd != report)
				(void)close(fd);
		}
	}
	execve(argv[0], argv, environ);
fail:
	err = errno;
	if (write(report, &err, sizeof(err)) < 0) {
		/* Nothing left to tell; the parent sees exit status 127. */
	}
	_exit(127);
}

/* Wait for pid until deadline (monotonic ms). Returns true when it was reaped into *status. */
static bool wait_until(pid_t pid, long deadline, int *status)
{
	int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);

	for (;;) {
		pid_t r = waitpid(pid, status, WNOHANG);
		long left;

		if (r == pid)
			break;
		if (r < 0 && errno != EINTR) {
			if (pidfd >= 0)
				close(pidfd);
			*status = -1;
			return true;
		}
		left = deadline - now_ms();
		if (left <= 0) {
			if (pidfd >= 0)
				close(pidfd);
			return false;
		}
		if (pidfd >= 0) {
			struct pollfd p = { .fd = pidfd, .events = POLLIN, .revents = 0 };
			(void)poll(&p, 1, left > 1000 ? 1000 : (int)left);
		} else {
			/* Kernels before 5.3 have no pidfd: poll the child every 20 ms. */
			struct timespec ts = { 0, 20 * 1000 * 1000 };
			(void)nanosleep(&ts, NULL);
		}
	}
	if (pidfd >= 0)
		close(pidfd);
	return true;
}

static int describe_status(const char *hook, int status, char *err, size_t errlen)
{
	if (status == -1) {
		snprintf(err, errlen, "slinfer: lost track of hook %s: %s", hook, strerror(ECHILD));
		return -1;
	}
	if (WIFEXITED(status)) {
		if (WEXITSTATUS(status) == 0)
			return 0;
		snprintf(err, errlen, "slinfer: hook %s exited with status %d", hook, WEXITSTATUS(status));
		return -1;
	}
	if (WIFSIGNALED(status)) {
		snprintf(err, errlen, "slinfer: hook %s was killed by signal %d (%s)", hook,
			 WTERMSIG(status), strsignal(WTERMSIG(status)));
		return -1;
	}
	snprintf(err, errlen, "slinfer: hook %s ended with wait status 0x%x", hook, (unsigned)status);
	return -1;
}

int slinfer_hook_run(char *const argv[], unsigned int timeout_s, char *err, size_t errlen)
{
	struct sigaction dfl, old_chld;
	int report[2];
	int devnull, exec_errno = 0, status = 0, rc;
	ssize_t n;
	pid_t pid;
	long deadline;

	devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (devnull < 0) {
		snprintf(err, errlen, "slinfer: cannot open /dev/null: %s", strerror(errno));
		return -1;
	}
	if (pipe2(report, O_CLOEXEC) != 0) {
		snprintf(err, errlen, "slinfer: cannot create a pipe: %s", strerror(errno));
		close(devnull);
		return -1;
	}
	/* A SIGCHLD set to SIG_IGN by the host would reap the hook before we can read its status. */
	memset(&dfl, 0, sizeof(dfl));
	dfl.sa_handler = SIG_DFL;
	if (sigaction(SIGCHLD, &dfl, &old_chld) != 0) {
		snprintf(err, errlen, "slinfer: cannot reset SIGCHLD: %s", strerror(errno));
		close(devnull);
		close(report[0]);
		close(report[1]);
		return -1;
	}
	deadline = now_ms() + (long)timeout_s * 1000;
	pid = fork();
	if (pid == 0)
		child_exec(argv, devnull, report[1]);
	rc = errno;
	close(devnull);
	close(report[1]);
	if (pid < 0) {
		close(report[0]);
		(void)sigaction(SIGCHLD, &old_chld, NULL);
		snprintf(err, errlen, "slinfer: cannot fork for hook %s: %s", argv[0], strerror(rc));
		return -1;
	}
	/* The pipe closes on a successful execve; otherwise the child sends errno. */
	do {
		n = read(report[0], &exec_errno, sizeof(exec_errno));
	} while (n < 0 && errno == EINTR);
	close(report[0]);

	if (!wait_until(pid, deadline, &status)) {
		(void)kill(pid, SIGKILL);
		while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
			;
		(void)sigaction(SIGCHLD, &old_chld, NULL);
		snprintf(err, errlen, "slinfer: hook %s did not finish within %u s and was killed", argv[0],
			 timeout_s);
		return -1;
	}
	(void)sigaction(SIGCHLD, &old_chld, NULL);
	if (n == (ssize_t)sizeof(exec_errno)) {
		snprintf(err, errlen, "slinfer: cannot execute hook %s: %s", argv[0], strerror(exec_errno));
		return -1;
	}
	return describe_status(argv[0], status, err, errlen);
}
