"""Segmentation and privilege transitions against hand-built GDTs, TSSs and stacks: linear-address checks,
descriptor loads and their error codes, far transfers through call gates, IRET forms, fast system calls."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from popek.cpu import segments
from popek.cpu.core import Cpu
from popek.cpu.mmu import Access
from popek.cpu.segments import UnsupportedTaskSwitch, descriptor_to_segment
from popek.cpu.state import (
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    CS,
    DS,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    EFER_SCE,
    ES,
    FS,
    GS,
    IF,
    IOPL_MASK,
    MSR_IA32_SYSENTER_CS,
    MSR_IA32_SYSENTER_EIP,
    MSR_IA32_SYSENTER_ESP,
    MSR_LSTAR,
    MSR_SFMASK,
    MSR_STAR,
    NT,
    R11,
    RCX,
    RDX,
    RSP,
    SS,
    TF,
    VM,
    ZF,
    CpuException,
    Vector,
)
from popek.memory import GuestMemory

GDT, TSS, TSS64, LDT = 0x1000, 0x3000, 0x3100, 0x5000
KCODE, KDATA, UCODE, UDATA = 0x08, 0x10, 0x1B, 0x23
KCODE64, KDATA64, UDATA64, UCODE64 = 0x28, 0x30, 0x3B, 0x43  # STAR[63:48] = 0x30: SS 0x38|3, CS 0x40|3
GATE32, EXPDOWN, XONLY, ABSENT, TSS_SEL, LDT_SEL = 0x48, 0x50, 0x58, 0x60, 0x68, 0x70
TSS64_SEL, GATE64, CONFORMING, ABSENT_SS = 0x78, 0x88, 0x98, 0xA0
HANDLER = 0x7000


class NullBus:
    def mmio_read(self, addr: int, size: int) -> int:
        return 0

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        pass

    def pio_read(self, port: int, size: int) -> int:
        return 0

    def pio_write(self, port: int, size: int, value: int) -> None:
        pass


def desc(base: int, limit: int, type_: int, *, s: int = 1, dpl: int = 0, p: int = 1, db: int = 1, l: int = 0) -> int:
    """An 8-byte segment descriptor (byte granular)."""
    return (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | type_ << 40
        | s << 44
        | dpl << 45
        | p << 47
        | ((limit >> 16) & 0xF) << 48
        | l << 53
        | db << 54
        | (base >> 24) << 56
    )


def gate(selector: int, offset: int, type_: int, dpl: int, params: int = 0, p: int = 1) -> int:
    """The low 8 bytes of a call/interrupt/trap gate."""
    return (
        (offset & 0xFFFF)
        | selector << 16
        | params << 32
        | type_ << 40
        | dpl << 45
        | p << 47
        | ((offset >> 16) & 0xFFFF) << 48
    )


def build_gdt(cpu: Cpu) -> None:
    """The GDT every test starts from (see the selector constants above)."""
    mem = cpu.mem
    entries = {
        KCODE: desc(0, 0xFFFFF, 0xA),
        KDATA: desc(0, 0xFFFFF, 0x2),
        UCODE: desc(0, 0xFFFFF, 0xA, dpl=3),
        UDATA: desc(0, 0xFFFFF, 0x2, dpl=3),
        KCODE64: desc(0, 0xFFFFF, 0xA, l=1, db=0),
        KDATA64: desc(0, 0xFFFFF, 0x2),
        UDATA64: desc(0, 0xFFFFF, 0x2, dpl=3),
        UCODE64: desc(0, 0xFFFFF, 0xA, dpl=3, l=1, db=0),
        GATE32: gate(KCODE, HANDLER, 0xC, 3, params=2),
        EXPDOWN: desc(0x100000, 0x0FFF, 0x6),
        XONLY: desc(0, 0xFFFF, 0x8),
        ABSENT: desc(0, 0xFFFF, 0x2, p=0),
        TSS_SEL: desc(TSS, 0x67, 0x9, s=0, db=0),
        LDT_SEL: desc(LDT, 0xF, 0x2, s=0, db=0),
        TSS64_SEL: desc(TSS64, 0x67, 0x9, s=0, db=0),
        GATE64: gate(KCODE64, HANDLER, 0xC, 3),
        CONFORMING: desc(0, 0xFFFFF, 0xE, dpl=0),
        ABSENT_SS: desc(0, 0xFFFFF, 0x2, dpl=3, p=0),
    }
    for sel, raw in entries.items():
        mem.write_u64(GDT + (sel & ~7), raw)
    mem.write_u64(GDT + GATE64 + 8, 0)  # upper half of the 64-bit gate: offset 63:32 = 0, type 0
    mem.write_u64(GDT + TSS64_SEL + 8, 0)
    cpu.state.gdtr.base, cpu.state.gdtr.limit = GDT, 0xFF


def load(cpu: Cpu, sreg: int, selector: int) -> None:
    """Load a segment register's cache straight from the GDT (test setup, no checks)."""
    raw = cpu.mem.read_u64(GDT + (selector & ~7))
    seg = descriptor_to_segment(selector, raw)
    cpu.state.seg[sreg] = seg


def protected(cpu: Cpu, cpl: int = 0) -> None:
    st = cpu.state
    st.cr0 = CR0_PE
    build_gdt(cpu)
    code, data = (KCODE, KDATA) if cpl == 0 else (UCODE, UDATA)
    load(cpu, CS, code)
    for sreg in (SS, DS, ES, FS, GS):
        load(cpu, sreg, data)
    # 32-bit TSS: ESP0 = 0x9000, SS0 = KDATA
    cpu.mem.write_u32(TSS + 4, 0x9000)
    cpu.mem.write_u32(TSS + 8, KDATA)
    st.tr = descriptor_to_segment(TSS_SEL, cpu.mem.read_u64(GDT + TSS_SEL))
    st.gpr[RSP] = 0x8000
    cpu.mmu.flush()


def identity_paging(cpu: Cpu) -> None:
    """Identity-map the first 16 MiB with 2-MiB pages, user-accessible (PML4 at 0x20000)."""
    mem = cpu.mem
    mem.write_u64(0x20000, 0x21000 | 7)
    mem.write_u64(0x21000, 0x22000 | 7)
    for i in range(8):
        mem.write_u64(0x22000 + 8 * i, (i << 21) | 0x87)
    st = cpu.state
    st.cr3 = 0x20000
    st.cr4 |= CR4_PAE
    st.cr0 |= CR0_PG


def long64(cpu: Cpu, cpl: int = 0) -> None:
    st = cpu.state
    protected(cpu)
    st.efer = EFER_LME | EFER_LMA | EFER_SCE | EFER_NXE
    identity_paging(cpu)
    code, data = (KCODE64, KDATA64) if cpl == 0 else (UCODE64, UDATA64)
    load(cpu, CS, code)
    load(cpu, SS, data)
    cpu.mem.write_u64(TSS64 + 4, 0x9000)  # RSP0
    cpu.mem.write_u64(TSS64 + 0x24, 0xA008)  # IST1 (misaligned on purpose)
    st.tr = descriptor_to_segment(TSS64_SEL, cpu.mem.read_u64(GDT + TSS64_SEL))
    cpu.mmu.flush()


@pytest.fixture
def cpu() -> Iterator[Cpu]:
    with GuestMemory(16 << 20) as mem:
        yield Cpu(0, mem, NullBus())


def raises(vector: int, code: int | None, fn: object, *args: object) -> None:
    with pytest.raises(CpuException) as info:
        fn(*args)  # type: ignore[operator]
    assert (info.value.vector, info.value.error_code) == (vector, code), str(info.value)


# --- linear addresses ---


def test_real_mode_linear_and_limit(cpu: Cpu) -> None:
    segments.load_segment(cpu, DS, 0x1234)
    assert cpu.state.seg[DS].base == 0x12340
    assert segments.linear(cpu, DS, 0x10, 2, Access.READ) == 0x12350
    raises(Vector.GP, 0, segments.linear, cpu, DS, 0xFFFF, 2, Access.READ)
    raises(Vector.SS, 0, segments.linear, cpu, SS, 0xFFFF, 2, Access.WRITE)


def test_protected_mode_type_and_limit_checks(cpu: Cpu) -> None:
    protected(cpu)
    st = cpu.state
    raises(Vector.GP, 0, segments.linear, cpu, CS, 0x10, 4, Access.WRITE)  # code is never writable
    assert segments.linear(cpu, CS, 0x10, 4, Access.READ) == 0x10  # readable code
    load(cpu, ES, XONLY)
    raises(Vector.GP, 0, segments.linear, cpu, ES, 0x10, 4, Access.READ)
    load(cpu, ES, EXPDOWN)  # expand-down: offsets 0x1000..0xFFFFFFFF are valid
    raises(Vector.GP, 0, segments.linear, cpu, ES, 0xFFE, 4, Access.READ)
    assert segments.linear(cpu, ES, 0x1000, 4, Access.WRITE) == 0x101000
    st.seg[SS].limit = 0xFFF
    raises(Vector.SS, 0, segments.linear, cpu, SS, 0xFFD, 4, Access.READ)
    segments.load_segment(cpu, DS, 0)
    raises(Vector.GP, 0, segments.linear, cpu, DS, 0, 1, Access.READ)  # null segment


def test_64bit_linear_uses_fs_gs_bases_and_checks_canonical(cpu: Cpu) -> None:
    long64(cpu)
    st = cpu.state
    st.seg[DS].base = 0x1000  # ignored in 64-bit mode
    st.seg[FS].base = 0xFFFF_8000_0000_0000
    assert segments.linear(cpu, DS, 0x10, 8, Access.READ) == 0x10
    assert segments.linear(cpu, FS, 0x10, 8, Access.READ) == 0xFFFF_8000_0000_0010
    raises(Vector.GP, 0, segments.linear, cpu, DS, 0x8000_0000_0000, 1, Access.READ)
    raises(Vector.GP, 0, segments.linear, cpu, DS, 0x7FFF_FFFF_FFFC, 8, Access.READ)  # crosses the hole
    raises(Vector.SS, 0, segments.linear, cpu, SS, 0x8000_0000_0000, 8, Access.WRITE)
    segments.load_segment(cpu, DS, 0)  # null DS is fine in 64-bit mode
    assert segments.linear(cpu, DS, 0x20, 1, Access.WRITE) == 0x20


# --- segment loads ---


def test_load_data_segment_sets_accessed(cpu: Cpu) -> None:
    protected(cpu)
    segments.load_segment(cpu, DS, KDATA)
    seg = cpu.state.seg[DS]
    assert (seg.selector, seg.base, seg.limit, seg.type) == (KDATA, 0, 0xFFFFF, 0x3)
    assert cpu.mem.read_u8(GDT + KDATA + 5) & 1


def test_load_segment_error_codes(cpu: Cpu) -> None:
    protected(cpu)
    raises(Vector.GP, 0, segments.load_segment, cpu, SS, 0)
    raises(Vector.GP, KDATA, segments.load_segment, cpu, SS, KDATA | 1)  # RPL != CPL
    raises(Vector.GP, UDATA & ~3, segments.load_segment, cpu, SS, UDATA)  # DPL != CPL
    raises(Vector.GP, KCODE, segments.load_segment, cpu, SS, KCODE)  # not writable data
    raises(Vector.GP, XONLY, segments.load_segment, cpu, DS, XONLY)  # execute-only code
    raises(Vector.NP, ABSENT, segments.load_segment, cpu, DS, ABSENT)
    raises(Vector.GP, 0x100, segments.load_segment, cpu, DS, 0x100)  # beyond the GDT limit
    raises(Vector.GP, 0x0C, segments.load_segment, cpu, DS, 0x0C)  # LDT selector, no LDT
    raises(Vector.GP, TSS_SEL, segments.load_segment, cpu, DS, TSS_SEL)  # system descriptor
    raises(Vector.UD, None, segments.load_segment, cpu, CS, KCODE)
    protected(cpu, cpl=3)
    raises(Vector.GP, KDATA, segments.load_segment, cpu, DS, KDATA)  # DPL < CPL
    raises(Vector.SS, ABSENT_SS, segments.load_segment, cpu, SS, ABSENT_SS | 3)
    segments.load_segment(cpu, DS, CONFORMING)  # readable conforming code: no privilege check
    segments.load_segment(cpu, ES, 3)  # a null selector with any RPL
    assert cpu.state.seg[ES].unusable


def test_null_ss_in_64bit_mode(cpu: Cpu) -> None:
    long64(cpu)
    segments.load_segment(cpu, SS, 0)
    assert cpu.state.seg[SS].unusable and cpu.state.cpl == 0
    raises(Vector.GP, 0, segments.load_segment, cpu, SS, 1)  # RPL != CPL


def test_ltr_marks_the_tss_busy_and_lldt(cpu: Cpu) -> None:
    protected(cpu)
    segments.load_tr(cpu, TSS_SEL)
    assert cpu.state.tr.type == 0xB and cpu.mem.read_u8(GDT + TSS_SEL + 5) & 0xF == 0xB
    raises(Vector.GP, TSS_SEL, segments.load_tr, cpu, TSS_SEL)  # busy now
    raises(Vector.GP, 0, segments.load_tr, cpu, 0)
    segments.load_ldt(cpu, LDT_SEL)
    assert cpu.state.ldtr.base == LDT
    cpu.mem.write_u64(LDT + 8, desc(0x4400, 0xFF, 0x2, dpl=0))
    segments.load_segment(cpu, DS, 0x0C)  # LDT entry 1
    assert cpu.state.seg[DS].base == 0x4400
    raises(Vector.GP, KDATA, segments.load_ldt, cpu, KDATA)
    segments.load_ldt(cpu, 0)
    assert cpu.state.ldtr.unusable


def test_ltr_in_long_mode_reads_16_bytes(cpu: Cpu) -> None:
    long64(cpu)
    cpu.mem.write_u64(GDT + TSS64_SEL + 8, 0x1234)
    segments.load_tr(cpu, TSS64_SEL)
    assert cpu.state.tr.base == 0x1234_0000_0000 | TSS64


# --- the stack ---


def test_push_pop_16bit_wraps_and_faults_before_changing_rsp(cpu: Cpu) -> None:
    st = cpu.state
    st.gpr[RSP] = 0xABCD_0000_0000_0000
    segments.push(cpu, 0x1234, 2)
    assert st.gpr[RSP] == 0xABCD_0000_0000_FFFE and cpu.mem.read_u16(0xFFFE) == 0x1234
    assert segments.pop(cpu, 2) == 0x1234 and st.gpr[RSP] == 0xABCD_0000_0000_0000
    protected(cpu)
    st.seg[SS].limit = 0x7FFF
    st.gpr[RSP] = 0x8002
    raises(Vector.SS, 0, segments.push, cpu, 1, 4)
    assert st.gpr[RSP] == 0x8002


# --- far transfers ---


def test_far_jump_and_its_checks(cpu: Cpu) -> None:
    protected(cpu)
    st = cpu.state
    segments.far_jump(cpu, KCODE, 0x1234)
    assert (st.seg[CS].selector, st.rip) == (KCODE, 0x1234)
    raises(Vector.GP, UCODE & ~3, segments.far_jump, cpu, UCODE, 0)  # DPL != CPL, non-conforming
    raises(Vector.GP, 0, segments.far_jump, cpu, 0, 0)
    raises(Vector.GP, KDATA, segments.far_jump, cpu, KDATA, 0)
    st.seg[CS].limit = 0xFFFF
    raises(Vector.GP, 0, segments.far_jump, cpu, XONLY, 0x10000)  # beyond the target's limit
    with pytest.raises(UnsupportedTaskSwitch):
        segments.far_jump(cpu, TSS_SEL, 0)


def test_real_mode_far_call_and_return(cpu: Cpu) -> None:
    st = cpu.state
    st.gpr[RSP] = 0x1000
    st.seg[CS].selector, st.seg[CS].base = 0x100, 0x1000
    segments.far_call(cpu, 0x2000, 0x30, 16, 0x55)
    assert (st.seg[CS].base, st.rip, st.gpr[RSP]) == (0x20000, 0x30, 0xFFC)
    assert cpu.mem.read(0xFFC, 4) == bytes([0x55, 0, 0x00, 0x01])
    segments.far_return(cpu, 16, 0)
    assert (st.seg[CS].selector, st.rip, st.gpr[RSP]) == (0x100, 0x55, 0x1000)


def test_call_gate_to_more_privilege_and_back(cpu: Cpu) -> None:
    protected(cpu, cpl=3)
    st = cpu.state
    st.gpr[RSP] = 0x8000
    cpu.mem.write_u32(0x8000, 0x11111111)  # the two parameters the gate copies
    cpu.mem.write_u32(0x8004, 0x22222222)
    segments.far_call(cpu, GATE32 | 3, 0xDEAD, 32, 0x4444)  # the offset is ignored through a gate
    assert st.cpl == 0 and st.seg[CS].selector == KCODE and st.rip == HANDLER
    assert st.seg[SS].selector == KDATA and st.gpr[RSP] == 0x9000 - 24
    frame = [cpu.mem.read_u32(0x9000 - 24 + 4 * i) for i in range(6)]
    assert frame == [0x4444, UCODE, 0x11111111, 0x22222222, 0x8000, UDATA]
    # the handler loads a ring-0 DS, then returns with RET 8 (dropping the parameters on both stacks)
    segments.load_segment(cpu, DS, KDATA)
    segments.far_return(cpu, 32, 8)
    assert st.cpl == 3 and st.seg[CS].selector == UCODE and st.rip == 0x4444
    assert st.seg[SS].selector == UDATA and st.gpr[RSP] == 0x8008
    assert st.seg[DS].unusable and not st.seg[ES].unusable  # DS (DPL 0) is invalid at CPL 3


def test_call_gate_checks(cpu: Cpu) -> None:
    protected(cpu, cpl=3)
    cpu.mem.write_u64(GDT + GATE32, gate(KCODE, HANDLER, 0xC, 0))  # gate DPL 0 < CPL 3
    raises(Vector.GP, GATE32, segments.far_call, cpu, GATE32 | 3, 0, 32, 0)
    cpu.mem.write_u64(GDT + GATE32, gate(KCODE, HANDLER, 0xC, 3, p=0))
    raises(Vector.NP, GATE32, segments.far_call, cpu, GATE32 | 3, 0, 32, 0)
    cpu.mem.write_u64(GDT + GATE32, gate(KDATA, HANDLER, 0xC, 3))
    raises(Vector.GP, KDATA, segments.far_call, cpu, GATE32 | 3, 0, 32, 0)
    cpu.mem.write_u64(GDT + GATE32, gate(KCODE, HANDLER, 0xC, 3))
    cpu.mem.write_u32(TSS + 8, UDATA)  # SS0 with RPL 3: invalid for ring 0
    raises(Vector.TS, UDATA & ~3, segments.far_call, cpu, GATE32 | 3, 0, 32, 0)
    assert cpu.state.cpl == 3 and cpu.state.gpr[RSP] == 0x8000


def test_64bit_call_gate_switches_to_rsp0_with_null_ss(cpu: Cpu) -> None:
    long64(cpu, cpl=3)
    st = cpu.state
    st.gpr[RSP] = 0x8000
    segments.far_call(cpu, GATE64 | 3, 0, 64, 0x4000_1234)
    assert st.cpl == 0 and st.seg[SS].unusable and st.seg[SS].selector == 0
    assert st.seg[CS].selector == KCODE64 and st.rip == HANDLER and st.gpr[RSP] == 0x9000 - 32
    frame = [cpu.mem.read_u64(0x9000 - 32 + 8 * i) for i in range(4)]
    assert frame == [0x4000_1234, UCODE64, 0x8000, UDATA64]
    segments.far_return(cpu, 64, 0)
    assert st.cpl == 3 and st.rip == 0x4000_1234 and st.gpr[RSP] == 0x8000


# --- IRET ---


def test_real_mode_iret(cpu: Cpu) -> None:
    st = cpu.state
    st.gpr[RSP] = 0x1000
    cpu.mem.write(0x1000, bytes([0x34, 0x12, 0x00, 0x20]) + (IF | ZF | 2).to_bytes(2, "little"))
    segments.iret(cpu, 16)
    assert (st.rip, st.seg[CS].base, st.gpr[RSP]) == (0x1234, 0x20000, 0x1006)
    assert st.rflags == IF | ZF | 2


def test_protected_iret_same_privilege_and_flag_rules(cpu: Cpu) -> None:
    protected(cpu, cpl=3)
    st = cpu.state
    st.rflags = 2  # IOPL 0, IF 0
    st.gpr[RSP] = 0x8000
    for i, v in enumerate([0x5555, UCODE, IF | IOPL_MASK | ZF | TF | 2]):
        cpu.mem.write_u32(0x8000 + 4 * i, v)
    segments.iret(cpu, 32)
    assert st.rip == 0x5555 and st.gpr[RSP] == 0x800C
    assert st.rflags == ZF | TF | 2  # CPL 3 > IOPL: neither IOPL nor IF change


def test_protected_iret_to_outer_privilege(cpu: Cpu) -> None:
    protected(cpu)
    st = cpu.state
    st.gpr[RSP] = 0x9000
    for i, v in enumerate([0x6666, UCODE, IF | 2, 0x7FF0, UDATA]):
        cpu.mem.write_u32(0x9000 + 4 * i, v)
    st.nmi_blocked = True
    segments.iret(cpu, 32)
    assert st.cpl == 3 and st.rip == 0x6666 and st.gpr[RSP] == 0x7FF0 and st.seg[SS].selector == UDATA
    assert st.rflags & IF and not st.nmi_blocked
    assert st.seg[DS].unusable  # the ring-0 DS is nulled


def test_iret_rejects_more_privileged_code(cpu: Cpu) -> None:
    protected(cpu, cpl=3)
    st = cpu.state
    for i, v in enumerate([0x6666, KCODE, 2]):
        cpu.mem.write_u32(0x8000 + 4 * i, v)
    raises(Vector.GP, KCODE, segments.iret, cpu, 32)
    st.rflags |= NT
    with pytest.raises(UnsupportedTaskSwitch):
        segments.iret(cpu, 32)


def test_iret_to_virtual_8086_mode(cpu: Cpu) -> None:
    protected(cpu)
    st = cpu.state
    st.gpr[RSP] = 0x9000
    frame = [0x0100, 0x2000, VM | IF | 2, 0xFFF0, 0x3000, 0x4000, 0x5000, 0x6000, 0x7000]
    for i, v in enumerate(frame):
        cpu.mem.write_u32(0x9000 + 4 * i, v)
    segments.iret(cpu, 32)
    assert st.rflags & VM and st.cpl == 3 and st.rip == 0x100 and st.gpr[RSP] == 0xFFF0
    assert [st.seg[r].base for r in (CS, SS, ES, DS, FS, GS)] == [0x20000, 0x30000, 0x40000, 0x50000, 0x60000, 0x70000]
    raises(Vector.GP, 0, segments.iret, cpu, 16)  # IOPL 0 in virtual-8086 mode


def test_iretq_always_pops_ss_rsp(cpu: Cpu) -> None:
    long64(cpu)
    st = cpu.state
    st.gpr[RSP] = 0x9000
    for i, v in enumerate([0xFFFF_8000_0000_1000, KCODE64, 2, 0x8888, 0]):
        cpu.mem.write_u64(0x9000 + 8 * i, v)
    segments.iret(cpu, 64)
    assert st.rip == 0xFFFF_8000_0000_1000 and st.gpr[RSP] == 0x8888 and st.seg[SS].unusable and st.cpl == 0
    st.gpr[RSP] = 0x9000
    for i, v in enumerate([0x4000, UCODE64, IF | 2, 0x7000, UDATA64]):
        cpu.mem.write_u64(0x9000 + 8 * i, v)
    segments.iret(cpu, 64)
    assert st.cpl == 3 and st.rip == 0x4000 and st.gpr[RSP] == 0x7000 and st.seg[SS].selector == UDATA64
    # returning to ring 3 with a null SS is not allowed; a non-canonical RIP neither
    long64(cpu)
    st.gpr[RSP] = 0x9000
    for i, v in enumerate([0x4000, UCODE64, 2, 0x7000, 3]):
        cpu.mem.write_u64(0x9000 + 8 * i, v)
    raises(Vector.GP, 0, segments.iret, cpu, 64)
    for i, v in enumerate([0x8000_0000_0000, UCODE64, 2, 0x7000, UDATA64]):
        cpu.mem.write_u64(0x9000 + 8 * i, v)
    raises(Vector.GP, 0, segments.iret, cpu, 64)
    assert st.cpl == 0 and st.gpr[RSP] == 0x9000
    st.rflags |= NT
    raises(Vector.GP, 0, segments.iret, cpu, 64)


# --- fast system calls ---


def test_syscall_sysret_64(cpu: Cpu) -> None:
    long64(cpu, cpl=3)
    st = cpu.state
    st.msrs[MSR_STAR] = (0x30 << 48) | (KCODE64 << 32)
    st.msrs[MSR_LSTAR] = 0xFFFF_FFFF_8100_0000
    st.msrs[MSR_SFMASK] = IF | TF
    st.rflags = IF | TF | ZF | 2
    segments.syscall(cpu, 0x401234)
    assert st.gpr[RCX] == 0x401234 and st.gpr[R11] == IF | TF | ZF | 2
    assert st.rip == 0xFFFF_FFFF_8100_0000 and st.rflags == ZF | 2 and st.cpl == 0
    assert (st.seg[CS].selector, st.seg[SS].selector, st.seg[CS].l) == (KCODE64, KDATA64, 1)
    segments.sysret(cpu, 64)
    assert st.cpl == 3 and st.rip == 0x401234 and st.rflags == IF | TF | ZF | 2
    assert (st.seg[CS].selector, st.seg[SS].selector, st.seg[CS].l) == (UCODE64, UDATA64, 1)
    raises(Vector.GP, 0, segments.sysret, cpu, 64)  # CPL 3
    segments.syscall(cpu, 0x8000_0000_0000)
    raises(Vector.GP, 0, segments.sysret, cpu, 64)  # RCX not canonical
    segments.sysret(cpu, 32)  # to compatibility mode: CS = STAR[63:48] | 3
    assert st.seg[CS].selector == 0x33 and not st.seg[CS].l and st.rip == 0
    st.efer &= ~EFER_SCE
    raises(Vector.UD, None, segments.syscall, cpu, 0)


def test_sysenter_sysexit(cpu: Cpu) -> None:
    protected(cpu, cpl=3)
    st = cpu.state
    raises(Vector.GP, 0, segments.sysenter, cpu)  # SYSENTER_CS not set up
    st.msrs[MSR_IA32_SYSENTER_CS] = KCODE
    st.msrs[MSR_IA32_SYSENTER_ESP] = 0x9000
    st.msrs[MSR_IA32_SYSENTER_EIP] = 0xC0001000
    st.rflags = IF | 2
    segments.sysenter(cpu)
    assert st.cpl == 0 and st.rip == 0xC0001000 and st.gpr[RSP] == 0x9000 and not st.rflags & IF
    assert (st.seg[CS].selector, st.seg[SS].selector) == (KCODE, KDATA)
    st.gpr[RCX], st.gpr[RDX] = 0x7000, 0x401000
    segments.sysexit(cpu, 32)
    assert st.cpl == 3 and st.rip == 0x401000 and st.gpr[RSP] == 0x7000
    assert (st.seg[CS].selector, st.seg[SS].selector) == (KCODE + 16 | 3, KCODE + 24 | 3)
    raises(Vector.GP, 0, segments.sysexit, cpu, 32)  # CPL 3


def test_iretq_to_ring_3_nulls_ring_0_data_selectors_but_keeps_the_fs_gs_bases(cpu: Cpu) -> None:
    """§5.8.6: the ring-0 DS/GS become null at CPL 3; in IA-32e mode the GS base is IA32_GS_BASE and stays."""
    long64(cpu)
    st = cpu.state
    load(cpu, DS, KDATA64)
    load(cpu, GS, KDATA64)
    st.seg[GS].base = 0x123000
    st.seg[DS].base = 0
    st.gpr[RSP] = 0x9000
    for i, v in enumerate([0x4000, UCODE64, IF | 2, 0x7000, UDATA64]):
        cpu.mem.write_u64(0x9000 + 8 * i, v)
    segments.iret(cpu, 64)
    assert st.cpl == 3 and st.seg[GS].unusable and st.seg[DS].unusable
    assert st.seg[GS].base == 0x123000
