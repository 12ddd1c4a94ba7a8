"""The boot protocols, checked on synthetic kernels built here byte by byte."""

from __future__ import annotations

import itertools
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popek.boot import e820, elf, layout, load_kernel, mptable, multiboot
from popek.boot.entry import Mode
from popek.boot.loader import BootFiles
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


# --- kernels anywhere in RAM, and the ranges popek writes -------------------------------------------------


def make_elf32(segments: list[tuple[int, bytes, int]], entry: int = 0x8000, multiboot_header: bool = True) -> bytes:
    """An ELF32 x86 file with one PT_LOAD per (paddr, contents, memsz), and a Multiboot header (no a.out
    kludge) in the first segment's file bytes."""
    ehsize, phentsize = 52, 32
    phoff = ehsize
    data_off = (phoff + phentsize * len(segments) + 15) & ~15
    body = bytearray()
    phdrs = b""
    for i, (paddr, contents, memsz) in enumerate(segments):
        if i == 0 and multiboot_header:
            flags = multiboot.FLAG_MEMORY_INFO
            contents = (
                struct.pack("<III", multiboot.HEADER_MAGIC, flags, (-(multiboot.HEADER_MAGIC + flags)) & 0xFFFFFFFF)
                + contents
            )
        offset = data_off + len(body)
        body += contents
        phdrs += struct.pack(
            "<IIIIIIII", elf.PT_LOAD, offset, paddr, paddr, len(contents), max(memsz, len(contents)), 5, 4
        )
    header = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)
    header += struct.pack(
        "<HHIIIIIHHHHHH", 2, elf.EM_386, 1, entry, phoff, 0, 0, ehsize, phentsize, len(segments), 0, 0, 0
    )
    return (header + phdrs).ljust(data_off, b"\0") + bytes(body)


def test_multiboot_elf_below_1_mib_loads_where_it_asks() -> None:
    # realmode.flat's layout: code at 0x8000, data and bss at 0xb000, clear of the GDT, the Multiboot info and
    # the command line; the 64-bit entry's page tables at 0x9000-0xEFFF are no Multiboot kernel's concern
    image = make_elf32([(0x8000, b"\xf4" * 0x2000, 0x2000), (0xB000, b"D" * 0x100, 0x3000)])
    with GuestMemory(16 * MiB) as mem:
        mem.fill(0xB100, 0x100, 0xAA)  # the bss must come out zeroed
        boot = load_kernel(mem, image, "-x", files=BootFiles("x86/realmode.flat"))
        assert boot.format == "Multiboot" and boot.entry.rip == 0x8000
        assert (boot.kernel_start, boot.kernel_end) == (0x8000, 0xE000)
        assert mem.read(0x800C, 4) == b"\xf4" * 4 and mem.read(0xB000, 4) == b"DDDD"
        assert mem.read(0xB100, 0x100) == bytes(0x100)


def test_elf_headers_segment_at_0xff000_loads() -> None:
    image = make_elf32([(0xFF000, b"\x7fELF" + bytes(0xFF0), 0x1000), (0x100000, b"\xf4" * 16, 16)], entry=0x100000)
    with GuestMemory(16 * MiB) as mem:
        boot = load_kernel(mem, image)
        assert boot.kernel_start == 0xFF000 and mem.read(0x100000, 1) == b"\xf4"


@pytest.mark.parametrize(
    "paddr,needle",
    [
        (0x6000, "the boot information"),
        (0x500, "the boot GDT"),
        (layout.EBDA_ADDR, "the MP table"),
        (layout.ACPI_ADDR + 0x100, "the ACPI tables"),
        (layout.CMDLINE_ADDR, "the kernel command line"),
    ],
)
def test_a_segment_over_what_popek_writes_is_refused_naming_it(paddr: int, needle: str) -> None:
    image = make_elf32([(paddr, b"\xf4" * 64, 64)], entry=paddr)
    with GuestMemory(16 * MiB) as mem, pytest.raises(BootError, match=needle) as err:
        load_kernel(mem, image, "console=ttyS0")
    assert "popek writes" in str(err.value)


def test_a_pvh_segment_may_use_the_page_tables_only_the_64_bit_entry_writes() -> None:
    with GuestMemory(16 * MiB) as mem:
        boot = load_kernel(mem, make_pvh_elf(entry=0x9000, load=0x9000))
        assert boot.entry.rip == 0x9000 and mem.read(0x9000, 16) == b"\xf4" * 16


def test_overlapping_segments_are_refused() -> None:
    image = make_elf32([(0x200000, b"A" * 0x1000, 0x1000), (0x200800, b"B" * 0x1000, 0x1000)], entry=0x200000)
    with GuestMemory(16 * MiB) as mem, pytest.raises(BootError, match="overlaps kernel segment 0"):
        load_kernel(mem, image)


def test_the_initrd_goes_below_a_kernel_at_the_top_of_ram() -> None:
    top = 16 * MiB
    image = make_elf32([(top - 0x10000, b"\xf4" * 16, 0x10000)], entry=top - 0x10000)
    with GuestMemory(top) as mem:
        boot = load_kernel(mem, image, "", b"R" * 5000)
        assert boot.initrd is not None
        addr, size = boot.initrd
        assert addr + size <= top - 0x10000 and mem.read(addr, size) == b"R" * 5000


def test_every_protocols_areas_are_disjoint_and_in_the_first_mib() -> None:
    assert (layout.ACPI_ADDR, layout.ACPI_END) == (0xE0000, 0xF0000)
    for areas in (layout.BZIMAGE_AREAS, layout.PVH_AREAS, layout.MULTIBOOT_AREAS, layout.BOOT_SECTOR_AREAS):
        spans = sorted((a.start, a.end) for a in areas)
        assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans)), spans
        assert spans[-1][1] <= layout.HIGH_MEMORY
        assert (layout.CMDLINE_ADDR, layout.CMDLINE_ADDR + layout.CMDLINE_MAX) not in spans
        assert all(not (s < layout.CMDLINE_ADDR + layout.CMDLINE_MAX and e > layout.CMDLINE_ADDR) for s, e in spans)


def test_multiboot_cmdline_starts_with_the_kernel_file_name_and_module_0_is_named_after_the_initrd() -> None:
    with GuestMemory(16 * MiB) as mem:
        boot = load_kernel(mem, make_multiboot(), "a b", b"ENV", BootFiles("./x86/msr.flat", "env.txt"))
        info = boot.entry.regs["rbx"]
        assert mem.read_cstring(mem.read_u32(info + 16)) == b"./x86/msr.flat a b"
        mods = mem.read_u32(info + 24)
        start, end, string = struct.unpack("<III", mem.read(mods, 12))
        assert mem.read(start, end - start) == b"ENV" and mem.read_cstring(string) == b"env.txt"
        assert boot.cmdline == b"./x86/msr.flat a b"


def test_an_empty_append_still_gives_argv0_as_qemu_does() -> None:
    with GuestMemory(16 * MiB) as mem:
        boot = load_kernel(mem, make_multiboot(), "", None, BootFiles("k.bin"))
        assert mem.read_cstring(mem.read_u32(boot.entry.regs["rbx"] + 16)) == b"k.bin "


def test_command_line_bytes_that_are_not_utf8_reach_the_guest_as_typed() -> None:
    typed = b"x=\xff\xfe caf\xc3\xa9"
    as_argv = os.fsdecode(typed)  # how Python hands such an argument to popek: surrogate-escaped
    with GuestMemory(16 * MiB) as mem:
        boot = load_kernel(mem, make_bzimage(), as_argv)
        assert mem.read_cstring(mem.read_u32(layout.ZERO_PAGE_ADDR + 0x228)) == typed and boot.cmdline == typed
    with GuestMemory(16 * MiB) as mem, pytest.raises(BootError, match="NUL"):
        load_kernel(mem, make_bzimage(), "a\0b")


def test_a_bss_of_3_gib_costs_no_host_memory() -> None:
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    big = (3 << 30) - (2 << 20)  # from 1 MiB up to the 32-bit MMIO hole at 3 GiB
    pvh = bytearray(make_pvh_elf(entry=0x100000, load=0x100000))
    struct.pack_into("<Q", pvh, 64 + 40, big)  # the PT_LOAD's p_memsz
    aout = bytearray(make_multiboot())
    struct.pack_into("<I", aout, 24, 0x100000 + big)  # bss_end_addr
    for image in (bytes(pvh), bytes(aout)):
        with GuestMemory(4 << 30) as mem:
            before = rss()
            boot = load_kernel(mem, image)
            grown = rss() - before
            assert boot.kernel_end - boot.kernel_start >= big
            assert grown < 64 * MiB, f"loading a 3 GiB bss grew RSS by {grown >> 20} MiB"
            assert mem.read(0x100000 + big - 16, 16) == bytes(16)


def test_a_setup_header_cut_short_is_a_boot_error() -> None:
    data = bytearray(0x206)
    data[0x202:0x206] = b"HdrS"
    with GuestMemory(16 * MiB) as mem, pytest.raises(BootError, match="ends inside the setup header"):
        load_kernel(mem, bytes(data))


# --- hostile kernels: whatever the bytes, a BootError or a load, never another exception -----------------

FUZZ_MEM = 8 * MiB
_mem_for_fuzz: GuestMemory | None = None


def fuzz_memory() -> GuestMemory:
    """One guest memory for every example (a fresh 8 MiB mapping per example would dominate the run)."""
    global _mem_for_fuzz
    if _mem_for_fuzz is None:
        _mem_for_fuzz = GuestMemory(FUZZ_MEM)
    return _mem_for_fuzz


def load_or_boot_error(image: bytes, initrd: bytes | None = None) -> None:
    try:
        boot = load_kernel(fuzz_memory(), image, "console=ttyS0", initrd, BootFiles("fuzz.bin", "initrd"))
    except BootError:
        return
    assert boot.kernel_start <= boot.kernel_end <= fuzz_memory().top


INTERESTING = st.sampled_from(
    [0, 1, 0x7FFF, 0xFFFF, 0x8000_0000, 0xFFFF_F000, 0xFFFF_FFFF, 1 << 32, (1 << 64) - 1, (1 << 63), FUZZ_MEM - 1]
)
VALID = {
    "bzImage": make_bzimage(),
    "pvh": make_pvh_elf(),
    "multiboot": make_multiboot(),
    "multiboot-elf": make_elf32([(0x200000, b"\xf4" * 64, 0x1000)], entry=0x200000),
    "bootsector": b"\xf4".ljust(510, b"\0") + b"\x55\xaa",
}


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid image of some format with fields overwritten by interesting or random values, or cut short."""
    image = bytearray(VALID[draw(st.sampled_from(sorted(VALID)))])
    for _ in range(draw(st.integers(1, 6))):
        off = draw(st.integers(0, len(image) - 1))
        width = draw(st.sampled_from([1, 2, 4, 8]))
        value = draw(INTERESTING | st.integers(0, (1 << 64) - 1)) & ((1 << (8 * width)) - 1)
        chunk = value.to_bytes(width, "little")
        image[off : off + width] = chunk[: len(image) - off]
    if draw(st.booleans()):
        image = image[: draw(st.integers(0, len(image)))]
    return bytes(image)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_are_a_boot_error_or_a_kernel(data: bytes) -> None:
    load_or_boot_error(data)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(), st.none() | st.binary(min_size=0, max_size=64))
def test_mutated_headers_are_a_boot_error_or_a_kernel(image: bytes, initrd: bytes | None) -> None:
    load_or_boot_error(image, initrd)


ELF_FIELDS64 = {"phoff": (32, "<Q"), "phentsize": (54, "<H"), "phnum": (56, "<H"), "entry": (24, "<Q")}
PHDR64 = {"p_offset": (8, "<Q"), "p_paddr": (24, "<Q"), "p_filesz": (32, "<Q"), "p_memsz": (40, "<Q")}


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.sampled_from(sorted(ELF_FIELDS64)), INTERESTING | st.integers(0, 0xFFFF)),
    st.dictionaries(st.sampled_from(sorted(PHDR64)), INTERESTING | st.integers(0, 1 << 24)),
    st.integers(0, 1),
)
def test_pvh_elf_with_hostile_program_headers(header: dict[str, int], phdr: dict[str, int], which: int) -> None:
    image = bytearray(make_pvh_elf())
    for name, value in header.items():
        off, fmt = ELF_FIELDS64[name]
        struct.pack_into(fmt, image, off, value & ((1 << (8 * struct.calcsize(fmt))) - 1))
    for name, value in phdr.items():
        off, fmt = PHDR64[name]
        struct.pack_into(fmt, image, 64 + 56 * which + off, value)
    load_or_boot_error(bytes(image))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(INTERESTING | st.integers(0, 1 << 24), min_size=5, max_size=5), st.integers(0, 64))
def test_multiboot_with_inconsistent_aout_kludge_fields(fields: list[int], body: int) -> None:
    image = bytearray(make_multiboot(body=b"\xf4" * body))
    struct.pack_into("<IIIII", image, 12, *(f & 0xFFFFFFFF for f in fields))
    load_or_boot_error(bytes(image))
