"""A writer of the cpio "newc" (SVR4, no CRC) format, the one the Linux kernel unpacks as an initramfs.

Format (Documentation/driver-api/early-userspace/buffer-format.rst, and cpio(5)): each member is a 110-byte ASCII
header -- the magic ``070701`` and thirteen 8-digit hexadecimal fields (ino, mode, uid, gid, nlink, mtime,
filesize, devmajor, devminor, rdevmajor, rdevminor, namesize including the NUL, check) -- then the NUL-terminated
name padded to a multiple of 4 bytes, then the data (a symlink's data is its target) padded likewise. The archive
ends with a member named ``TRAILER!!!``.

popek writes the initramfs itself so building the default guest needs no ``cpio`` tool and comes out the same
byte for byte on every host (fixed owner and mtime, inode numbers in writing order).
"""

from __future__ import annotations

import stat
from typing import BinaryIO

MAGIC = b"070701"
HEADER_SIZE = 110
TRAILER = "TRAILER!!!"


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def _normalize(path: str) -> str:
    """The member name for path: relative (as gen_init_cpio and GNU cpio write them), '/'-separated, no '..'.

    The kernel would happily create '../x' relative to its root, which is the same as '/x', but a name like that
    in popek's own recipe is a bug to report, not a path to reinterpret.
    """
    name = path.strip("/")
    parts = name.split("/")
    if not name or any(part in ("", ".", "..") for part in parts) or "\0" in name:
        raise ValueError(f"cpio: {path!r} is not a plain absolute or relative path")
    return name


class NewcWriter:
    """Appends members to a newc archive; the directories leading to a member are added first if missing.

    The kernel's unpacker creates each member with a plain mkdir/open/symlink/mknod and does not create parent
    directories, so an archive whose "bin/sh" comes before "bin" would lose it. Adding parents here makes that
    mistake impossible instead of something every caller must remember.
    """

    def __init__(self, out: BinaryIO, *, mtime: int = 0, uid: int = 0, gid: int = 0) -> None:
        self._out = out
        self._mtime = mtime
        self._uid = uid
        self._gid = gid
        self._next_ino = 1
        self._offset = 0
        self._names: set[str] = set()
        self._directories: set[str] = set()
        self._closed = False

    def directory(self, path: str, mode: int = 0o755) -> None:
        name = _normalize(path)
        if name in self._directories:
            return
        self._member(name, stat.S_IFDIR | (mode & 0o7777), b"", nlink=2)
        self._directories.add(name)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._member(_normalize(path), stat.S_IFREG | (mode & 0o7777), data)

    def symlink(self, path: str, target: str) -> None:
        if not target or "\0" in target:
            raise ValueError(f"cpio: bad symlink target {target!r} for {path!r}")
        self._member(_normalize(path), stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._member(_normalize(path), stat.S_IFCHR | (mode & 0o7777), b"", rdev=(major, minor))

    def block_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._member(_normalize(path), stat.S_IFBLK | (mode & 0o7777), b"", rdev=(major, minor))

    def close(self) -> None:
        """Write the trailer; the stream itself stays open (it belongs to the caller)."""
        if self._closed:
            return
        self._write_header(TRAILER, ino=0, mode=0, nlink=1, size=0, rdev=(0, 0), mtime=0)
        self._closed = True

    @property
    def size(self) -> int:
        return self._offset

    def _member(self, name: str, mode: int, data: bytes, *, nlink: int = 1, rdev: tuple[int, int] = (0, 0)) -> None:
        if self._closed:
            raise ValueError("cpio: the archive is already closed")
        if name in self._names:
            raise ValueError(f"cpio: {name!r} is already in the archive")
        parent = name.rpartition("/")[0]
        if parent and parent not in self._directories:
            self.directory(parent)
        self._names.add(name)
        ino = self._next_ino
        self._next_ino += 1
        self._write_header(name, ino=ino, mode=mode, nlink=nlink, size=len(data), rdev=rdev, mtime=self._mtime)
        self._write(data + b"\0" * _pad4(len(data)))

    def _write_header(
        self, name: str, *, ino: int, mode: int, nlink: int, size: int, rdev: tuple[int, int], mtime: int
    ) -> None:
        encoded = name.encode() + b"\0"
        uid, gid = (self._uid, self._gid) if ino else (0, 0)
        fields = (ino, mode, uid, gid, nlink, mtime, size, 0, 0, rdev[0], rdev[1], len(encoded), 0)
        for value in fields:
            if not 0 <= value <= 0xFFFFFFFF:
                raise ValueError(f"cpio: {name!r}: a header field ({value}) does not fit in 32 bits")
        header = MAGIC + b"".join(b"%08X" % value for value in fields)
        self._write(header + encoded + b"\0" * _pad4(HEADER_SIZE + len(encoded)))

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._offset += len(data)
