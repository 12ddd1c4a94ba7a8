/* popek-agent: the default guest's agent (docs/agent-protocol.md). It listens on AF_VSOCK (or, for tests, a
 * Unix socket or a loopback TCP address) and serves each connection in a process of its own: the handshake,
 * one request, the end. The listener only accepts, forks and reaps, so no client can block it, and a fault in
 * one connection's process takes no other connection with it.
 *
 * Built with `gcc -static` against glibc (popek/agent/binary.py): the agent calls nothing that goes through
 * NSS (no getaddrinfo, getpwnam...; addresses are numeric), so static glibc needs no shared library at run time.
 *
 * Usage: popek-agent [--vsock PORT | --unix PATH | --tcp HOST:PORT]   (default: --vsock 1024) */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <linux/vm_sockets.h>

#include "agent.h"

#define DEFAULT_VSOCK_PORT 1024

static struct request request; /* ~130 KiB: one per connection process */

static void serve(int fd)
{
	struct conn c;
	char why[256];
	if (conn_init(&c, fd) < 0) {
		close(fd);
		return;
	}
	int64_t deadline = now_ms() + PA_HANDSHAKE_MS;
	struct frame f;
	int got = conn_wait_frame(&c, &f, deadline, why, sizeof(why));
	if (got == WAIT_GONE)
		goto gone;
	if (got == WAIT_BAD || f.type != PA_HELLO || f.length < 8) {
		conn_send_error(&c, PA_ERR_PROTOCOL, 0, "%s",
				got == WAIT_BAD ? why : "a connection starts with HELLO (u16 major, u16 minor, u32 max_frame)");
		goto finish;
	}
	unsigned major = le16(f.payload), minor = le16(f.payload + 2);
	if (major != PA_VERSION_MAJOR) {
		conn_send_error(&c, PA_ERR_VERSION, 0, "popek-agent speaks protocol %d.%d; the host speaks %u.%u",
				PA_VERSION_MAJOR, PA_VERSION_MINOR, major, minor);
		goto finish;
	}
	unsigned char hello[8];
	put16(hello, PA_VERSION_MAJOR);
	put16(hello + 2, PA_VERSION_MINOR);
	put32(hello + 4, PA_MAX_FRAME);
	if (conn_send(&c, PA_HELLO, hello, sizeof(hello), PA_HANDSHAKE_MS) < 0)
		goto gone;
	got = conn_wait_frame(&c, &f, deadline, why, sizeof(why));
	if (got == WAIT_GONE)
		goto gone;
	if (got == WAIT_BAD) {
		conn_send_error(&c, PA_ERR_PROTOCOL, 0, "%s", why);
		goto finish;
	}
	if (f.type == PA_PING) {
		if (conn_send(&c, PA_OK, NULL, 0, PA_IO_IDLE_MS) < 0)
			goto gone;
		goto finish;
	}
	unsigned kind = parse_request(f.type, f.payload, f.length, &request, why, sizeof(why));
	if (kind) {
		conn_send_error(&c, kind, 0, "%s", why);
		goto finish;
	}
	if (request.type != PA_EXEC)
		umask(0); /* MODE is the mode a file or directory gets */
	switch (request.type) {
	case PA_EXEC:
		handle_exec(&c, &request);
		break;
	case PA_READ:
		handle_read(&c, &request);
		break;
	case PA_WRITE:
		handle_write(&c, &request);
		break;
	case PA_LIST:
		handle_list(&c, &request);
		break;
	case PA_STAT:
		handle_stat(&c, &request);
		break;
	case PA_REMOVE:
		handle_remove(&c, &request);
		break;
	case PA_MKDIR:
		handle_mkdir(&c, &request);
		break;
	case PA_REFRESH:
		handle_refresh(&c, &request);
		break;
	}
	conn_free(&c); /* the operations end the connection; this frees its buffers */
	return;
finish:
	conn_finish(&c);
gone:
	conn_free(&c);
}

/* ---- listening ---------------------------------------------------------------------------------------- */

static void usage(void)
{
	fprintf(stderr, "usage: popek-agent [--vsock PORT | --unix PATH | --tcp HOST:PORT]  (default: --vsock %d)\n",
		DEFAULT_VSOCK_PORT);
	exit(2);
}

static int parse_port(const char *s, unsigned max)
{
	char *end;
	errno = 0;
	unsigned long v = strtoul(s, &end, 10);
	if (errno || end == s || *end || v > max || *s == '-' || *s == '+')
		return -1;
	return (int)v;
}

static int listen_vsock(int port, char *name, size_t name_size)
{
	int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = (unsigned)port};
	if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		fprintf(stderr, "popek-agent: cannot listen on vsock port %d: %s\n", port, strerror(errno));
		exit(1);
	}
	snprintf(name, name_size, "vsock:%d", port);
	return fd;
}

static int listen_unix(const char *path, char *name, size_t name_size)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	if (strlen(path) >= sizeof(a.sun_path)) {
		fprintf(stderr, "popek-agent: the Unix socket path %s is longer than %zu bytes\n", path,
			sizeof(a.sun_path) - 1);
		exit(1);
	}
	strcpy(a.sun_path, path);
	struct stat st;
	if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode))
		unlink(path); /* a socket left by an agent that is gone */
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		fprintf(stderr, "popek-agent: cannot listen on %s: %s\n", path, strerror(errno));
		exit(1);
	}
	snprintf(name, name_size, "unix:%s", path);
	return fd;
}

static int listen_tcp(const char *spec, char *name, size_t name_size)
{
	/* HOST:PORT or [V6HOST]:PORT, numeric only */
	char host[64];
	const char *colon = strrchr(spec, ':');
	size_t host_len = colon ? (size_t)(colon - spec) : 0;
	if (!colon || host_len == 0 || host_len >= sizeof(host))
		usage();
	memcpy(host, spec, host_len);
	host[host_len] = 0;
	int port = parse_port(colon + 1, 65535);
	if (port < 0)
		usage();
	struct sockaddr_storage ss;
	memset(&ss, 0, sizeof(ss));
	socklen_t len;
	int loopback;
	if (host[0] == '[' && host[host_len - 1] == ']') {
		host[host_len - 1] = 0;
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
		a->sin6_family = AF_INET6;
		a->sin6_port = htons((uint16_t)port);
		if (inet_pton(AF_INET6, host + 1, &a->sin6_addr) != 1)
			usage();
		loopback = IN6_IS_ADDR_LOOPBACK(&a->sin6_addr);
		len = sizeof(*a);
	} else {
		struct sockaddr_in *a = (struct sockaddr_in *)&ss;
		a->sin_family = AF_INET;
		a->sin_port = htons((uint16_t)port);
		if (inet_pton(AF_INET, host, &a->sin_addr) != 1)
			usage();
		loopback = (ntohl(a->sin_addr.s_addr) >> 24) == 127;
		len = sizeof(*a);
	}
	if (!loopback) {
		fprintf(stderr, "popek-agent: --tcp binds loopback addresses only (the agent has no authentication)\n");
		exit(1);
	}
	int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	int one = 1;
	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
	    bind(fd, (struct sockaddr *)&ss, len) < 0 || getsockname(fd, (struct sockaddr *)&ss, &len) < 0) {
		fprintf(stderr, "popek-agent: cannot listen on %s: %s\n", spec, strerror(errno));
		exit(1);
	}
	char shown[INET6_ADDRSTRLEN];
	int bound = ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
					     : ntohs(((struct sockaddr_in *)&ss)->sin_port);
	inet_ntop(ss.ss_family,
		  ss.ss_family == AF_INET6 ? (void *)&((struct sockaddr_in6 *)&ss)->sin6_addr
					   : (void *)&((struct sockaddr_in *)&ss)->sin_addr,
		  shown, sizeof(shown));
	snprintf(name, name_size, ss.ss_family == AF_INET6 ? "tcp:[%s]:%d" : "tcp:%s:%d", shown, bound);
	return fd;
}

static void refuse_busy(int fd)
{
	unsigned char frame[4 + 1 + 6 + 64];
	const char *msg = "popek-agent serves its maximum number of connections";
	size_t n = strlen(msg);
	put32(frame, (uint32_t)(1 + 6 + n));
	frame[4] = PA_ERROR;
	put16(frame + 5, PA_ERR_BUSY);
	put32(frame + 7, 0);
	memcpy(frame + 11, msg, n);
	ssize_t ignored = send(fd, frame, 11 + n, MSG_DONTWAIT | MSG_NOSIGNAL);
	(void)ignored;
	close(fd);
}

int main(int argc, char **argv)
{
	/* fds 0-2 must be taken, so that no socket or pipe of ours is ever one of them (dup2 onto itself keeps
	 * FD_CLOEXEC) */
	for (;;) {
		int fd = open("/dev/null", O_RDWR | O_CLOEXEC);
		if (fd < 0 || fd > 2) {
			if (fd > 2)
				close(fd);
			break;
		}
		fcntl(fd, F_SETFD, 0); /* a standard descriptor, as a child expects it */
	}
	/* whatever else the launcher left open is not for the commands we run */
	if (close_range(3, ~0u, CLOSE_RANGE_CLOEXEC) < 0) {
		long max = sysconf(_SC_OPEN_MAX);
		for (int fd = 3; fd < (max > 0 && max < 65536 ? max : 65536); fd++)
			fcntl(fd, F_SETFD, FD_CLOEXEC);
	}
	int listen_fd = -1;
	char name[160];
	if (argc == 1) {
		listen_fd = listen_vsock(DEFAULT_VSOCK_PORT, name, sizeof(name));
	} else if (argc == 3 && !strcmp(argv[1], "--vsock")) {
		int port = parse_port(argv[2], 0x7FFFFFFF);
		if (port < 0)
			usage();
		listen_fd = listen_vsock(port, name, sizeof(name));
	} else if (argc == 3 && !strcmp(argv[1], "--unix")) {
		listen_fd = listen_unix(argv[2], name, sizeof(name));
	} else if (argc == 3 && !strcmp(argv[1], "--tcp")) {
		listen_fd = listen_tcp(argv[2], name, sizeof(name));
	} else {
		usage();
	}
	if (listen(listen_fd, 64) < 0) {
		fprintf(stderr, "popek-agent: cannot listen on %s: %s\n", name, strerror(errno));
		return 1;
	}
	signal(SIGPIPE, SIG_IGN);
	signal(SIGHUP, SIG_IGN);
	sigset_t chld;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, NULL);
	int sigfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
	if (sigfd < 0) {
		fprintf(stderr, "popek-agent: signalfd: %s\n", strerror(errno));
		return 1;
	}
	fprintf(stderr, "popek-agent: protocol %d.%d, listening on %s\n", PA_VERSION_MAJOR, PA_VERSION_MINOR, name);
	fflush(stderr);

	int live = 0;
	for (;;) {
		struct pollfd p[2] = {{.fd = listen_fd, .events = POLLIN}, {.fd = sigfd, .events = POLLIN}};
		if (poll(p, 2, -1) < 0 && errno != EINTR)
			return 1;
		if (p[1].revents) {
			struct signalfd_siginfo si;
			while (read(sigfd, &si, sizeof(si)) == sizeof(si))
				;
			while (waitpid(-1, NULL, WNOHANG) > 0)
				live--;
		}
		if (!(p[0].revents & POLLIN))
			continue;
		int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
				poll(NULL, 0, 100); /* out of descriptors: let connections end rather than spin */
			continue;
		}
		if (live >= PA_MAX_CONNECTIONS) {
			refuse_busy(fd);
			continue;
		}
		pid_t pid = fork();
		if (pid == 0) {
			close(listen_fd);
			close(sigfd);
			serve(fd);
			_exit(0);
		}
		if (pid < 0)
			refuse_busy(fd);
		else {
			live++;
			close(fd);
		}
	}
}
