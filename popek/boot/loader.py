"""Kernel format detection and the shared parts of loading: command line, initrd placement, MP table.

Formats, tried in this order, by content rather than by file name:
- Linux bzImage (Documentation/x86/boot.rst), entered through the 64-bit boot protocol;
- ELF with a PVH entry note (xen/include/public/arch-x86/hvm/start_info.h, "x86/HVM direct boot ABI");
- Multiboot v1 (the Multiboot Specification 0.6.96), as QEMU's -kernel accepts it;
- a 512-byte boot sector (0x55AA signature), entered in real mode at 0000:7C00 as a BIOS would.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from popek.boot import layout
from popek.boot.entry import EntryState
from popek.boot.plan import BootPlan
from popek.errors import BootError
from popek.memory import GuestMemory


@dataclass
class BootImage:
    """What was loaded, and the state the boot vCPU starts in."""

    format: str
    entry: EntryState
    kernel_start: int
    kernel_end: int
    initrd: tuple[int, int] | None = None  # (gpa, size)
    cmdline: bytes = b""


def encode_cmdline(cmdline: str | bytes) -> bytes:
    """The bytes of a command line: a str from argv carries undecodable bytes as surrogate escapes (PEP 383), and
    they go to the guest as they were typed, as QEMU passes -append through; NUL cannot be carried."""
    if isinstance(cmdline, str):
        try:
            cmdline = cmdline.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise BootError("the kernel command line has characters that are not bytes (lone surrogates)") from None
    if b"\0" in cmdline:
        raise BootError("the kernel command line contains a NUL byte")
    return cmdline


def write_cmdline(plan: BootPlan, cmdline: str | bytes, limit: int = layout.CMDLINE_MAX) -> tuple[int, bytes]:
    raw = encode_cmdline(cmdline)
    if len(raw) + 1 > limit:
        raise BootError(f"the kernel command line is {len(raw)} bytes; this kernel accepts at most {limit - 1}")
    plan.claim(layout.CMDLINE_ADDR, len(raw) + 1, "the kernel command line", popeks=True)
    plan.mem.write(layout.CMDLINE_ADDR, raw + b"\0")
    return layout.CMDLINE_ADDR, raw


def place_initrd(plan: BootPlan, data: bytes, lowest: int, highest: int) -> tuple[int, int]:
    """Put the initrd as high as allowed (below `highest`, exclusive), page-aligned, above `lowest`, clear of
    everything else the boot placed."""
    if len(data) == 0:
        raise BootError("the initrd is empty")
    addr = plan.place_high(len(data), lowest, highest, "the initrd")
    plan.mem.write(addr, data)
    return addr, len(data)


def read_file(path: str | os.PathLike[str], what: str, limit: int) -> bytes:
    """The contents of a regular file of at most `limit` bytes, checked before anything is read.

    The file is opened non-blocking (a FIFO without a writer must not hang popek) and its size taken from fstat,
    so /dev/zero, a FIFO or a sparse file larger than the guest is refused without reading it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BootError(f"{what} {os.fsdecode(path)} does not exist") from None
    except OSError as e:
        raise BootError(f"cannot open {what} {os.fsdecode(path)}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise BootError(f"{what} {os.fsdecode(path)} is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise BootError(f"{what} {os.fsdecode(path)} is not a regular file (a device, FIFO or socket)")
        if st.st_size > limit:
            raise BootError(
                f"{what} {os.fsdecode(path)} ({st.st_size} bytes) is larger than guest memory ({limit} bytes)"
            )
        chunks = []
        remaining = st.st_size + 1  # one byte more tells a file that grew while being read
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
        if len(data) > st.st_size:
            raise BootError(f"{what} {os.fsdecode(path)} grew while popek was reading it")
        return data
    except OSError as e:
        raise BootError(f"cannot read {what} {os.fsdecode(path)}: {e.strerror}") from None
    finally:
        os.close(fd)


@dataclass(frozen=True)
class BootFiles:
    """The names the kernel and initrd were given on popek's command line: Multiboot passes them to the guest
    (QEMU's loader starts the kernel's command line with its file name, and names module 0 after the initrd)."""

    kernel: str | bytes = b""
    initrd: str | bytes = b""

    def kernel_name(self) -> bytes:
        return os.fsencode(self.kernel)

    def initrd_name(self) -> bytes:
        return os.fsencode(self.initrd)


NO_FILES = BootFiles()


def load_kernel(
    mem: GuestMemory,
    kernel: bytes,
    cmdline: str | bytes = "",
    initrd: bytes | None = None,
    files: BootFiles = NO_FILES,
) -> BootImage:
    """Load `kernel` in whichever supported format it is; raise BootError naming what is wrong otherwise."""
    from popek.boot import bootsector, bzimage, elf, multiboot

    if bzimage.is_bzimage(kernel):
        return bzimage.load(mem, kernel, cmdline, initrd)
    if elf.is_elf(kernel):
        if elf.pvh_entry(kernel) is not None:
            return elf.load_pvh(mem, kernel, cmdline, initrd)
        if multiboot.find_header(kernel) is not None:
            return multiboot.load(mem, kernel, cmdline, initrd, files)
        raise BootError("the ELF kernel has neither a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) nor a Multiboot header")
    if multiboot.find_header(kernel) is not None:
        return multiboot.load(mem, kernel, cmdline, initrd, files)
    if bootsector.is_boot_sector(kernel):
        return bootsector.load(mem, kernel, cmdline, initrd)
    if kernel[:2] == b"MZ" and len(kernel) >= 0x206 and kernel[0x202:0x206] != b"HdrS":
        raise BootError("the kernel is a PE/EFI image without a Linux boot header")
    raise BootError(
        "not a kernel popek can boot: expected a Linux bzImage, an ELF with a PVH note, a Multiboot kernel, "
        "or a 512-byte boot sector"
    )
