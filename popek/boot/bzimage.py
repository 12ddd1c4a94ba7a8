"""The Linux x86 boot protocol (Documentation/x86/boot.rst), 64-bit entry.

popek loads the protected-mode kernel at 1 MiB, fills a zero page (boot_params) with the kernel's own setup
header, the command line, the initrd and the e820 map, and enters at `load address + 0x200` in 64-bit mode —
the path Firecracker and Cloud Hypervisor take, which skips the real-mode setup code entirely.
"""

from __future__ import annotations

import struct

from popek.boot import e820, gdt, layout, loader, plan
from popek.errors import BootError
from popek.memory import GuestMemory

SETUP_HEADER = 0x1F1
HDRS = b"HdrS"
MIN_VERSION = 0x020C  # 2.12: xloadflags, which says whether the 64-bit entry exists

OFF_SETUP_SECTS = 0x1F1
OFF_VID_MODE = 0x1FA
OFF_BOOT_FLAG = 0x1FE
OFF_JUMP = 0x200
OFF_HEADER = 0x202
OFF_VERSION = 0x206
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_CMD_LINE_PTR = 0x228
OFF_INITRD_ADDR_MAX = 0x22C
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
OFF_PREF_ADDRESS = 0x258
OFF_INIT_SIZE = 0x260
OFF_SYSSIZE = 0x1F4

# boot_params fields outside the setup header
OFF_EXT_RAMDISK_IMAGE = 0x0C0
OFF_EXT_RAMDISK_SIZE = 0x0C4
OFF_EXT_CMD_LINE_PTR = 0x0C8
OFF_E820_ENTRIES = 0x1E8
OFF_E820_TABLE = 0x2D0
E820_MAX_ZEROPAGE = 128

LOADED_HIGH = 0x01
KEEP_SEGMENTS = 0x40
XLF_KERNEL_64 = 0x01
LOADER_UNDEFINED = 0xFF
LOAD_ADDR = layout.HIGH_MEMORY


def is_bzimage(data: bytes) -> bool:
    return len(data) >= OFF_HEADER + 4 and data[OFF_HEADER : OFF_HEADER + 4] == HDRS


def _u8(data: bytes, off: int) -> int:
    return data[off]


def _u16(data: bytes, off: int) -> int:
    return int(struct.unpack_from("<H", data, off)[0])


def _u32(data: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", data, off)[0])


def load(mem: GuestMemory, data: bytes, cmdline: str | bytes, initrd: bytes | None) -> loader.BootImage:
    if len(data) < OFF_INIT_SIZE + 4:
        raise BootError("bzImage: the file ends inside the setup header")
    version = _u16(data, OFF_VERSION)
    if _u16(data, OFF_BOOT_FLAG) != 0xAA55:
        raise BootError("bzImage: the setup header's boot_flag is not 0xAA55")
    if version < MIN_VERSION:
        raise BootError(
            f"bzImage: boot protocol {version >> 8}.{version & 0xFF:02d} is older than 2.12, "
            "which the 64-bit entry needs"
        )
    loadflags = _u8(data, OFF_LOADFLAGS)
    if not loadflags & LOADED_HIGH:
        raise BootError("bzImage: a zImage (loaded low) cannot be booted; rebuild as bzImage")
    if not _u16(data, OFF_XLOADFLAGS) & XLF_KERNEL_64:
        raise BootError("bzImage: the kernel has no 64-bit entry point (XLF_KERNEL_64 not set)")
    setup_sects = _u8(data, OFF_SETUP_SECTS) or 4
    kernel_offset = (setup_sects + 1) * 512
    syssize = _u32(data, OFF_SYSSIZE) * 16
    if syssize == 0 or kernel_offset + syssize > len(data):
        raise BootError(
            f"bzImage: truncated: the header promises {kernel_offset + syssize} bytes, the file has {len(data)}"
        )
    protected = memoryview(data)[kernel_offset : kernel_offset + syssize]
    init_size = max(_u32(data, OFF_INIT_SIZE), len(protected))
    if LOAD_ADDR + init_size > mem.low_top:
        raise BootError(
            f"bzImage: the kernel needs {init_size >> 20} MiB from 1 MiB up; give the VM more memory (--mem)"
        )
    p = plan.BootPlan(mem, "bzImage", layout.BZIMAGE_AREAS)
    p.claim(LOAD_ADDR, init_size, "the kernel (its init_size from 1 MiB)")
    mem.write(LOAD_ADDR, protected)

    header_end = min(OFF_HEADER + _u8(data, OFF_JUMP + 1), 0x290)
    zero_page = bytearray(4096)
    zero_page[SETUP_HEADER:header_end] = data[SETUP_HEADER:header_end]
    zero_page[OFF_TYPE_OF_LOADER] = LOADER_UNDEFINED
    zero_page[OFF_LOADFLAGS] = loadflags & ~KEEP_SEGMENTS
    struct.pack_into("<H", zero_page, OFF_VID_MODE, 0xFFFF)

    cmdline_limit = _u32(data, OFF_CMDLINE_SIZE) + 1 if version >= 0x0206 else 256
    cmd_addr, raw_cmd = loader.write_cmdline(p, cmdline, min(cmdline_limit, layout.CMDLINE_MAX))
    struct.pack_into("<I", zero_page, OFF_CMD_LINE_PTR, cmd_addr)

    initrd_range = None
    if initrd is not None:
        initrd_max = _u32(data, OFF_INITRD_ADDR_MAX) or 0x37FFFFFF
        initrd_range = loader.place_initrd(p, initrd, LOAD_ADDR + init_size, initrd_max + 1)
        struct.pack_into("<II", zero_page, OFF_RAMDISK_IMAGE, initrd_range[0], initrd_range[1])

    entries = e820.memory_map(mem)[:E820_MAX_ZEROPAGE]
    zero_page[OFF_E820_ENTRIES] = len(entries)
    for i, entry in enumerate(entries):
        zero_page[OFF_E820_TABLE + 20 * i : OFF_E820_TABLE + 20 * (i + 1)] = entry.pack()
    mem.write(layout.ZERO_PAGE_ADDR, bytes(zero_page))

    state = gdt.long_mode_entry(mem, LOAD_ADDR + 0x200, {"rsi": layout.ZERO_PAGE_ADDR, "rsp": layout.BOOT_STACK_TOP})
    return loader.BootImage("bzImage", state, LOAD_ADDR, LOAD_ADDR + init_size, initrd_range, raw_cmd)
