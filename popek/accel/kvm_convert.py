"""Conversions between KVM's register structures (kvm_regs, kvm_sregs) and the software CPU's `CpuState`, and the
flat view of architectural state (`ArchState`: field name -> int) that the lockstep checker compares.

The flat view holds what both backends define the same way: the 16 GPRs, RIP, RFLAGS, the six segment registers,
TR and LDTR (selector, base, byte-granular limit, and the attributes packed as in VMX access rights: type, S, DPL,
P, L, D/B, G; AVL is software-defined and left out), GDTR, IDTR, CR0, CR2, CR3, CR4 and EFER.

A data segment register (DS, ES, FS, GS, SS) or LDTR holding a null selector keeps whatever hidden state the
implementation chose (Intel marks it unusable, AMD keeps stale attributes, popek's CPU marks it unusable): for
those only the selector is compared, plus the FS and GS bases, which 64-bit code uses with null selectors.
Fields that are not compared hold `NOT_COMPARED` on both sides.
"""

from __future__ import annotations

from popek.cpu.state import GPR_NAMES, SEGMENT_NAMES, CpuState, Segment, TableRegister
from popek.kvm.structs import kvm_regs, kvm_segment, kvm_sregs

ArchState = dict[str, int]

NOT_COMPARED = -1
KVM_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", *(f"r{i}" for i in range(8, 16)))
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_NULL_OK = frozenset({"ds", "es", "fs", "gs", "ss", "ldt"})  # a null selector is legal and leaves hidden state
_BASE_USED_WHEN_NULL = frozenset({"fs", "gs"})


def pack_attributes(type_: int, s: int, dpl: int, present: int, l: int, db: int, g: int) -> int:
    """Segment attributes in the VMX access-rights layout (SDM vol. 3C table 24-2), without AVL."""
    return (
        (type_ & 0xF)
        | (s & 1) << 4
        | (dpl & 3) << 5
        | (present & 1) << 7
        | (l & 1) << 13
        | (db & 1) << 14
        | (g & 1) << 15
    )


def describe_attributes(attr: int) -> str:
    if attr == NOT_COMPARED:
        return "-"
    return (
        f"type={attr & 0xF:x} s={attr >> 4 & 1} dpl={attr >> 5 & 3} p={attr >> 7 & 1} "
        f"l={attr >> 13 & 1} db={attr >> 14 & 1} g={attr >> 15 & 1}"
    )


def _put_segment(out: ArchState, name: str, selector: int, base: int, limit: int, attr: int) -> None:
    out[f"{name}.sel"] = selector
    if name in _NULL_OK and selector & 0xFFFC == 0:
        out[f"{name}.base"] = base if name in _BASE_USED_WHEN_NULL else NOT_COMPARED
        out[f"{name}.limit"] = NOT_COMPARED
        out[f"{name}.attr"] = NOT_COMPARED
    else:
        out[f"{name}.base"] = base
        out[f"{name}.limit"] = limit
        out[f"{name}.attr"] = attr


def _kvm_segment(out: ArchState, name: str, seg: kvm_segment) -> None:
    attr = pack_attributes(seg.type, seg.s, seg.dpl, seg.present, seg.l, seg.db, seg.g)
    _put_segment(out, name, seg.selector, seg.base, seg.limit, attr)


def _cpu_segment(out: ArchState, name: str, seg: Segment) -> None:
    attr = pack_attributes(seg.type, seg.s, seg.dpl, seg.present, seg.l, seg.db, seg.g)
    _put_segment(out, name, seg.selector, seg.base, seg.limit, attr)


def arch_from_kvm(regs: kvm_regs, sregs: kvm_sregs) -> ArchState:
    out: ArchState = {name: int(getattr(regs, name)) for name in KVM_GPRS}
    out["rip"], out["rflags"] = int(regs.rip), int(regs.rflags)
    for name in SEGMENTS:
        _kvm_segment(out, name, getattr(sregs, name))
    out["gdt.base"], out["gdt.limit"] = int(sregs.gdt.base), int(sregs.gdt.limit)
    out["idt.base"], out["idt.limit"] = int(sregs.idt.base), int(sregs.idt.limit)
    for name in ("cr0", "cr2", "cr3", "cr4", "efer"):
        out[name] = int(getattr(sregs, name))
    return out


def arch_from_cpu(state: CpuState) -> ArchState:
    out: ArchState = {name: state.gpr[GPR_NAMES.index(name)] for name in KVM_GPRS}
    out["rip"], out["rflags"] = state.rip, state.rflags
    for name in SEGMENTS[:6]:
        _cpu_segment(out, name, state.seg[SEGMENT_NAMES.index(name)])
    _cpu_segment(out, "tr", state.tr)
    _cpu_segment(out, "ldt", state.ldtr)
    out["gdt.base"], out["gdt.limit"] = state.gdtr.base, state.gdtr.limit
    out["idt.base"], out["idt.limit"] = state.idtr.base, state.idtr.limit
    out["cr0"], out["cr2"], out["cr3"], out["cr4"], out["efer"] = state.cr0, state.cr2, state.cr3, state.cr4, state.efer
    return out


def segment_from_kvm(seg: kvm_segment) -> Segment:
    return Segment(
        selector=seg.selector, base=seg.base, limit=seg.limit, type=seg.type, s=seg.s, dpl=seg.dpl,
        present=seg.present, db=seg.db, l=seg.l, g=seg.g, avl=seg.avl, unusable=seg.unusable,
    )  # fmt: skip


def load_cpu_from_kvm(state: CpuState, regs: kvm_regs, sregs: kvm_sregs) -> None:
    """Give a software vCPU the registers of a KVM vCPU, so that both start a lockstep run from one state
    (KVM may adjust what it was given: CR0.ET, EFER.LMA, segment accessed bits)."""
    for name in KVM_GPRS:
        state.gpr[GPR_NAMES.index(name)] = int(getattr(regs, name))
    state.rip, state.rflags = int(regs.rip), int(regs.rflags)
    for name in SEGMENTS[:6]:
        state.seg[SEGMENT_NAMES.index(name)] = segment_from_kvm(getattr(sregs, name))
    state.tr = segment_from_kvm(sregs.tr)
    state.ldtr = segment_from_kvm(sregs.ldt)
    state.gdtr = TableRegister(int(sregs.gdt.base), int(sregs.gdt.limit))
    state.idtr = TableRegister(int(sregs.idt.base), int(sregs.idt.limit))
    state.cr0, state.cr2, state.cr3 = int(sregs.cr0), int(sregs.cr2), int(sregs.cr3)
    state.cr4, state.cr8, state.efer = int(sregs.cr4), int(sregs.cr8), int(sregs.efer)
    state.halted = False


def store_segment(dst: kvm_segment, seg: Segment) -> None:
    dst.selector, dst.base, dst.limit = seg.selector, seg.base, seg.limit
    dst.type, dst.s, dst.dpl, dst.present = seg.type, seg.s, seg.dpl, seg.present
    dst.db, dst.l, dst.g, dst.avl = seg.db, seg.l, seg.g, seg.avl
    dst.unusable = 1 if seg.unusable or not seg.present else 0


def store_cpu_to_kvm(state: CpuState, regs: kvm_regs, sregs: kvm_sregs) -> None:
    """The inverse of `load_cpu_from_kvm`, for the fields `ArchState` compares (others in `regs`/`sregs` kept)."""
    for name in KVM_GPRS:
        setattr(regs, name, state.gpr[GPR_NAMES.index(name)])
    regs.rip, regs.rflags = state.rip, state.rflags
    for name in SEGMENTS[:6]:
        store_segment(getattr(sregs, name), state.seg[SEGMENT_NAMES.index(name)])
    store_segment(sregs.tr, state.tr)
    store_segment(sregs.ldt, state.ldtr)
    sregs.gdt.base, sregs.gdt.limit = state.gdtr.base, state.gdtr.limit
    sregs.idt.base, sregs.idt.limit = state.idtr.base, state.idtr.limit
    sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.efer = state.cr0, state.cr2, state.cr3, state.cr4, state.efer
