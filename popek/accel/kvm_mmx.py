"""MMX data moves (MOVD/MOVQ to, from and between MMX registers) completed in popek for a host that cannot
emulate them at guest ring 0, on the vCPU's x87 state (KVM_GET_FPU / KVM_SET_FPU).

The MMX registers are the low 64 bits of the x87 physical registers R0..R7 (Intel SDM vol. 1 §9.5): MMi is Ri,
whatever the stack top. Every MMX instruction but EMMS sets TOP to 0 and marks all eight tags valid, and a write
to MMi sets bits 79:64 of Ri to all ones (vol. 1 §9.5.1, table 9-2). KVM's kvm_fpu is an FXSAVE image: fpr[i] is
ST(i) = R[(TOP + i) mod 8], and ftwx the abridged tag word (bit i set: Ri valid), so once TOP is 0, fpr[i] is MMi.

Faults come in the order of the instructions' exception tables (vol. 2B MOVD/MOVQ, "64-Bit Mode Exceptions"):
#UD when CR0.EM is set, #NM when CR0.TS is set, #MF when an unmasked x87 exception is pending (FSW.ES), and only
then the memory operand's own faults (#PF, #GP), which the caller's linear memory raises.
"""

from __future__ import annotations

import iced_x86

from popek.cpu.state import CpuException, Vector
from popek.kvm.structs import kvm_fpu

CR0_EM = 1 << 2
CR0_TS = 1 << 3
FSW_ES = 1 << 7
FSW_TOP_SHIFT = 11
FSW_TOP = 7 << FSW_TOP_SHIFT
MMX_EXPONENT = 0xFFFF << 64  # bits 79:64 of a physical register an MMX write leaves

_C = iced_x86.Code
# code -> (operand bytes, destination is an MMX register)
MOVES: dict[int, tuple[int, bool]] = {
    _C.MOVD_MM_RM32: (4, True),
    _C.MOVQ_MM_RM64: (8, True),
    _C.MOVQ_MM_MMM64: (8, True),
    _C.MOVD_RM32_MM: (4, False),
    _C.MOVQ_RM64_MM: (8, False),
    _C.MOVQ_MMM64_MM: (8, False),
}


def check_usable(cr0: int, fsw: int) -> None:
    """The faults an MMX instruction takes before it touches any operand."""
    if cr0 & CR0_EM:
        raise CpuException(Vector.UD)
    if cr0 & CR0_TS:
        raise CpuException(Vector.NM)
    if fsw & FSW_ES:
        raise CpuException(Vector.MF)


def _physical(fpu: kvm_fpu) -> list[bytes]:
    """R0..R7 (10 bytes each) from fpr, which holds them in stack order."""
    top = (fpu.fsw & FSW_TOP) >> FSW_TOP_SHIFT
    return [bytes(fpu.fpr[(j - top) & 7])[:10] for j in range(8)]


def read_mm(fpu: kvm_fpu, index: int) -> int:
    """MMi: bits 63:0 of physical register Ri."""
    return int.from_bytes(_physical(fpu)[index][:8], "little")


def enter_mmx(fpu: kvm_fpu) -> None:
    """What any MMX instruction (EMMS aside) does to the x87 state: TOP = 0, every tag valid."""
    regs = _physical(fpu)
    for j in range(8):
        fpu.fpr[j][:] = list(regs[j] + bytes(6))
    fpu.fsw &= ~FSW_TOP
    fpu.ftwx = 0xFF


def write_mm(fpu: kvm_fpu, index: int, value: int) -> None:
    """MMi = value, bits 79:64 of Ri all ones; `enter_mmx` first, so that fpr[i] is Ri."""
    fpu.fpr[index][:] = list(((value & (2**64 - 1)) | MMX_EXPONENT).to_bytes(10, "little") + bytes(6))


def mm_index(register: int) -> int:
    return register - iced_x86.Register.MM0
