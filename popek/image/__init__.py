"""popek's default guest: a Linux kernel and a busybox initramfs that popek builds itself from Debian packages.

``popek run`` boots it to a shell, ``popek run -- CMD`` to run CMD once and return its output and exit status.
The recipe and the cache are in build.py, the guest <-> host protocol (kernel parameter in, console markers out)
in protocol.py, the initramfs in initramfs.py and cpio.py, the kernel config check in kconfig.py, and the Debian
root disk (``--image debian``) in rootfs.py.
"""

from __future__ import annotations

from popek.image.build import (
    GuestImage,
    cache_dir,
    cached_default_guest,
    ensure_default_guest,
    image_info,
)
from popek.image.errors import ImageError
from popek.image.protocol import (
    BASE_CMDLINE,
    COMMAND_LINE_SIZE,
    EXIT_STATUS_PREFIX,
    READY_MARKER,
    command_parameter,
    parse_exit_status,
)

__all__ = [
    "BASE_CMDLINE",
    "COMMAND_LINE_SIZE",
    "EXIT_STATUS_PREFIX",
    "READY_MARKER",
    "GuestImage",
    "ImageError",
    "cache_dir",
    "cached_default_guest",
    "command_parameter",
    "ensure_default_guest",
    "image_info",
    "parse_exit_status",
]
