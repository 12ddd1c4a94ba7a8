"""TAP devices, the kernel's virtual Ethernet link to the host stack (Documentation/networking/tuntap.rst): opening
/dev/net/tun and attaching the fd to an interface with TUNSETIFF.

The flags are IFF_TAP (Ethernet frames, not IP packets) and IFF_NO_PI (no 4-byte packet-information prefix), so
one read(2) returns one whole frame and one write(2) sends one; no IFF_VNET_HDR, since popek's virtio-net offers
no offloads and strips the virtio header itself. The fd is non-blocking: a frame the host cannot take is dropped,
as a NIC drops on a full queue.

The request number is computed as <linux/if_tun.h> defines it, `_IOW('T', 202, int)`, and `struct ifreq` keeps
<linux/if.h>'s layout: a name of IFNAMSIZ bytes and a 24-byte union, of which TUNSETIFF reads `ifr_flags`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

from popek.errors import ConfigError
from popek.kvm.ioctl import IOW

IFNAMSIZ = 16
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
TUN_DEVICE = "/dev/net/tun"


class ifreq(ctypes.Structure):  # the kernel's name and layout
    _fields_ = [("ifr_name", ctypes.c_char * IFNAMSIZ), ("ifr_flags", ctypes.c_short), ("_union", ctypes.c_byte * 22)]


assert ctypes.sizeof(ifreq) == 40  # struct ifreq on x86-64

TUNSETIFF = IOW(ord("T"), 202, ctypes.c_int)


def valid_interface_name(name: str) -> bool:
    """What the kernel's dev_valid_name() accepts: 1 to IFNAMSIZ-1 bytes, not "." or "..", no '/', ':' or space."""
    raw = name.encode("utf-8", "surrogateescape")
    return (
        0 < len(raw) < IFNAMSIZ
        and name not in (".", "..")
        and not any(c in "/:" or c.isspace() for c in name)
        and name.isprintable()
    )


def open_tap(name: str) -> int:
    """A non-blocking fd attached to TAP interface `name` (created if it does not exist and the caller may)."""
    if not valid_interface_name(name):
        raise ConfigError(f"tap {name!r} is not a valid interface name (1-15 characters, no '/', ':' or spaces)")
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"tap {name}: {TUN_DEVICE} does not exist (the host kernel needs the tun module)") from None
    except OSError as e:
        raise ConfigError(f"tap {name}: cannot open {TUN_DEVICE}: {e.strerror}") from None
    request = ifreq(name.encode(), IFF_TAP | IFF_NO_PI)
    try:
        fcntl.ioctl(fd, TUNSETIFF, request)
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EPERM:
            raise ConfigError(
                f"tap {name}: not permitted (creating a TAP device needs CAP_NET_ADMIN; or let root create it for "
                f"you: ip tuntap add {name} mode tap user $USER)"
            ) from None
        if e.errno == errno.EBUSY:
            raise ConfigError(f"tap {name}: the interface is in use by another program") from None
        if e.errno == errno.EINVAL:
            raise ConfigError(f"tap {name}: an interface of that name exists and is not a TAP device") from None
        raise ConfigError(f"tap {name}: TUNSETIFF failed: {e.strerror}") from None
    return fd
