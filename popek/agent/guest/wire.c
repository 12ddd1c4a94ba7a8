/* Framing (docs/agent-protocol.md, "Frames"): a frame's length is checked against PA_MAX_FRAME as soon as its
 * four bytes are in, so no claim is ever allocated; both buffers have a fixed size per connection. The socket
 * is non-blocking: EXEC drives it from its poll() loop, the other operations wait with a deadline. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

uint16_t le16(const unsigned char *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

uint32_t le32(const unsigned char *p)
{
	return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

uint64_t le64(const unsigned char *p) { return (uint64_t)le32(p) | ((uint64_t)le32(p + 4) << 32); }

void put16(unsigned char *p, uint16_t v)
{
	p[0] = (unsigned char)v;
	p[1] = (unsigned char)(v >> 8);
}

void put32(unsigned char *p, uint32_t v)
{
	put16(p, (uint16_t)v);
	put16(p + 2, (uint16_t)(v >> 16));
}

void put64(unsigned char *p, uint64_t v)
{
	put32(p, (uint32_t)v);
	put32(p + 4, (uint32_t)(v >> 32));
}

int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int set_nonblocking(int fd, int on)
{
	int flags = fcntl(fd, F_GETFL);
	if (flags < 0)
		return -1;
	flags = on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK;
	return fcntl(fd, F_SETFL, flags);
}

int conn_init(struct conn *c, int fd)
{
	memset(c, 0, sizeof(*c));
	c->fd = fd;
	c->in = malloc(PA_IN_CAPACITY);
	c->out = malloc(PA_OUT_CAPACITY);
	if (!c->in || !c->out || set_nonblocking(fd, 1) < 0) {
		conn_free(c);
		return -1;
	}
	return 0;
}

void conn_free(struct conn *c)
{
	free(c->in);
	free(c->out);
	c->in = c->out = NULL;
	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
}

/* ---- input -------------------------------------------------------------------------------------------- */

int conn_fill(struct conn *c)
{
	if (c->in_start > 0) { /* the consumed frames' bytes are dead: keep only the partial one */
		memmove(c->in, c->in + c->in_start, c->in_end - c->in_start);
		c->in_end -= c->in_start;
		c->in_start = 0;
	}
	if (c->in_end == PA_IN_CAPACITY)
		return FILL_AGAIN; /* a whole frame is buffered: the caller takes it first */
	for (;;) {
		ssize_t n = recv(c->fd, c->in + c->in_end, PA_IN_CAPACITY - c->in_end, 0);
		if (n > 0) {
			c->in_end += (size_t)n;
			return FILL_DATA;
		}
		if (n == 0)
			return FILL_EOF;
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN || errno == EWOULDBLOCK)
			return FILL_AGAIN;
		return FILL_ERROR;
	}
}

int conn_take(struct conn *c, struct frame *f, char *why, size_t why_size)
{
	size_t have = c->in_end - c->in_start;
	if (have < PA_HEADER_SIZE)
		return TAKE_MORE;
	uint32_t length = le32(c->in + c->in_start);
	if (length == 0 || length > PA_MAX_FRAME) {
		snprintf(why, why_size, "a frame length of %u is outside 1..%u", length, PA_MAX_FRAME);
		return TAKE_BAD;
	}
	if (have < PA_HEADER_SIZE + (size_t)length)
		return TAKE_MORE;
	f->type = c->in[c->in_start + PA_HEADER_SIZE];
	f->payload = c->in + c->in_start + PA_HEADER_SIZE + 1;
	f->length = length - 1;
	c->in_start += PA_HEADER_SIZE + (size_t)length;
	return TAKE_FRAME;
}

int conn_wait_frame(struct conn *c, struct frame *f, int64_t deadline_ms, char *why, size_t why_size)
{
	for (;;) {
		int taken = conn_take(c, f, why, why_size);
		if (taken == TAKE_FRAME)
			return WAIT_FRAME;
		if (taken == TAKE_BAD)
			return WAIT_BAD;
		int filled = conn_fill(c);
		if (filled == FILL_DATA)
			continue;
		if (filled != FILL_AGAIN)
			return WAIT_GONE;
		int64_t left = deadline_ms - now_ms();
		if (left <= 0)
			return WAIT_GONE;
		struct pollfd p = {.fd = c->fd, .events = POLLIN};
		if (poll(&p, 1, (int)left) < 0 && errno != EINTR)
			return WAIT_GONE;
	}
}

/* ---- output ------------------------------------------------------------------------------------------- */

size_t conn_room(const struct conn *c) { return PA_OUT_CAPACITY - (c->out_end - c->out_start); }

int conn_pending(const struct conn *c) { return c->out_end > c->out_start; }

unsigned char *conn_frame_space(struct conn *c, size_t payload)
{
	size_t need = PA_HEADER_SIZE + 1 + payload;
	if (conn_room(c) < need)
		return NULL;
	if (PA_OUT_CAPACITY - c->out_end < need) {
		memmove(c->out, c->out + c->out_start, c->out_end - c->out_start);
		c->out_end -= c->out_start;
		c->out_start = 0;
	}
	c->pending_payload = payload;
	return c->out + c->out_end + PA_HEADER_SIZE + 1;
}

void conn_frame_commit(struct conn *c, uint8_t type, size_t payload)
{
	if (payload > c->pending_payload)
		abort(); /* a caller wrote past the space it asked for */
	put32(c->out + c->out_end, (uint32_t)(payload + 1));
	c->out[c->out_end + PA_HEADER_SIZE] = type;
	c->out_end += PA_HEADER_SIZE + 1 + payload;
	c->pending_payload = 0;
}

int conn_queue(struct conn *c, uint8_t type, const void *payload, size_t length)
{
	unsigned char *space = conn_frame_space(c, length);
	if (!space)
		return -1;
	if (length)
		memcpy(space, payload, length);
	conn_frame_commit(c, type, length);
	return 0;
}

int conn_flush_some(struct conn *c)
{
	while (c->out_start < c->out_end) {
		ssize_t n = send(c->fd, c->out + c->out_start, c->out_end - c->out_start, MSG_NOSIGNAL);
		if (n > 0) {
			c->out_start += (size_t)n;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return 0;
		return -1;
	}
	c->out_start = c->out_end = 0;
	return 0;
}

int conn_flush(struct conn *c, int timeout_ms)
{
	int64_t deadline = now_ms() + timeout_ms;
	for (;;) {
		if (conn_flush_some(c) < 0)
			return -1;
		if (!conn_pending(c))
			return 0;
		int64_t left = deadline - now_ms();
		if (left <= 0)
			return -1;
		struct pollfd p = {.fd = c->fd, .events = POLLOUT};
		if (poll(&p, 1, (int)left) < 0 && errno != EINTR)
			return -1;
	}
}

int conn_send(struct conn *c, uint8_t type, const void *payload, size_t length, int timeout_ms)
{
	if (conn_room(c) < PA_HEADER_SIZE + 1 + length && conn_flush(c, timeout_ms) < 0)
		return -1;
	if (conn_queue(c, type, payload, length) < 0)
		return -1;
	return conn_flush(c, timeout_ms);
}

int conn_send_ok_count(struct conn *c, uint64_t count)
{
	unsigned char p[8];
	put64(p, count);
	return conn_send(c, PA_OK, p, sizeof(p), PA_IO_IDLE_MS);
}

void conn_send_error(struct conn *c, unsigned kind, int err, const char *fmt, ...)
{
	unsigned char p[6 + 1024];
	put16(p, (uint16_t)kind);
	put32(p + 2, (uint32_t)err);
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf((char *)p + 6, sizeof(p) - 6, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if ((size_t)n > sizeof(p) - 7)
		n = (int)(sizeof(p) - 7); /* truncated: vsnprintf kept room for a NUL that is not sent */
	conn_send(c, PA_ERROR, p, 6 + (size_t)n, PA_IO_IDLE_MS);
}

void conn_finish(struct conn *c)
{
	if (c->fd < 0)
		return;
	conn_flush(c, PA_IO_IDLE_MS);
	shutdown(c->fd, SHUT_WR);
	/* discard what the host still sends, so that it reads our last frame instead of a connection reset */
	int64_t deadline = now_ms() + PA_LINGER_MS;
	for (;;) {
		char sink[4096];
		ssize_t n = recv(c->fd, sink, sizeof(sink), 0);
		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
			break;
		if (n > 0)
			continue;
		int64_t left = deadline - now_ms();
		if (left <= 0)
			break;
		struct pollfd p = {.fd = c->fd, .events = POLLIN};
		poll(&p, 1, (int)left);
	}
	close(c->fd);
	c->fd = -1;
}
