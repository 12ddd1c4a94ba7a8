"""Segmentation, the stack, and privilege transitions for the software CPU (Intel SDM vol. 3A, vol. 2).

Implemented:
- vol. 3A §3.4-3.5 and §5.1-5.6: segment selectors, descriptors and their hidden caches; effective → linear
  address translation with limit checks (expand-up and expand-down, §5.3), type checks (§5.4-5.5) and, in 64-bit
  mode, FS/GS bases and the canonical check (§3.3.7.1, §5.3.1).
- vol. 2 MOV/POP Sreg, LDS..LSS: segment register loads with the null-selector, RPL/DPL/CPL, type and present
  checks and their #GP/#SS/#NP error codes; the accessed bit written back to the descriptor (§3.4.5.1).
- vol. 3A §5.8 and vol. 2 JMP/CALL/RET far: direct far transfers and call gates (16-, 32- and 64-bit), calls to
  more privilege with the stack switch from the TSS (§5.8.5-5.8.6, §7.7 for the 64-bit TSS), parameter copying,
  returns to outer privilege (data segment registers invalid at the new CPL are nulled, §5.8.6).
- vol. 2 IRET: real mode, virtual-8086 mode (IOPL 3), protected mode (same and outer privilege, return to
  virtual-8086 mode from CPL 0), IA-32e mode (64-bit mode always pops SS:RSP; a null SS is allowed when returning
  to 64-bit code at CPL < 3), with the RFLAGS rules (IOPL only at CPL 0, IF only when CPL <= IOPL, VIF/VIP at
  CPL 0). IRET unblocks NMIs.
- vol. 2 SYSCALL/SYSRET (64-bit mode, and the legacy/compatibility forms AMD defines), SYSENTER/SYSEXIT.
- vol. 2 LTR/LLDT (16-byte system descriptors in IA-32e mode, TSS busy bit).
- the stack: `push`/`pop` with the stack-address size of SS (or 64 bits in 64-bit mode).

Unsupported (reported as `UnsupportedTaskSwitch`, a plain Python error, since no architectural exception would be
truthful): hardware task switches (JMP/CALL to a TSS or task gate, IRET with NT=1 outside IA-32e mode; §7.3).
IRET in virtual-8086 mode with IOPL < 3 raises #GP(0) as without CR4.VME (the VME variant is not implemented).
The interpreter raises #UD for instructions invalid in the current mode (MOV CS, LTR in real mode) before
calling here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from popek.cpu.mmu import Access
from popek.cpu.state import (
    AC,
    AF,
    CF,
    CR0_PE,
    CR4_LA57,
    CS,
    DF,
    DS,
    EFER_LMA,
    EFER_SCE,
    ES,
    FS,
    GS,
    ID,
    IF,
    IOPL_MASK,
    IOPL_SHIFT,
    MASK64,
    MSR_CSTAR,
    MSR_IA32_SYSENTER_CS,
    MSR_IA32_SYSENTER_EIP,
    MSR_IA32_SYSENTER_ESP,
    MSR_LSTAR,
    MSR_SFMASK,
    MSR_STAR,
    NT,
    OF,
    PF,
    R11,
    RCX,
    RDX,
    RF,
    RFLAGS_FIXED,
    RSP,
    SF,
    SS,
    TF,
    VIF,
    VIP,
    VM,
    ZF,
    CpuException,
    CpuState,
    Segment,
    Vector,
)

if TYPE_CHECKING:
    from popek.cpu.core import Cpu

MASK32 = 0xFFFFFFFF
_ACCESSED = 1 << 40  # the accessed bit of a code/data descriptor (type bit 0)
_CANON48 = 1 << 47
_CANON57 = 1 << 56


class UnsupportedTaskSwitch(Exception):
    """The guest asked for a hardware task switch, which the software CPU does not implement."""


# --- small helpers ---


def _gp(code: int = 0) -> CpuException:
    return CpuException(Vector.GP, code)


def _sel_error(selector: int, ext: int = 0) -> int:
    """A selector error code (SDM §6.13): index and TI of the selector, EXT in bit 0."""
    return (selector & 0xFFFC) | ext


def _is_null(selector: int) -> bool:
    return not selector & 0xFFFC


def _in_64bit(st: CpuState) -> bool:
    return bool(st.efer & EFER_LMA and st.seg[CS].l)


def _protected(st: CpuState) -> bool:
    """Protected mode proper (not real mode, not virtual-8086 mode)."""
    return bool(st.cr0 & CR0_PE and not st.rflags & VM)


def canonical(st: CpuState, addr: int) -> bool:
    """Is `addr` canonical for the paging mode (48 bits, or 57 with CR4.LA57)?"""
    half = _CANON57 if st.cr4 & CR4_LA57 else _CANON48
    return ((addr + half) & MASK64) < 2 * half


def _null_segment(selector: int, dpl: int = 0) -> Segment:
    """The cache of a segment register loaded with a null selector: unusable (§3.4.4). `dpl` matters only for SS,
    whose DPL is the CPL in 64-bit mode after a null SS load."""
    return Segment(selector=selector, base=0, limit=0, type=0, s=0, dpl=dpl, present=0, unusable=1)


def _real_segment(seg: Segment, selector: int, v86: bool) -> None:
    """Real mode keeps the cached limit and attributes (so "unreal mode" works); virtual-8086 mode loads fixed
    attributes (§20.1.1)."""
    seg.selector = selector
    seg.base = selector << 4
    seg.unusable = 0
    if v86:
        seg.limit, seg.type, seg.s, seg.dpl, seg.present = 0xFFFF, 3, 1, 3, 1
        seg.db = seg.l = seg.g = 0


def within_limit(seg: Segment, offset: int, size: int) -> bool:
    """Do bytes offset..offset+size-1 lie inside the segment (expand-down data segments included, §5.3)?"""
    end = offset + size - 1
    if seg.s and seg.type & 0xC == 0x4:  # expand-down data: valid offsets are limit+1 .. 0xFFFF or 0xFFFFFFFF
        return offset > seg.limit and end <= (MASK32 if seg.db else 0xFFFF)
    return end <= seg.limit or seg.limit == MASK32  # a 4-GiB segment wraps rather than faults


def _offset_ok(st: CpuState, seg: Segment, offset: int) -> bool:
    """Is `offset` a valid new instruction pointer in code segment `seg` (limit, or canonical for 64-bit code)?"""
    if st.efer & EFER_LMA and seg.l:
        return canonical(st, offset)
    return offset <= seg.limit


# --- effective → linear ---


def linear(cpu: Cpu, sreg: int, offset: int, size: int, access: Access) -> int:
    """The linear address of `size` bytes at `offset` in segment `sreg`, or #GP(0) (#SS(0) for SS).

    The interpreter has already masked `offset` to the address size. Real and virtual-8086 mode check only the
    limit; protected mode also checks usability and type; 64-bit mode checks only that the access is canonical.
    """
    st = cpu.state
    if st.efer & EFER_LMA and st.seg[CS].l:
        addr = (st.seg[sreg].base + offset) & MASK64 if sreg >= FS else offset
        half = _CANON57 if st.cr4 & CR4_LA57 else _CANON48
        if ((addr + half) & MASK64) > 2 * half - size:
            raise CpuException(Vector.SS if sreg == SS else Vector.GP, 0)
        return addr
    seg = st.seg[sreg]
    t = seg.type
    if st.cr0 & CR0_PE and not st.rflags & VM:
        if seg.unusable:
            raise CpuException(Vector.SS if sreg == SS else Vector.GP, 0)
        if t & 8:  # code: never writable, readable only with the R bit (execute always, through CS)
            if access == Access.WRITE or (access == Access.READ and not t & 2):
                raise CpuException(Vector.SS if sreg == SS else Vector.GP, 0)
        elif (access == Access.WRITE and not t & 2) or access == Access.EXECUTE:
            raise CpuException(Vector.SS if sreg == SS else Vector.GP, 0)
    limit = seg.limit
    if t & 0xC == 0x4 and seg.s:
        if offset <= limit or offset + size - 1 > (MASK32 if seg.db else 0xFFFF):
            raise CpuException(Vector.SS if sreg == SS else Vector.GP, 0)
    elif offset + size - 1 > limit and limit != MASK32:
        raise CpuException(Vector.SS if sreg == SS else Vector.GP, 0)
    return (seg.base + offset) & MASK32


# --- descriptors ---


def descriptor_to_segment(selector: int, raw: int) -> Segment:
    """The hidden cache a segment register takes from 8-byte descriptor `raw` (§3.4.5); the limit is scaled."""
    g = (raw >> 55) & 1
    limit = (raw & 0xFFFF) | ((raw >> 32) & 0xF0000)
    if g:
        limit = (limit << 12) | 0xFFF
    return Segment(
        selector=selector,
        base=((raw >> 16) & 0xFFFFFF) | (((raw >> 56) & 0xFF) << 24),
        limit=limit,
        type=(raw >> 40) & 0xF,
        s=(raw >> 44) & 1,
        dpl=(raw >> 45) & 3,
        present=(raw >> 47) & 1,
        avl=(raw >> 52) & 1,
        l=(raw >> 53) & 1,
        db=(raw >> 54) & 1,
        g=g,
    )


def _descriptor_address(cpu: Cpu, selector: int, size: int, ext: int) -> int:
    """The linear address of the descriptor `selector` names, or #GP(selector) when it lies beyond the table."""
    st = cpu.state
    if selector & 4:
        if st.ldtr.unusable or _is_null(st.ldtr.selector):
            raise _gp(_sel_error(selector, ext))
        base, limit = st.ldtr.base, st.ldtr.limit
    else:
        base, limit = st.gdtr.base, st.gdtr.limit
    index = selector & 0xFFF8
    if index + size - 1 > limit:
        raise _gp(_sel_error(selector, ext))
    return (base + index) & (MASK64 if st.efer & EFER_LMA else MASK32)


def read_descriptor(cpu: Cpu, selector: int, ext: int = 0) -> int:
    """The 8-byte descriptor for `selector` from the GDT or LDT (an implicit supervisor access), or
    #GP(selector | ext) when beyond the table limit."""
    addr = _descriptor_address(cpu, selector, 8, ext)
    return cpu.mmu.read(addr, 8, user=False, implicit=True)


def read_system_descriptor(cpu: Cpu, selector: int, ext: int = 0) -> tuple[int, int]:
    """A system descriptor: (low, high) 8-byte halves; in IA-32e mode they are 16 bytes (§7.2.3, §5.8.3.1) and
    the limit check covers all 16, outside it `high` is 0."""
    st = cpu.state
    if st.efer & EFER_LMA:
        addr = _descriptor_address(cpu, selector, 16, ext)
        lo = cpu.mmu.read(addr, 8, user=False, implicit=True)
        hi = cpu.mmu.read(addr + 8, 8, user=False, implicit=True)
        return lo, hi
    return read_descriptor(cpu, selector, ext), 0


def _set_accessed(cpu: Cpu, selector: int, raw: int) -> None:
    """Set the accessed bit in a code/data descriptor in memory, as the processor does on a load (§3.4.5.1)."""
    if not raw & _ACCESSED:
        addr = _descriptor_address(cpu, selector, 8, 0)
        cpu.mmu.write(addr + 5, 1, ((raw >> 40) & 0xFF) | 1, user=False, implicit=True)


def _is_code(seg: Segment) -> bool:
    return bool(seg.s and seg.type & 8)


def _is_writable_data(seg: Segment) -> bool:
    return bool(seg.s and seg.type & 0xA == 0x2)


# --- segment register loads ---


def load_segment(cpu: Cpu, sreg: int, selector: int) -> None:
    """MOV/POP/LxS to a data segment register or SS, with every protected-mode check (vol. 2 MOV, §5.10.2-4).

    Real mode changes only selector and base; virtual-8086 mode also loads fixed attributes. CS is loaded only
    by far transfers (`far_jump` etc.); asking for it here is #UD as MOV CS is.
    """
    st = cpu.state
    selector &= 0xFFFF
    if not st.cr0 & CR0_PE or st.rflags & VM:
        _real_segment(st.seg[sreg], selector, bool(st.rflags & VM))
        return
    if sreg == CS:
        raise CpuException(Vector.UD)
    cpl = st.cpl
    rpl = selector & 3
    if sreg == SS:
        if _is_null(selector):
            # 64-bit mode allows a null SS below CPL 3 when RPL = CPL (vol. 2 MOV); the DPL keeps the CPL
            if _in_64bit(st) and cpl < 3 and rpl == cpl:
                st.seg[SS] = _null_segment(selector, cpl)
                return
            raise _gp(0)
        raw = read_descriptor(cpu, selector)
        seg = descriptor_to_segment(selector, raw)
        if rpl != cpl or not _is_writable_data(seg) or seg.dpl != cpl:
            raise _gp(_sel_error(selector))
        if not seg.present:
            raise CpuException(Vector.SS, _sel_error(selector))
    else:
        if _is_null(selector):
            st.seg[sreg] = _null_segment(selector)
            return
        raw = read_descriptor(cpu, selector)
        seg = descriptor_to_segment(selector, raw)
        if not seg.s or (seg.type & 0xA == 0x8):  # system descriptor, or execute-only code
            raise _gp(_sel_error(selector))
        if (not seg.type & 8 or not seg.type & 4) and (rpl > seg.dpl or cpl > seg.dpl):
            raise _gp(_sel_error(selector))  # data or non-conforming code: DPL must be >= both RPL and CPL
        if not seg.present:
            raise CpuException(Vector.NP, _sel_error(selector))
    _set_accessed(cpu, selector, raw)
    seg.type |= 1
    st.seg[sreg] = seg


def load_tr(cpu: Cpu, selector: int) -> None:
    """LTR: load the task register from an available TSS descriptor in the GDT and mark it busy (vol. 2 LTR)."""
    st = cpu.state
    if st.cpl != 0:
        raise _gp(0)
    selector &= 0xFFFF
    if _is_null(selector):
        raise _gp(0)
    if selector & 4:
        raise _gp(_sel_error(selector))
    lo, hi = read_system_descriptor(cpu, selector)
    seg = descriptor_to_segment(selector, lo)
    lma = st.efer & EFER_LMA
    if seg.s or seg.type not in ((9,) if lma else (1, 9)) or (lma and (hi >> 40) & 0x1F):
        raise _gp(_sel_error(selector))
    if not seg.present:
        raise CpuException(Vector.NP, _sel_error(selector))
    if lma:
        seg.base |= (hi & MASK32) << 32
        if not canonical(st, seg.base):
            raise _gp(_sel_error(selector))
    addr = _descriptor_address(cpu, selector, 8, 0)
    cpu.mmu.write(addr + 5, 1, ((lo >> 40) & 0xFF) | 2, user=False, implicit=True)
    seg.type |= 2
    st.tr = seg


def load_ldt(cpu: Cpu, selector: int) -> None:
    """LLDT: load LDTR from an LDT descriptor in the GDT; a null selector leaves LDTR unusable (vol. 2 LLDT)."""
    st = cpu.state
    if st.cpl != 0:
        raise _gp(0)
    selector &= 0xFFFF
    if _is_null(selector):
        st.ldtr = _null_segment(selector)
        return
    if selector & 4:
        raise _gp(_sel_error(selector))
    lo, hi = read_system_descriptor(cpu, selector)
    seg = descriptor_to_segment(selector, lo)
    lma = st.efer & EFER_LMA
    if seg.s or seg.type != 2 or (lma and (hi >> 40) & 0x1F):
        raise _gp(_sel_error(selector))
    if not seg.present:
        raise CpuException(Vector.NP, _sel_error(selector))
    if lma:
        seg.base |= (hi & MASK32) << 32
        if not canonical(st, seg.base):
            raise _gp(_sel_error(selector))
    st.ldtr = seg


# --- the stack ---


def stack_bits(cpu: Cpu) -> int:
    """The stack-address size: 64 in 64-bit mode, else SS.B (32) or 16."""
    return _stack_bits(cpu.state)


def _stack_bits(st: CpuState) -> int:
    if st.efer & EFER_LMA and st.seg[CS].l:
        return 64
    return 32 if st.seg[SS].db else 16


def set_sp(st: CpuState, sp: int, bits: int) -> None:
    """Write the stack pointer for a stack of `bits` (a 16-bit stack keeps RSP's upper bits)."""
    st.gpr[RSP] = (st.gpr[RSP] & ~0xFFFF) | (sp & 0xFFFF) if bits == 16 else sp & ((1 << bits) - 1)


def push(cpu: Cpu, value: int, size: int) -> None:
    """Push `size` bytes: the segment and paging checks happen before RSP changes."""
    st = cpu.state
    bits = _stack_bits(st)
    sp = (st.gpr[RSP] - size) & ((1 << bits) - 1)
    cpu.mmu.write(linear(cpu, SS, sp, size, Access.WRITE), size, value)
    set_sp(st, sp, bits)


def pop(cpu: Cpu, size: int) -> int:
    """Pop `size` bytes: the value is read before RSP changes."""
    st = cpu.state
    bits = _stack_bits(st)
    mask = (1 << bits) - 1
    sp = st.gpr[RSP] & mask
    value = cpu.mmu.read(linear(cpu, SS, sp, size, Access.READ), size)
    set_sp(st, sp + size, bits)
    return value


def _stack_read(cpu: Cpu, sp: int, size: int, index: int) -> int:
    """The `index`-th `size`-byte item above `sp` on the current stack (for pops checked before any change)."""
    st = cpu.state
    bits = _stack_bits(st)
    off = (sp + index * size) & ((1 << bits) - 1)
    return cpu.mmu.read(linear(cpu, SS, off, size, Access.READ), size)


def write_frame(
    cpu: Cpu, ss: Segment, sp: int, values: list[int], size: int, bits: int, fault: tuple[int, int], user: bool
) -> int:
    """Push `values` (first pushed first) onto the stack `ss`:`sp` of `bits` without touching registers.

    Every slot is checked (limit or canonical → `fault` = (vector, error code)) and translated before the first
    byte is written, so a fault leaves memory unchanged. Returns the new stack pointer.
    """
    st = cpu.state
    mask = (1 << bits) - 1
    mmu = cpu.mmu
    addrs = []
    for _ in values:
        sp = (sp - size) & mask
        if bits == 64:
            if not canonical(st, sp) or not canonical(st, sp + size - 1):
                raise CpuException(*fault)
            addr = sp
        else:
            if not within_limit(ss, sp, size):
                raise CpuException(*fault)
            addr = (ss.base + sp) & MASK32
        mmu.translate(addr, Access.WRITE, user)
        mmu.translate(addr + size - 1, Access.WRITE, user)
        addrs.append(addr)
    for addr, value in zip(addrs, values):
        mmu.write(addr, size, value, user=user)
    return sp


# --- far transfers ---


def _code_descriptor(cpu: Cpu, selector: int, ext: int = 0) -> tuple[int, Segment]:
    """Read a descriptor that must be a code segment: (raw, cache), or #GP(selector)."""
    raw = read_descriptor(cpu, selector, ext)
    seg = descriptor_to_segment(selector, raw)
    if not _is_code(seg):
        raise _gp(_sel_error(selector, ext))
    return raw, seg


def _check_64bit_code(st: CpuState, seg: Segment, err: int) -> None:
    """In IA-32e mode a code segment with both L and D set is invalid (§5.2.1)."""
    if st.efer & EFER_LMA and seg.l and seg.db:
        raise _gp(err)


def _load_cs(cpu: Cpu, raw: int, seg: Segment, selector: int, cpl: int) -> None:
    """Commit CS: the selector's RPL becomes the (new) CPL; the accessed bit is set in memory first."""
    _set_accessed(cpu, selector, raw)
    seg.type |= 1
    seg.selector = (selector & 0xFFFC) | cpl
    cpu.state.seg[CS] = seg


def _read_call_gate(cpu: Cpu, selector: int, lo: int) -> tuple[int, int, int, int]:
    """Decode a call gate: (target selector, offset, parameter count, gate size in bytes); 16 bytes in IA-32e
    mode, where only 64-bit gates exist (§5.8.3.1)."""
    st = cpu.state
    gtype = (lo >> 40) & 0xF
    target = (lo >> 16) & 0xFFFF
    if st.efer & EFER_LMA:
        _, hi = read_system_descriptor(cpu, selector)
        if gtype != 0xC or (hi >> 40) & 0x1F:
            raise _gp(_sel_error(selector))
        return target, (lo & 0xFFFF) | (((lo >> 48) & 0xFFFF) << 16) | ((hi & MASK32) << 32), 0, 8
    if gtype == 0x4:
        return target, lo & 0xFFFF, (lo >> 32) & 0x1F, 2
    return target, (lo & 0xFFFF) | (((lo >> 48) & 0xFFFF) << 16), (lo >> 32) & 0x1F, 4


def _far_target(cpu: Cpu, selector: int) -> tuple[int, Segment]:
    """Read the descriptor a far JMP/CALL names and reject what cannot be a target: (raw, cache)."""
    st = cpu.state
    if _is_null(selector):
        raise _gp(0)
    raw = read_descriptor(cpu, selector)
    seg = descriptor_to_segment(selector, raw)
    if seg.s:
        if not seg.type & 8:
            raise _gp(_sel_error(selector))
        return raw, seg
    if seg.type in (0x4, 0xC):
        if st.efer & EFER_LMA and seg.type != 0xC:
            raise _gp(_sel_error(selector))
        return raw, seg
    if seg.type in (0x1, 0x5, 0x9) and not st.efer & EFER_LMA:
        raise UnsupportedTaskSwitch(f"far transfer to task (TSS or task gate) selector {selector:#06x}")
    raise _gp(_sel_error(selector))


def _check_direct_code(st: CpuState, seg: Segment, selector: int, cpl: int) -> None:
    """The privilege checks of a direct far JMP/CALL to a code segment (vol. 2 JMP, CALL)."""
    err = _sel_error(selector)
    if seg.type & 4:  # conforming
        if seg.dpl > cpl:
            raise _gp(err)
    elif selector & 3 > cpl or seg.dpl != cpl:
        raise _gp(err)
    if not seg.present:
        raise CpuException(Vector.NP, err)
    _check_64bit_code(st, seg, err)


def _gate_target(cpu: Cpu, gate: Segment, gate_selector: int, target: int, cpl: int) -> tuple[int, Segment]:
    """The checks on a call gate and the code segment it names, shared by JMP and CALL (§5.8.4)."""
    st = cpu.state
    gerr = _sel_error(gate_selector)
    if gate.dpl < cpl or gate_selector & 3 > gate.dpl:
        raise _gp(gerr)
    if not gate.present:
        raise CpuException(Vector.NP, gerr)
    if _is_null(target):
        raise _gp(0)
    raw, code = _code_descriptor(cpu, target)
    terr = _sel_error(target)
    if code.dpl > cpl:
        raise _gp(terr)
    if not code.present:
        raise CpuException(Vector.NP, terr)
    if st.efer & EFER_LMA and not (code.l and not code.db):
        raise _gp(terr)  # IA-32e call gates lead to 64-bit code only
    return raw, code


def far_jump(cpu: Cpu, selector: int, offset: int) -> None:
    """JMP ptr16:xx / JMP m16:xx (vol. 2 JMP): `offset` is already masked to the operand size."""
    st = cpu.state
    selector &= 0xFFFF
    if not _protected(st):
        if offset > st.seg[CS].limit:
            raise _gp(0)
        _real_segment(st.seg[CS], selector, bool(st.rflags & VM))
        st.rip = offset
        return
    cpl = st.cpl
    raw, seg = _far_target(cpu, selector)
    if seg.s:
        _check_direct_code(st, seg, selector, cpl)
        if not _offset_ok(st, seg, offset):
            raise _gp(0)
        _load_cs(cpu, raw, seg, selector, cpl)
        st.rip = offset
        return
    target, gate_offset, _count, gate_size = _read_call_gate(cpu, selector, raw)
    craw, code = _gate_target(cpu, seg, selector, target, cpl)
    if (code.type & 4 and code.dpl > cpl) or (not code.type & 4 and code.dpl != cpl):
        raise _gp(_sel_error(target))  # JMP through a gate never changes privilege
    if gate_size == 2:
        gate_offset &= 0xFFFF
    if not _offset_ok(st, code, gate_offset):
        raise _gp(0)
    _load_cs(cpu, craw, code, target, cpl)
    st.rip = gate_offset


def inner_stack(cpu: Cpu, dpl: int, ext: int) -> tuple[int, int]:
    """(SS selector, stack pointer) for privilege level `dpl` from the current legacy TSS (§7.2.1, §7.2.2)."""
    st = cpu.state
    tr = st.tr
    terr = _sel_error(tr.selector, ext)
    if tr.type & 8:  # 32-bit TSS: ESPn at 4 + 8n, SSn at 8 + 8n
        off, size = 4 + 8 * dpl, 4
    else:  # 16-bit TSS: SPn at 2 + 4n, SSn at 4 + 4n
        off, size = 2 + 4 * dpl, 2
    if off + 2 * size - 1 > tr.limit:
        raise CpuException(Vector.TS, terr)
    sp = cpu.mmu.read(tr.base + off, size, user=False, implicit=True)
    ss = cpu.mmu.read(tr.base + off + size, 2, user=False, implicit=True)
    return ss, sp


def tss64_stack(cpu: Cpu, index: int, ext: int) -> int:
    """A stack pointer from the 64-bit TSS (§7.7): RSP0-2 for `index` 0-2, IST1-7 for 4-10 (IST n = 3 + n)."""
    st = cpu.state
    tr = st.tr
    off = 4 + 8 * index
    if off + 7 > tr.limit:
        raise CpuException(Vector.TS, _sel_error(tr.selector, ext))
    return cpu.mmu.read(tr.base + off, 8, user=False, implicit=True)


def check_new_ss(cpu: Cpu, ss_sel: int, dpl: int, ext: int) -> tuple[int, Segment]:
    """The checks on the stack segment taken from a TSS for a call or interrupt to privilege `dpl`: #TS, or
    #SS when not present (vol. 2 CALL, §6.12.1)."""
    if _is_null(ss_sel):
        raise CpuException(Vector.TS, ext)
    err = _sel_error(ss_sel, ext)
    try:
        raw = read_descriptor(cpu, ss_sel, ext)
    except CpuException:
        raise CpuException(Vector.TS, err) from None
    seg = descriptor_to_segment(ss_sel, raw)
    if ss_sel & 3 != dpl or seg.dpl != dpl or not _is_writable_data(seg):
        raise CpuException(Vector.TS, err)
    if not seg.present:
        raise CpuException(Vector.SS, err)
    return raw, seg


def far_call(cpu: Cpu, selector: int, offset: int, operand_size: int, return_rip: int) -> None:
    """CALL ptr16:xx / CALL m16:xx (vol. 2 CALL): direct, or through a call gate, possibly to more privilege.

    `operand_size` (16/32/64) sizes the pushes of a direct call; a gate's own size sizes those through it.
    """
    st = cpu.state
    selector &= 0xFFFF
    size = operand_size // 8
    if not _protected(st):
        if offset > st.seg[CS].limit:
            raise _gp(0)
        bits = _stack_bits(st)
        frame = [st.seg[CS].selector, return_rip]
        sp = write_frame(cpu, st.seg[SS], st.gpr[RSP], frame, size, bits, (Vector.SS, 0), st.cpl == 3)
        set_sp(st, sp, bits)
        _real_segment(st.seg[CS], selector, bool(st.rflags & VM))
        st.rip = offset
        return
    cpl = st.cpl
    raw, seg = _far_target(cpu, selector)
    bits = _stack_bits(st)
    if seg.s:
        _check_direct_code(st, seg, selector, cpl)
        if not _offset_ok(st, seg, offset):
            raise _gp(0)
        sp = write_frame(
            cpu, st.seg[SS], st.gpr[RSP], [st.seg[CS].selector, return_rip], size, bits, (Vector.SS, 0), cpl == 3
        )
        _load_cs(cpu, raw, seg, selector, cpl)
        set_sp(st, sp, bits)
        st.rip = offset
        return
    target, gate_offset, count, gate_size = _read_call_gate(cpu, selector, raw)
    craw, code = _gate_target(cpu, seg, selector, target, cpl)
    if gate_size == 2:
        gate_offset &= 0xFFFF
    if not code.type & 4 and code.dpl < cpl:
        _call_more_privilege(cpu, code, craw, target, gate_offset, count, gate_size, return_rip)
        return
    if not _offset_ok(st, code, gate_offset):
        raise _gp(0)
    sp = write_frame(
        cpu, st.seg[SS], st.gpr[RSP], [st.seg[CS].selector, return_rip], gate_size, bits, (Vector.SS, 0), cpl == 3
    )
    _load_cs(cpu, craw, code, target, cpl)
    set_sp(st, sp, bits)
    st.rip = gate_offset


def _call_more_privilege(
    cpu: Cpu, code: Segment, craw: int, target: int, offset: int, count: int, size: int, return_rip: int
) -> None:
    """A call through a gate to a more privileged non-conforming segment: switch to the TSS stack of the new
    CPL, copy `count` parameters (legacy gates), push the caller's SS:SP and CS:IP (vol. 2 CALL, §5.8.5)."""
    st = cpu.state
    dpl = code.dpl
    old_ss, old_sp = st.seg[SS].selector, st.gpr[RSP]
    if size == 8:  # IA-32e: RSPn from the 64-bit TSS, a null SS with RPL = new CPL
        new_sp = tss64_stack(cpu, dpl, 0)
        if not canonical(st, new_sp):
            raise CpuException(Vector.SS, 0)
        if not _offset_ok(st, code, offset):
            raise _gp(0)
        new_ss = _null_segment(dpl, dpl)
        ss_raw = None
        bits = 64
        values = [old_ss, old_sp, st.seg[CS].selector, return_rip]
        fault = (Vector.SS, 0)
    else:
        ss_sel, new_sp = inner_stack(cpu, dpl, 0)
        ss_raw, new_ss = check_new_ss(cpu, ss_sel, dpl, 0)
        bits = 32 if new_ss.db else 16
        params = [_stack_read(cpu, old_sp, size, i) for i in range(count)]
        if not _offset_ok(st, code, offset):
            raise _gp(0)
        values = [old_ss, old_sp & ((1 << (8 * size)) - 1), *reversed(params), st.seg[CS].selector, return_rip]
        fault = (Vector.SS, _sel_error(ss_sel))
    sp = write_frame(cpu, new_ss, new_sp, values, size, bits, fault, False)
    if ss_raw is not None:
        _set_accessed(cpu, new_ss.selector, ss_raw)
        new_ss.type |= 1
    _load_cs(cpu, craw, code, target, dpl)
    st.seg[SS] = new_ss
    set_sp(st, sp, bits)
    st.rip = offset


def _return_checks(cpu: Cpu, cs_sel: int) -> tuple[int, Segment]:
    """The checks on the code segment a far RET or IRET returns to (vol. 2 RET, IRET)."""
    st = cpu.state
    cpl = st.cpl
    if _is_null(cs_sel):
        raise _gp(0)
    raw, seg = _code_descriptor(cpu, cs_sel)
    rpl = cs_sel & 3
    err = _sel_error(cs_sel)
    if rpl < cpl or (seg.type & 4 and seg.dpl > rpl) or (not seg.type & 4 and seg.dpl != rpl):
        raise _gp(err)
    if not seg.present:
        raise CpuException(Vector.NP, err)
    _check_64bit_code(st, seg, err)
    return raw, seg


def _return_ss_checks(cpu: Cpu, ss_sel: int, rpl: int, code: Segment) -> tuple[int | None, Segment]:
    """The checks on the stack segment a return to outer privilege (or an IRET in 64-bit mode) loads. A null SS
    is allowed only when returning to 64-bit code below CPL 3."""
    st = cpu.state
    if _is_null(ss_sel):
        if st.efer & EFER_LMA and code.l and rpl != 3:
            return None, _null_segment(ss_sel, rpl)
        raise _gp(0)
    raw = read_descriptor(cpu, ss_sel)
    seg = descriptor_to_segment(ss_sel, raw)
    err = _sel_error(ss_sel)
    if ss_sel & 3 != rpl or not _is_writable_data(seg) or seg.dpl != rpl:
        raise _gp(err)
    if not seg.present:
        raise CpuException(Vector.SS, err)
    return raw, seg


def _null_invalid_segments(st: CpuState, cpl: int) -> None:
    """After a return to outer privilege, data segment registers the new CPL may not use become null (§5.8.6).
    In IA-32e mode FS and GS keep their base: it is IA32_FS_BASE/IA32_GS_BASE, which only a segment load or
    WRMSR/WRFSBASE change, not the invalidation of the selector (what kvm-unit-tests' per-CPU data in GS relies
    on after a return to ring 3 and back)."""
    for sreg in (ES, DS, FS, GS):
        seg = st.seg[sreg]
        if seg.unusable:
            continue
        if (not seg.type & 8 or not seg.type & 4) and seg.dpl < cpl:
            base = seg.base if st.efer & EFER_LMA and sreg in (FS, GS) else 0
            st.seg[sreg] = _null_segment(0)
            st.seg[sreg].base = base


def far_return(cpu: Cpu, operand_size: int, pop_bytes: int) -> None:
    """RET far [imm16] (vol. 2 RET): to the same or to outer privilege; nothing changes if a check fails."""
    st = cpu.state
    size = operand_size // 8
    sp = st.gpr[RSP]
    bits = _stack_bits(st)
    ip = _stack_read(cpu, sp, size, 0)
    cs_sel = _stack_read(cpu, sp, size, 1) & 0xFFFF
    if not _protected(st):
        if ip > st.seg[CS].limit:
            raise _gp(0)
        _real_segment(st.seg[CS], cs_sel, bool(st.rflags & VM))
        set_sp(st, sp + 2 * size + pop_bytes, bits)
        st.rip = ip
        return
    cpl = st.cpl
    raw, code = _return_checks(cpu, cs_sel)
    rpl = cs_sel & 3
    if rpl == cpl:
        if not _offset_ok(st, code, ip):
            raise _gp(0)
        _load_cs(cpu, raw, code, cs_sel, cpl)
        set_sp(st, sp + 2 * size + pop_bytes, bits)
        st.rip = ip
        return
    base = sp + 2 * size + pop_bytes
    new_sp = _stack_read(cpu, base, size, 0)
    ss_sel = _stack_read(cpu, base, size, 1) & 0xFFFF
    ss_raw, ss = _return_ss_checks(cpu, ss_sel, rpl, code)
    if not _offset_ok(st, code, ip):
        raise _gp(0)
    if ss_raw is not None:
        _set_accessed(cpu, ss_sel, ss_raw)
        ss.type |= 1
    _load_cs(cpu, raw, code, cs_sel, rpl)
    st.seg[SS] = ss
    set_sp(st, new_sp + pop_bytes, _stack_bits(st))
    st.rip = ip
    _null_invalid_segments(st, rpl)


# --- IRET ---

_IRET_REAL_KEEP = VIP | VIF | VM


def _iret_flags(st: CpuState, temp: int, operand_size: int, cpl: int) -> None:
    """Load RFLAGS from an IRET image by the rules of the old CPL (vol. 2 IRET): IOPL and VIF/VIP only at CPL 0,
    IF only when CPL <= IOPL; a 16-bit IRET loads only the low 16 bits. VM is never loaded here."""
    mask = CF | PF | AF | ZF | SF | TF | DF | OF | NT
    if operand_size >= 32:
        mask |= RF | AC | ID
    if cpl <= (st.rflags & IOPL_MASK) >> IOPL_SHIFT:
        mask |= IF
    if cpl == 0:
        mask |= IOPL_MASK
        if operand_size >= 32:
            mask |= VIF | VIP
    if operand_size == 16:
        mask &= 0xFFFF
    st.rflags = (st.rflags & ~mask) | (temp & mask) | RFLAGS_FIXED


def iret(cpu: Cpu, operand_size: int) -> None:
    """IRET/IRETD/IRETQ (vol. 2 IRET, SDM §6.14.3 for 64-bit mode). Unblocks NMIs on success."""
    st = cpu.state
    size = operand_size // 8
    sp = st.gpr[RSP]
    bits = _stack_bits(st)
    if not st.cr0 & CR0_PE or st.rflags & VM:
        v86 = bool(st.rflags & VM)
        if v86 and (st.rflags & IOPL_MASK) != IOPL_MASK:
            raise _gp(0)  # IOPL-sensitive in virtual-8086 mode (the CR4.VME variant is not implemented)
        ip = _stack_read(cpu, sp, size, 0)
        cs_sel = _stack_read(cpu, sp, size, 1) & 0xFFFF
        flags = _stack_read(cpu, sp, size, 2)
        if ip > st.seg[CS].limit:
            raise _gp(0)
        keep = _IRET_REAL_KEEP | (IOPL_MASK if v86 else 0)
        if size == 4:
            st.rflags = (flags & 0x257FD5 & ~keep) | (st.rflags & keep) | RFLAGS_FIXED
        else:
            low_keep = IOPL_MASK if v86 else 0
            st.rflags = (st.rflags & ~0xFFFF) | (flags & 0xFFFF & ~low_keep) | (st.rflags & low_keep) | RFLAGS_FIXED
        _real_segment(st.seg[CS], cs_sel, v86)
        set_sp(st, sp + 3 * size, bits)
        st.rip = ip
        st.nmi_blocked = False
        return
    lma = st.efer & EFER_LMA
    if st.rflags & NT:
        if lma:
            raise _gp(0)
        raise UnsupportedTaskSwitch("IRET with EFLAGS.NT=1 (return from a nested task)")
    in64 = _in_64bit(st)
    cpl = st.cpl
    ip = _stack_read(cpu, sp, size, 0)
    cs_sel = _stack_read(cpu, sp, size, 1) & 0xFFFF
    flags = _stack_read(cpu, sp, size, 2)
    if not lma and flags & VM and cpl == 0 and size == 4:
        _iret_to_v86(cpu, sp, ip, cs_sel, flags)
        return
    raw, code = _return_checks(cpu, cs_sel)
    rpl = cs_sel & 3
    if rpl > cpl or in64:
        new_sp = _stack_read(cpu, sp, size, 3)
        ss_sel = _stack_read(cpu, sp, size, 4) & 0xFFFF
        ss_raw, ss = _return_ss_checks(cpu, ss_sel, rpl, code)
        if not _offset_ok(st, code, ip):
            raise _gp(0)
        if ss_raw is not None:
            _set_accessed(cpu, ss_sel, ss_raw)
            ss.type |= 1
        _iret_flags(st, flags, operand_size, cpl)
        _load_cs(cpu, raw, code, cs_sel, rpl)
        st.seg[SS] = ss
        if size == 8:
            st.gpr[RSP] = new_sp
        else:
            set_sp(st, new_sp, 16 if size == 2 else 32)
        st.rip = ip
        if rpl > cpl:
            _null_invalid_segments(st, rpl)
    else:
        if not _offset_ok(st, code, ip):
            raise _gp(0)
        _iret_flags(st, flags, operand_size, cpl)
        _load_cs(cpu, raw, code, cs_sel, cpl)
        set_sp(st, sp + 3 * size, bits)
        st.rip = ip
    st.nmi_blocked = False


def _iret_to_v86(cpu: Cpu, sp: int, ip: int, cs_sel: int, flags: int) -> None:
    """IRETD at CPL 0 with VM set in the image: pop ESP, SS, ES, DS, FS, GS and enter virtual-8086 mode."""
    st = cpu.state
    rest = [_stack_read(cpu, sp, 4, i) for i in range(3, 9)]
    new_esp, ss_sel, es_sel, ds_sel, fs_sel, gs_sel = rest
    if ip > 0xFFFF:  # beyond the virtual-8086 CS limit
        raise _gp(0)
    st.rflags = (flags & 0x3F7FD5) | RFLAGS_FIXED  # every flag, VM included (§20.2.6)
    for sreg, sel in ((CS, cs_sel), (SS, ss_sel), (ES, es_sel), (DS, ds_sel), (FS, fs_sel), (GS, gs_sel)):
        seg = Segment()
        _real_segment(seg, sel & 0xFFFF, True)
        st.seg[sreg] = seg
    st.gpr[RSP] = new_esp & MASK32
    st.rip = ip & 0xFFFF
    st.nmi_blocked = False


# --- fast system calls ---


def _flat(selector: int, code: bool, dpl: int, long: bool = False) -> Segment:
    """The fixed flat segment caches SYSCALL/SYSRET/SYSENTER/SYSEXIT load (they read no descriptor)."""
    return Segment(
        selector=selector,
        base=0,
        limit=MASK32,
        type=0xB if code else 0x3,
        s=1,
        dpl=dpl,
        present=1,
        db=0 if long else 1,
        l=1 if long else 0,
        g=1,
    )


def syscall(cpu: Cpu, next_rip: int) -> None:
    """SYSCALL (vol. 2 SYSCALL). In 64-bit mode: RCX ← next RIP, R11 ← RFLAGS, RIP ← LSTAR, RFLAGS &= ~SFMASK,
    CS/SS from STAR[47:32]. Compatibility mode uses CSTAR, legacy protected mode STAR[31:0] with IF/VM/RF
    cleared — AMD's definition; on a CPU that names itself Intel the interpreter raises #UD outside 64-bit mode
    before this is reached. #UD when EFER.SCE = 0 or in real/virtual-8086 mode."""
    st = cpu.state
    if not st.efer & EFER_SCE or not _protected(st):
        raise CpuException(Vector.UD)
    star = st.get_msr(MSR_STAR)
    sel = (star >> 32) & 0xFFFC
    if st.efer & EFER_LMA:
        st.gpr[RCX] = next_rip
        st.gpr[R11] = st.rflags
        target = st.get_msr(MSR_LSTAR if st.seg[CS].l else MSR_CSTAR)
        st.rflags = (st.rflags & ~(st.get_msr(MSR_SFMASK) | RF) & MASK32) | RFLAGS_FIXED
        st.seg[CS] = _flat(sel, True, 0, long=True)
        st.rip = target
    else:
        st.gpr[RCX] = next_rip & MASK32
        st.rflags = (st.rflags & ~(VM | IF | RF)) | RFLAGS_FIXED
        st.seg[CS] = _flat(sel, True, 0)
        st.rip = star & MASK32
    st.seg[SS] = _flat(sel + 8, False, 0)


def sysret(cpu: Cpu, operand_size: int) -> None:
    """SYSRET (vol. 2 SYSRET): back to CPL 3 with CS/SS from STAR[63:48]; REX.W returns to 64-bit code.
    #UD when EFER.SCE = 0; #GP(0) unless CPL 0 in protected mode, or (64-bit) when RCX is not canonical."""
    st = cpu.state
    if not st.efer & EFER_SCE or not _protected(st):
        raise CpuException(Vector.UD)
    if st.cpl != 0:
        raise _gp(0)
    base = (st.get_msr(MSR_STAR) >> 48) & 0xFFFF
    if st.efer & EFER_LMA:
        if operand_size == 64:
            if not canonical(st, st.gpr[RCX]):
                raise _gp(0)
            st.seg[CS] = _flat(((base + 16) & 0xFFFC) | 3, True, 3, long=True)
            st.rip = st.gpr[RCX]
        else:
            st.seg[CS] = _flat((base & 0xFFFC) | 3, True, 3)
            st.rip = st.gpr[RCX] & MASK32
        st.rflags = (st.gpr[R11] & 0x3C7FD7) | RFLAGS_FIXED
    else:
        st.seg[CS] = _flat((base & 0xFFFC) | 3, True, 3)
        st.rip = st.gpr[RCX] & MASK32
        st.rflags |= IF
    st.seg[SS] = _flat(((base + 8) & 0xFFFC) | 3, False, 3)


def sysenter(cpu: Cpu) -> None:
    """SYSENTER (vol. 2 SYSENTER): to CPL 0 at SYSENTER_EIP/ESP with flat CS/SS from SYSENTER_CS; 64-bit code
    in IA-32e mode. #GP(0) in real mode or when SYSENTER_CS is null."""
    st = cpu.state
    cs = st.get_msr(MSR_IA32_SYSENTER_CS) & 0xFFFF
    if not st.cr0 & CR0_PE or not cs & 0xFFFC:
        raise _gp(0)
    st.rflags = (st.rflags & ~(VM | IF | RF)) | RFLAGS_FIXED
    lma = bool(st.efer & EFER_LMA)
    st.seg[CS] = _flat(cs & 0xFFFC, True, 0, long=lma)
    st.seg[SS] = _flat((cs + 8) & 0xFFFC, False, 0)
    if lma:
        st.gpr[RSP] = st.get_msr(MSR_IA32_SYSENTER_ESP)
        st.rip = st.get_msr(MSR_IA32_SYSENTER_EIP)
    else:
        st.gpr[RSP] = st.get_msr(MSR_IA32_SYSENTER_ESP) & MASK32
        st.rip = st.get_msr(MSR_IA32_SYSENTER_EIP) & MASK32


def sysexit(cpu: Cpu, operand_size: int) -> None:
    """SYSEXIT (vol. 2 SYSEXIT): to CPL 3 at RDX with stack RCX; REX.W returns to 64-bit code. #GP(0) unless
    CPL 0 in protected mode with SYSENTER_CS non-null, or (64-bit) when RCX or RDX is not canonical."""
    st = cpu.state
    cs = st.get_msr(MSR_IA32_SYSENTER_CS) & 0xFFFF
    if not _protected(st) or not cs & 0xFFFC or st.cpl != 0:
        raise _gp(0)
    if operand_size == 64:
        if not canonical(st, st.gpr[RCX]) or not canonical(st, st.gpr[RDX]):
            raise _gp(0)
        st.seg[CS] = _flat(((cs + 32) & 0xFFFC) | 3, True, 3, long=True)
        st.seg[SS] = _flat(((cs + 40) & 0xFFFC) | 3, False, 3)
        st.gpr[RSP] = st.gpr[RCX]
        st.rip = st.gpr[RDX]
    else:
        st.seg[CS] = _flat(((cs + 16) & 0xFFFC) | 3, True, 3)
        st.seg[SS] = _flat(((cs + 24) & 0xFFFC) | 3, False, 3)
        st.gpr[RSP] = st.gpr[RCX] & MASK32
        st.rip = st.gpr[RDX] & MASK32
