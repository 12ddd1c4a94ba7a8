"""Kernel format detection and the shared parts of loading: command line, initrd placement, MP table.

Formats, tried in this order, by content rather than by file name:
- Linux bzImage (Documentation/x86/boot.rst), entered through the 64-bit boot protocol;
- ELF with a PVH entry note (xen/include/public/arch-x86/hvm/start_info.h, "x86/HVM direct boot ABI");
- Multiboot v1 (the Multiboot Specification 0.6.96), as QEMU's -kernel accepts it;
- a 512-byte boot sector (0x55AA signature), entered in real mode at 0000:7C00 as a BIOS would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from popek.boot import layout
from popek.boot.entry import EntryState
from popek.errors import BootError
from popek.memory import PAGE_SIZE, GuestMemory


@dataclass
class BootImage:
    """What was loaded, and the state the boot vCPU starts in."""

    format: str
    entry: EntryState
    kernel_start: int
    kernel_end: int
    initrd: tuple[int, int] | None = None  # (gpa, size)
    cmdline: bytes = b""


def write_cmdline(mem: GuestMemory, cmdline: str, limit: int = layout.CMDLINE_MAX) -> tuple[int, bytes]:
    raw = cmdline.encode()
    if b"\0" in raw:
        raise BootError("the kernel command line contains a NUL byte")
    if len(raw) + 1 > limit:
        raise BootError(f"the kernel command line is {len(raw)} bytes; this kernel accepts at most {limit - 1}")
    mem.write(layout.CMDLINE_ADDR, raw + b"\0")
    return layout.CMDLINE_ADDR, raw


def place_initrd(mem: GuestMemory, data: bytes, lowest: int, highest: int) -> tuple[int, int]:
    """Put the initrd as high as allowed (below `highest`, exclusive), page-aligned, above `lowest`."""
    top = min(highest, mem.low_top)
    addr = (top - len(data)) & ~(PAGE_SIZE - 1)
    if len(data) == 0:
        raise BootError("the initrd is empty")
    if addr < max(lowest, layout.HIGH_MEMORY):
        raise BootError(
            f"the initrd ({len(data)} bytes) does not fit in guest memory between the kernel's end "
            f"({lowest:#x}) and {top:#x}: give the VM more memory (--mem)"
        )
    mem.write(addr, data)
    return addr, len(data)


def read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BootError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise BootError(f"{what} {path} is a directory") from None
    except OSError as e:
        raise BootError(f"cannot read {what} {path}: {e.strerror}") from None


def load_kernel(mem: GuestMemory, kernel: bytes, cmdline: str = "", initrd: bytes | None = None) -> BootImage:
    """Load `kernel` in whichever supported format it is; raise BootError naming what is wrong otherwise."""
    from popek.boot import bootsector, bzimage, elf, multiboot

    if bzimage.is_bzimage(kernel):
        return bzimage.load(mem, kernel, cmdline, initrd)
    if elf.is_elf(kernel):
        if elf.pvh_entry(kernel) is not None:
            return elf.load_pvh(mem, kernel, cmdline, initrd)
        if multiboot.find_header(kernel) is not None:
            return multiboot.load(mem, kernel, cmdline, initrd)
        raise BootError("the ELF kernel has neither a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) nor a Multiboot header")
    if multiboot.find_header(kernel) is not None:
        return multiboot.load(mem, kernel, cmdline, initrd)
    if bootsector.is_boot_sector(kernel):
        return bootsector.load(mem, kernel, cmdline, initrd)
    if kernel[:2] == b"MZ" and len(kernel) >= 0x206 and kernel[0x202:0x206] != b"HdrS":
        raise BootError("the kernel is a PE/EFI image without a Linux boot header")
    raise BootError(
        "not a kernel popek can boot: expected a Linux bzImage, an ELF with a PVH note, a Multiboot kernel, "
        "or a 512-byte boot sector"
    )
