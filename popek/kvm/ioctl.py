"""The Linux ioctl request encoding (include/uapi/asm-generic/ioctl.h).

Request numbers are computed from the argument's ctypes type, as the kernel's own `_IOW(type, nr, struct)`
macros do, so a struct that changes size changes its request number with it instead of silently mismatching.
"""

from __future__ import annotations

import ctypes

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2

CType = type[ctypes._SimpleCData] | type[ctypes.Structure] | type[ctypes.Array]  # type: ignore[type-arg]


TERMINAL_IOCTL_TYPE = ord("T")  # <asm-generic/ioctls.h> TCGETS..., FIONBIO, FIOCLEX; <linux/if_tun.h> TUNSETIFF
IOC_TYPE_MASK = ((1 << _IOC_TYPEBITS) - 1) << _IOC_TYPESHIFT  # where a request number keeps its type byte


def type_field(type_: int) -> int:
    """A request number's bits for ioctl type type_ (a seccomp filter matches requests by them: popek.jail)."""
    return type_ << _IOC_TYPESHIFT


def IOC(direction: int, type_: int, nr: int, size: int) -> int:
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit the request encoding")
    return (direction << _IOC_DIRSHIFT) | (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def IO(type_: int, nr: int) -> int:
    return IOC(IOC_NONE, type_, nr, 0)


def IOR(type_: int, nr: int, arg: CType) -> int:
    return IOC(IOC_READ, type_, nr, ctypes.sizeof(arg))


def IOW(type_: int, nr: int, arg: CType) -> int:
    return IOC(IOC_WRITE, type_, nr, ctypes.sizeof(arg))


def IOWR(type_: int, nr: int, arg: CType) -> int:
    return IOC(IOC_READ | IOC_WRITE, type_, nr, ctypes.sizeof(arg))
