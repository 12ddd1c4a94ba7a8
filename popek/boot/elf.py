"""ELF kernels entered through the PVH boot ABI (Xen's "x86/HVM direct boot ABI", used by QEMU, Firecracker and
Cloud Hypervisor for an uncompressed vmlinux).

The kernel names its 32-bit entry in an ELF note (owner "Xen", type XEN_ELFNOTE_PHYS32_ENTRY = 18). popek loads
every PT_LOAD segment at its physical address, writes `struct hvm_start_info` (version 1, with the memory map,
the command line and the initrd as module 0) and enters in flat 32-bit protected mode with EBX pointing to it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from popek.boot import e820, gdt, layout, loader, plan
from popek.errors import BootError
from popek.memory import GuestMemory

XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
PT_LOAD = 1
PT_NOTE = 4
EM_386 = 3
EM_X86_64 = 62

START_INFO_SIZE = 56
MODLIST_ENTRY_SIZE = 32
MEMMAP_ENTRY_SIZE = 24


def is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


@dataclass(frozen=True)
class Phdr:
    type: int
    offset: int
    paddr: int
    filesz: int
    memsz: int


def _header(data: bytes) -> tuple[bool, int, int, int]:
    """(is 64-bit, e_phoff, e_phentsize, e_phnum), validated."""
    if len(data) < 52:
        raise BootError("ELF: the file ends inside the ELF header")
    ei_class, ei_data = data[4], data[5]
    if ei_class not in (1, 2) or ei_data != 1:
        raise BootError("ELF: only little-endian ELF32/ELF64 kernels can be booted")
    is64 = ei_class == 2
    machine = struct.unpack_from("<H", data, 18)[0]
    if machine not in (EM_386, EM_X86_64):
        raise BootError(f"ELF: machine {machine} is not x86")
    if is64:
        if len(data) < 64:
            raise BootError("ELF: the file ends inside the ELF header")
        phoff = struct.unpack_from("<Q", data, 32)[0]
        phentsize, phnum = struct.unpack_from("<HH", data, 54)
    else:
        phoff = struct.unpack_from("<I", data, 28)[0]
        phentsize, phnum = struct.unpack_from("<HH", data, 42)
    if phentsize < (56 if is64 else 32) or phoff + phentsize * phnum > len(data):
        raise BootError("ELF: the program headers lie outside the file")
    return is64, phoff, phentsize, phnum


def program_headers(data: bytes) -> list[Phdr]:
    is64, phoff, phentsize, phnum = _header(data)
    out = []
    for i in range(phnum):
        off = phoff + i * phentsize
        if is64:
            p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from("<IIQQQQQ", data, off)
        else:
            p_type, p_offset, _vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from("<IIIIII", data, off)
        out.append(Phdr(p_type, p_offset, p_paddr, p_filesz, p_memsz))
    return out


def _notes(data: bytes, phdrs: list[Phdr]) -> Iterator[tuple[bytes, int, bytes]]:
    for ph in phdrs:
        if ph.type != PT_NOTE:
            continue
        pos, end = ph.offset, min(ph.offset + ph.filesz, len(data))
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name_off = pos + 12
            desc_off = name_off + ((namesz + 3) & ~3)
            next_pos = desc_off + ((descsz + 3) & ~3)
            if next_pos > end:
                break
            yield data[name_off : name_off + namesz].rstrip(b"\0"), ntype, data[desc_off : desc_off + descsz]
            pos = next_pos


def pvh_entry(data: bytes) -> int | None:
    try:
        phdrs = program_headers(data)
    except BootError:
        return None
    for name, ntype, desc in _notes(data, phdrs):
        if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) in (4, 8):
            return int.from_bytes(desc, "little")
    return None


def load_segments(p: plan.BootPlan, data: bytes, what: str = "ELF") -> tuple[int, int]:
    """Copy PT_LOAD segments to their physical addresses, anywhere in guest RAM clear of what the boot protocol
    places (`p`); zero their bss without building it. Returns the lowest and highest byte used."""
    mem = p.mem
    segments = [ph for ph in program_headers(data) if ph.type == PT_LOAD and ph.memsz > 0]
    for i, ph in enumerate(segments):
        if ph.filesz > ph.memsz or ph.offset + ph.filesz > len(data):
            raise BootError(f"{what}: a segment for {ph.paddr:#x} lies outside the file (truncated kernel?)")
        if not mem.contains(ph.paddr, ph.memsz):
            raise BootError(f"{what}: a segment at {ph.paddr:#x}+{ph.memsz:#x} is not in guest RAM (--mem?)")
        p.claim(ph.paddr, ph.memsz, f"kernel segment {i} (file offset {ph.offset:#x})")
    if not segments:
        raise BootError(f"{what}: no loadable segment")
    view = memoryview(data)
    for ph in segments:
        mem.write(ph.paddr, view[ph.offset : ph.offset + ph.filesz])
        mem.zero(ph.paddr + ph.filesz, ph.memsz - ph.filesz)
    return min(ph.paddr for ph in segments), max(ph.paddr + ph.memsz for ph in segments)


def load_pvh(mem: GuestMemory, data: bytes, cmdline: str | bytes, initrd: bytes | None) -> loader.BootImage:
    entry = pvh_entry(data)
    assert entry is not None
    p = plan.BootPlan(mem, "ELF (PVH)", layout.PVH_AREAS)
    cmd_addr, raw_cmd = loader.write_cmdline(p, cmdline)
    low, high = load_segments(p, data, "ELF (PVH)")

    info = layout.BOOT_INFO_ADDR
    modlist = info + START_INFO_SIZE
    memmap = modlist + MODLIST_ENTRY_SIZE
    initrd_range = None
    modules = b""
    if initrd is not None:
        initrd_range = loader.place_initrd(p, initrd, layout.HIGH_MEMORY, 1 << 32)
        modules = struct.pack("<QQQQ", initrd_range[0], initrd_range[1], 0, 0)
    entries = e820.memory_map(mem)
    table = b"".join(struct.pack("<QQII", e.addr, e.size, e.type, 0) for e in entries)
    start_info = struct.pack(
        "<IIIIQQQQII",
        HVM_START_MAGIC,
        1,
        0,
        1 if modules else 0,
        modlist if modules else 0,
        cmd_addr,
        0,
        memmap,
        len(entries),
        0,
    )
    blob = start_info + modules.ljust(MODLIST_ENTRY_SIZE, b"\0") + table
    if len(blob) > layout.BOOT_INFO.size:
        raise BootError(f"ELF (PVH): the memory map does not fit in {layout.BOOT_INFO.what}")
    mem.write(info, blob)

    state = gdt.protected_mode_entry(mem, entry, {"rbx": info})
    return loader.BootImage("ELF (PVH)", state, low, high, initrd_range, raw_cmd)
