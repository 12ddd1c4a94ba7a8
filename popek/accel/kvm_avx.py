"""AVX register moves (VMOVDQA, VMOVNTDQA, VMOVNTDQ on YMM registers, VZEROALL) completed in popek for a host that
cannot emulate VEX instructions at guest ring 0 while its guests still see AVX in CPUID, on the vCPU's XSAVE
state (KVM_GET_XSAVE / KVM_SET_XSAVE, in the host's standard layout).

YMMi is XMMi (bits 127:0, the legacy area at 160 + 16 i) and YMM_Hi128 (bits 255:128, state component 2 at the
offset CPUID.(EAX=0DH,ECX=2).EBX gives) (Intel SDM vol. 1 §13.5.2). A component whose XSTATE_BV bit is clear is
in its initial configuration, all zeros (§13.6); writing it sets the bit. VZEROALL zeroes YMM0-YMM15 (vol. 2C).

Faults before any operand is touched (vol. 2A §2.8, table 2-21 "Type 1" / "Type 8" exceptions): #UD where
CR4.OSXSAVE is clear or XCR0 does not enable SSE and AVX state, #NM where CR0.TS is set. The aligned memory forms
raise #GP(0) on an address that is not 32-byte aligned; the memory's own faults come from the caller's memory.
"""

from __future__ import annotations

import struct

import iced_x86

from popek.cpu import xsave
from popek.cpu.state import CpuException, Vector

CR0_TS = 1 << 3
CR4_OSXSAVE = 1 << 18
XCR0_SSE_AVX = 0x6
YMM_COMPONENT = 2
XMM_OFFSET = 160
HEADER = 512

_C = iced_x86.Code
LOAD, STORE, MOVE, ZERO = "load", "store", "move", "zero"
# code -> what it does; the memory forms of these all require a 32-byte aligned operand
MOVES: dict[int, str] = {
    _C.VEX_VMOVDQA_YMM_YMMM256: LOAD,  # or MOVE with a register source
    _C.VEX_VMOVNTDQA_YMM_M256: LOAD,
    _C.VEX_VMOVDQA_YMMM256_YMM: STORE,  # or MOVE with a register destination
    _C.VEX_VMOVNTDQ_M256_YMM: STORE,
    _C.VEX_VZEROALL: ZERO,
}


def check_usable(cr0: int, cr4: int, xcr0: int) -> None:
    if not cr4 & CR4_OSXSAVE or xcr0 & XCR0_SSE_AVX != XCR0_SSE_AVX:
        raise CpuException(Vector.UD)
    if cr0 & CR0_TS:
        raise CpuException(Vector.NM)


def _xstate_bv(area: bytearray) -> int:
    return int(struct.unpack_from("<Q", area, HEADER)[0])


def read_ymm(area: bytearray, layout: dict[int, xsave.Component], index: int) -> int:
    """YMM`index` from a standard-form XSAVE image."""
    bv = _xstate_bv(area)
    low = int.from_bytes(area[XMM_OFFSET + 16 * index : XMM_OFFSET + 16 * index + 16], "little") if bv & 2 else 0
    high = 0
    if bv & 4:
        at = layout[YMM_COMPONENT].offset + 16 * index
        high = int.from_bytes(area[at : at + 16], "little")
    return low | high << 128


def write_ymm(area: bytearray, layout: dict[int, xsave.Component], index: int, value: int) -> None:
    """YMM`index` = value; the SSE and AVX components are then in use. A component brought out of its initial
    configuration gets its other registers' initial values (zeros) written first."""
    bv = _xstate_bv(area)
    high_at = layout[YMM_COMPONENT].offset
    if not bv & 2:
        area[XMM_OFFSET : XMM_OFFSET + 256] = bytes(256)
    if not bv & 4:
        area[high_at : high_at + 256] = bytes(256)
    struct.pack_into("<Q", area, HEADER, bv | XCR0_SSE_AVX)
    area[XMM_OFFSET + 16 * index : XMM_OFFSET + 16 * index + 16] = (value & (2**128 - 1)).to_bytes(16, "little")
    area[high_at + 16 * index : high_at + 16 * index + 16] = (value >> 128 & (2**128 - 1)).to_bytes(16, "little")


def zero_all(area: bytearray, layout: dict[int, xsave.Component]) -> None:
    """VZEROALL: YMM0-YMM15 all zeros (written out, the components marked in use as the processor may)."""
    for i in range(16):
        write_ymm(area, layout, i, 0)


def ymm_index(register: int) -> int:
    return register - iced_x86.Register.YMM0
