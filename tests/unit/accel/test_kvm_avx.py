"""YMM registers in a standard-form XSAVE image (SDM vol. 1 §13.5.2): XMMi in the legacy area, bits 255:128 in
state component 2; a component whose XSTATE_BV bit is clear reads as zeros (§13.6) and a write sets the bit."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popek.accel import kvm_avx
from popek.cpu import xsave
from popek.cpu.state import CpuException, Vector

LAYOUT = {2: xsave.Component(256, 576, False)}


def _area(xstate_bv: int, fill: int) -> bytearray:
    area = bytearray([fill]) * 4096
    struct.pack_into("<QQ", area, 512, xstate_bv, 0)
    return area


@settings(max_examples=50, deadline=None)
@given(index=st.integers(0, 15), value=st.integers(0, 2**256 - 1), bv=st.sampled_from([0, 2, 4, 6]))
def test_a_ymm_write_reads_back_and_leaves_the_others_as_they_read(index: int, value: int, bv: int) -> None:
    area = _area(bv, 0xA5)  # stale bytes behind components in their initial configuration
    before = [kvm_avx.read_ymm(area, LAYOUT, i) for i in range(16)]
    kvm_avx.write_ymm(area, LAYOUT, index, value)
    assert struct.unpack_from("<Q", area, 512)[0] & 6 == 6
    assert [kvm_avx.read_ymm(area, LAYOUT, i) for i in range(16)] == [
        value if i == index else before[i] for i in range(16)
    ]


def test_a_component_in_its_initial_configuration_reads_as_zeros() -> None:
    area = _area(0, 0xFF)
    assert kvm_avx.read_ymm(area, LAYOUT, 3) == 0
    area = _area(2, 0xFF)  # SSE in use, AVX not: the upper half is zero
    assert kvm_avx.read_ymm(area, LAYOUT, 3) == 2**128 - 1


def test_vzeroall_zeroes_every_ymm_register() -> None:
    area = _area(6, 0x5A)
    kvm_avx.zero_all(area, LAYOUT)
    assert all(kvm_avx.read_ymm(area, LAYOUT, i) == 0 for i in range(16))


@pytest.mark.parametrize(
    "cr0,cr4,xcr0,vector",
    [
        (0, 0, 0x7, Vector.UD),  # CR4.OSXSAVE clear
        (0, kvm_avx.CR4_OSXSAVE, 0x3, Vector.UD),  # XCR0 without AVX state
        (kvm_avx.CR0_TS, kvm_avx.CR4_OSXSAVE, 0x7, Vector.NM),
    ],
)
def test_avx_faults_before_touching_operands(cr0: int, cr4: int, xcr0: int, vector: int) -> None:
    with pytest.raises(CpuException) as exc:
        kvm_avx.check_usable(cr0, cr4, xcr0)
    assert exc.value.vector == vector
