"""Host file I/O that devices do on the guest's behalf: complete vectored reads and writes into and out of guest
memory views (preadv(2)/pwritev(2), which may transfer less than asked), and hole punching (fallocate(2) with
FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE), which Python's `os` module does not expose."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
ZERO_CHUNK = 1 << 20  # the most host memory a zero fill takes at once

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def advance_views(views: list[memoryview], done: int) -> list[memoryview]:
    """The views left after the first `done` bytes have been transferred."""
    while views and done >= len(views[0]):
        done -= len(views[0])
        views = views[1:]
    if views and done:
        views = [views[0][done:], *views[1:]]
    return views


def preadv_all(fd: int, views: Sequence[memoryview], offset: int) -> None:
    """Fill every view from the file at `offset`; EOF before the end is an OSError (EIO)."""
    pending = [v for v in views if len(v)]
    while pending:
        got = os.preadv(fd, pending, offset)
        if got == 0:
            raise OSError(errno.EIO, "unexpected end of file")
        offset += got
        pending = advance_views(pending, got)


def pwritev_all(fd: int, views: Sequence[memoryview], offset: int) -> None:
    """Write every view to the file at `offset`."""
    pending = [v for v in views if len(v)]
    while pending:
        done = os.pwritev(fd, pending, offset)
        if done == 0:
            raise OSError(errno.EIO, "the file took no bytes")
        offset += done
        pending = advance_views(pending, done)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate `length` bytes at `offset`, keeping the file size: later reads return zeros."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def write_zeroes(fd: int, offset: int, length: int) -> None:
    """Zero `length` bytes at `offset`: a hole where the file system can punch one, zeros written otherwise."""
    try:
        punch_hole(fd, offset, length)
        return
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    zeros = memoryview(bytes(min(length, ZERO_CHUNK)))
    while length:
        n = min(length, len(zeros))
        pwritev_all(fd, [zeros[:n]], offset)
        offset += n
        length -= n
