"""The boot protocols, checked on synthetic kernels built here byte by byte."""

from __future__ import annotations

import struct

import pytest

from popek.boot import e820, elf, layout, load_kernel, mptable, multiboot
from popek.boot.entry import Mode
from popek.errors import BootError
from popek.memory import GuestMemory

MiB = 1 << 20


def make_bzimage(
    payload: bytes = b"\x90" * 1024, version: int = 0x020F, xloadflags: int = 1, truncate: int = 0
) -> bytes:
    setup_sects = 1
    image = bytearray(512 * (setup_sects + 1))
    image[0x1F1] = setup_sects
    struct.pack_into("<I", image, 0x1F4, (len(payload) + 15) // 16)
    struct.pack_into("<H", image, 0x1FE, 0xAA55)
    image[0x200:0x202] = b"\xeb\x66"  # jmp over the header: header ends at 0x202 + 0x66
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, version)
    image[0x211] = 0x01
    struct.pack_into("<I", image, 0x22C, 0x37FFFFFF)
    struct.pack_into("<H", image, 0x236, xloadflags)
    struct.pack_into("<I", image, 0x238, 2047)
    struct.pack_into("<I", image, 0x260, 4 * MiB)
    data = bytes(image) + payload.ljust((len(payload) + 15) // 16 * 16, b"\0")
    return data[: len(data) - truncate] if truncate else data


def test_bzimage_uses_the_64_bit_boot_protocol() -> None:
    with GuestMemory(64 * MiB) as mem:
        boot = load_kernel(mem, make_bzimage(), "console=ttyS0", b"initrd!" * 100)
        assert boot.format == "bzImage"
        assert boot.entry.mode is Mode.LONG
        assert boot.entry.rip == 0x100200
        assert boot.entry.regs["rsi"] == layout.ZERO_PAGE_ADDR
        zp = layout.ZERO_PAGE_ADDR
        assert mem.read(zp + 0x202, 4) == b"HdrS"
        assert mem.read_u8(zp + 0x210) == 0xFF
        assert mem.read_cstring(mem.read_u32(zp + 0x228)) == b"console=ttyS0"
        rd_addr, rd_size = mem.read_u32(zp + 0x218), mem.read_u32(zp + 0x21C)
        assert rd_size == 700 and rd_addr % 4096 == 0 and rd_addr + rd_size <= 64 * MiB
        assert mem.read(rd_addr, 7) == b"initrd!"
        n = mem.read_u8(zp + 0x1E8)
        table = [struct.unpack_from("<QQI", mem.read(zp + 0x2D0 + 20 * i, 20)) for i in range(n)]
        assert (0x100000, 63 * MiB, e820.E820_RAM) in table
        assert mem.read(0x100000, 4) == b"\x90" * 4


def test_bzimage_long_mode_page_tables_identity_map_4_gib() -> None:
    with GuestMemory(16 * MiB) as mem:
        boot = load_kernel(mem, make_bzimage())
        cr3 = boot.entry.cr3
        pdpt = mem.read_u64(cr3) & ~0xFFF
        pd3 = mem.read_u64(pdpt + 3 * 8) & ~0xFFF
        assert mem.read_u64(pd3 + 511 * 8) == (0xFFE00000 | 0x83)


def test_truncated_bzimage_is_refused() -> None:
    with GuestMemory(16 * MiB) as mem, pytest.raises(BootError, match="truncated"):
        load_kernel(mem, make_bzimage(truncate=100))


def test_bzimage_without_64_bit_entry_is_refused() -> None:
    with GuestMemory(16 * MiB) as mem, pytest.raises(BootError, match="64-bit"):
        load_kernel(mem, make_bzimage(xloadflags=0))


def test_old_boot_protocol_is_refused() -> None:
    with GuestMemory(16 * MiB) as mem, pytest.raises(BootError, match=r"2\.12"):
        load_kernel(mem, make_bzimage(version=0x0204))


def test_overlong_command_line_is_refused() -> None:
    with GuestMemory(16 * MiB) as mem, pytest.raises(BootError, match="at most 2047"):
        load_kernel(mem, make_bzimage(), "x" * 3000)


def test_initrd_that_does_not_fit_is_refused() -> None:
    with GuestMemory(8 * MiB) as mem, pytest.raises(BootError, match="does not fit"):
        load_kernel(mem, make_bzimage(), "", b"\0" * (6 * MiB))


@pytest.mark.parametrize("junk", [b"", b"hello world", b"\0" * 4096, b"MZ" + b"\0" * 1000])
def test_files_that_are_not_kernels_are_refused(junk: bytes) -> None:
    with GuestMemory(16 * MiB) as mem, pytest.raises(BootError):
        load_kernel(mem, junk)


def make_pvh_elf(entry: int = 0x200000, load: int = 0x200000, code: bytes = b"\xf4" * 16, note_bytes: int = 4) -> bytes:
    ehsize, phentsize = 64, 56
    name = b"Xen\0"
    desc = entry.to_bytes(note_bytes, "little")
    note = struct.pack("<III", len(name), len(desc), elf.XEN_ELFNOTE_PHYS32_ENTRY) + name + desc
    phoff = ehsize
    note_off = phoff + 2 * phentsize
    code_off = (note_off + len(note) + 15) & ~15
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 2, elf.EM_X86_64, 1, entry, phoff, 0, 0, ehsize, phentsize, 2, 0, 0, 0)
    ph_load = struct.pack("<IIQQQQQQ", elf.PT_LOAD, 5, code_off, load, load, len(code), len(code) + 64, 16)
    ph_note = struct.pack("<IIQQQQQQ", elf.PT_NOTE, 4, note_off, 0, 0, len(note), len(note), 4)
    blob = bytearray(header + ph_load + ph_note)
    blob += note
    blob = blob.ljust(code_off, b"\0") + code
    return bytes(blob)


@pytest.mark.parametrize("note_bytes", [4, 8])
def test_pvh_elf_gets_start_info_with_cmdline_memmap_and_initrd(note_bytes: int) -> None:
    with GuestMemory(32 * MiB) as mem:
        boot = load_kernel(mem, make_pvh_elf(note_bytes=note_bytes), "root=none", b"RAMDISK")
        assert boot.format == "ELF (PVH)"
        assert boot.entry.mode is Mode.PROTECTED and boot.entry.rip == 0x200000
        info = boot.entry.regs["rbx"]
        magic, version, _flags, nr_modules, modlist, cmdline, _rsdp, memmap, entries = struct.unpack(
            "<IIIIQQQQI", mem.read(info, 52)
        )
        assert (magic, version, nr_modules) == (elf.HVM_START_MAGIC, 1, 1)
        assert mem.read_cstring(cmdline) == b"root=none"
        rd_addr, rd_size = struct.unpack("<QQ", mem.read(modlist, 16))
        assert mem.read(rd_addr, rd_size) == b"RAMDISK"
        ram = [struct.unpack("<QQI", mem.read(memmap + 24 * i, 20)) for i in range(entries)]
        assert (0x100000, 31 * MiB, e820.E820_RAM) in ram
        assert mem.read(0x200000, 16) == b"\xf4" * 16
        assert mem.read(0x200010, 64) == bytes(64)  # bss is zeroed


def test_elf_segment_outside_guest_ram_is_refused() -> None:
    with GuestMemory(4 * MiB) as mem, pytest.raises(BootError, match="not in guest RAM"):
        load_kernel(mem, make_pvh_elf(entry=0x800000, load=0x800000))


def test_elf_without_pvh_note_or_multiboot_header_is_refused() -> None:
    blob = bytearray(make_pvh_elf())
    blob[blob.index(b"Xen\0") : blob.index(b"Xen\0") + 3] = b"Foo"
    with GuestMemory(16 * MiB) as mem, pytest.raises(BootError, match="PVH"):
        load_kernel(mem, bytes(blob))


def make_multiboot(load: int = 0x100000, body: bytes = b"\xf4" * 32) -> bytes:
    flags = multiboot.FLAG_AOUT_KLUDGE | multiboot.FLAG_MEMORY_INFO
    header_size = 32
    header = struct.pack(
        "<IIIIIIII",
        multiboot.HEADER_MAGIC,
        flags,
        (-(multiboot.HEADER_MAGIC + flags)) & 0xFFFFFFFF,
        load,
        load,
        0,
        load + header_size + len(body) + 0x1000,
        load + header_size,
    )
    return header + body


def test_multiboot_kernel_gets_magic_info_and_cmdline() -> None:
    with GuestMemory(16 * MiB) as mem:
        boot = load_kernel(mem, make_multiboot(), "hello multiboot", b"MOD")
        assert boot.format == "Multiboot"
        assert boot.entry.regs["rax"] == multiboot.BOOTLOADER_MAGIC
        info = boot.entry.regs["rbx"]
        flags, mem_lower, mem_upper, _dev, cmdline, mods_count, mods_addr = struct.unpack(
            "<IIIIIII", mem.read(info, 28)
        )
        assert flags & (multiboot.INFO_MEM | multiboot.INFO_CMDLINE | multiboot.INFO_MODS)
        assert (mem_lower, mem_upper) == (639, 15 * 1024)
        assert mem.read_cstring(cmdline) == b"hello multiboot"
        start, end = struct.unpack("<II", mem.read(mods_addr, 8))
        assert (mods_count, mem.read(start, end - start)) == (1, b"MOD")
        assert boot.entry.rip == 0x100020


def test_multiboot_header_with_bad_addresses_is_refused() -> None:
    blob = bytearray(make_multiboot())
    struct.pack_into("<I", blob, 16, 0x100004)  # load_addr above header_addr
    with GuestMemory(16 * MiB) as mem, pytest.raises(BootError):
        load_kernel(mem, bytes(blob))


def test_boot_sector_starts_in_real_mode_at_7c00() -> None:
    sector = b"\xf4".ljust(510, b"\0") + b"\x55\xaa"
    with GuestMemory(2 * MiB) as mem:
        boot = load_kernel(mem, sector)
        assert boot.entry.mode is Mode.REAL and boot.entry.rip == 0x7C00 and boot.entry.regs["rdx"] == 0x80
        assert mem.read(0x7C00, 1) == b"\xf4"


def test_mp_table_checksums_and_lists_every_cpu() -> None:
    blob = mptable.build(4)
    assert blob[:4] == b"_MP_" and sum(blob[:16]) & 0xFF == 0
    table = blob[16:]
    length = struct.unpack_from("<H", table, 4)[0]
    assert table[:4] == b"PCMP" and sum(table[:length]) & 0xFF == 0
    count = struct.unpack_from("<H", table, 34)[0]
    assert count == 4 + 1 + 1 + 16 + 2
    cpus = [table[44 + 20 * i : 44 + 20 * (i + 1)] for i in range(4)]
    assert [c[1] for c in cpus] == [0, 1, 2, 3] and cpus[0][3] == 3 and cpus[1][3] == 1


def test_too_many_cpus_for_the_mp_table_is_a_config_error() -> None:
    from popek.errors import ConfigError

    with pytest.raises(ConfigError):
        mptable.build(200)
