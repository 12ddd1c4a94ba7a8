"""The default guest's initramfs: Debian's static busybox, one symlink per applet, popek's guest agent
(/sbin/popek-agent, popek/agent/) and popek's /init, as an uncompressed newc cpio (see cpio.py; the kernel config
has BLK_DEV_INITRD and no decompressor is needed).

The symlinks are written here rather than by ``busybox --install -s`` at boot: a few hundred symlink() calls in
the guest are a few hundred system calls the guest kernel would run, possibly emulated; in the archive they cost
nothing at boot.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from popek.image.cpio import NewcWriter
from popek.image.errors import ImageError

BUSYBOX_PATH = "bin/busybox"
AGENT_PATH = "sbin/popek-agent"  # the init script starts it by this path

# linuxrc is busybox's init for old initrd images; this initramfs has its own /init
_SKIPPED_APPLETS = {BUSYBOX_PATH, "linuxrc"}

_DIRECTORIES = (
    ("bin", 0o755),
    ("sbin", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("etc", 0o755),
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("root", 0o700),
    ("mnt", 0o755),
    ("var", 0o755),
)

# Just enough for `id`, `ls -l` and the shell to name root instead of printing numbers.
_ETC_FILES = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": b"root:x:0:\n",
}


def busybox_applets(busybox: Path) -> list[str]:
    """The applet paths the busybox binary itself lists (``bin/ls``, ``usr/bin/awk``...), minus busybox itself.

    Asking the binary keeps the links in step with whatever applets Debian's build enabled.
    """
    try:
        listed = subprocess.run(
            [str(busybox), "--list-full"], check=True, capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ImageError(f"cannot list the applets of {busybox}: {exc}") from exc
    applets = []
    for line in listed.splitlines():
        path = line.strip().strip("/")
        if path and path not in _SKIPPED_APPLETS:
            applets.append(path)
    if not applets:
        raise ImageError(f"{busybox} --list-full listed no applets: is it Debian's busybox-static?")
    return sorted(set(applets))


def write_initramfs(
    out: BinaryIO, *, busybox: bytes, applets: Iterable[str], init: bytes, agent: bytes | None = None
) -> int:
    """Write the whole archive to out; returns its size. Deterministic: same inputs, same bytes."""
    writer = NewcWriter(out)
    for path, mode in _DIRECTORIES:
        writer.directory(path, mode)
    writer.char_device("dev/console", 5, 1, 0o600)
    writer.char_device("dev/null", 1, 3, 0o666)
    for path, data in _ETC_FILES.items():
        writer.file(path, data, 0o644)
    writer.file(BUSYBOX_PATH, busybox, 0o755)
    for applet in applets:
        writer.symlink(applet, "/" + BUSYBOX_PATH)
    if agent is not None:
        writer.file(AGENT_PATH, agent, 0o755)
    writer.file("init", init, 0o755)
    writer.close()
    return writer.size
