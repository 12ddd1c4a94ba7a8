"""MMX registers on KVM's kvm_fpu (an FXSAVE image, fpr[i] = ST(i)): MMi is physical register Ri whatever TOP is,
an MMX move sets TOP to 0 and every tag valid, and a write leaves bits 79:64 all ones (SDM vol. 1 §9.5.1)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popek.accel import kvm_mmx
from popek.cpu.state import CpuException, Vector
from popek.kvm.structs import kvm_fpu


def _fpu(top: int, physical: list[int]) -> kvm_fpu:
    fpu = kvm_fpu()
    fpu.fsw, fpu.ftwx = top << 11, 0x0F
    for j, r in enumerate(physical):
        fpu.fpr[(j - top) & 7][:] = list(r.to_bytes(10, "little") + bytes(6))
    return fpu


@settings(max_examples=50, deadline=None)
@given(
    top=st.integers(0, 7),
    physical=st.lists(st.integers(0, 2**80 - 1), min_size=8, max_size=8),
    index=st.integers(0, 7),
    value=st.integers(0, 2**64 - 1),
)
def test_an_mmx_write_lands_in_the_physical_register_and_resets_the_stack_top(
    top: int, physical: list[int], index: int, value: int
) -> None:
    fpu = _fpu(top, physical)
    assert [kvm_mmx.read_mm(fpu, j) for j in range(8)] == [r & (2**64 - 1) for r in physical]
    kvm_mmx.enter_mmx(fpu)
    kvm_mmx.write_mm(fpu, index, value)
    assert (fpu.fsw >> 11) & 7 == 0 and fpu.ftwx == 0xFF
    for j in range(8):
        raw = int.from_bytes(bytes(fpu.fpr[j])[:10], "little")
        assert raw == (value | 0xFFFF << 64 if j == index else physical[j])
        assert kvm_mmx.read_mm(fpu, j) == (value if j == index else physical[j] & (2**64 - 1))


@pytest.mark.parametrize(
    "cr0,fsw,vector",
    [
        (kvm_mmx.CR0_EM | kvm_mmx.CR0_TS, kvm_mmx.FSW_ES, Vector.UD),
        (kvm_mmx.CR0_TS, kvm_mmx.FSW_ES, Vector.NM),
        (0, kvm_mmx.FSW_ES, Vector.MF),
    ],
)
def test_an_mmx_instruction_faults_in_the_documented_order(cr0: int, fsw: int, vector: int) -> None:
    with pytest.raises(CpuException) as exc:
        kvm_mmx.check_usable(cr0, fsw)
    assert exc.value.vector == vector


def test_an_mmx_instruction_runs_with_the_fpu_usable_and_no_pending_exception() -> None:
    kvm_mmx.check_usable(0x80000011, 0)  # no exception
