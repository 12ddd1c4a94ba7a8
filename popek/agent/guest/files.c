/* File operations (docs/agent-protocol.md, "READ" to "MKDIR"). Each waits at most PA_IO_IDLE_MS for the host
 * (for its next frame, or for room to send one); a host that does not keep up is taken for gone. The
 * connection's process runs with umask 0, so MODE is what a file or directory gets. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"

static void os_error(struct conn *c, int err, const char *what, const char *path)
{
	conn_send_error(c, PA_ERR_OS, err, "cannot %s '%s': %s", what, path, strerror(err));
	conn_finish(c);
}

static void put_record(unsigned char *p, const struct stat *st)
{
	put32(p, (uint32_t)st->st_mode);
	put32(p + 4, (uint32_t)st->st_uid);
	put32(p + 8, (uint32_t)st->st_gid);
	put64(p + 12, (uint64_t)st->st_size);
	put64(p + 20, (uint64_t)((int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec));
}

/* an output buffer with room for payload bytes, flushing (with the idle limit) until there is; NULL: gone */
static unsigned char *space_for(struct conn *c, size_t payload)
{
	unsigned char *space;
	while (!(space = conn_frame_space(c, payload)))
		if (conn_flush(c, PA_IO_IDLE_MS) < 0)
			return NULL;
	return space;
}

/* directories, FIFOs and sockets are not files to transfer (a FIFO could block the transfer forever) */
static int refuse_special(struct conn *c, const struct stat *st, const char *verb, const char *path)
{
	if (S_ISDIR(st->st_mode)) {
		os_error(c, EISDIR, verb, path);
		return 1;
	}
	if (S_ISFIFO(st->st_mode) || S_ISSOCK(st->st_mode)) {
		conn_send_error(c, PA_ERR_OS, EINVAL, "cannot %s '%s': it is a FIFO or a socket", verb, path);
		conn_finish(c);
		return 1;
	}
	return 0;
}

void handle_read(struct conn *c, const struct request *r)
{
	char *path = dup_bytes(r->path);
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0) {
		os_error(c, errno, "open", path);
		goto out;
	}
	if (refuse_special(c, &st, "read", path))
		goto out;
	set_nonblocking(fd, 0);
	int seekable = S_ISREG(st.st_mode);
	if (r->offset && !seekable) {
		os_error(c, ESPIPE, "read at an offset in", path);
		goto out;
	}
	uint64_t left = r->has_length ? r->length : UINT64_MAX, offset = r->offset, total = 0;
	while (left) {
		size_t want = left < PA_CHUNK ? (size_t)left : PA_CHUNK;
		unsigned char *space = space_for(c, want);
		if (!space)
			goto gone;
		ssize_t n = seekable ? pread(fd, space, want, (off_t)offset) : read(fd, space, want);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			os_error(c, errno, "read", path);
			goto out;
		}
		if (n == 0)
			break;
		conn_frame_commit(c, PA_DATA, (size_t)n);
		offset += (uint64_t)n;
		total += (uint64_t)n;
		left -= (uint64_t)n;
		if (conn_flush_some(c) < 0)
			goto gone;
	}
	if (conn_send_ok_count(c, total) < 0)
		goto gone;
	conn_finish(c);
	goto out;
gone:
	conn_free(c);
out:
	if (fd >= 0)
		close(fd);
	free(path);
}

static int write_all(int fd, const unsigned char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			return -1;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

static void sync_parent(const char *path)
{
	char *dir = strdup(path);
	if (!dir)
		return;
	char *slash = strrchr(dir, '/');
	const char *name = slash ? (slash == dir ? "/" : (*slash = 0, dir)) : ".";
	int fd = open(name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd >= 0) {
		fsync(fd);
		close(fd);
	}
	free(dir);
}

void handle_write(struct conn *c, const struct request *r)
{
	char why[256];
	char *path = dup_bytes(r->path);
	int flags = O_WRONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK;
	if (r->flags & PA_WRITE_CREATE)
		flags |= O_CREAT;
	if (r->flags & PA_WRITE_TRUNCATE)
		flags |= O_TRUNC;
	if (r->flags & PA_WRITE_APPEND)
		flags |= O_APPEND;
	if (r->flags & PA_WRITE_EXCLUSIVE)
		flags |= O_EXCL;
	mode_t mode = r->has_mode ? (mode_t)r->mode : PA_DEFAULT_FILE_MODE;
	int fd = open(path, flags, mode);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0) {
		os_error(c, errno, "open", path);
		goto out;
	}
	if (refuse_special(c, &st, "write", path))
		goto out;
	set_nonblocking(fd, 0);
	if (r->has_mode && S_ISREG(st.st_mode) && fchmod(fd, mode) < 0) {
		os_error(c, errno, "set the mode of", path);
		goto out;
	}
	if (conn_send(c, PA_OK, NULL, 0, PA_IO_IDLE_MS) < 0)
		goto gone;
	uint64_t total = 0;
	for (;;) {
		struct frame f;
		int got = conn_wait_frame(c, &f, now_ms() + PA_IO_IDLE_MS, why, sizeof(why));
		if (got == WAIT_GONE)
			goto gone;
		if (got == WAIT_BAD) {
			conn_send_error(c, PA_ERR_PROTOCOL, 0, "%s", why);
			conn_finish(c);
			goto out;
		}
		if (f.type == PA_DATA_END)
			break;
		if (f.type != PA_DATA) {
			conn_send_error(c, PA_ERR_PROTOCOL, 0, "frame type %#x is not expected during WRITE", f.type);
			conn_finish(c);
			goto out;
		}
		if (write_all(fd, f.payload, f.length) < 0) {
			os_error(c, errno, "write", path);
			goto out;
		}
		total += f.length;
	}
	if (fsync(fd) < 0 && errno != EINVAL) { /* EINVAL: a character device, nothing to sync */
		os_error(c, errno, "fsync", path);
		goto out;
	}
	int closed = close(fd);
	fd = -1;
	if (closed < 0) {
		os_error(c, errno, "close", path);
		goto out;
	}
	if (flags & O_CREAT)
		sync_parent(path);
	if (conn_send_ok_count(c, total) < 0)
		goto gone;
	conn_finish(c);
	goto out;
gone:
	conn_free(c);
out:
	if (fd >= 0)
		close(fd);
	free(path);
}

void handle_list(struct conn *c, const struct request *r)
{
	char *path = dup_bytes(r->path);
	int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
	if (!d) {
		os_error(c, errno, "list", path);
		if (fd >= 0)
			close(fd);
		free(path);
		return;
	}
	uint64_t count = 0;
	unsigned char *space = NULL;
	size_t used = 0;
	struct dirent *e;
	for (;;) {
		errno = 0;
		if (!(e = readdir(d)))
			break;
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		size_t name = strlen(e->d_name);
		struct stat st;
		if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
			if (errno == ENOENT)
				continue; /* removed while we list */
			memset(&st, 0, sizeof(st));
			st.st_mode = DTTOIF(e->d_type);
		}
		size_t need = PA_FILE_RECORD_SIZE + 2 + name;
		if (space && used + need > PA_CHUNK) {
			conn_frame_commit(c, PA_ENTRIES, used);
			space = NULL;
			if (conn_flush_some(c) < 0)
				goto gone;
		}
		if (!space) {
			if (!(space = space_for(c, PA_CHUNK)))
				goto gone;
			used = 0;
		}
		put_record(space + used, &st);
		put16(space + used + PA_FILE_RECORD_SIZE, (uint16_t)name);
		memcpy(space + used + PA_FILE_RECORD_SIZE + 2, e->d_name, name);
		used += need;
		count++;
	}
	int err = errno;
	if (space)
		conn_frame_commit(c, PA_ENTRIES, used);
	if (err) {
		os_error(c, err, "list", path);
		goto out;
	}
	if (conn_send_ok_count(c, count) < 0)
		goto gone;
	conn_finish(c);
	goto out;
gone:
	conn_free(c);
out:
	closedir(d);
	free(path);
}

void handle_stat(struct conn *c, const struct request *r)
{
	char *path = dup_bytes(r->path);
	struct stat st;
	int failed = (r->flags & PA_STAT_NOFOLLOW) ? lstat(path, &st) : stat(path, &st);
	if (failed < 0) {
		os_error(c, errno, "stat", path);
		free(path);
		return;
	}
	unsigned char record[PA_FILE_RECORD_SIZE];
	put_record(record, &st);
	if (conn_queue(c, PA_INFO, record, sizeof(record)) == 0 && conn_send(c, PA_OK, NULL, 0, PA_IO_IDLE_MS) == 0)
		conn_finish(c);
	else
		conn_free(c);
	free(path);
}

/* "a/b" -> where = name + "/" + where, for the message naming the entry that could not be removed */
static void prepend(char *where, size_t size, const char *name)
{
	size_t have = strlen(where), add = strlen(name) + (have ? 1 : 0);
	if (have + add + 1 > size)
		return;
	memmove(where + add, where, have + 1);
	memcpy(where, name, strlen(name));
	if (have)
		where[add - 1] = '/';
}

/* removes parent/name and all below it without following symlinks; 0 or an errno, where naming the entry */
static int remove_tree(int parent, const char *name, int depth, char *where, size_t size)
{
	if (depth >= PA_MAX_REMOVE_DEPTH) {
		prepend(where, size, name);
		return ELOOP;
	}
	int fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
	if (!d) {
		int err = errno;
		if (fd >= 0)
			close(fd);
		if (err == ENOTDIR || err == ELOOP) /* replaced by a file or symlink meanwhile */
			err = unlinkat(parent, name, 0) < 0 ? errno : 0;
		if (err && err != ENOENT)
			prepend(where, size, name);
		return err == ENOENT ? 0 : err;
	}
	for (int attempt = 0;; attempt++) {
		struct dirent *e;
		while ((e = readdir(d))) {
			if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
				continue;
			int is_dir = e->d_type == DT_DIR;
			if (e->d_type == DT_UNKNOWN) {
				struct stat st;
				is_dir = fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode);
			}
			int err = is_dir ? remove_tree(dirfd(d), e->d_name, depth + 1, where, size)
					 : unlinkat(dirfd(d), e->d_name, 0) < 0 ? errno : 0;
			if (err && err != ENOENT) {
				if (!is_dir)
					prepend(where, size, e->d_name);
				prepend(where, size, name);
				closedir(d);
				return err;
			}
		}
		if (unlinkat(parent, name, AT_REMOVEDIR) == 0 || errno == ENOENT)
			break;
		if (errno != ENOTEMPTY || attempt > 0) { /* ENOTEMPTY once: entries created while we listed */
			int err = errno;
			prepend(where, size, name);
			closedir(d);
			return err;
		}
		rewinddir(d);
	}
	closedir(d);
	return 0;
}

void handle_remove(struct conn *c, const struct request *r)
{
	char *path = dup_bytes(r->path);
	struct stat st, root;
	if (lstat(path, &st) < 0) {
		os_error(c, errno, "remove", path);
	} else if (S_ISDIR(st.st_mode) && stat("/", &root) == 0 && st.st_dev == root.st_dev &&
		   st.st_ino == root.st_ino) {
		os_error(c, EPERM, "remove the root directory", path);
	} else if (!S_ISDIR(st.st_mode)) {
		if (unlink(path) < 0)
			os_error(c, errno, "remove", path);
		else if (conn_send(c, PA_OK, NULL, 0, PA_IO_IDLE_MS) == 0)
			conn_finish(c);
	} else if (!(r->flags & PA_REMOVE_RECURSIVE)) {
		if (rmdir(path) < 0)
			os_error(c, errno, "remove", path);
		else if (conn_send(c, PA_OK, NULL, 0, PA_IO_IDLE_MS) == 0)
			conn_finish(c);
	} else {
		char where[PA_MAX_PATH + 1] = "";
		int err = remove_tree(AT_FDCWD, path, 0, where, sizeof(where));
		if (err)
			os_error(c, err, "remove", where[0] ? where : path);
		else if (conn_send(c, PA_OK, NULL, 0, PA_IO_IDLE_MS) == 0)
			conn_finish(c);
	}
	free(path);
}

void handle_mkdir(struct conn *c, const struct request *r)
{
	char *path = dup_bytes(r->path);
	mode_t mode = r->has_mode ? (mode_t)r->mode : PA_DEFAULT_DIR_MODE;
	if (r->flags & PA_MKDIR_PARENTS) {
		for (char *s = path + 1; *s; s++) {
			if (*s != '/')
				continue;
			*s = 0;
			int failed = mkdir(path, PA_DEFAULT_DIR_MODE) < 0 && errno != EEXIST;
			int err = errno;
			*s = '/';
			if (failed) {
				os_error(c, err, "create the directory", path);
				goto out;
			}
		}
	}
	if (mkdir(path, mode) < 0) {
		struct stat st;
		int err = errno;
		if (!(err == EEXIST && (r->flags & PA_MKDIR_PARENTS) && stat(path, &st) == 0 && S_ISDIR(st.st_mode))) {
			os_error(c, err, "create the directory", path);
			goto out;
		}
	}
	if (conn_send(c, PA_OK, NULL, 0, PA_IO_IDLE_MS) == 0)
		conn_finish(c);
out:
	free(path);
}
