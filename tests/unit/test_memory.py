from __future__ import annotations

import mmap
from pathlib import Path

import pytest

from popek.errors import ConfigError, GuestMemoryError
from popek.memory import MMIO_HOLE_END, MMIO_HOLE_START, PAGE_SIZE, GuestMemory, Region, layout


def test_memory_above_the_hole_is_placed_above_4_gib() -> None:
    assert layout(512 << 20) == [(0, 512 << 20)]
    assert layout(4 << 30) == [(0, MMIO_HOLE_START), (MMIO_HOLE_END, (4 << 30) - MMIO_HOLE_START)]


@pytest.mark.parametrize("size", [0, -4096, 4095])
def test_bad_sizes_are_config_errors(size: int) -> None:
    with pytest.raises(ConfigError):
        layout(size)


def test_reads_and_writes_are_bounds_checked() -> None:
    with GuestMemory(1 << 20) as mem:
        mem.write_u32(0x1000, 0xDEADBEEF)
        assert mem.read_u32(0x1000) == 0xDEADBEEF
        mem.write((1 << 20) - 4, b"abcd")
        for gpa, size in [((1 << 20) - 3, 4), (1 << 20, 1), (-1, 1), (0, (1 << 20) + 1)]:
            with pytest.raises(GuestMemoryError):
                mem.read(gpa, size)
        with pytest.raises(GuestMemoryError):
            mem.write((1 << 20) - 2, b"xyz")


def test_a_view_never_spans_the_mmio_hole() -> None:
    with GuestMemory(MMIO_HOLE_START + (1 << 20)) as mem:
        with pytest.raises(GuestMemoryError):
            mem.view(MMIO_HOLE_START - 8, 16)
        mem.write(MMIO_HOLE_END, b"hi")
        assert bytes(mem.view(MMIO_HOLE_END, 2)) == b"hi"


def test_cstring_stops_at_nul_and_at_the_region_end() -> None:
    with GuestMemory(1 << 20) as mem:
        mem.write(0x100, b"console=ttyS0\0junk")
        assert mem.read_cstring(0x100) == b"console=ttyS0"
        mem.write((1 << 20) - 3, b"abc")
        assert mem.read_cstring((1 << 20) - 3) == b"abc"


def test_vmm_writes_mark_pages_dirty_once() -> None:
    with GuestMemory(1 << 20) as mem:
        mem.write(0x1FFF, b"ab")  # straddles pages 1 and 2
        assert mem.dirty_pages() == [0x1000, 0x2000]
        assert mem.dirty_pages() == []
        mem.mark_dirty_bitmap(0, bytes([0b1000_0000]))
        assert mem.dirty_pages() == [0x7000]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_zeroing_a_touched_gigabyte_gives_its_memory_back() -> None:
    size = 1 << 30
    with GuestMemory(size) as mem:
        mem.fill(0x1000, 64 << 20, 0x5A)  # 64 MiB made resident
        mem.write(0x123, b"head")
        before = _rss()
        mem.zero(0x800, size - 0x1000)  # partial pages at both ends, whole pages between
        assert _rss() < before - (48 << 20)
        assert mem.read(0x123, 4) == b"head"  # below the range: untouched
        assert mem.read(0x800, 0x1000) == bytes(0x1000) and mem.read(size - 0x800 - 16, 16) == bytes(16)
        assert mem.read(0x2000000, 4) == bytes(4)
        assert 0x1000 in mem.dirty_pages()


def test_zeroing_a_file_backed_region_writes_zeros_instead_of_bringing_the_file_back(tmp_path: Path) -> None:
    # a snapshot maps its file privately: MADV_DONTNEED there would show the file's bytes again
    size = 4 * PAGE_SIZE
    snapshot = tmp_path / "snapshot.bin"
    snapshot.write_bytes(b"S" * size)
    with GuestMemory(size) as mem, open(snapshot, "r+b") as f:
        mapping = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE)
        mem.regions[0] = Region(0, size, mapping, anonymous=False)
        mem.write(0, b"guest wrote this")
        mem.zero(0, size)
        assert mem.read(0, size) == bytes(size)
        # the hazard the flag exists for: the same primitive believing the region anonymous
        mem.regions[0] = Region(0, size, mapping, anonymous=True)
        mem.zero(0, size)
        assert mem.read(0, 4) == b"SSSS"
        mapping.close()


def test_fill_and_zero_refuse_ranges_outside_guest_ram() -> None:
    with GuestMemory(1 << 20) as mem:
        for gpa, size in [((1 << 20) - 4, 8), (-1, 1), (0, -1)]:
            with pytest.raises(GuestMemoryError):
                mem.zero(gpa, size)
            with pytest.raises(GuestMemoryError):
                mem.fill(gpa, size, 1)


def test_remap_page_keeps_contents_and_the_page_writable() -> None:
    with GuestMemory(4 * 1024 * 1024) as mem:
        mem.write(0x21FF0, b"before the flush")
        assert mem.remap_page(0x21FF8)
        assert mem.read(0x21FF0, 16) == b"before the flush"
        mem.write(0x21000, b"after")
        assert mem.read(0x21000, 5) == b"after"
        assert not mem.remap_page(4 * 1024 * 1024)
