"""The newc writer, read back by an independent reader written from cpio(5) and by GNU cpio where installed."""

from __future__ import annotations

import io
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from popek.image.cpio import NewcWriter
from popek.image.initramfs import busybox_applets, write_initramfs


@dataclass
class Member:
    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    data: bytes
    rdev: tuple[int, int]


def read_newc(archive: bytes) -> list[Member]:
    """Every member up to the trailer; asserts the format's alignment rules on the way."""
    members: list[Member] = []
    pos = 0
    while True:
        assert pos % 4 == 0
        header = archive[pos : pos + 110]
        assert header[:6] == b"070701", f"bad magic at {pos}"
        f = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size, _maj, _min, rmaj, rmin, namesize, check = f
        assert check == 0
        name_end = pos + 110 + namesize
        assert archive[name_end - 1] == 0, "name not NUL-terminated"
        name = archive[pos + 110 : name_end - 1].decode()
        data_start = (name_end + 3) & ~3
        assert archive[name_end:data_start] == b"\0" * (data_start - name_end)
        data = archive[data_start : data_start + size]
        pos = (data_start + size + 3) & ~3
        if name == "TRAILER!!!":
            assert size == 0
            assert pos == len(archive)
            return members
        members.append(Member(name, ino, mode, uid, gid, nlink, mtime, data, (rmaj, rmin)))


def sample_archive() -> bytes:
    out = io.BytesIO()
    writer = NewcWriter(out, mtime=1234)
    writer.directory("/tmp", 0o1777)
    writer.file("/etc/hosts", b"127.0.0.1 localhost\n", 0o644)  # parent etc/ comes first, made on the way
    writer.file("init", b"#!/bin/sh\n", 0o755)
    writer.file("empty", b"", 0o600)
    writer.symlink("bin/sh", "/bin/busybox")
    writer.char_device("dev/console", 5, 1)
    writer.char_device("dev/null", 1, 3, 0o666)
    writer.block_device("dev/vda", 254, 0, 0o660)
    writer.close()
    assert writer.size == len(out.getvalue())
    return out.getvalue()


def test_round_trip() -> None:
    members = {m.name: m for m in read_newc(sample_archive())}
    assert list(members) == ["tmp", "etc", "etc/hosts", "init", "empty", "bin", "bin/sh", "dev", "dev/console",
                             "dev/null", "dev/vda"]  # fmt: skip
    assert members["tmp"].mode == stat.S_IFDIR | 0o1777
    assert members["etc"].mode == stat.S_IFDIR | 0o755
    assert members["etc/hosts"].data == b"127.0.0.1 localhost\n"
    assert members["etc/hosts"].mode == stat.S_IFREG | 0o644
    assert members["init"].mode == stat.S_IFREG | 0o755
    assert members["empty"].data == b""
    assert members["bin/sh"].mode == stat.S_IFLNK | 0o777
    assert members["bin/sh"].data == b"/bin/busybox"
    assert members["dev/console"].mode == stat.S_IFCHR | 0o600
    assert members["dev/console"].rdev == (5, 1)
    assert members["dev/null"].rdev == (1, 3)
    assert members["dev/vda"].mode == stat.S_IFBLK | 0o660
    assert {m.mtime for m in members.values()} == {1234}
    assert {(m.uid, m.gid) for m in members.values()} == {(0, 0)}
    assert len({m.ino for m in members.values()}) == len(members)


def test_same_input_same_bytes() -> None:
    assert sample_archive() == sample_archive()


@pytest.mark.parametrize("path", ["", "/", "a/../b", "a//b", "./a", "a/\0"])
def test_bad_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError):
        NewcWriter(io.BytesIO()).file(path, b"")


def test_duplicates_and_writes_after_close_are_refused() -> None:
    writer = NewcWriter(io.BytesIO())
    writer.file("a", b"1")
    with pytest.raises(ValueError):
        writer.symlink("a", "b")
    writer.directory("d")
    writer.directory("d")  # the same directory twice is harmless: parents are added implicitly anyway
    writer.close()
    with pytest.raises(ValueError):
        writer.file("b", b"")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio is not installed (apt-get install cpio)")
def test_gnu_cpio_reads_it(tmp_path: Path) -> None:
    archive = sample_archive()
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=archive, capture_output=True, check=True).stdout
    assert listing.decode().split() == [m.name for m in read_newc(archive)]
    verbose = subprocess.run(["cpio", "-itv", "--quiet"], input=archive, capture_output=True, check=True).stdout
    lines = {line.split()[-1]: line for line in verbose.decode().splitlines()}
    assert lines["dev/console"].startswith("crw-------")
    assert "5,   1" in lines["dev/console"] or "5, 1" in lines["dev/console"]
    assert lines["tmp"].startswith("drwxrwxrwt")
    assert "bin/sh -> /bin/busybox" in verbose.decode()
    # and GNU cpio extracts the file contents we wrote (devices need no root to list, only to create: skip them)
    subprocess.run(
        ["cpio", "-id", "--quiet", "--no-absolute-filenames", "etc/hosts", "init"],
        input=archive,
        cwd=tmp_path,
        check=True,
    )
    assert (tmp_path / "etc/hosts").read_bytes() == b"127.0.0.1 localhost\n"
    assert (tmp_path / "init").stat().st_mode & 0o777 == 0o755


BUSYBOX = Path("/bin/busybox")


@pytest.mark.skipif(not BUSYBOX.is_file(), reason="busybox-static is not installed")
def test_initramfs_has_busybox_every_applet_and_init() -> None:
    applets = busybox_applets(BUSYBOX)
    assert "bin/sh" in applets and "sbin/reboot" in applets and "bin/busybox" not in applets
    out = io.BytesIO()
    write_initramfs(out, busybox=BUSYBOX.read_bytes(), applets=applets, init=b"#!/bin/busybox sh\n")
    members = {m.name: m for m in read_newc(out.getvalue())}
    assert members["bin/busybox"].data == BUSYBOX.read_bytes()
    assert members["bin/busybox"].mode == stat.S_IFREG | 0o755
    assert members["init"].mode == stat.S_IFREG | 0o755
    assert members["dev/console"].rdev == (5, 1)
    assert members["dev/null"].rdev == (1, 3)
    for applet in applets:
        assert members[applet].data == b"/bin/busybox", applet
    for directory in ("proc", "sys", "dev", "tmp", "run", "root", "usr/bin", "usr/sbin"):
        assert stat.S_ISDIR(members[directory].mode), directory
    # every member's parent precedes it: the kernel's unpacker does not create directories on its own
    seen: set[str] = set()
    for member in read_newc(out.getvalue()):
        parent = member.name.rpartition("/")[0]
        assert not parent or parent in seen, member.name
        seen.add(member.name)
