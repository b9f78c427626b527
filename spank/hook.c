/*
 * Fork + execve of slinfer-hook with a deadline.
 *
 * Responsible for: the hook's argv (one builder for prolog and epilog), starting the hook
 * without a shell and with a clean descriptor table, passing its output on line by line (slurmstepd's own stdout/stderr are /dev/null in the prolog), waiting
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

/* The hook's output on its way to on_line. */
struct output {
	int fd;                             /* read end, non-blocking; -1 once closed */
	char line[SLINFER_HOOK_LINE_MAX + 1];
	size_t len;                         /* bytes in line */
	size_t total;                       /* bytes seen so far */
	slinfer_hook_line_f on_line;
	void *ctx;
};

static long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Between fork and execve: only async-signal-safe calls, no allocation, no stdio. */
static void child_exec(char *const argv[], int devnull, int out, int report)
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

	/* Keep our descriptors clear of 0-2, which are about to be replaced. */
	if (report < 3 && (report = fcntl(report, F_DUPFD_CLOEXEC, 3)) < 0)
		goto fail;
	if (devnull < 3 && (devnull = fcntl(devnull, F_DUPFD_CLOEXEC, 3)) < 0)
		goto fail;
	if (out < 3 && (out = fcntl(out, F_DUPFD_CLOEXEC, 3)) < 0)
		goto fail;
	if (dup2(devnull, STDIN_FILENO) < 0 || dup2(out, STDOUT_FILENO) < 0 ||
	    dup2(out, STDERR_FILENO) < 0)
		goto fail;
	if (syscall(SYS_close_range, 3U, ~0U, CLOSE_RANGE_CLOEXEC) != 0) {
		/* Kernels before 5.11: close one by one. */
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

static void emit_line(struct output *o)
{
	o->line[o->len] = '\0';
	if (o->on_line != NULL)
		o->on_line(o->ctx, o->line);
	o->len = 0;
}

static void take_bytes(struct output *o, const char *buf, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (o->total >= SLINFER_HOOK_OUTPUT_MAX)
			return;
		o->total++;
		if (buf[i] == '\n') {
			emit_line(o);
			continue;
		}
		o->line[o->len++] = buf[i];
		if (o->len == SLINFER_HOOK_LINE_MAX)
			emit_line(o);
	}
}

/* Read what is there now; close the pipe at EOF or on an error. */
static void drain(struct output *o)
{
	char buf[4096];

	while (o->fd >= 0) {
		ssize_t n = read(o->fd, buf, sizeof(buf));
		if (n > 0) {
			take_bytes(o, buf, (size_t)n);
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN)
			return;
		close(o->fd);
		o->fd = -1;
	}
}

static void finish_output(struct output *o)
{
	drain(o);
	if (o->fd >= 0) {
		close(o->fd);
		o->fd = -1;
	}
	if (o->len > 0)
		emit_line(o);
}

/*
 * Wait for pid until deadline (monotonic ms), passing its output on. Returns true when it was
 * reaped into *status (-1 when the wait itself failed), false at the deadline.
 */
static bool wait_until(pid_t pid, long deadline, struct output *o, int *status)
{
	int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	bool reaped = false;

	for (;;) {
		struct pollfd fds[2];
		nfds_t nfds = 0;
		pid_t r = waitpid(pid, status, WNOHANG);
		long left;

		if (r == pid) {
			reaped = true;
			break;
		}
		if (r < 0 && errno != EINTR) {
			*status = -1;
			reaped = true;
			break;
		}
		left = deadline - now_ms();
		if (left <= 0)
			break;
		if (pidfd >= 0)
			fds[nfds++] = (struct pollfd){ .fd = pidfd, .events = POLLIN, .revents = 0 };
		if (o->fd >= 0)
			fds[nfds++] = (struct pollfd){ .fd = o->fd, .events = POLLIN, .revents = 0 };
		/* Without a pidfd (kernels before 5.3) the child is polled every 20 ms. */
		(void)poll(fds, nfds, pidfd >= 0 ? (left > 1000 ? 1000 : (int)left) : 20);
		drain(o);
	}
	if (pidfd >= 0)
		close(pidfd);
	return reaped;
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

int slinfer_hook_run(char *const argv[], unsigned int timeout_s, slinfer_hook_line_f on_line,
		     void *ctx, char *err, size_t errlen)
{
	struct sigaction dfl, old_chld;
	struct output o = { .fd = -1, .len = 0, .total = 0, .on_line = on_line, .ctx = ctx };
	int report[2] = { -1, -1 }, out[2] = { -1, -1 };
	int devnull, exec_errno = 0, status = 0, saved;
	ssize_t n;
	pid_t pid;
	long deadline;

	devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (devnull < 0) {
		snprintf(err, errlen, "slinfer: cannot open /dev/null: %s", strerror(errno));
		return -1;
	}
	if (pipe2(report, O_CLOEXEC) != 0 || pipe2(out, O_CLOEXEC) != 0) {
		snprintf(err, errlen, "slinfer: cannot create a pipe: %s", strerror(errno));
		goto fail_fds;
	}
	if (fcntl(out[0], F_SETFL, O_NONBLOCK) != 0) {
		snprintf(err, errlen, "slinfer: cannot make the hook's pipe non-blocking: %s",
			 strerror(errno));
		goto fail_fds;
	}
	/* A SIGCHLD set to SIG_IGN by the host would reap the hook before we can read its status. */
	memset(&dfl, 0, sizeof(dfl));
	dfl.sa_handler = SIG_DFL;
	if (sigaction(SIGCHLD, &dfl, &old_chld) != 0) {
		snprintf(err, errlen, "slinfer: cannot reset SIGCHLD: %s", strerror(errno));
		goto fail_fds;
	}
	deadline = now_ms() + (long)timeout_s * 1000;
	pid = fork();
	if (pid == 0)
		child_exec(argv, devnull, out[1], report[1]);
	saved = errno;
	close(devnull);
	close(report[1]);
	close(out[1]);
	o.fd = out[0];
	if (pid < 0) {
		close(report[0]);
		close(out[0]);
		(void)sigaction(SIGCHLD, &old_chld, NULL);
		snprintf(err, errlen, "slinfer: cannot fork for hook %s: %s", argv[0], strerror(saved));
		return -1;
	}
	/* The report pipe closes on a successful execve; otherwise the child sends errno. */
	do {
		n = read(report[0], &exec_errno, sizeof(exec_errno));
	} while (n < 0 && errno == EINTR);
	close(report[0]);

	if (!wait_until(pid, deadline, &o, &status)) {
		(void)kill(pid, SIGKILL);
		while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
			;
		finish_output(&o);
		(void)sigaction(SIGCHLD, &old_chld, NULL);
		snprintf(err, errlen, "slinfer: hook %s did not finish within %u s and was killed", argv[0],
			 timeout_s);
		return -1;
	}
	finish_output(&o);
	(void)sigaction(SIGCHLD, &old_chld, NULL);
	if (n == (ssize_t)sizeof(exec_errno)) {
		snprintf(err, errlen, "slinfer: cannot execute hook %s: %s", argv[0], strerror(exec_errno));
		return -1;
	}
	return describe_status(argv[0], status, err, errlen);

fail_fds:
	close(devnull);
	for (int i = 0; i < 2; i++) {
		if (report[i] >= 0)
			close(report[i]);
		if (out[i] >= 0)
			close(out[i]);
	}
	return -1;
}

void slinfer_hook_argv(const struct slinfer_args *args, const char *phase, const char *jobid,
		       const struct slinfer_options *opts, const char *envfile,
		       char *argv[SLINFER_HOOK_ARGV_MAX])
{
	int n = 0;

	/* execve takes char *const[]: the hook gets copies, nothing writes through these. */
	argv[n++] = (char *)args->hook;
	argv[n++] = (char *)phase;
	argv[n++] = "--job-id";
	argv[n++] = (char *)jobid;
	if (opts != NULL) {
		argv[n++] = "--model";
		argv[n++] = (char *)opts->model;
		if (opts->pool)
			argv[n++] = "--pool";
	}
	argv[n++] = "--env-file";
	argv[n++] = (char *)envfile;
	if (args->config[0] != '\0') {
		argv[n++] = "--config";
		argv[n++] = (char *)args->config;
	}
	argv[n] = NULL;
}
