"""Exception and interrupt delivery for the software CPU (Intel SDM vol. 3A ch. 6, vol. 2 INT n).

Implemented:
- §20.1.4 real-address mode: the IVT at IDTR.base, FLAGS/CS/IP pushed, IF/TF/AC cleared, no error code.
- §6.10-6.12 protected mode: 16- and 32-bit interrupt and trap gates, the gate DPL check for software interrupts
  (#GP(vector*8+2)), the checks on the handler's code segment, handlers at the same privilege or more privilege
  with the stack switch from the TSS (SSn:ESPn), interrupts from virtual-8086 mode (§20.3.1.1: GS/FS/DS/ES pushed
  and nulled, ring-0 handlers only).
- §6.14 IA-32e mode: 16-byte gates, 64-bit handlers only, RSPn from the 64-bit TSS, the interrupt stack table
  (§6.14.5), the stack aligned to 16 bytes, SS:RSP always pushed, a null SS at the new CPL.
- §6.13 error codes: EXT set for faults during the delivery of an event not caused by software; the IDT bit for
  faults on a gate.
- §6.15 (table 6-5) double faults: contributory and page-fault classes; #DF while delivering #DF shuts down
  (`TripleFault`). RF is set in the RFLAGS image pushed for fault-class exceptions (§17.3.1.1).

Unsupported: task gates (a hardware task switch: `UnsupportedTaskSwitch`), the CR4.VME interrupt redirection
bitmap in virtual-8086 mode (software interrupts there need IOPL 3, else #GP(0) as without VME), shadow stacks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from popek.cpu.segments import (
    UnsupportedTaskSwitch,
    canonical,
    check_new_ss,
    descriptor_to_segment,
    inner_stack,
    read_descriptor,
    set_sp,
    stack_bits,
    tss64_stack,
    write_frame,
)
from popek.cpu.state import (
    AC,
    CR0_PE,
    CS,
    DS,
    EFER_LMA,
    ES,
    FS,
    GS,
    IF,
    IOPL_MASK,
    NT,
    RF,
    RSP,
    SS,
    TF,
    VM,
    CpuException,
    Segment,
    TripleFault,
    Vector,
)

if TYPE_CHECKING:
    from popek.cpu.core import Cpu

MASK32 = 0xFFFFFFFF
_CONTRIBUTORY = frozenset({Vector.DE, Vector.TS, Vector.NP, Vector.SS, Vector.GP})
# fault-class exceptions: the RFLAGS image they push has RF set, so the restarted instruction's breakpoint does
# not fire again (#DB is a trap here: instruction breakpoints are not emulated)
_FAULTS = frozenset(
    {Vector.DE, Vector.BR, Vector.UD, Vector.NM, Vector.TS, Vector.NP, Vector.SS, Vector.GP, Vector.PF}
    | {Vector.MF, Vector.AC, Vector.XM}
)


def deliver(
    cpu: Cpu,
    vector: int,
    error_code: int | None = None,
    *,
    software: bool = False,
    return_rip: int | None = None,
    cr2: int | None = None,
    push_rf: bool = False,
) -> None:
    """Deliver an exception or interrupt through the IVT/IDT: on return CS:RIP is the handler's first
    instruction. Raises `CpuException` (with EXT set as §6.13 says) when delivery itself faults, leaving the
    registers as they were (CR2 excepted).

    `software`: INT n/INT3/INTO (gate DPL checked against CPL, EXT clear). `return_rip`: the RIP pushed (the
    faulting instruction for faults, the next one for traps and INT n); default `cpu.state.rip`. `error_code` is
    pushed when not None (outside real mode). `cr2`: loaded into CR2 first (a #PF). `push_rf`: set RF in the
    pushed RFLAGS (fault-class exceptions; `handle` does it).
    """
    st = cpu.state
    rip = st.rip if return_rip is None else return_rip
    if cr2 is not None:
        st.cr2 = cr2
    flags = st.rflags | RF if push_rf else st.rflags
    if not st.cr0 & CR0_PE:
        _deliver_real(cpu, vector, rip, flags)
    elif st.efer & EFER_LMA:
        _deliver_long(cpu, vector, error_code, software, rip, flags)
    else:
        _deliver_protected(cpu, vector, error_code, software, rip, flags)
    st.halted = False
    st.interrupt_shadow = False


def _deliver_real(cpu: Cpu, vector: int, rip: int, flags: int) -> None:
    """Real mode: a far call through the 4-byte IVT entry with FLAGS pushed first (§20.1.4)."""
    st = cpu.state
    off = vector * 4
    if off + 3 > st.idtr.limit:
        raise CpuException(Vector.GP, 0)
    entry = cpu.mmu.read(st.idtr.base + off, 4, user=False, implicit=True)
    cs = st.seg[CS]
    bits = stack_bits(cpu)
    frame = [flags & 0xFFFF, cs.selector, rip & 0xFFFF]
    sp = write_frame(cpu, st.seg[SS], st.gpr[RSP], frame, 2, bits, (Vector.SS, 0), False)
    set_sp(st, sp, bits)
    st.rflags &= ~(IF | TF | AC | RF)
    cs.selector = entry >> 16
    cs.base = cs.selector << 4
    st.rip = entry & 0xFFFF


def _gate_error(vector: int, ext: int) -> int:
    """The error code naming an IDT entry (§6.13: IDT bit set)."""
    return vector * 8 + 2 + ext


def _handler_segment(cpu: Cpu, selector: int, ext: int) -> tuple[int, Segment]:
    """The checks on the code segment an interrupt gate names (§6.12.1.1)."""
    st = cpu.state
    if not selector & 0xFFFC:
        raise CpuException(Vector.GP, ext)
    raw = read_descriptor(cpu, selector, ext)
    code = descriptor_to_segment(selector, raw)
    err = (selector & 0xFFFC) | ext
    if not code.s or not code.type & 8 or code.dpl > st.cpl:
        raise CpuException(Vector.GP, err)
    if not code.present:
        raise CpuException(Vector.NP, err)
    return raw, code


def _commit_cs(cpu: Cpu, raw: int, code: Segment, cpl: int) -> None:
    """Load CS with the handler's segment, its RPL the new CPL, setting the descriptor's accessed bit."""
    if not raw & (1 << 40):
        _write_accessed(cpu, code.selector, raw)
    code.type |= 1
    code.selector = (code.selector & 0xFFFC) | cpl
    cpu.state.seg[CS] = code


def _write_accessed(cpu: Cpu, selector: int, raw: int) -> None:
    st = cpu.state
    table = st.ldtr.base if selector & 4 else st.gdtr.base
    cpu.mmu.write(table + (selector & 0xFFF8) + 5, 1, ((raw >> 40) & 0xFF) | 1, user=False, implicit=True)


def _deliver_protected(cpu: Cpu, vector: int, error_code: int | None, software: bool, rip: int, flags: int) -> None:
    """Protected mode (and virtual-8086 mode) delivery through an 8-byte IDT gate (§6.12)."""
    st = cpu.state
    ext = 0 if software else 1
    cpl = st.cpl
    v86 = bool(st.rflags & VM)
    if v86 and software and vector not in (Vector.BP, Vector.OF) and st.rflags & IOPL_MASK != IOPL_MASK:
        raise CpuException(Vector.GP, 0)  # INT n is IOPL-sensitive in virtual-8086 mode (§20.3.3, no VME)
    off = vector * 8
    if off + 7 > st.idtr.limit:
        raise CpuException(Vector.GP, _gate_error(vector, ext))
    gate = cpu.mmu.read(st.idtr.base + off, 8, user=False, implicit=True)
    gtype = (gate >> 40) & 0x1F  # S bit included: must be 0
    if gtype not in (0x5, 0x6, 0x7, 0xE, 0xF):
        raise CpuException(Vector.GP, _gate_error(vector, ext))
    if software and (gate >> 45) & 3 < cpl:
        raise CpuException(Vector.GP, _gate_error(vector, 0))
    if not gate >> 47 & 1:
        raise CpuException(Vector.NP, _gate_error(vector, ext))
    if gtype == 0x5:
        raise UnsupportedTaskSwitch(f"interrupt {vector} through a task gate")
    size = 4 if gtype & 8 else 2
    selector = (gate >> 16) & 0xFFFF
    offset = (gate & 0xFFFF) | ((gate >> 32) & 0xFFFF0000 if size == 4 else 0)
    raw, code = _handler_segment(cpu, selector, ext)
    cs_err = (selector & 0xFFFC) | ext
    old_cs = st.seg[CS].selector
    mask = (1 << (8 * size)) - 1
    tail = [flags & mask, old_cs, rip & mask] + ([] if error_code is None else [error_code & mask])
    if not code.type & 4 and code.dpl < cpl:
        new_cpl = code.dpl
        if v86 and new_cpl != 0:
            raise CpuException(Vector.GP, cs_err)
        ss_sel, new_sp = inner_stack(cpu, new_cpl, ext)
        ss_raw, new_ss = check_new_ss(cpu, ss_sel, new_cpl, ext)
        bits = 32 if new_ss.db else 16
        if offset > code.limit:
            raise CpuException(Vector.GP, ext)
        frame = [st.seg[SS].selector, st.gpr[RSP] & (MASK32 if size == 4 else 0xFFFF), *tail]
        if v86:
            frame = [st.seg[GS].selector, st.seg[FS].selector, st.seg[DS].selector, st.seg[ES].selector, *frame]
        sp = write_frame(cpu, new_ss, new_sp, frame, size, bits, (Vector.SS, (ss_sel & 0xFFFC) | ext), new_cpl == 3)
        if not ss_raw & (1 << 40):
            _write_accessed(cpu, ss_sel, ss_raw)
        new_ss.type |= 1
        _commit_cs(cpu, raw, code, new_cpl)
        st.seg[SS] = new_ss
        set_sp(st, sp, bits)
        if v86:
            for sreg in (ES, DS, FS, GS):
                st.seg[sreg] = Segment(selector=0, base=0, limit=0, type=0, s=0, present=0, unusable=1)
    elif v86:
        raise CpuException(Vector.GP, cs_err)  # a virtual-8086 interrupt must reach a ring-0 handler
    elif code.type & 4 or code.dpl == cpl:
        if offset > code.limit:
            raise CpuException(Vector.GP, ext)
        bits = stack_bits(cpu)
        sp = write_frame(cpu, st.seg[SS], st.gpr[RSP], tail, size, bits, (Vector.SS, ext), cpl == 3)
        _commit_cs(cpu, raw, code, cpl)
        set_sp(st, sp, bits)
    else:
        raise CpuException(Vector.GP, cs_err)
    st.rip = offset
    st.rflags &= ~(TF | VM | RF | NT | (IF if not gtype & 1 else 0))


def _deliver_long(cpu: Cpu, vector: int, error_code: int | None, software: bool, rip: int, flags: int) -> None:
    """IA-32e mode delivery through a 16-byte IDT gate to 64-bit code (§6.14)."""
    st = cpu.state
    ext = 0 if software else 1
    cpl = st.cpl
    off = vector * 16
    if off + 15 > st.idtr.limit:
        raise CpuException(Vector.GP, _gate_error(vector, ext))
    lo = cpu.mmu.read(st.idtr.base + off, 8, user=False, implicit=True)
    hi = cpu.mmu.read(st.idtr.base + off + 8, 8, user=False, implicit=True)
    gtype = (lo >> 40) & 0x1F
    if gtype not in (0xE, 0xF) or (hi >> 40) & 0x1F:
        raise CpuException(Vector.GP, _gate_error(vector, ext))
    if software and (lo >> 45) & 3 < cpl:
        raise CpuException(Vector.GP, _gate_error(vector, 0))
    if not lo >> 47 & 1:
        raise CpuException(Vector.NP, _gate_error(vector, ext))
    selector = (lo >> 16) & 0xFFFF
    offset = (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF0000) | ((hi & MASK32) << 32)
    ist = (lo >> 32) & 7
    raw, code = _handler_segment(cpu, selector, ext)
    cs_err = (selector & 0xFFFC) | ext
    if not code.l or code.db:
        raise CpuException(Vector.GP, cs_err)
    if not code.type & 4 and code.dpl < cpl:
        new_cpl = code.dpl
        new_sp = tss64_stack(cpu, 3 + ist if ist else new_cpl, ext)
    elif code.type & 4 or code.dpl == cpl:
        new_cpl = cpl
        new_sp = tss64_stack(cpu, 3 + ist, ext) if ist else st.gpr[RSP]
    else:
        raise CpuException(Vector.GP, cs_err)
    if not canonical(st, offset):
        raise CpuException(Vector.GP, ext)
    new_sp &= ~0xF
    frame = [st.seg[SS].selector, st.gpr[RSP], flags, st.seg[CS].selector, rip]
    if error_code is not None:
        frame.append(error_code)
    sp = write_frame(cpu, st.seg[SS], new_sp, frame, 8, 64, (Vector.SS, ext), new_cpl == 3)
    _commit_cs(cpu, raw, code, new_cpl)
    if new_cpl != cpl:
        st.seg[SS] = Segment(selector=new_cpl, base=0, limit=0, type=0, s=0, dpl=new_cpl, present=0, unusable=1)
    st.gpr[RSP] = sp
    st.rip = offset
    st.rflags &= ~(TF | VM | RF | NT | (IF if not gtype & 1 else 0))


def _double_fault(first: int, second: int) -> bool:
    """Does `second`, raised while delivering `first`, make a double fault (SDM table 6-5)?"""
    if first == Vector.PF:
        return second == Vector.PF or second in _CONTRIBUTORY
    return first in _CONTRIBUTORY and second in _CONTRIBUTORY


def handle(cpu: Cpu, exc: CpuException, return_rip: int) -> None:
    """Deliver `exc`, raised by the instruction at `return_rip`, with the double-fault rules: a contributory or
    page fault while delivering one becomes #DF(0); any fault while delivering #DF raises `TripleFault`; other
    combinations are handled serially (the second exception is delivered instead)."""
    vector = exc.vector
    try:
        deliver(cpu, vector, exc.error_code, return_rip=return_rip, cr2=exc.cr2, push_rf=vector in _FAULTS)
    except CpuException as second:
        if vector == Vector.DF:
            raise TripleFault(f"{second} while delivering #DF") from None
        if _double_fault(vector, second.vector):
            try:
                deliver(cpu, Vector.DF, 0, return_rip=return_rip)
            except CpuException as third:
                raise TripleFault(f"{third} while delivering #DF") from None
        else:
            handle(cpu, second, return_rip)


def inject_interrupt(cpu: Cpu, vector: int) -> None:
    """Deliver external interrupt `vector` before the instruction at RIP (the caller has checked RFLAGS.IF and
    the interrupt shadow). A fault during delivery is handled as an exception of that instruction."""
    rip = cpu.state.rip
    try:
        deliver(cpu, vector, return_rip=rip)
    except CpuException as exc:
        handle(cpu, exc, rip)


def inject_nmi(cpu: Cpu) -> None:
    """Deliver an NMI (vector 2) and block further NMIs until the next IRET (§6.7.1). The caller checks
    `nmi_blocked` first and clears its pending flag."""
    st = cpu.state
    rip = st.rip
    st.nmi_blocked = True
    try:
        deliver(cpu, Vector.NMI, return_rip=rip)
    except CpuException as exc:
        handle(cpu, exc, rip)
