"""The software CPU's FPU state to and from KVM's kvm_fpu (an FXSAVE image: fpr[i] is ST(i), ftwx the abridged
tag by physical register), without /dev/kvm: the round trip is exact and the registers land in physical order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from popek.accel.kvm_softcpu import _load_fpu, _store_fpu
from popek.cpu import x87
from popek.cpu.state import CpuState
from popek.kvm.structs import kvm_fpu


def _fpu(top: int, regs: list[int], ftwx: int, fop: int, fip: int, fdp: int) -> kvm_fpu:
    fpu = kvm_fpu()
    fpu.fcw, fpu.fsw, fpu.ftwx, fpu.mxcsr = 0x37F, top << 11 | 0x4100, ftwx, 0x1F80
    fpu.last_opcode, fpu.last_ip, fpu.last_dp = fop, fip, fdp
    for i, r in enumerate(regs):
        fpu.fpr[i][:] = list(r.to_bytes(10, "little") + bytes(6))
    return fpu


@settings(max_examples=50, deadline=None)
@given(
    top=st.integers(0, 7),
    regs=st.lists(st.integers(0, 2**80 - 1), min_size=8, max_size=8),
    ftwx=st.integers(0, 255),
    fop=st.integers(0, 0x7FF),
    fip=st.integers(0, 2**64 - 1),
    fdp=st.integers(0, 2**64 - 1),
)
def test_fpu_state_round_trips_and_keeps_stack_order(
    top: int, regs: list[int], ftwx: int, fop: int, fip: int, fdp: int
) -> None:
    fpu = _fpu(top, regs, ftwx, fop, fip, fdp)
    state = CpuState()
    _load_fpu(state, fpu)
    stack = x87.Stack(state)
    assert [stack.raw(i) for i in range(8)] == regs  # ST(i) is fpr[i] whatever TOP is
    assert state.st[top] == regs[0] and state.ftw == ftwx
    assert (state.fop, state.fip, state.fdp) == (fop, fip, fdp)
    out = kvm_fpu()
    _store_fpu(state, out)
    assert bytes(out) == bytes(fpu)
