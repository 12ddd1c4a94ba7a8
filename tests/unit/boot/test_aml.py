from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popek.boot import aml


def decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(encoded length, bytes the PkgLength took), by ACPI 6.0 §20.2.4."""
    lead = data[0]
    extra = lead >> 6
    if extra == 0:
        return lead & 0x3F, 1
    value = lead & 0x0F
    for i in range(extra):
        value |= data[1 + i] << (4 + 8 * i)
    return value, 1 + extra


@given(st.integers(min_value=0, max_value=aml.PKG_LENGTH_MAX - 4))
def test_pkg_length_counts_itself_and_round_trips(body: int) -> None:
    raw = aml.pkg_length(body)
    value, used = decode_pkg_length(raw)
    assert used == len(raw)
    assert value == body + len(raw)


def test_pkg_length_uses_one_byte_up_to_63_then_more() -> None:
    assert aml.pkg_length(62) == bytes([63])
    assert len(aml.pkg_length(63)) == 2
    assert aml.pkg_length(63) == bytes([0x40 | (65 & 0xF), 65 >> 4])
    with pytest.raises(ValueError):
        aml.pkg_length(aml.PKG_LENGTH_MAX)


def test_integers_take_their_shortest_encoding() -> None:
    assert aml.integer(0) == b"\x00"
    assert aml.integer(1) == b"\x01"
    assert aml.integer(5) == b"\x0a\x05"
    assert aml.integer(0x1234) == b"\x0b\x34\x12"
    assert aml.integer(0x12345678) == b"\x0c\x78\x56\x34\x12"
    assert aml.integer(1 << 40) == b"\x0e" + (1 << 40).to_bytes(8, "little")
    with pytest.raises(ValueError):
        aml.integer(-1)


def test_name_strings_root_parent_dual_and_multi() -> None:
    assert aml.name_string("\\_S5_") == b"\\_S5_"
    assert aml.name_string("\\_S5") == b"\\_S5_"
    assert aml.name_string("^^ABC") == b"^^ABC_"
    assert aml.name_string("_SB.PCI0") == b"\x2e_SB_PCI0"
    assert aml.name_string("\\_SB.PCI0.ISA") == b"\\\x2f\x03_SB_PCI0ISA_"
    assert aml.name_string("\\") == b"\\\x00"
    for bad in ("1ABC", "ABCDE", "ab", ""):
        with pytest.raises(ValueError):
            aml.name_seg(bad)


def test_s5_package_encodes_as_iasl_would() -> None:
    # Name (\_S5, Package (0x04) {Zero, Zero, Zero, Zero}) as iasl compiles it, but for the root prefix (5c),
    # which iasl drops at the root scope
    encoded = aml.name("\\_S5_", aml.package(*(aml.integer(0) for _ in range(4))))
    assert encoded == bytes.fromhex("08 5c 5f 53 35 5f 12 06 04 00 00 00 00")
