/* EXEC (docs/agent-protocol.md, "EXEC"): fork, set the child up in a session of its own, then one poll() loop
 * over the connection, the child's pipes (or pty master), and a signalfd for SIGCHLD.
 *
 * Memory is fixed per connection: output is read from a pipe only when the connection's output buffer has room
 * for a whole chunk (so a host that does not read stalls the child on a full pipe), and stdin is credit-limited
 * to PA_STDIN_WINDOW bytes (so the connection is always read, and a SIGNAL never waits behind stdin). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

extern char **environ;

enum { STAGE_SETUP = 1, STAGE_CHDIR = 2, STAGE_EXEC = 3 };

#define MAX_TIMEOUT_MS (100ull * 365 * 24 * 3600 * 1000) /* keeps deadlines far from int64 overflow */

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

/* The agent's environment changed by the request's ENV items, in order: NAME=VALUE sets, NAME unsets. */
static char **build_env(const struct request *r)
{
	size_t base = 0;
	if (!r->clear_env)
		for (char **e = environ; *e; e++)
			base++;
	char **env = calloc(base + r->nenv + 1, sizeof(char *));
	if (!env)
		return NULL;
	size_t n = 0;
	if (!r->clear_env)
		for (char **e = environ; *e; e++)
			env[n++] = *e;
	for (size_t i = 0; i < r->nenv; i++) {
		char *entry = dup_bytes(r->env[i]);
		if (!entry)
			return NULL;
		char *eq = strchr(entry, '=');
		size_t name = eq ? (size_t)(eq - entry) : strlen(entry);
		size_t kept = 0;
		for (size_t j = 0; j < n; j++)
			if (!(strncmp(env[j], entry, name) == 0 && env[j][name] == '='))
				env[kept++] = env[j];
		n = kept;
		if (eq)
			env[n++] = entry;
	}
	env[n] = NULL;
	return env;
}

static char **build_argv(const struct request *r)
{
	if (r->has_shell) {
		char **argv = calloc(4, sizeof(char *));
		if (!argv || !(argv[2] = dup_bytes(r->shell)))
			return NULL;
		argv[0] = "/bin/sh";
		argv[1] = "-c";
		return argv;
	}
	char **argv = calloc(r->nargs + 1, sizeof(char *));
	if (!argv)
		return NULL;
	for (size_t i = 0; i < r->nargs; i++)
		if (!(argv[i] = dup_bytes(r->args[i])))
			return NULL;
	return argv;
}

struct child_setup {
	char **argv, **envp;
	const char *cwd, *slave;
	int stdin_read, stdout_write, stderr_write; /* pipes; -1 for /dev/null (stdin) or with a pty */
	int status_write;
	pid_t parent;
};

static void child_fail(const struct child_setup *s, int stage)
{
	unsigned char b[8];
	put32(b, (uint32_t)stage);
	put32(b + 4, (uint32_t)errno);
	ssize_t ignored = write(s->status_write, b, sizeof(b));
	(void)ignored;
	_exit(127);
}

static void child_run(const struct child_setup *s)
{
	for (int sig = 1; sig < NSIG; sig++)
		signal(sig, SIG_DFL); /* the agent ignores SIGPIPE: an ignored disposition would survive exec */
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	if (setsid() < 0)
		child_fail(s, STAGE_SETUP);
	prctl(PR_SET_PDEATHSIG, SIGKILL); /* should the connection's process die before it reaps us */
	if (getppid() != s->parent)
		_exit(127);
	if (s->slave) {
		int t = open(s->slave, O_RDWR);
		if (t < 0 || ioctl(t, TIOCSCTTY, 0) < 0)
			child_fail(s, STAGE_SETUP);
		if (dup2(t, 0) < 0 || dup2(t, 1) < 0 || dup2(t, 2) < 0)
			child_fail(s, STAGE_SETUP);
		if (t > 2)
			close(t);
	} else {
		int in = s->stdin_read >= 0 ? s->stdin_read : open("/dev/null", O_RDONLY | O_CLOEXEC);
		if (in < 0 || dup2(in, 0) < 0 || dup2(s->stdout_write, 1) < 0 || dup2(s->stderr_write, 2) < 0)
			child_fail(s, STAGE_SETUP);
	}
	if (s->cwd && chdir(s->cwd) < 0)
		child_fail(s, STAGE_CHDIR);
	environ = s->envp;
	execvp(s->argv[0], s->argv);
	child_fail(s, STAGE_EXEC);
}

/* ---- the running child -------------------------------------------------------------------------------- */

struct stream {
	int fd;
	uint8_t type;
};

struct run {
	struct conn *c;
	pid_t pid;
	int reaped, status, timed_out, pty, exit_queued;
	int64_t started_ns, reaped_ns, reaped_ms, deadline_ms, kill_at_ms;
	uint32_t grace_ms;
	struct stream out[2];
	int master; /* the pty master (also out[0].fd), for RESIZE */
	/* stdin: bytes [in_start, in_end) of inbuf wait for the child */
	int stdin_fd, stdin_allowed, stdin_eof, stdin_done, veof_pending;
	unsigned char *inbuf;
	size_t in_start, in_end;
	uint64_t allowance; /* STDIN bytes the host may still send; + pending + to_grant == PA_STDIN_WINDOW */
	uint64_t to_grant;
};

static void run_close(struct run *r)
{
	close_fd(&r->out[0].fd);
	close_fd(&r->out[1].fd);
	close_fd(&r->stdin_fd);
	free(r->inbuf);
	r->inbuf = NULL;
}

/* The host is gone, or broke a rule: the child goes, with its process group. */
static void run_kill(struct run *r)
{
	if (!r->reaped) {
		kill(-r->pid, SIGKILL);
		while (waitpid(r->pid, NULL, 0) < 0 && errno == EINTR)
			;
		r->reaped = 1;
	}
	run_close(r);
}

static void stdin_stop(struct run *r)
{
	/* the child will not read more: what is pending is dropped, and its credit returned */
	r->to_grant += r->in_end - r->in_start;
	r->in_start = r->in_end = 0;
	r->stdin_done = 1;
	r->veof_pending = 0;
	close_fd(&r->stdin_fd);
}

/* 0, or an ERROR kind with why filled in */
static unsigned on_frame(struct run *r, const struct frame *f, char *why, size_t why_size)
{
	switch (f->type) {
	case PA_STDIN:
		if (!r->stdin_allowed || r->stdin_eof) {
			snprintf(why, why_size, "STDIN %s", r->stdin_eof ? "after STDIN_EOF" : "without the STDIN item");
			return PA_ERR_PROTOCOL;
		}
		if (f->length > r->allowance) {
			snprintf(why, why_size, "STDIN of %zu bytes exceeds the %llu bytes of credit", f->length,
				 (unsigned long long)r->allowance);
			return PA_ERR_PROTOCOL;
		}
		r->allowance -= f->length;
		if (r->stdin_done) {
			r->to_grant += f->length;
		} else {
			if (PA_STDIN_WINDOW - r->in_end < f->length) {
				memmove(r->inbuf, r->inbuf + r->in_start, r->in_end - r->in_start);
				r->in_end -= r->in_start;
				r->in_start = 0;
			}
			memcpy(r->inbuf + r->in_end, f->payload, f->length);
			r->in_end += f->length;
		}
		return 0;
	case PA_STDIN_EOF:
		if (!r->stdin_allowed || r->stdin_eof) {
			snprintf(why, why_size, "STDIN_EOF %s", r->stdin_eof ? "twice" : "without the STDIN item");
			return PA_ERR_PROTOCOL;
		}
		r->stdin_eof = 1;
		if (r->pty && !r->stdin_done)
			r->veof_pending = 1;
		return 0;
	case PA_SIGNAL: {
		uint32_t sig = f->length >= 4 ? le32(f->payload) : 0;
		if (sig < 1 || sig > 64) {
			snprintf(why, why_size, "SIGNAL needs a signal number in 1..64");
			return PA_ERR_PROTOCOL;
		}
		if (!r->reaped)
			kill(-r->pid, (int)sig);
		return 0;
	}
	case PA_RESIZE:
		if (f->length < 4) {
			snprintf(why, why_size, "RESIZE needs rows and cols");
			return PA_ERR_PROTOCOL;
		}
		if (r->pty && r->master >= 0) {
			struct winsize ws = {.ws_row = le16(f->payload), .ws_col = le16(f->payload + 2)};
			ioctl(r->master, TIOCSWINSZ, &ws);
		}
		return 0;
	default:
		snprintf(why, why_size, "frame type %#x is not expected during EXEC", f->type);
		return PA_ERR_PROTOCOL;
	}
}

/* Read what a pipe has into STDOUT/STDERR frames while the connection has room. After the child has been
 * reaped, "nothing now" ends a pipe (its writes before exit are all in it); a pty gets a short grace. */
static void pump_stream(struct run *r, struct stream *s, int64_t now)
{
	while (s->fd >= 0) {
		unsigned char *space = conn_frame_space(r->c, PA_CHUNK);
		if (!space)
			return;
		ssize_t n = read(s->fd, space, PA_CHUNK);
		if (n > 0) {
			conn_frame_commit(r->c, s->type, (size_t)n);
			if (!r->reaped)
				return; /* one chunk per wake-up keeps stdout and stderr fair */
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			if (r->reaped && (!r->pty || now - r->reaped_ms >= PA_PTY_LINGER_MS)) {
				if (s->fd == r->master)
					r->master = -1;
				close_fd(&s->fd);
			}
			return;
		}
		if (s->fd == r->master) /* EOF, or EIO: a pty whose slave is closed everywhere */
			r->master = -1;
		close_fd(&s->fd);
	}
}

static void pump_stdin(struct run *r)
{
	while (r->stdin_fd >= 0 && r->in_end > r->in_start) {
		ssize_t n = write(r->stdin_fd, r->inbuf + r->in_start, r->in_end - r->in_start);
		if (n > 0) {
			r->in_start += (size_t)n;
			r->to_grant += (size_t)n;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		stdin_stop(r); /* EPIPE: the child closed its stdin */
		return;
	}
	if (r->in_start == r->in_end)
		r->in_start = r->in_end = 0;
	if (r->stdin_fd < 0 || !r->stdin_eof || r->in_end > r->in_start)
		return;
	if (!r->pty) {
		stdin_stop(r);
		return;
	}
	if (r->veof_pending) {
		struct termios t;
		unsigned char veof = tcgetattr(r->stdin_fd, &t) == 0 ? t.c_cc[VEOF] : 4;
		ssize_t n = write(r->stdin_fd, &veof, 1);
		if (n == 1)
			r->veof_pending = 0;
		else if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
			stdin_stop(r);
	}
}

static void queue_exit(struct run *r)
{
	unsigned char e[16];
	uint8_t how = PA_EXIT_EXITED, flags = r->timed_out ? PA_EXIT_TIMED_OUT : 0;
	uint32_t value = 0;
	if (WIFEXITED(r->status)) {
		value = (uint32_t)WEXITSTATUS(r->status);
	} else if (WIFSIGNALED(r->status)) {
		how = PA_EXIT_SIGNALED;
		value = (uint32_t)WTERMSIG(r->status);
		if (WCOREDUMP(r->status))
			flags |= PA_EXIT_CORE_DUMPED;
	}
	e[0] = how;
	e[1] = flags;
	put16(e + 2, 0);
	put32(e + 4, value);
	put64(e + 8, (uint64_t)(r->reaped_ns - r->started_ns));
	if (conn_queue(r->c, PA_EXIT, e, sizeof(e)) == 0)
		r->exit_queued = 1;
}

/* the complete frames buffered from the host: 0, or -kind for a broken rule */
static int take_frames(struct run *r, char *why, size_t why_size)
{
	struct frame f;
	int taken;
	while ((taken = conn_take(r->c, &f, why, why_size)) == TAKE_FRAME) {
		unsigned kind = on_frame(r, &f, why, why_size);
		if (kind)
			return -(int)kind;
	}
	return taken == TAKE_BAD ? -PA_ERR_PROTOCOL : 0;
}

static int64_t earliest(int64_t a, int64_t b) { return a == 0 || (b != 0 && b < a) ? b : a; }

/* 1 when EXIT is sent, 0 when the host is gone (the child killed), -kind on a broken rule (the child killed) */
static int run_loop(struct run *r, int sigfd, char *why, size_t why_size)
{
	struct conn *c = r->c;
	for (;;) {
		int broken = take_frames(r, why, why_size); /* some may have come with the request itself */
		if (broken)
			return broken;
		if (r->stdin_fd >= 0 && (r->in_end > r->in_start || r->veof_pending))
			pump_stdin(r);
		int64_t now = now_ms();
		if (!r->reaped && r->deadline_ms && !r->timed_out && now >= r->deadline_ms) {
			r->timed_out = 1;
			kill(-r->pid, SIGTERM);
			r->kill_at_ms = now + r->grace_ms;
		}
		if (!r->reaped && r->kill_at_ms && now >= r->kill_at_ms) {
			kill(-r->pid, SIGKILL);
			r->kill_at_ms = 0;
		}
		if (r->reaped) {
			if (!r->stdin_done)
				stdin_stop(r);
			for (int i = 0; i < 2; i++)
				pump_stream(r, &r->out[i], now);
		}
		if (r->to_grant && (r->to_grant >= PA_STDIN_WINDOW / 4 || r->in_end == r->in_start)) {
			unsigned char g[4];
			put32(g, (uint32_t)r->to_grant);
			if (conn_queue(c, PA_CREDIT, g, sizeof(g)) == 0) {
				r->allowance += r->to_grant;
				r->to_grant = 0;
			}
		}
		if (r->reaped && r->out[0].fd < 0 && r->out[1].fd < 0 && !r->exit_queued)
			queue_exit(r);
		if (conn_pending(c) && conn_flush_some(c) < 0)
			return 0;
		if (r->exit_queued && !conn_pending(c))
			return 1;

		struct pollfd p[5];
		int n = 0, i_sock = n++, i_sig = -1, i_in = -1, i_out[2] = {-1, -1};
		p[i_sock] = (struct pollfd){.fd = c->fd, .events = POLLIN | (conn_pending(c) ? POLLOUT : 0)};
		if (!r->reaped) {
			i_sig = n++;
			p[i_sig] = (struct pollfd){.fd = sigfd, .events = POLLIN};
		}
		int room = conn_room(c) >= PA_HEADER_SIZE + 1 + PA_CHUNK;
		for (int i = 0; i < 2; i++)
			if (r->out[i].fd >= 0 && room) {
				i_out[i] = n++;
				p[i_out[i]] = (struct pollfd){.fd = r->out[i].fd, .events = POLLIN};
			}
		if (r->stdin_fd >= 0 && (r->in_end > r->in_start || r->veof_pending)) {
			i_in = n++;
			p[i_in] = (struct pollfd){.fd = r->stdin_fd, .events = POLLOUT};
		}
		int64_t wake = 0;
		if (!r->reaped) {
			if (!r->timed_out)
				wake = earliest(wake, r->deadline_ms);
			wake = earliest(wake, r->kill_at_ms);
		} else if (r->pty && r->out[0].fd >= 0) {
			wake = earliest(wake, r->reaped_ms + PA_PTY_LINGER_MS);
		}
		int timeout = -1;
		if (wake) {
			int64_t left = wake - now;
			timeout = left <= 0 ? 0 : left > 1000000 ? 1000000 : (int)left;
		}
		if (poll(p, (nfds_t)n, timeout) < 0) {
			if (errno == EINTR)
				continue;
			return 0;
		}
		now = now_ms();

		if (i_sig >= 0 && p[i_sig].revents) {
			struct signalfd_siginfo si;
			while (read(sigfd, &si, sizeof(si)) == sizeof(si))
				;
			int status;
			if (waitpid(r->pid, &status, WNOHANG) == r->pid) {
				r->reaped = 1;
				r->status = status;
				r->reaped_ns = now_ns();
				r->reaped_ms = now;
			}
		}
		if (p[i_sock].revents & (POLLIN | POLLHUP | POLLERR)) {
			int filled = conn_fill(c);
			if (filled == FILL_EOF || filled == FILL_ERROR) {
				int broken = take_frames(r, why, why_size); /* the host's last words still count */
				return broken ? broken : 0;
			}
			int broken = take_frames(r, why, why_size);
			if (broken)
				return broken;
		}
		if ((p[i_sock].revents & POLLOUT) && conn_flush_some(c) < 0)
			return 0;
		for (int i = 0; i < 2; i++)
			if (i_out[i] >= 0 && p[i_out[i]].revents)
				pump_stream(r, &r->out[i], now);
		if (i_in >= 0 && p[i_in].revents)
			pump_stdin(r);
		else if (r->stdin_fd >= 0 && r->stdin_eof && r->in_end == r->in_start && !r->veof_pending && !r->pty)
			stdin_stop(r);
	}
}

/* ---- the request -------------------------------------------------------------------------------------- */

static const char *stage_name(int stage)
{
	return stage == STAGE_CHDIR ? "change to the directory" : stage == STAGE_EXEC ? "execute" : "set up";
}

void handle_exec(struct conn *c, const struct request *req)
{
	char why[256];
	char **argv = build_argv(req), **envp = build_env(req);
	char *cwd = req->has_cwd ? dup_bytes(req->cwd) : NULL;
	if (!argv || !envp || (req->has_cwd && !cwd)) {
		conn_send_error(c, PA_ERR_OS, ENOMEM, "out of memory for the command");
		conn_finish(c);
		return;
	}
	struct run r = {.c = c, .master = -1, .stdin_fd = -1, .out = {{-1, PA_STDOUT}, {-1, PA_STDERR}}};
	r.pty = req->has_pty;
	r.stdin_allowed = req->use_stdin || req->has_pty;
	r.grace_ms = req->kill_grace_ms;
	int in_pipe[2] = {-1, -1}, out_pipe[2] = {-1, -1}, err_pipe[2] = {-1, -1}, status_pipe[2] = {-1, -1};
	char slave[128];
	struct child_setup setup = {.argv = argv, .envp = envp, .cwd = cwd, .parent = getpid()};
	const char *failed = NULL;
	if (r.pty) {
		r.master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
		struct winsize ws = {.ws_row = req->rows, .ws_col = req->cols};
		if (r.master < 0 || grantpt(r.master) < 0 || unlockpt(r.master) < 0 ||
		    ptsname_r(r.master, slave, sizeof(slave)) != 0 || ioctl(r.master, TIOCSWINSZ, &ws) < 0)
			failed = "open a pseudo-terminal";
		r.out[0].fd = r.master;
		if (!failed && (r.stdin_fd = fcntl(r.master, F_DUPFD_CLOEXEC, 3)) < 0)
			failed = "open a pseudo-terminal";
		setup.slave = slave;
		setup.stdin_read = setup.stdout_write = setup.stderr_write = -1;
	} else {
		if (pipe2(out_pipe, O_CLOEXEC) < 0 || pipe2(err_pipe, O_CLOEXEC) < 0 ||
		    (r.stdin_allowed && pipe2(in_pipe, O_CLOEXEC) < 0))
			failed = "create pipes";
		r.out[0].fd = out_pipe[0];
		r.out[1].fd = err_pipe[0];
		r.stdin_fd = in_pipe[1];
		setup.stdin_read = in_pipe[0];
		setup.stdout_write = out_pipe[1];
		setup.stderr_write = err_pipe[1];
	}
	sigset_t chld;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, NULL);
	int sigfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
	if (!failed && (pipe2(status_pipe, O_CLOEXEC) < 0 || sigfd < 0))
		failed = "create pipes";
	if (r.stdin_allowed && !failed && !(r.inbuf = malloc(PA_STDIN_WINDOW)))
		failed = "allocate the stdin buffer";
	if (failed) {
		int err = errno;
		close_fd(&in_pipe[0]);
		close_fd(&out_pipe[1]);
		close_fd(&err_pipe[1]);
		close_fd(&status_pipe[0]);
		close_fd(&status_pipe[1]);
		close_fd(&sigfd);
		run_close(&r);
		conn_send_error(c, PA_ERR_OS, err, "cannot %s: %s", failed, strerror(err));
		conn_finish(c);
		return;
	}
	setup.status_write = status_pipe[1];
	r.started_ns = now_ns();
	r.pid = fork();
	if (r.pid == 0)
		child_run(&setup);
	int fork_errno = errno;
	close_fd(&in_pipe[0]);
	close_fd(&out_pipe[1]);
	close_fd(&err_pipe[1]);
	close_fd(&status_pipe[1]);
	if (r.pid < 0) {
		close_fd(&status_pipe[0]);
		close_fd(&sigfd);
		run_close(&r);
		conn_send_error(c, PA_ERR_OS, fork_errno, "cannot fork: %s", strerror(fork_errno));
		conn_finish(c);
		return;
	}
	unsigned char st[8];
	ssize_t got;
	do
		got = read(status_pipe[0], st, sizeof(st));
	while (got < 0 && errno == EINTR);
	close_fd(&status_pipe[0]);
	if (got == (ssize_t)sizeof(st)) { /* the child could not exec: it said why and exited */
		int stage = (int)le32(st), err = (int)le32(st + 4);
		while (waitpid(r.pid, NULL, 0) < 0 && errno == EINTR)
			;
		close_fd(&sigfd);
		run_close(&r);
		const char *what = stage == STAGE_CHDIR ? cwd : stage == STAGE_EXEC ? argv[0] : "the child";
		conn_send_error(c, PA_ERR_OS, err, "cannot %s '%s': %s", stage_name(stage), what, strerror(err));
		conn_finish(c);
		return;
	}
	if (req->timeout_ms)
		r.deadline_ms = now_ms() + (int64_t)(req->timeout_ms < MAX_TIMEOUT_MS ? req->timeout_ms : MAX_TIMEOUT_MS);
	r.allowance = r.stdin_allowed ? PA_STDIN_WINDOW : 0;
	for (int i = 0; i < 2; i++)
		if (r.out[i].fd >= 0)
			set_nonblocking(r.out[i].fd, 1);
	if (r.stdin_fd >= 0)
		set_nonblocking(r.stdin_fd, 1);
	unsigned char started[8];
	put32(started, (uint32_t)r.pid);
	put32(started + 4, (uint32_t)r.allowance);
	conn_queue(c, PA_STARTED, started, sizeof(started)); /* the output buffer is empty: it fits */

	int result = run_loop(&r, sigfd, why, sizeof(why));
	close_fd(&sigfd);
	if (result == 1) {
		run_close(&r);
		conn_finish(c);
		return;
	}
	run_kill(&r);
	if (result < 0) {
		conn_send_error(c, (unsigned)-result, 0, "%s", why);
		conn_finish(c);
	}
}
