"""A snapshot taken on one backend restored on the other (docs/snapshot-state.md, "Across backends"): `convert`
turns the whole state (`popek.vm_snapshot` top level) of a KVM VM into the state a software-CPU VM's restore
takes, and the reverse, field by field, so the guest goes on from the same instruction.

What is converted (the mapping table is in docs/snapshot-state.md):
- vCPUs: kvm_regs <-> GPRs, RIP, RFLAGS; kvm_sregs(2) <-> segments with their hidden parts, GDTR/IDTR, CR0-CR4,
  CR8, EFER, the PAE PDPTRs (KVM_GET_SREGS2, api.rst 4.131); kvm_debugregs <-> DR0-3, DR6, DR7; the XSAVE legacy
  area (the FXSAVE64 layout, SDM vol. 1 §10.5.1 table 10-2, in the non-compacted XSAVE image KVM_GET_XSAVE gives,
  vol. 1 §13.4) <-> x87 and SSE state; XCR0; PKRU (XSAVE component 9, at the offset CPUID.(0xD,9).EBX gives);
  MSRs both sides know (SYSENTER, STAR/LSTAR/CSTAR/SFMASK, KERNEL_GS_BASE, TSC_AUX, PAT, MTRRs, MISC_ENABLE,
  TSC_ADJUST, MCG_STATUS and the MCE banks), the TSC (soft: `tsc_offset` over the virtual clock), IA32_APIC_BASE
  and TSC_DEADLINE (the soft side keeps both in its local APIC); kvm_vcpu_events and the MP state <-> NMI
  pending/blocked, the interrupt shadow, halted, waiting for a SIPI.
- The interrupt platform: KVM_GET_IRQCHIP's kvm_pic_state pair and kvm_ioapic_state <-> popek's 8259A pair and
  I/O APIC; the KVM LAPIC register page (SDM vol. 3A table 11-1 offsets) <-> popek's `LocalApic`; KVM_GET_PIT2
  <-> popek's 8254 and port 0x61; KVM's device time base (`time_ns`) <-> the virtual clock.

The other backend's devices are built on a scratch `SoftPlatform` and given their state through their own
`restore` (or their ports), so everything the soft side derives (the PIC's INTR, the PIT's phase on the clock)
is derived by the device code itself, and every value from a hostile snapshot is checked by the same checks a
same-backend restore makes.

Where a value cannot be carried faithfully the conversion is a SnapshotError naming it, never a silent loss:
YMM/AVX-512/AMX state in use (XSTATE_BV or XCR0 beyond x87|SSE|PKRU), an exception or interrupt being injected,
SMM, a KVM paravirtual MSR in use (kvm-clock, async PF, steal time, PV EOI), any other MSR one side lacks with a
value other than its reset value, an 8259A mode KVM's PIC does not implement (single, ICW1.LTIM), a PIT count or
status latched and not read, a non-zero x87 FCS/FDS (the FXSAVE64 image KVM keeps has no room for them).

What each backend's own restore does with time is kept: KVM_SET_PIT2 reloads every channel's count at the
restore (arch/x86/kvm/i8254.c, kvm_vm_ioctl_set_pit2 -> kvm_pit_load_count) and KVM_SET_LAPIC restarts the APIC
timer from TMICT; so kvm -> soft starts each PIT count and the APIC timer from the current count KVM reported,
and soft -> kvm starts them from the reload value, as a KVM -> KVM restore does.

CPUID (the rule `cpuid_problems` checks): a guest that saw a feature the target does not implement may be using
it, so a snapshot crosses only if the CPUID its vCPUs saw is one both backends implement. KVM -> soft: every
feature bit of leaves 1, 7.0 and 0x80000001 must be one the software CPU offers (`default_cpuid`; XSAVE, AVX,
AVX2, AVX-512, AMX, FMA, F16C, VAES/VPCLMULQDQ, ... are not), and leaf 0x40000001 (KVM's paravirtual features:
kvm-clock, async PF, PV EOI, steal time, PV unhalt) must offer none. The `soft` CPU template
(`popek.cpuid.apply_template`) gives a KVM guest exactly that. Soft -> KVM: every feature the software CPU
offered must be in the KVM vCPUs' CPUID (the host must have them: PKS, RDPID, UMIP, ...).
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any, TypeVar

from popek import cpuid as cpuid_mod
from popek.accel import soft_snapshot
from popek.accel.kvm_convert import segment_from_kvm, store_segment
from popek.accel.kvm_snapshot import IRQCHIPS, RUNTIME_CPUID_BITS, _msrs, _pack, _raw
from popek.cpu import interp as cpu_interp
from popek.cpu.interp import default_cpuid
from popek.cpu.state import MSR_IA32_PKRS, SEGMENT_NAMES, CpuState, TableRegister
from popek.cpuid import KVM_FEATURES_LEAF
from popek.devices import lapic as lapic_mod
from popek.devices.platform import SoftPlatform
from popek.kvm import MpState
from popek.kvm import structs as s
from popek.kvm.consts import VcpuEventsValid
from popek.snapshot import SnapshotError

BACKENDS = ("kvm", "soft")
MASK64 = (1 << 64) - 1
T = TypeVar("T", bound=ctypes.Structure)

# --- CPUID ---

# (leaf, subleaf, register index in a saved row [function, index, flags, eax, ebx, ecx, edx]) of the feature
# flags the rule compares
FEATURE_REGS = ((1, 0, 5), (1, 0, 6), (7, 0, 4), (7, 0, 5), (7, 0, 6), (0x80000001, 0, 5), (0x80000001, 0, 6))
_REG_NAMES = {3: "EAX", 4: "EBX", 5: "ECX", 6: "EDX"}
# bits the soft CPU offers per vCPU beyond `default_cpuid`, or that promise nothing it lacks (popek.cpuid)
SOFT_EXTRA = {
    (leaf, subleaf, ("eax", "ebx", "ecx", "edx").index(register) + 3): bits
    for (leaf, subleaf, register), bits in cpuid_mod.SOFT_EXTRA.items()
}


def _rows(saved: object, what: str) -> dict[tuple[int, int], list[int]]:
    if not isinstance(saved, list) or len(saved) > 4096:
        raise SnapshotError(f"{what}: the CPUID is a list of [function, index, flags, eax, ebx, ecx, edx] rows")
    out: dict[tuple[int, int], list[int]] = {}
    for row in saved:
        if not isinstance(row, list) or len(row) != 7 or any(type(x) is not int or not 0 <= x < 1 << 32 for x in row):
            raise SnapshotError(f"{what}: {row!r} is not a CPUID row")
        out[(row[0], row[1])] = row
    return out


def _soft_features(leaf: int, subleaf: int, register: int) -> int:
    return default_cpuid(leaf, subleaf)[register - 3] | SOFT_EXTRA.get((leaf, subleaf, register), 0)


def cpuid_problems(kvm_cpuid: object, direction: str) -> list[str]:
    """What makes a KVM CPUID (a snapshot's or a target VM's, as `kvm_snapshot._cpuid` saves it) unfit to cross:
    direction "to_soft" lists the features the KVM guest saw that the soft CPU lacks, "to_kvm" the soft CPU's
    features the KVM vCPU lacks. Empty: the snapshot may cross."""
    problems: list[str] = []
    if not isinstance(kvm_cpuid, list):
        raise SnapshotError("KVM state: the CPUID is a list per vCPU")
    for i, vcpu_rows in enumerate(kvm_cpuid):
        rows = _rows(vcpu_rows, f"KVM cpuid[{i}]")
        for leaf, subleaf, register in FEATURE_REGS:
            row = rows.get((leaf, subleaf))
            kvm = (row[register] if row is not None else 0) & ~RUNTIME_CPUID_BITS.get((leaf, subleaf, register), 0)
            soft = _soft_features(leaf, subleaf, register) & ~RUNTIME_CPUID_BITS.get((leaf, subleaf, register), 0)
            optional = SOFT_EXTRA.get((leaf, subleaf, register), 0)
            extra = kvm & ~soft if direction == "to_soft" else soft & ~kvm & ~optional
            if extra:
                where = f"CPUID.({leaf:#x},{subleaf}).{_REG_NAMES[register]} bits {extra:#x}"
                side = "the KVM vCPU offered, the software CPU lacks" if direction == "to_soft" else (
                    "the software CPU offered, this KVM vCPU lacks")
                problems.append(f"vCPU {i}: {where} ({side})")
        pv = rows.get((KVM_FEATURES_LEAF, 0))
        if direction == "to_soft" and pv is not None and pv[3]:
            problems.append(f"vCPU {i}: KVM paravirtual features {pv[3]:#x} offered (CPUID 0x40000001.EAX)")
    return problems


def _check_cpuid(kvm_cpuid: object, direction: str) -> None:
    problems = cpuid_problems(kvm_cpuid, direction)
    if problems:
        raise SnapshotError(
            "the snapshot cannot cross backends: its guest saw a CPUID the other backend does not implement "
            f"(take it with --cpu-template soft): {'; '.join(problems[:4])}"
        )


# --- MSRs ---

MSR_TSC = 0x10
MSR_APIC_BASE = lapic_mod.MSR_APIC_BASE
MSR_TSC_DEADLINE = lapic_mod.MSR_TSC_DEADLINE
MSR_EFER, MSR_FS_BASE, MSR_GS_BASE = 0xC0000080, 0xC0000100, 0xC0000101
# in the segment registers and EFER of kvm_sregs already
SREGS_MSRS = frozenset({MSR_EFER, MSR_FS_BASE, MSR_GS_BASE})
# MSRs the soft CPU keeps in `CpuState.msrs` (popek.cpu.interp.read_msr/write_msr)
SOFT_MSRS = (
    cpu_interp.STORAGE_MSRS
    | {cpu_interp.MSR_TSC_ADJUST, cpu_interp.MSR_MCG_STATUS, MSR_IA32_PKRS}
    | set(cpu_interp.MCE_BANK_MSRS)
)
# read-only MSRs that describe the CPU model, not guest state: the guest cannot change them, and the CPUID rule
# covers the model (MTRRCAP, MCG_CAP, microcode revision, PLATFORM_INFO, ARCH_CAPABILITIES, PERF_CAPABILITIES,
# the VMX capability MSRs 0x480-0x491, the APERF/MPERF counters KVM lets the guest read)
READ_ONLY_MSRS = frozenset({0xFE, 0x179, 0x8B, 0xCE, 0x10A, 0x345, 0xE7, 0xE8, *range(0x480, 0x492)})
# KVM's paravirtual MSRs (Documentation/virt/kvm/x86/msr.rst): in use when non-zero
KVM_PV_MSRS = {
    0x11: "kvm-clock (MSR_KVM_WALL_CLOCK)", 0x12: "kvm-clock (MSR_KVM_SYSTEM_TIME)",
    0x4B564D00: "kvm-clock (MSR_KVM_WALL_CLOCK_NEW)", 0x4B564D01: "kvm-clock (MSR_KVM_SYSTEM_TIME_NEW)",
    0x4B564D02: "async page faults (MSR_KVM_ASYNC_PF_EN)", 0x4B564D03: "steal time (MSR_KVM_STEAL_TIME)",
    0x4B564D04: "PV EOI (MSR_KVM_PV_EOI_EN)", 0x4B564D05: "PV polling (MSR_KVM_POLL_CONTROL)",
    0x4B564D06: "async PF interrupt (MSR_KVM_ASYNC_PF_INT)", 0x4B564D07: "async PF ack (MSR_KVM_ASYNC_PF_ACK)",
    0x4B564D08: "migration control (MSR_KVM_MIGRATION_CONTROL)",
}  # fmt: skip
# MSR_KVM_POLL_CONTROL resets to 1 (polling allowed); the others to 0
KVM_PV_RESET = {0x4B564D05: 1}
# KVM reset values of MSRs the soft CPU lacks (arch/x86/kvm/x86.c kvm_vcpu_reset): a value other than these
# is guest state the soft CPU cannot hold
KVM_RESET = {0xE1: 0x186A0}  # IA32_UMWAIT_CONTROL


def _soft_msr_default(index: int) -> int:
    return cpu_interp.MSR_DEFAULTS.get(index, 0)


# --- the FXSAVE64 legacy area (SDM vol. 1 §10.5.1 table 10-2) and the XSAVE header (§13.4.2) ---

LEGACY = struct.Struct("<HHBxHQQII")  # FCW FSW FTW(abridged) FOP FIP FDP MXCSR MXCSR_MASK
XSTATE_BV_OFFSET = 512
XSTATE_X87, XSTATE_SSE, XSTATE_PKRU = 1 << 0, 1 << 1, 1 << 9
MXCSR_VALID = 0xFFFF  # MXCSR bits 31:16 are reserved (#GP on LDMXCSR/XRSTOR)


def _pkru_offset(rows: dict[tuple[int, int], list[int]]) -> int | None:
    row = rows.get((0xD, 9))
    return row[4] if row is not None and row[3] == 4 else None


def _offers_pku(rows: dict[tuple[int, int], list[int]]) -> bool:
    """CPUID.(EAX=7,ECX=0):ECX.PKU[bit 3] (SDM vol. 2A, CPUID): the guest may set CR4.PKE and use PKRU."""
    row = rows.get((7, 0))
    return row is not None and bool(row[5] & cpuid_mod.L7_ECX_PKU)


def _fpu_from_xsave(image: bytes, xcr0: int, rows: dict[tuple[int, int], list[int]], cpu: CpuState, what: str) -> None:
    xstate_bv = int.from_bytes(image[XSTATE_BV_OFFSET : XSTATE_BV_OFFSET + 8], "little")
    if xstate_bv & ~(XSTATE_X87 | XSTATE_SSE | XSTATE_PKRU):
        raise SnapshotError(
            f"{what}.xsave: XSTATE_BV {xstate_bv:#x}: state beyond x87/SSE/PKRU is in use (YMM, AVX-512, AMX, ...), "
            "which the software CPU does not have"
        )
    if xcr0 & ~(XSTATE_X87 | XSTATE_SSE | XSTATE_PKRU) or not xcr0 & 1:
        raise SnapshotError(f"{what}.xcrs: XCR0 {xcr0:#x} enables state the software CPU does not have")
    cpu.xcr0 = xcr0 & (XSTATE_X87 | XSTATE_SSE)
    fcw, fsw, ftw, fop, fip, fdp, mxcsr, _ = LEGACY.unpack_from(image, 0)
    cpu.mxcsr = mxcsr  # saved with SSE or AVX state; KVM's uabi image always holds it
    if xstate_bv & XSTATE_X87:
        cpu.fcw, cpu.fsw, cpu.ftw, cpu.fop, cpu.fip, cpu.fdp = fcw, fsw, ftw, fop & 0x7FF, fip, fdp
        top = fsw >> 11 & 7
        for i in range(8):  # the image holds ST(i); the soft CPU keeps physical R0..R7, ST(i) = R[(TOP + i) % 8]
            cpu.st[(top + i) % 8] = int.from_bytes(image[32 + 16 * i : 42 + 16 * i], "little")
    if xstate_bv & XSTATE_SSE:
        cpu.xmm = [int.from_bytes(image[160 + 16 * i : 176 + 16 * i], "little") for i in range(16)]
    if xstate_bv & XSTATE_PKRU and _offers_pku(rows):
        offset = _pkru_offset(rows)
        if offset is None or offset + 4 > len(image):
            raise SnapshotError(f"{what}.xsave: PKRU is in the image, but the saved CPUID does not say where")
        cpu.pkru = int.from_bytes(image[offset : offset + 4], "little")
    # else KVM's image holds the host's PKRU component for a guest whose CPUID hides PKU (and with it leaf 0xD,
    # which would say where PKRU is): CR4.PKE is reserved for that guest (SDM vol. 3A §2.5), so RDPKRU is #UD
    # and PKRU checks no access (§4.6.2). Nothing the guest can see depends on it; the soft CPU keeps 0.


def _fpu_to_xsave(cpu: CpuState, image: bytearray, rows: dict[tuple[int, int], list[int]], what: str) -> int:
    """Write the soft CPU's x87/SSE/PKRU state into a (zeroed) XSAVE image; the XSTATE_BV it sets."""
    if cpu.fcs or cpu.fds:
        raise SnapshotError(
            f"{what}: x87 FCS {cpu.fcs:#x} / FDS {cpu.fds:#x} are set, and KVM's FXSAVE64-format image has no room "
            "for them (SDM vol. 1 table 10-2)"
        )
    if cpu.mxcsr & ~MXCSR_VALID:
        raise SnapshotError(f"{what}.mxcsr: {cpu.mxcsr:#x} sets reserved bits")
    LEGACY.pack_into(image, 0, cpu.fcw, cpu.fsw, cpu.ftw, cpu.fop, cpu.fip, cpu.fdp, cpu.mxcsr, MXCSR_VALID)
    top = cpu.fsw >> 11 & 7
    for i in range(8):
        image[32 + 16 * i : 42 + 16 * i] = cpu.st[(top + i) % 8].to_bytes(10, "little")
    for i in range(16):
        image[160 + 16 * i : 176 + 16 * i] = cpu.xmm[i].to_bytes(16, "little")
    xstate_bv = XSTATE_X87 | XSTATE_SSE
    if cpu.pkru:
        offset = _pkru_offset(rows)
        if offset is None or offset + 4 > len(image):
            raise SnapshotError(f"{what}.pkru: {cpu.pkru:#x} is set, and the KVM vCPU's XSAVE image has no PKRU")
        image[offset : offset + 4] = cpu.pkru.to_bytes(4, "little")
        xstate_bv |= XSTATE_PKRU
    image[XSTATE_BV_OFFSET : XSTATE_BV_OFFSET + 16] = xstate_bv.to_bytes(8, "little") + bytes(8)
    return xstate_bv


# --- the LAPIC page (SDM vol. 3A table 11-1) ---


def _reg(page: bytes, offset: int) -> int:
    return int.from_bytes(page[offset : offset + 4], "little")


def _put(page: bytearray, offset: int, value: int) -> None:
    page[offset : offset + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")


def _bits256(page: bytes, base: int) -> int:
    return sum(_reg(page, base + 0x10 * k) << (32 * k) for k in range(8))


def _put256(page: bytearray, base: int, value: int) -> None:
    for k in range(8):
        _put(page, base + 0x10 * k, value >> (32 * k))


REG_ISR, REG_TMR, REG_IRR, REG_ESR, REG_ICR_LO, REG_ICR_HI = 0x100, 0x180, 0x200, 0x280, 0x300, 0x310
REG_TMICT, REG_TMCCT, REG_TDCR, REG_LVT_CMCI = 0x380, 0x390, 0x3E0, 0x2F0


def _lapic_to_soft(page: bytes, apic_base: int, tsc_deadline: int, tsc: int, lint0: bool, fresh: Any) -> dict[str, Any]:
    """popek LocalApic state from a KVM LAPIC page (xAPIC layout: popek's KVM backend does not enable
    KVM_CAP_X2APIC_API, so the ID register is ID << 24 in both modes, api.rst 4.57)."""
    x2apic = bool(apic_base & lapic_mod.APIC_BASE_EXTD)
    if apic_base & ~0xFFF != lapic_mod.LAPIC_BASE:
        raise SnapshotError(f"IA32_APIC_BASE {apic_base:#x}: the soft APIC is at {lapic_mod.LAPIC_BASE:#x}")
    state: dict[str, Any] = dict(fresh.state())
    ldr = _reg(page, lapic_mod.REG_LDR)
    state.update(
        apic_id=_reg(page, lapic_mod.REG_ID) >> 24, tpr=_reg(page, lapic_mod.REG_TPR) & 0xFF,
        ldr=0 if x2apic else ldr & 0xFF000000, dfr=_reg(page, lapic_mod.REG_DFR), svr=_reg(page, lapic_mod.REG_SVR),
        esr=_reg(page, REG_ESR) & 0xFF, _esr_pending=0, icr=_reg(page, REG_ICR_LO) | _reg(page, REG_ICR_HI) << 32,
        irr=_bits256(page, REG_IRR), isr=_bits256(page, REG_ISR), tmr=_bits256(page, REG_TMR),
        lint_levels=[lint0, False], initial_count=_reg(page, REG_TMICT), divide_config=_reg(page, REG_TDCR),
        tsc_deadline=tsc_deadline, _extint_requested=False, _enabled=bool(apic_base & lapic_mod.APIC_BASE_EN),
        x2apic=x2apic, lvt=[_reg(page, reg) for reg in lapic_mod.LVT_REGS], tsc=tsc,
    )  # fmt: skip
    # the timer goes on from the count KVM read at the capture (KVM_GET_LAPIC fills TMCCT)
    current = _reg(page, REG_TMCCT)
    mode = state["lvt"][0] >> lapic_mod.LVT_TIMER_MODE_SHIFT & 3
    state["tstart_ago_ns"] = 0
    state["_tcount"] = current if mode != lapic_mod.TIMER_TSC_DEADLINE else 0
    if mode == lapic_mod.TIMER_TSC_DEADLINE:
        state["timer_in_ns"] = (
            max(tsc_deadline - tsc, 0) * 10**9 // state["tsc_hz"] if tsc_deadline else None
        )
    elif current:
        divider = lapic_mod.DIVIDERS[state["divide_config"] & 0b1011]
        state["timer_in_ns"] = -((-current * 10**9 * divider) // state["timer_hz"])
    else:
        state["timer_in_ns"] = None
    return state


def _lapic_to_kvm(apic: Any, template: bytes) -> bytes:
    page = bytearray(template)
    _put(page, lapic_mod.REG_ID, (apic.apic_id & 0xFF) << 24)
    _put(page, lapic_mod.REG_TPR, apic.tpr)
    _put(page, lapic_mod.REG_LDR, apic.ldr if not apic.x2apic else _reg(template, lapic_mod.REG_LDR))
    _put(page, lapic_mod.REG_DFR, apic.dfr)
    _put(page, lapic_mod.REG_SVR, apic.svr)
    _put(page, REG_ESR, apic.esr)
    _put(page, REG_ICR_LO, apic.icr)
    _put(page, REG_ICR_HI, apic.icr >> 32)
    _put256(page, REG_IRR, apic.irr)
    _put256(page, REG_ISR, apic.isr)
    _put256(page, REG_TMR, apic.tmr)
    for reg in lapic_mod.LVT_REGS:
        _put(page, reg, apic.lvt[reg])
    _put(page, REG_TMICT, apic.initial_count)
    _put(page, REG_TMCCT, apic.current_count())
    _put(page, REG_TDCR, apic.divide_config)
    return bytes(page)


# --- the 8259A pair (kvm_pic_state, arch/x86/kvm/i8259.c) ---

KVM_CASCADE_ICW3 = {True: 0x04, False: 0x02}  # KVM's pair is cascaded on IR2, always


def _pic_to_soft(kvm: s.kvm_pic_state, master: bool) -> dict[str, Any]:
    auto_eoi, sfnm = bool(kvm.auto_eoi), bool(kvm.special_fully_nested_mode)
    return {
        "elcr": int(kvm.elcr), "lines": int(kvm.last_irr), "irr": int(kvm.irr), "isr": int(kvm.isr),
        "imr": int(kvm.imr), "vector_base": int(kvm.irq_base), "lowest": (kvm.priority_add - 1) & 7,
        "init_step": 0 if kvm.init_state == 0 else kvm.init_state + 1, "icw4_expected": bool(kvm.init4),
        "single": False, "ltim": False, "icw3": KVM_CASCADE_ICW3[master],
        "icw4": 1 | int(auto_eoi) << 1 | int(sfnm) << 4, "auto_eoi": auto_eoi,
        "rotate_on_aeoi": bool(kvm.rotate_on_auto_eoi), "sfnm": sfnm, "special_mask": bool(kvm.special_mask),
        "read_isr": bool(kvm.read_reg_select), "poll": bool(kvm.poll),
    }  # fmt: skip


def _pic_to_kvm(chip: Any, template: s.kvm_pic_state, name: str) -> s.kvm_pic_state:
    if chip.single or chip.ltim:
        raise SnapshotError(
            f"{name}: ICW1 set {'single mode' if chip.single else 'level-triggered mode (LTIM)'}, which KVM's 8259A "
            "does not implement (arch/x86/kvm/i8259.c takes the trigger from ELCR and is always cascaded)"
        )
    out = s.kvm_pic_state.from_buffer_copy(bytes(template))
    # KVM's PIT pulses IRQ0 (i8254.c kvm_pit_inject raises and lowers it at once) where popek's drives OUT as a
    # level: a master last_irr with IRQ0 high would swallow KVM's next pulse, which is never acknowledged, and
    # KVM's PIT then injects no more (reinject mode waits for that acknowledge)
    lines = chip.lines & ~1 if chip.master else chip.lines
    out.last_irr, out.irr, out.imr, out.isr = lines, chip.irr, chip.imr, chip.isr
    out.priority_add, out.irq_base = (chip.lowest + 1) & 7, chip.vector_base
    out.read_reg_select, out.poll, out.special_mask = int(chip.read_isr), int(chip.poll), int(chip.special_mask)
    out.init_state = 0 if chip.init_step == 0 else chip.init_step - 1
    out.auto_eoi, out.rotate_on_auto_eoi = int(chip.auto_eoi), int(chip.rotate_on_aeoi)
    out.special_fully_nested_mode, out.init4, out.elcr = int(chip.sfnm), int(chip.icw4_expected), chip.elcr
    return out


# --- the 8254 (kvm_pit_state2, arch/x86/kvm/i8254.c) ---

RW_STATE_LSB, RW_STATE_MSB, RW_STATE_WORD0, RW_STATE_WORD1 = 1, 2, 3, 4
KVM_PIT_FLAGS_SPEAKER_DATA_ON = 0x2
PIT_UNPROGRAMMED = 0xFF  # kvm_pit_reset's mode
PORT61_GATE2, PORT61_SPEAKER = 0x1, 0x2


def _pit_to_soft(pit: s.kvm_pit_state2, platform: SoftPlatform) -> None:
    """Program the scratch platform's PIT through its ports as the guest would have: each count starts now, as
    KVM_SET_PIT2 reloads it."""
    soft = platform.pit
    for i, ch in enumerate(pit.channels):
        if ch.count_latched or ch.status_latched:
            raise SnapshotError(f"pit2 channel {i}: a latched count or status the guest has not read yet")
        if ch.mode == PIT_UNPROGRAMMED:
            continue
        if ch.mode > 5 or not RW_STATE_LSB <= ch.rw_mode <= 3 or ch.count > 0x10000:
            raise SnapshotError(f"pit2 channel {i}: mode {ch.mode}, access {ch.rw_mode}, count {ch.count}")
        soft.write(3, bytes([i << 6 | ch.rw_mode << 4 | ch.mode << 1 | (ch.bcd & 1)]))
        count = ch.count & 0xFFFF
        if ch.rw_mode == RW_STATE_LSB:
            soft.write(i, bytes([count & 0xFF]))
        elif ch.rw_mode == RW_STATE_MSB:
            soft.write(i, bytes([count >> 8]))
        else:
            soft.write(i, bytes([count & 0xFF]))
            soft.write(i, bytes([count >> 8]))
            if ch.write_state == RW_STATE_WORD1:  # the guest wrote the LSB of its next count
                soft.write(i, bytes([ch.write_latch]))
        if ch.rw_mode == 3 and ch.read_state == RW_STATE_WORD1:  # the guest read the LSB of a count
            soft.read(i, 1)
    platform.port61.write(0, bytes([(PORT61_GATE2 if pit.channels[2].gate else 0)
                                    | (PORT61_SPEAKER if pit.flags & KVM_PIT_FLAGS_SPEAKER_DATA_ON else 0)]))


def _pit_to_kvm(platform: SoftPlatform, template: s.kvm_pit_state2) -> s.kvm_pit_state2:
    out = s.kvm_pit_state2.from_buffer_copy(bytes(template))
    for i, ch in enumerate(platform.pit.channels):
        dst = out.channels[i]
        dst.gate = int(ch.gate)
        dst.count_load_time = 0  # KVM_SET_PIT2 reloads the count now, whatever this says
        if not ch.running and not ch._has_count and ch.mode == 0 and ch.count_register == 0:
            dst.mode, dst.count = PIT_UNPROGRAMMED, 0x10000  # as kvm_pit_reset leaves a channel
            continue
        dst.mode, dst.bcd, dst.rw_mode = ch.mode, int(ch.bcd), ch.rw
        dst.count = ch.period or (ch.count_register or 0x10000)
        word = ch.rw == 3
        dst.read_state = (RW_STATE_WORD1 if ch._read_high else RW_STATE_WORD0) if word else ch.rw
        dst.write_state = (RW_STATE_WORD1 if ch._low_byte is not None else RW_STATE_WORD0) if word else ch.rw
        dst.write_latch = ch._low_byte or 0
        dst.count_latched, dst.latched_count = 0, 0
        if ch._latch:
            if len(ch._latch) == 2:
                dst.count_latched, dst.latched_count = RW_STATE_WORD0, ch._latch[0] | ch._latch[1] << 8
            elif ch.rw == RW_STATE_LSB:
                dst.count_latched, dst.latched_count = RW_STATE_LSB, ch._latch[0]
            else:  # an MSB-only latch, or the high half of a word whose low half was read
                dst.count_latched, dst.latched_count = RW_STATE_MSB, ch._latch[0] << 8
        dst.status_latched, dst.status = (1, ch._status) if ch._status is not None else (0, 0)
    speaker = KVM_PIT_FLAGS_SPEAKER_DATA_ON if platform.port61.value & PORT61_SPEAKER else 0
    out.flags = (out.flags & ~KVM_PIT_FLAGS_SPEAKER_DATA_ON) | speaker
    return out


# --- vCPUs ---


def _kvm_xsave(saved: dict[str, Any], what: str) -> bytes:
    if "xsave2" in saved:
        image = saved["xsave2"]
        if not isinstance(image, bytes) or not ctypes.sizeof(s.kvm_xsave) <= len(image) <= 1 << 20:
            raise SnapshotError(f"{what}.xsave2: an XSAVE image of {ctypes.sizeof(s.kvm_xsave)} bytes or more")
        return image
    return bytes(_raw(saved.get("xsave"), s.kvm_xsave, f"{what}.xsave"))


def _vcpu_to_soft(
    saved: object, rows: dict[tuple[int, int], list[int]], time_ns: int, what: str
) -> tuple[dict[str, Any], bool, int, int, bytes]:
    """(soft vCPU state, waiting for SIPI, IA32_APIC_BASE, IA32_TSC_DEADLINE, LAPIC page) of one KVM vCPU."""
    if not isinstance(saved, dict):
        raise SnapshotError(f"{what}: the saved state is not an object")
    regs = _raw(saved.get("regs"), s.kvm_regs, f"{what}.regs")
    sregs: s.kvm_sregs | s.kvm_sregs2 = (
        _raw(saved.get("sregs2"), s.kvm_sregs2, f"{what}.sregs2")
        if "sregs2" in saved
        else _raw(saved.get("sregs"), s.kvm_sregs, f"{what}.sregs")
    )
    xcrs = _raw(saved.get("xcrs"), s.kvm_xcrs, f"{what}.xcrs")
    debugregs = _raw(saved.get("debugregs"), s.kvm_debugregs, f"{what}.debugregs")
    lapic = _raw(saved.get("lapic"), s.kvm_lapic_state, f"{what}.lapic")
    events = _raw(saved.get("vcpu_events"), s.kvm_vcpu_events, f"{what}.vcpu_events")
    msrs = _msrs(saved.get("msrs"), f"{what}.msrs")
    image = _kvm_xsave(saved, what)
    mp = saved.get("mp_state")
    if mp not in (MpState.RUNNABLE, MpState.HALTED, MpState.INIT_RECEIVED) or type(mp) is not int:
        raise SnapshotError(f"{what}.mp_state: {mp!r} (runnable, halted or waiting for INIT/SIPI cross)")

    cpu = CpuState()
    names = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", *(f"r{i}" for i in range(8, 16)))
    cpu.gpr = [int(getattr(regs, n)) for n in names]
    cpu.rip, cpu.rflags = int(regs.rip), int(regs.rflags) | 2
    cpu.seg = [segment_from_kvm(getattr(sregs, n)) for n in SEGMENT_NAMES]
    cpu.tr, cpu.ldtr = segment_from_kvm(sregs.tr), segment_from_kvm(sregs.ldt)
    cpu.gdtr = TableRegister(int(sregs.gdt.base), int(sregs.gdt.limit))
    cpu.idtr = TableRegister(int(sregs.idt.base), int(sregs.idt.limit))
    cpu.cr0, cpu.cr2, cpu.cr3, cpu.cr4 = int(sregs.cr0), int(sregs.cr2), int(sregs.cr3), int(sregs.cr4)
    cpu.cr8, cpu.efer = int(sregs.cr8) & 0xF, int(sregs.efer)
    pdptes = None
    if isinstance(sregs, s.kvm_sregs2):
        if sregs.flags & 1:  # KVM_SREGS2_FLAGS_PDPTRS_VALID
            pdptes = [int(x) for x in sregs.pdptrs]
    elif any(sregs.interrupt_bitmap):
        raise SnapshotError(f"{what}.sregs: an external interrupt is being injected (interrupt_bitmap)")
    cpu.dr = [*(int(x) for x in debugregs.db), int(debugregs.dr6), int(debugregs.dr7),
              int(debugregs.dr6), int(debugregs.dr7)]  # fmt: skip  DR4/DR5 alias DR6/DR7 (vol. 3B §17.2.2)
    xcr0 = next((int(x.value) for x in xcrs.xcrs[: min(xcrs.nr_xcrs, 16)] if x.xcr == 0), 1)
    _fpu_from_xsave(image, xcr0, rows, cpu, what)

    ev = events
    if ev.exception.injected or ev.exception.pending or ev.interrupt.injected or ev.triple_fault_pending:
        raise SnapshotError(f"{what}.vcpu_events: an exception or interrupt is being injected")
    if ev.smi.smm or ev.smi.pending:
        raise SnapshotError(f"{what}.vcpu_events: SMM, which the software CPU does not have")
    cpu.interrupt_shadow = bool(ev.interrupt.shadow)
    cpu.nmi_blocked = bool(ev.nmi.masked)
    nmi_pending = bool(ev.nmi.pending or ev.nmi.injected)
    cpu.halted = mp == MpState.HALTED

    tsc = msrs.get(MSR_TSC, 0)
    cpu.tsc_offset = (tsc - time_ns) & MASK64  # the soft TSC is the virtual clock (now `time_ns`) + tsc_offset
    lost = []
    for index, value in msrs.items():
        if index in SOFT_MSRS:
            if value != _soft_msr_default(index) or index in cpu_interp.MSR_DEFAULTS:
                cpu.msrs[index] = value
        elif index in KVM_PV_MSRS:
            if value != KVM_PV_RESET.get(index, 0):
                lost.append(f"{KVM_PV_MSRS[index]} = {value:#x}")
        elif index in (MSR_TSC, MSR_APIC_BASE, MSR_TSC_DEADLINE) or index in SREGS_MSRS or index in READ_ONLY_MSRS:
            continue
        elif value != KVM_RESET.get(index, 0):
            lost.append(f"MSR {index:#x} = {value:#x}")
    if lost:
        raise SnapshotError(f"{what}: the software CPU has no {', '.join(lost[:6])}")
    out = soft_snapshot.state_dict(cpu, 0, nmi_pending, 0, pdptes)
    apic_base = msrs.get(MSR_APIC_BASE, int(sregs.apic_base))
    return out, mp == MpState.INIT_RECEIVED, apic_base, msrs.get(MSR_TSC_DEADLINE, 0), bytes(lapic)


def _vcpu_to_kvm(
    parsed: tuple[CpuState, int, bool, int, list[int] | None], apic: Any, waiting: bool, tsc: int,
    template: dict[str, Any], rows: dict[tuple[int, int], list[int]], what: str,
) -> dict[str, Any]:  # fmt: skip
    cpu, _, nmi_pending, db_pending, pdptes = parsed
    if db_pending:
        raise SnapshotError(f"{what}.db_pending: a debug trap of the instruction in progress is pending")
    if cpu.xcr0 != 1 and cpu.xcr0 != 3:
        raise SnapshotError(f"{what}.xcr0: {cpu.xcr0:#x}")
    regs = _raw(template["regs"], s.kvm_regs, f"{what}.regs")
    names = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", *(f"r{i}" for i in range(8, 16)))
    for name, value in zip(names, cpu.gpr, strict=True):
        setattr(regs, name, value)
    regs.rip, regs.rflags = cpu.rip, cpu.rflags
    out: dict[str, Any] = dict(template)
    sregs: s.kvm_sregs | s.kvm_sregs2
    if "sregs2" in template:
        sregs = _raw(template["sregs2"], s.kvm_sregs2, f"{what}.sregs2")
        sregs.flags, sregs.pdptrs[:] = (1, pdptes) if pdptes is not None else (0, [0] * 4)
    else:
        if pdptes is not None and cpu.cr0 >> 31 and cpu.cr4 & 0x20 and not cpu.efer & 0x400:
            raise SnapshotError(f"{what}.pdptes: PAE paging with loaded PDPTEs needs KVM_CAP_SREGS2 on this host")
        sregs = _raw(template["sregs"], s.kvm_sregs, f"{what}.sregs")
        sregs.interrupt_bitmap[:] = [0] * len(sregs.interrupt_bitmap)
    for name, seg in zip(SEGMENT_NAMES, cpu.seg, strict=True):
        store_segment(getattr(sregs, name), seg)
    store_segment(sregs.tr, cpu.tr)
    store_segment(sregs.ldt, cpu.ldtr)
    sregs.gdt.base, sregs.gdt.limit = cpu.gdtr.base, cpu.gdtr.limit
    sregs.idt.base, sregs.idt.limit = cpu.idtr.base, cpu.idtr.limit
    sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.efer = cpu.cr0, cpu.cr2, cpu.cr3, cpu.cr4, cpu.efer
    sregs.cr8, sregs.apic_base = apic.tpr >> 4, apic.apic_base
    debugregs = _raw(template["debugregs"], s.kvm_debugregs, f"{what}.debugregs")
    debugregs.db[:] = cpu.dr[:4]
    debugregs.dr6, debugregs.dr7 = cpu.dr[6], cpu.dr[7]
    xcrs = _raw(template["xcrs"], s.kvm_xcrs, f"{what}.xcrs")
    xcrs.nr_xcrs, xcrs.xcrs[0].xcr, xcrs.xcrs[0].value = 1, 0, cpu.xcr0
    image = bytearray(len(_kvm_xsave(template, what)))
    _fpu_to_xsave(cpu, image, rows, what)
    if "xsave2" in template:
        out["xsave2"] = bytes(image)
    else:
        out["xsave"] = _pack(s.kvm_xsave.from_buffer_copy(bytes(image)))
    lapic_page = _raw(template["lapic"], s.kvm_lapic_state, f"{what}.lapic")
    events = _raw(template["vcpu_events"], s.kvm_vcpu_events, f"{what}.vcpu_events")
    events.nmi.pending, events.nmi.masked, events.nmi.injected = int(nmi_pending), int(cpu.nmi_blocked), 0
    # KVM_X86_SHADOW_INT_MOV_SS = 1, _STI = 2; VM entry refuses STI blocking with IF clear (SDM vol. 3C §26.3.1.5)
    events.interrupt.shadow = (2 if cpu.rflags & 0x200 else 1) if cpu.interrupt_shadow else 0
    events.flags = VcpuEventsValid.NMI_PENDING | VcpuEventsValid.SHADOW
    targets = {index for index, _ in template["msrs"]}
    values = dict((index, value) for index, value in template["msrs"])
    for index in targets & SOFT_MSRS:  # what RDMSR reads on the soft CPU, stored or its reset value
        if index not in READ_ONLY_MSRS:
            values[index] = cpu.msrs.get(index, _soft_msr_default(index))
    lost = []
    for index, value in cpu.msrs.items():
        if index in targets:
            values[index] = value
        elif value != _soft_msr_default(index):
            lost.append(f"MSR {index:#x} = {value:#x}")
    if lost:
        raise SnapshotError(f"{what}: this KVM vCPU has no {', '.join(lost[:6])}")
    for index, value in ((MSR_TSC, tsc), (MSR_APIC_BASE, apic.apic_base), (MSR_TSC_DEADLINE, apic.tsc_deadline)):
        if index in targets:
            values[index] = value
    out.update(
        mp_state=int(MpState.INIT_RECEIVED if waiting else MpState.HALTED if cpu.halted else MpState.RUNNABLE),
        regs=_pack(regs), xcrs=_pack(xcrs), debugregs=_pack(debugregs), vcpu_events=_pack(events),
        lapic=_pack(s.kvm_lapic_state.from_buffer_copy(_lapic_to_kvm(apic, bytes(lapic_page)))),
        msrs=[[index, values[index]] for index, _ in template["msrs"]],
    )  # fmt: skip
    out["sregs2" if "sregs2" in template else "sregs"] = _pack(sregs)
    return out


# --- whole states ---


def _dict(value: object, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != keys:
        raise SnapshotError(f"{what}: an object with exactly {', '.join(sorted(keys))}")
    return value


def kvm_to_soft(accel: object, *, check_cpuid: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(SoftAccel state, the "platform" device state) of a `KvmAccel.snapshot_state()`."""
    top = _dict(accel, {"kvm", "time_ns"}, "KVM backend")
    time_ns = top["time_ns"]
    if type(time_ns) is not int or not 0 <= time_ns < 1 << 63:
        raise SnapshotError(f"KVM backend.time_ns: {time_ns!r}")
    kvm = _dict(top["kvm"], {"vm", "vcpus", "cpuid"}, "KVM state")
    vcpus = kvm["vcpus"]
    if not isinstance(vcpus, list) or not 1 <= len(vcpus) <= 1024 or not isinstance(kvm["cpuid"], list) or len(
        kvm["cpuid"]
    ) != len(vcpus):
        raise SnapshotError("KVM state: vcpus and cpuid are lists of one entry per vCPU")
    if check_cpuid:
        _check_cpuid(kvm["cpuid"], "to_soft")
    vm = _dict(kvm["vm"], {"irqchip", "pit2", "clock_ns"}, "KVM VM state")
    chips = _dict(vm["irqchip"], set(IRQCHIPS), "KVM VM state.irqchip")
    loaded = {name: _raw(chips[name], s.kvm_irqchip, f"irqchip {name}") for name in IRQCHIPS}
    pit = _raw(vm["pit2"], s.kvm_pit_state2, "pit2")

    platform = SoftPlatform(len(vcpus))
    platform.clock.restore({"now_ns": time_ns})
    pic_state = {
        "master": _pic_to_soft(loaded["pic_master"].chip.pic, True),
        "slave": _pic_to_soft(loaded["pic_slave"].chip.pic, False),
        "intr": False,
    }
    platform.pic.restore(pic_state)  # validated; INTR derived from the chips
    ioapic = loaded["ioapic"].chip.ioapic
    if ioapic.base_address != 0xFEC00000:
        raise SnapshotError(f"irqchip ioapic: base {ioapic.base_address:#x}, the platform's is at 0xfec00000")
    pins = platform.ioapic.pins
    platform.ioapic.restore({
        "id": ioapic.id & 0xF if ioapic.id < 16 else ioapic.id, "select": ioapic.ioregsel & 0xFF,
        "redirection": [int(x) for x in ioapic.redirtbl[:pins]],
        "levels": [bool(ioapic.irr >> i & 1) for i in range(pins)],
    })  # fmt: skip
    _pit_to_soft(pit, platform)

    cpus: list[dict[str, Any]] = []
    waiting: list[bool] = []
    for i, (saved, rows) in enumerate(zip(vcpus, kvm["cpuid"], strict=True)):
        what = f"KVM vCPU {i}"
        cpu, sipi, apic_base, deadline, page = _vcpu_to_soft(saved, _rows(rows, what), time_ns, what)
        tsc = (cpu["tsc_offset"] + time_ns) & MASK64
        lint0 = bool(platform.pic.intr) if i == 0 else False
        apic_state = _lapic_to_soft(page, apic_base, deadline, tsc, lint0, platform.lapics[i])
        platform.lapics[i].restore(apic_state)
        cpus.append(cpu)
        waiting.append(sipi)
    if waiting[0]:
        raise SnapshotError("KVM vCPU 0: the bootstrap processor waits for a SIPI")
    soft = {
        "version": soft_snapshot.VERSION, "vcpus": cpus, "waiting_for_sipi": waiting,
        "quantum_start": [0] * len(cpus), "stall_ns": [0] * len(cpus), "pending_irqs": [],
    }  # fmt: skip
    return soft, platform.state()


def soft_to_kvm(accel: object, platform_state: object, fresh: object, *, check_cpuid: bool = True) -> dict[str, Any]:
    """A `KvmAccel.snapshot_state()` from a SoftAccel state and its "platform" device state; `fresh` is the
    `snapshot_state()` of the KVM VM it goes into, taken before it ran: its CPUID, structure sizes, MSR list and
    the registers the software side has no counterpart for (reset values) are the target's."""
    data = _dict(accel, {"version", "vcpus", "waiting_for_sipi", "quantum_start", "stall_ns", "pending_irqs"}, "soft")
    if data["version"] != soft_snapshot.VERSION:
        raise SnapshotError(f"soft.version: {data['version']!r}")
    target = _dict(_dict(fresh, {"kvm", "time_ns"}, "target KVM state")["kvm"], {"vm", "vcpus", "cpuid"}, "target")
    n = len(target["vcpus"])
    if not isinstance(data["vcpus"], list) or len(data["vcpus"]) != n:
        raise SnapshotError(f"soft.vcpus: {n} vCPUs here, the snapshot has another number")
    if check_cpuid:
        _check_cpuid(target["cpuid"], "to_kvm")
    parsed = [soft_snapshot.parse_cpu(v, f"soft.vcpus[{i}]") for i, v in enumerate(data["vcpus"])]
    waiting = data["waiting_for_sipi"]
    if not isinstance(waiting, list) or len(waiting) != n or any(type(w) is not bool for w in waiting):
        raise SnapshotError("soft.waiting_for_sipi: a list of true or false per vCPU")
    spent = []
    for name in ("quantum_start", "stall_ns"):
        values = data[name]
        if not isinstance(values, list) or len(values) != n or any(type(v) is not int or v < 0 for v in values):
            raise SnapshotError(f"soft.{name}: a list of counts per vCPU")
    for p, start, stall in zip(parsed, data["quantum_start"], data["stall_ns"], strict=True):
        if start > p[1]:
            raise SnapshotError("soft.quantum_start: past the vCPU's retired instructions")
        spent.append(p[1] - start + stall)  # SoftAccel._spent_ns at 1 ns per instruction
    platform = SoftPlatform(n)
    if not isinstance(platform_state, dict):
        raise SnapshotError("platform: the saved state is not an object")
    platform.restore(platform_state)
    irqs = data["pending_irqs"]
    if not isinstance(irqs, list) or len(irqs) > soft_snapshot.MAX_PENDING_IRQS:
        raise SnapshotError("soft.pending_irqs: a list of [line, level] pairs")
    for pair in irqs:  # line changes the soft backend had queued: given to the platform as it would have
        if not isinstance(pair, list) or len(pair) != 2 or type(pair[0]) is not int or type(pair[1]) is not bool:
            raise SnapshotError(f"soft.pending_irqs: {pair!r} is not a [line, level] pair")
        if not 0 <= pair[0] < platform.ioapic.pins:
            raise SnapshotError(f"soft.pending_irqs: no line {pair[0]}")
        platform.set_irq(pair[0], pair[1])
    now = platform.clock.now_ns()

    tvm = _dict(target["vm"], {"irqchip", "pit2", "clock_ns"}, "target VM")
    chips = {name: _raw(tvm["irqchip"][name], s.kvm_irqchip, f"irqchip {name}") for name in IRQCHIPS}
    for name, chip in (("pic_master", platform.pic.master), ("pic_slave", platform.pic.slave)):
        chips[name].chip.pic = _pic_to_kvm(chip, chips[name].chip.pic, name.replace("_", " "))
    io = chips["ioapic"].chip.ioapic
    io.ioregsel, io.id = platform.ioapic.select, platform.ioapic.id
    redirection = platform.ioapic.redirection
    io.irr = sum(1 << i for i, level in enumerate(platform.ioapic.levels) if level and redirection[i] >> 15 & 1)
    io.redirtbl[: len(redirection)] = redirection
    vm = {
        "irqchip": {name: _pack(chip) for name, chip in chips.items()},
        "pit2": _pack(_pit_to_kvm(platform, _raw(tvm["pit2"], s.kvm_pit_state2, "pit2"))),
        "clock_ns": now,
    }
    vcpus = []
    for i, (p, template) in enumerate(zip(parsed, target["vcpus"], strict=True)):
        what = f"soft vCPU {i}"
        rows = _rows(target["cpuid"][i], what)
        tsc = (now + spent[i] + p[0].tsc_offset) & MASK64
        vcpus.append(_vcpu_to_kvm(p, platform.lapics[i], waiting[i], tsc, template, rows, what))
    return {"kvm": {"vm": vm, "vcpus": vcpus, "cpuid": target["cpuid"]}, "time_ns": now}


def convert(
    state: dict[str, Any], target: str, *, fresh: dict[str, Any] | None = None, check_cpuid: bool = True
) -> dict[str, Any]:
    """The snapshot state (`popek.vm_snapshot` top level) as `target`'s restore takes it; the state itself if it
    was taken there. `fresh` is `{"accel": ..., "devices": ...}` of the VM it goes into, before it ran: needed for
    target "kvm" (the host's structures and CPUID), unused for "soft". `check_cpuid=False` skips the CPUID rule
    (module docstring), for a guest known never to have executed CPUID (the test guests: some nested hosts answer
    CPUID leaves 1 and 7 from their own processor whatever KVM_SET_CPUID2 said, `kvm_probe.observed_cpuid`)."""
    if target not in BACKENDS:
        raise SnapshotError(f"no backend {target!r} to convert a snapshot to")
    from popek import vm_snapshot

    top = vm_snapshot.parse_state(state)
    source = top["machine"]["backend"]
    if source == target:
        return state
    if source not in BACKENDS:
        raise SnapshotError(f"the snapshot was taken on backend {source!r}, which does not cross")
    devices = top["devices"]
    if not isinstance(devices, dict):
        raise SnapshotError("the device state is not an object")
    if target == "soft":
        if "platform" in devices:
            raise SnapshotError("a KVM snapshot with a soft platform device")
        accel, platform = kvm_to_soft(top["accel"], check_cpuid=check_cpuid)
        devices = {"platform": platform, **devices}
    else:
        if fresh is None:
            raise SnapshotError("a conversion to KVM needs the target VM's own state")
        if "platform" not in devices:
            raise SnapshotError("a soft snapshot without its platform devices")
        platform_state = devices["platform"]
        devices = {key: value for key, value in devices.items() if key != "platform"}
        accel = soft_to_kvm(top["accel"], platform_state, fresh["accel"], check_cpuid=check_cpuid)
    spec = dict(top["spec"]) if isinstance(top["spec"], dict) else top["spec"]
    if isinstance(spec, dict):
        spec["accel"] = target
    return {"machine": {"backend": target}, "spec": spec, "accel": accel, "devices": devices}
