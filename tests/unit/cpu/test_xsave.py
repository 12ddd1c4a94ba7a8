"""XSAVE/XRSTOR semantics on byte areas: what moves, what is initialised, what the header says, what faults."""

from __future__ import annotations

import struct

import pytest

from popek.cpu import xsave

LAYOUT = {2: xsave.Component(256, 576, False), 9: xsave.Component(8, 0x980, False)}
XCR0 = 0x7


def state_with(xinuse: int, fill: int) -> bytes:
    area = bytearray([fill]) * 4096
    struct.pack_into("<I", area, xsave.MXCSR_OFFSET, 0x1F80)
    area[512:576] = bytes(64)
    struct.pack_into("<Q", area, 512, xinuse)
    return bytes(area)


def test_standard_save_writes_enabled_in_use_components_and_header() -> None:
    state = state_with(0x7, 0xAB)
    saved = xsave.save(state, bytes(1024), XCR0, 0xFFFFFFFFFFFFFFFF, LAYOUT, compacted=False)
    assert saved[160:416] == state[160:416]
    assert saved[576:832] == state[576:832]
    assert struct.unpack_from("<QQ", saved, 512) == (0x7, 0)


def test_save_leaves_components_outside_the_mask_untouched() -> None:
    old = bytes([0x11]) * 1024
    saved = xsave.save(state_with(0x7, 0xAB), old, XCR0, 0x3, LAYOUT, compacted=False)
    assert saved[576:832] == old[576:832]
    assert struct.unpack_from("<Q", saved, 512)[0] & 0x4 == 0x11111111_11111111 & 0x4


def test_compacted_save_sets_xcomp_bv_and_packs_components() -> None:
    saved = xsave.save(state_with(0x7, 0xCD), bytes(1024), XCR0, 0x7, LAYOUT, compacted=True)
    xstate_bv, xcomp_bv = struct.unpack_from("<QQ", saved, 512)
    assert xcomp_bv == xsave.COMPACTED | 0x7 and xstate_bv == 0x7
    assert saved[576:832] == bytes([0xCD]) * 256


def test_restore_round_trips_a_standard_area() -> None:
    state = state_with(0x7, 0x5A)
    area = xsave.save(state, bytes(1024), XCR0, 0x7, LAYOUT, compacted=False)
    restored = xsave.restore(state_with(0x7, 0x00), area, XCR0, 0x7, LAYOUT)
    assert restored[160:416] == state[160:416] and restored[576:832] == state[576:832]


def test_restore_of_compacted_area_reads_packed_offsets() -> None:
    state = state_with(0x7, 0x77)
    area = xsave.save(state, bytes(1024), XCR0, 0x7, LAYOUT, compacted=True)
    restored = xsave.restore(state_with(0x7, 0), area, XCR0, 0x7, LAYOUT)
    assert restored[576:832] == bytes([0x77]) * 256


def test_restore_initialises_components_whose_xstate_bv_bit_is_clear() -> None:
    area = bytearray(1024)
    struct.pack_into("<I", area, xsave.MXCSR_OFFSET, 0x1F80)
    struct.pack_into("<QQ", area, 512, 0x0, 0)
    restored = xsave.restore(state_with(0x7, 0xFF), bytes(area), XCR0, 0x7, LAYOUT)
    assert struct.unpack_from("<H", restored, 0)[0] == xsave.FCW_DEFAULT
    assert restored[160:416] == bytes(256) and restored[576:832] == bytes(256)


@pytest.mark.parametrize(
    "xstate_bv,xcomp_bv,extra",
    [(0x8, 0, b""), (0x1, 1, b""), (0x1, 0, b"\x01"), (0x7, xsave.COMPACTED | 0x3, b"")],
)
def test_invalid_headers_fault(xstate_bv: int, xcomp_bv: int, extra: bytes) -> None:
    area = bytearray(1024)
    struct.pack_into("<QQ", area, 512, xstate_bv, xcomp_bv)
    if extra:
        area[540] = 1
    with pytest.raises(xsave.XsaveFault):
        xsave.restore(state_with(0x7, 0), bytes(area), XCR0, 0x7, LAYOUT)


def test_reserved_mxcsr_bits_fault() -> None:
    area = bytearray(1024)
    struct.pack_into("<I", area, xsave.MXCSR_OFFSET, 0x10000)
    struct.pack_into("<QQ", area, 512, 0x3, 0)
    with pytest.raises(xsave.XsaveFault):
        xsave.restore(state_with(0x7, 0), bytes(area), XCR0, 0x7, LAYOUT)
