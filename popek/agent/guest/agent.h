/* popek guest agent: what its files share (framing in wire.c, requests in request.c, EXEC in exec.c, file
 * operations in files.c, REFRESH in refresh.c, the listener in popek-agent.c). The protocol is
 * docs/agent-protocol.md. */
#ifndef POPEK_AGENT_H
#define POPEK_AGENT_H

#include <stddef.h>
#include <stdint.h>

#include "protocol.h"

/* ---- one connection: a non-blocking socket, one buffer per direction ---------------------------------- */

#define PA_IN_CAPACITY (PA_HEADER_SIZE + PA_MAX_FRAME)
#define PA_OUT_CAPACITY (256u << 10)

struct conn {
	int fd;
	unsigned char *in; /* PA_IN_CAPACITY bytes: at most one frame and the start of the next */
	size_t in_start, in_end;
	unsigned char *out; /* PA_OUT_CAPACITY bytes of frames not yet sent */
	size_t out_start, out_end;
	size_t pending_payload; /* set between conn_frame_space and conn_frame_commit */
};

struct frame {
	uint8_t type;
	const unsigned char *payload; /* valid until the next conn_fill */
	size_t length;
};

enum fill_result { FILL_DATA = 1, FILL_AGAIN = 0, FILL_EOF = -1, FILL_ERROR = -2 };
enum take_result { TAKE_FRAME = 1, TAKE_MORE = 0, TAKE_BAD = -1 };
enum wait_result { WAIT_FRAME = 1, WAIT_GONE = 0, WAIT_BAD = -1 };

int conn_init(struct conn *c, int fd);
void conn_free(struct conn *c);
int conn_fill(struct conn *c);
int conn_take(struct conn *c, struct frame *f, char *why, size_t why_size);
int conn_wait_frame(struct conn *c, struct frame *f, int64_t deadline_ms, char *why, size_t why_size);
size_t conn_room(const struct conn *c);
int conn_pending(const struct conn *c);
unsigned char *conn_frame_space(struct conn *c, size_t payload);
void conn_frame_commit(struct conn *c, uint8_t type, size_t payload);
int conn_queue(struct conn *c, uint8_t type, const void *payload, size_t length);
int conn_flush_some(struct conn *c);
int conn_flush(struct conn *c, int timeout_ms);
int conn_send(struct conn *c, uint8_t type, const void *payload, size_t length, int timeout_ms);
int conn_send_ok_count(struct conn *c, uint64_t count);
void conn_send_error(struct conn *c, unsigned kind, int err, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
void conn_finish(struct conn *c);

/* ---- little-endian fields ----------------------------------------------------------------------------- */

uint16_t le16(const unsigned char *p);
uint32_t le32(const unsigned char *p);
uint64_t le64(const unsigned char *p);
void put16(unsigned char *p, uint16_t v);
void put32(unsigned char *p, uint32_t v);
void put64(unsigned char *p, uint64_t v);

int64_t now_ms(void);
int set_nonblocking(int fd, int on);

/* ---- requests ----------------------------------------------------------------------------------------- */

struct bytes {
	const unsigned char *p; /* into the request frame: not NUL-terminated */
	size_t n;
};

struct request {
	uint8_t type;
	struct bytes args[PA_MAX_ARGS];
	size_t nargs;
	struct bytes env[PA_MAX_ENV];
	size_t nenv;
	struct bytes shell, cwd, path;
	int has_shell, has_cwd, has_path, clear_env, use_stdin, has_pty, has_mode, has_length;
	uint64_t timeout_ms, offset, length;
	uint32_t kill_grace_ms, mode, flags;
	uint16_t rows, cols;
	struct bytes entropy; /* REFRESH: 1..PA_MAX_ENTROPY bytes */
	uint64_t time_ns;     /* REFRESH: the CLOCK_REALTIME to set, ns since the epoch */
	unsigned char mac_old[6], mac_new[6]; /* REFRESH: the interface with mac_old gets mac_new */
	int has_time_ns, has_entropy, has_mac;
};

/* 0, or an ERROR kind with why filled in */
unsigned parse_request(uint8_t type, const unsigned char *payload, size_t length, struct request *r, char *why,
		       size_t why_size);
char *dup_bytes(struct bytes b);

/* ---- operations (each ends the connection with conn_finish) ------------------------------------------- */

void handle_exec(struct conn *c, const struct request *r);
void handle_read(struct conn *c, const struct request *r);
void handle_write(struct conn *c, const struct request *r);
void handle_list(struct conn *c, const struct request *r);
void handle_stat(struct conn *c, const struct request *r);
void handle_remove(struct conn *c, const struct request *r);
void handle_mkdir(struct conn *c, const struct request *r);
void handle_refresh(struct conn *c, const struct request *r);

#endif
