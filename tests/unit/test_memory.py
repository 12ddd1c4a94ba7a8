from __future__ import annotations

import pytest

from popek.errors import ConfigError, GuestMemoryError
from popek.memory import MMIO_HOLE_END, MMIO_HOLE_START, GuestMemory, layout


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


def test_remap_page_keeps_contents_and_the_page_writable() -> None:
    with GuestMemory(4 * 1024 * 1024) as mem:
        mem.write(0x21FF0, b"before the flush")
        assert mem.remap_page(0x21FF8)
        assert mem.read(0x21FF0, 16) == b"before the flush"
        mem.write(0x21000, b"after")
        assert mem.read(0x21000, 5) == b"after"
        assert not mem.remap_page(4 * 1024 * 1024)
