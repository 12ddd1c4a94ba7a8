"""Multiboot v1 kernels (The Multiboot Specification, version 0.6.96), as QEMU's -kernel loads them.

The header lies 4-aligned in the first 8 KiB. With flag bit 16 (the "a.out kludge") its address fields say where
the file goes; otherwise the kernel must be ELF and its segments are loaded. The kernel starts in flat 32-bit
protected mode with EAX = 0x2BADB002 and EBX pointing to the information structure (memory sizes, command line,
modules, memory map).
"""

from __future__ import annotations

import struct

from popek.boot import e820, elf, gdt, layout, loader, plan
from popek.errors import BootError
from popek.memory import GuestMemory

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
SEARCH_LIMIT = 8192
FLAG_PAGE_ALIGN = 1 << 0
FLAG_MEMORY_INFO = 1 << 1
FLAG_VIDEO_MODE = 1 << 2
FLAG_AOUT_KLUDGE = 1 << 16

INFO_MEM = 1 << 0
INFO_CMDLINE = 1 << 2
INFO_MODS = 1 << 3
INFO_MMAP = 1 << 6
INFO_LOADER_NAME = 1 << 9
INFO_SIZE = 120


def find_header(data: bytes) -> int | None:
    for off in range(0, min(len(data), SEARCH_LIMIT) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return off
    return None


def load(
    mem: GuestMemory,
    data: bytes,
    cmdline: str | bytes,
    initrd: bytes | None,
    files: loader.BootFiles = loader.NO_FILES,
) -> loader.BootImage:
    off = find_header(data)
    assert off is not None
    p = plan.BootPlan(mem, "Multiboot", layout.MULTIBOOT_AREAS)
    flags = struct.unpack_from("<I", data, off + 4)[0]
    if flags & 0xFFFF & ~(FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE):
        raise BootError(f"Multiboot: the kernel requires features popek does not provide (flags {flags:#x})")
    if flags & FLAG_AOUT_KLUDGE:
        if off + 32 > len(data):
            raise BootError("Multiboot: the file ends inside the header's address fields")
        header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from("<IIIII", data, off + 12)
        if load_addr > header_addr or header_addr - load_addr > off:
            raise BootError("Multiboot: header_addr and load_addr are inconsistent with the header's offset")
        file_start = off - (header_addr - load_addr)
        if load_end and load_end < load_addr:
            raise BootError("Multiboot: load_end_addr lies below load_addr")
        size = (load_end - load_addr) if load_end else len(data) - file_start
        if size <= 0 or file_start + size > len(data):
            raise BootError("Multiboot: the load range lies outside the file (truncated kernel?)")
        if bss_end and bss_end < load_addr + size:
            raise BootError("Multiboot: bss_end_addr lies below the end of the loaded image")
        memsz = bss_end - load_addr if bss_end else size
        p.claim(load_addr, memsz, "the kernel image (a.out kludge load range)")
        mem.write(load_addr, memoryview(data)[file_start : file_start + size])
        mem.zero(load_addr + size, memsz - size)
        low, high = load_addr, load_addr + memsz
    elif elf.is_elf(data):
        low, high = elf.load_segments(p, data, "Multiboot")
        is64 = data[4] == 2
        entry = struct.unpack_from("<Q" if is64 else "<I", data, 24)[0]
        if entry >= 1 << 32:
            raise BootError("Multiboot: the ELF entry point is above 4 GiB")
    else:
        raise BootError("Multiboot: no a.out-kludge addresses and not an ELF file: cannot tell where to load")

    # as QEMU's hw/i386/multiboot.c: the kernel's command line is "<kernel file> <-append>", and module 0's
    # string is the initrd's file name; both as given on the command line, after each other in the cmdline area
    kernel_name = files.kernel_name()
    full_cmdline = kernel_name + b" " + loader.encode_cmdline(cmdline) if kernel_name else cmdline
    cmd_addr, raw_cmd = loader.write_cmdline(p, full_cmdline)
    mod_string_addr = cmd_addr + len(raw_cmd) + 1
    mod_string = loader.encode_cmdline(files.initrd_name()) + b"\0"
    info = layout.BOOT_INFO_ADDR
    mods_addr = info + INFO_SIZE
    name_addr = mods_addr + 16
    mmap_addr = name_addr + 16
    info_flags = INFO_MEM | INFO_CMDLINE | INFO_MMAP | INFO_LOADER_NAME
    mods = b""
    initrd_range = None
    if initrd is not None:
        p.claim(mod_string_addr, len(mod_string), "the initrd's module string", popeks=True)
        mem.write(mod_string_addr, mod_string)
        initrd_range = loader.place_initrd(p, initrd, layout.HIGH_MEMORY, 1 << 32)
        mods = struct.pack("<IIII", initrd_range[0], initrd_range[0] + initrd_range[1], mod_string_addr, 0)
        info_flags |= INFO_MODS
    entries = e820.memory_map(mem)
    mmap = b"".join(struct.pack("<IQQI", 20, e.addr, e.size, e.type) for e in entries)
    mem_lower = layout.EBDA_ADDR // 1024
    mem_upper = (mem.low_top - layout.HIGH_MEMORY) // 1024
    info_struct = struct.pack(
        "<IIIIIII16xII",
        info_flags,
        mem_lower,
        mem_upper,
        0xFFFFFFFF,
        cmd_addr,
        1 if mods else 0,
        mods_addr,
        len(mmap),
        mmap_addr,
    )
    info_struct += struct.pack("<IIIIIIH", 0, 0, 0, name_addr, 0, 0, 0)
    blob = info_struct.ljust(INFO_SIZE, b"\0") + mods.ljust(16, b"\0") + b"popek\0".ljust(16, b"\0") + mmap
    if len(blob) > layout.BOOT_INFO.size:
        raise BootError(f"Multiboot: the memory map does not fit in {layout.BOOT_INFO.what}")
    mem.write(info, blob)
    state = gdt.protected_mode_entry(mem, entry, {"rax": BOOTLOADER_MAGIC, "rbx": info})
    return loader.BootImage("Multiboot", state, low, high, initrd_range, raw_cmd)
