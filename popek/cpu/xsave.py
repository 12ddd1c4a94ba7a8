"""XSAVE-managed processor state (Intel SDM vol. 1, chapter 13): saving it to and restoring it from an XSAVE
area in guest memory, in standard and compacted form.

The processor's state is itself held as a standard-form XSAVE area (`state`, e.g. KVM_GET_XSAVE's region), so
save and restore are copies between two areas with the architecture's rules about which components move,
which are initialised, and what the header says. Component offsets and sizes come from CPUID leaf 0xD as the
guest sees it. The init optimisation is honoured through XSTATE_BV of `state` (XINUSE).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

LEGACY_SIZE = 512
HEADER_OFFSET = 512
HEADER_SIZE = 64
EXTENDED_START = LEGACY_SIZE + HEADER_SIZE
COMPACTED = 1 << 63
X87, SSE, AVX = 0, 1, 2
MXCSR_OFFSET = 24
MXCSR_DEFAULT = 0x1F80
FCW_DEFAULT = 0x037F
X87_RANGES = ((0, MXCSR_OFFSET), (32, 160))
SSE_RANGE = (160, 416)


class XsaveFault(Exception):
    """The instruction raises #GP(0): a misaligned area or an invalid header."""


@dataclass(frozen=True)
class Component:
    size: int
    offset: int  # in the standard form
    align64: bool  # in the compacted form


def layout_from_cpuid(leaves: Mapping[int, tuple[int, int, int, int]]) -> dict[int, Component]:
    """`leaves` maps sub-leaf i of CPUID 0xD to (eax, ebx, ecx, edx) for the extended components i ≥ 2."""
    return {i: Component(eax, ebx, bool(ecx & 2)) for i, (eax, ebx, ecx, _edx) in leaves.items() if i >= 2 and eax}


def _compacted_offsets(layout: Mapping[int, Component], xcomp_bv: int) -> dict[int, int]:
    offsets, pos = {}, EXTENDED_START
    for i in sorted(layout):
        if xcomp_bv & (1 << i):
            if layout[i].align64:
                pos = (pos + 63) & ~63
            offsets[i] = pos
            pos += layout[i].size
    return offsets


def area_size(layout: Mapping[int, Component], rfbm: int, compacted: bool) -> int:
    if compacted:
        offsets = _compacted_offsets(layout, rfbm)
        return max([EXTENDED_START] + [offsets[i] + layout[i].size for i in offsets])
    return max([EXTENDED_START] + [c.offset + c.size for i, c in layout.items() if rfbm & (1 << i)])


def _header(area: bytes | bytearray) -> tuple[int, int]:
    xstate_bv, xcomp_bv = struct.unpack_from("<QQ", area, HEADER_OFFSET)
    return int(xstate_bv), int(xcomp_bv)


def save(
    state: bytes, old_area: bytes, xcr0: int, mask: int, layout: Mapping[int, Component], compacted: bool
) -> bytes:
    """XSAVE/XSAVEOPT (standard) or XSAVEC (compacted): the new contents of the area in guest memory.

    `old_area` is the area's current contents (XSAVE leaves what it does not write unchanged)."""
    rfbm = xcr0 & mask
    xinuse, _ = _header(state)
    xinuse |= 1 << X87 | 1 << SSE  # legacy state is always written, as hardware without init tracking does
    area = bytearray(old_area)
    if rfbm & (1 << X87):
        for lo, hi in X87_RANGES:
            area[lo:hi] = state[lo:hi]
    if rfbm & (1 << SSE):
        area[SSE_RANGE[0] : SSE_RANGE[1]] = state[SSE_RANGE[0] : SSE_RANGE[1]]
    if rfbm & ((1 << SSE) | (1 << AVX)):
        area[MXCSR_OFFSET : MXCSR_OFFSET + 8] = state[MXCSR_OFFSET : MXCSR_OFFSET + 8]
    old_bv, _ = _header(area)
    if compacted:
        offsets = _compacted_offsets(layout, rfbm)
        for i, off in offsets.items():
            if xinuse & (1 << i):
                c = layout[i]
                area[off : off + c.size] = state[c.offset : c.offset + c.size]
        xstate_bv, xcomp_bv = xinuse & rfbm, COMPACTED | rfbm
    else:
        for i, c in layout.items():
            if rfbm & xinuse & (1 << i):
                area[c.offset : c.offset + c.size] = state[c.offset : c.offset + c.size]
        xstate_bv, xcomp_bv = (old_bv & ~rfbm) | (xinuse & rfbm), 0
    struct.pack_into("<QQ", area, HEADER_OFFSET, xstate_bv, xcomp_bv)
    return bytes(area)


def restore(state: bytes, area: bytes, xcr0: int, mask: int, layout: Mapping[int, Component]) -> bytes:
    """XRSTOR: the processor state (a standard-form area) after loading `area` from guest memory."""
    rfbm = xcr0 & mask
    xstate_bv, xcomp_bv = _header(area)
    if any(area[HEADER_OFFSET + 16 : HEADER_OFFSET + HEADER_SIZE]):
        raise XsaveFault("reserved bytes of the XSAVE header are not zero")
    compacted = bool(xcomp_bv & COMPACTED)
    if compacted:
        if xcomp_bv & ~COMPACTED & ~xcr0 or xstate_bv & ~xcomp_bv:
            raise XsaveFault("XCOMP_BV or XSTATE_BV names components not enabled in XCR0")
        offsets = _compacted_offsets(layout, xcomp_bv & ~COMPACTED)
    else:
        if xcomp_bv or xstate_bv & ~xcr0:
            raise XsaveFault("XSTATE_BV names components not enabled in XCR0")
        offsets = {i: c.offset for i, c in layout.items()}
    out = bytearray(state)
    new_bv, _ = _header(out)
    if rfbm & (1 << X87):
        if xstate_bv & (1 << X87):
            for lo, hi in X87_RANGES:
                out[lo:hi] = area[lo:hi]
        else:
            for lo, hi in X87_RANGES:
                out[lo:hi] = bytes(hi - lo)
            struct.pack_into("<H", out, 0, FCW_DEFAULT)
    if rfbm & (1 << SSE):
        lo, hi = SSE_RANGE
        out[lo:hi] = area[lo:hi] if xstate_bv & (1 << SSE) else bytes(hi - lo)
    if rfbm & ((1 << SSE) | (1 << AVX)):
        if compacted and not xstate_bv & (1 << SSE):
            struct.pack_into("<I", out, MXCSR_OFFSET, MXCSR_DEFAULT)
        else:
            mxcsr = struct.unpack_from("<I", area, MXCSR_OFFSET)[0]
            if mxcsr & 0xFFFF0000:
                raise XsaveFault(f"MXCSR {mxcsr:#x} sets reserved bits")
            struct.pack_into("<I", out, MXCSR_OFFSET, mxcsr)
    for i, c in layout.items():
        if not rfbm & (1 << i):
            continue
        if xstate_bv & (1 << i) and i in offsets:
            out[c.offset : c.offset + c.size] = area[offsets[i] : offsets[i] + c.size]
        else:
            out[c.offset : c.offset + c.size] = bytes(c.size)
    new_bv = (new_bv & ~rfbm) | (xstate_bv & rfbm) | (rfbm & ((1 << X87) | (1 << SSE)))
    struct.pack_into("<QQ", out, HEADER_OFFSET, new_bv, 0)
    return bytes(out)
