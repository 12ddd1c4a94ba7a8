"""Translating popek's backend-neutral CPU state to and from KVM's register structures."""

from __future__ import annotations

from popek.boot.entry import EntryState, Mode, Segment
from popek.kvm import VcpuFd
from popek.kvm.structs import kvm_segment

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def _load_segment(dst: kvm_segment, seg: Segment) -> None:
    dst.selector, dst.base, dst.limit = seg.selector, seg.base, seg.limit
    dst.type, dst.s, dst.dpl, dst.present = seg.type, seg.s, seg.dpl, seg.present
    dst.db, dst.l, dst.g, dst.avl = seg.db, seg.l, seg.g, seg.avl
    dst.unusable = 0


def apply_entry(vcpu: VcpuFd, entry: EntryState) -> None:
    sregs = vcpu.get_sregs()
    _load_segment(sregs.cs, entry.cs)
    for name in ("ds", "es", "fs", "gs", "ss"):
        _load_segment(getattr(sregs, name), entry.ds)
    if entry.tr is not None:
        _load_segment(sregs.tr, entry.tr)
    if entry.mode is not Mode.REAL:
        sregs.gdt.base, sregs.gdt.limit = entry.gdt
        sregs.idt.base, sregs.idt.limit = entry.idt
        sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = entry.cr0, entry.cr3, entry.cr4, entry.efer
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    for name in GPRS:
        setattr(regs, name, entry.regs.get(name, 0))
    regs.rip, regs.rflags = entry.rip, entry.rflags
    vcpu.set_regs(regs)
    fpu = vcpu.get_fpu()
    fpu.fcw, fpu.mxcsr = 0x37F, 0x1F80
    vcpu.set_fpu(fpu)


def format_segment(name: str, seg: kvm_segment) -> str:
    return (
        f"{name:<3} sel={seg.selector:04x} base={seg.base:016x} limit={seg.limit:08x} "
        f"type={seg.type:x} s={seg.s} dpl={seg.dpl} p={seg.present} db={seg.db} l={seg.l} g={seg.g}"
    )


def register_dump(vcpu: VcpuFd) -> str:
    """The vCPU's architectural state, for a triple fault or an internal error report."""
    try:
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    except OSError as e:  # pragma: no cover - a dead vCPU fd
        return f"(registers unavailable: {e})"
    lines = [f"vCPU {vcpu.id}:"]
    row = []
    for i, name in enumerate(GPRS):
        row.append(f"{name.upper():>3}={getattr(regs, name):016x}")
        if i % 4 == 3:
            lines.append("  " + " ".join(row))
            row = []
    lines.append(f"  RIP={regs.rip:016x} RFLAGS={regs.rflags:08x}")
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        lines.append("  " + format_segment(name.upper(), getattr(sregs, name)))
    lines.append(f"  GDT={sregs.gdt.base:016x}/{sregs.gdt.limit:04x} IDT={sregs.idt.base:016x}/{sregs.idt.limit:04x}")
    lines.append(
        f"  CR0={sregs.cr0:08x} CR2={sregs.cr2:016x} CR3={sregs.cr3:016x} CR4={sregs.cr4:08x} "
        f"EFER={sregs.efer:x} APIC_BASE={sregs.apic_base:x}"
    )
    return "\n".join(lines)
