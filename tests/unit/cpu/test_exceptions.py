"""Exception and interrupt delivery in real, protected and long mode: the pushed frames byte by byte, stack
switches and the IST, software-interrupt privilege checks, #DF escalation and the triple fault."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from popek.cpu import exceptions
from popek.cpu.core import Cpu
from popek.cpu.segments import UnsupportedTaskSwitch
from popek.cpu.state import (
    AC,
    CS,
    IF,
    RF,
    RSP,
    SS,
    TF,
    ZF,
    CpuException,
    TripleFault,
    Vector,
)
from popek.memory import GuestMemory
from tests.unit.cpu.test_segments import (
    KCODE,
    KCODE64,
    KDATA,
    KDATA64,
    UCODE,
    UCODE64,
    UDATA,
    UDATA64,
    NullBus,
    gate,
    long64,
    protected,
)

IDT = 0x4000


@pytest.fixture
def cpu() -> Iterator[Cpu]:
    with GuestMemory(16 << 20) as mem:
        yield Cpu(0, mem, NullBus())


def idt32(cpu: Cpu, vector: int, selector: int, offset: int, type_: int = 0xE, dpl: int = 0, p: int = 1) -> None:
    cpu.mem.write_u64(IDT + 8 * vector, gate(selector, offset, type_, dpl, p=p))
    cpu.state.idtr.base, cpu.state.idtr.limit = IDT, 0x7FF


def idt64(cpu: Cpu, vector: int, offset: int, type_: int = 0xE, dpl: int = 0, ist: int = 0, p: int = 1) -> None:
    cpu.mem.write_u64(IDT + 16 * vector, gate(KCODE64, offset, type_, dpl, params=ist, p=p))
    cpu.mem.write_u64(IDT + 16 * vector + 8, offset >> 32)
    cpu.state.idtr.base, cpu.state.idtr.limit = IDT, 0xFFF


def words(cpu: Cpu, addr: int, n: int, size: int) -> list[int]:
    return [int.from_bytes(cpu.mem.read(addr + size * i, size), "little") for i in range(n)]


# --- real mode ---


def test_real_mode_delivery_through_the_ivt(cpu: Cpu) -> None:
    st = cpu.state
    cpu.mem.write_u32(0x21 * 4, (0x1000 << 16) | 0x0123)  # handler 1000:0123
    st.seg[CS].selector, st.seg[CS].base = 0x2000, 0x20000
    st.gpr[RSP] = 0x800
    st.rflags = IF | TF | AC | ZF | 2
    st.halted = True
    exceptions.deliver(cpu, 0x21, software=True, return_rip=0x45)
    assert (st.seg[CS].selector, st.seg[CS].base, st.rip, st.gpr[RSP]) == (0x1000, 0x10000, 0x123, 0x7FA)
    assert words(cpu, 0x7FA, 3, 2) == [0x45, 0x2000, (IF | TF | ZF | 2) & 0xFFFF]
    assert st.rflags == ZF | 2 and not st.halted  # IF, TF and AC cleared


def test_real_mode_gp_pushes_no_error_code(cpu: Cpu) -> None:
    st = cpu.state
    cpu.mem.write_u32(13 * 4, 0x0000_0500)
    st.gpr[RSP] = 0x800
    exceptions.handle(cpu, CpuException(Vector.GP, 0), 0x10)
    assert st.gpr[RSP] == 0x7FA and st.rip == 0x500


# --- protected mode ---


def test_protected_same_privilege_with_error_code(cpu: Cpu) -> None:
    protected(cpu)
    st = cpu.state
    idt32(cpu, 13, KCODE, 0x12345)
    st.gpr[RSP] = 0x8000
    st.rflags = IF | 2
    exceptions.handle(cpu, CpuException(Vector.GP, 0x28), 0x1000)
    assert st.rip == 0x12345 and st.seg[CS].selector == KCODE and st.gpr[RSP] == 0x8000 - 16
    assert words(cpu, 0x8000 - 16, 4, 4) == [0x28, 0x1000, KCODE, IF | RF | 2]  # faults push RF set
    assert not st.rflags & (IF | RF)


def test_protected_user_to_kernel_switches_to_the_tss_stack(cpu: Cpu) -> None:
    protected(cpu, cpl=3)
    st = cpu.state
    idt32(cpu, 0x80, KCODE, 0x2000, type_=0xF, dpl=3)  # trap gate: IF stays
    st.gpr[RSP] = 0x7000
    st.rflags = IF | 2
    exceptions.deliver(cpu, 0x80, software=True, return_rip=0x401002)
    assert st.cpl == 0 and st.seg[SS].selector == KDATA and st.gpr[RSP] == 0x9000 - 20
    assert words(cpu, 0x9000 - 20, 5, 4) == [0x401002, UCODE, IF | 2, 0x7000, UDATA]
    assert st.rflags & IF


def test_software_interrupt_gate_dpl_check(cpu: Cpu) -> None:
    protected(cpu, cpl=3)
    idt32(cpu, 0x81, KCODE, 0x2000, dpl=0)
    with pytest.raises(CpuException) as info:
        exceptions.deliver(cpu, 0x81, software=True)
    assert (info.value.vector, info.value.error_code) == (Vector.GP, 0x81 * 8 + 2)
    # a hardware interrupt ignores the gate DPL
    cpu.state.gpr[RSP] = 0x7000
    exceptions.deliver(cpu, 0x81)
    assert cpu.state.rip == 0x2000


def test_task_gates_are_reported_unsupported(cpu: Cpu) -> None:
    protected(cpu)
    idt32(cpu, 8, 0x68, 0, type_=0x5)
    with pytest.raises(UnsupportedTaskSwitch):
        exceptions.deliver(cpu, 8, 0)


# --- long mode ---


def test_long_mode_user_to_kernel_frame(cpu: Cpu) -> None:
    long64(cpu, cpl=3)
    st = cpu.state
    idt64(cpu, 14, 0xFFFF_FFFF_8000_1000)
    st.gpr[RSP] = 0x7FF8
    st.rflags = IF | 2
    exceptions.handle(cpu, CpuException(Vector.PF, 0x6, cr2=0x1234_5678), 0x40_1000)
    assert st.cr2 == 0x1234_5678
    assert st.cpl == 0 and st.seg[SS].unusable and st.seg[CS].selector == KCODE64
    assert st.rip == 0xFFFF_FFFF_8000_1000 and st.gpr[RSP] == 0x9000 - 48
    assert words(cpu, 0x9000 - 48, 6, 8) == [0x6, 0x40_1000, UCODE64, IF | RF | 2, 0x7FF8, UDATA64]


def test_long_mode_same_privilege_aligns_the_stack(cpu: Cpu) -> None:
    long64(cpu)
    st = cpu.state
    idt64(cpu, 0x30, 0x5000)
    st.gpr[RSP] = 0x8008  # not 16-byte aligned
    st.rip = 0x1111
    exceptions.inject_interrupt(cpu, 0x30)
    assert st.gpr[RSP] == 0x8000 - 40 and st.rip == 0x5000
    assert words(cpu, 0x8000 - 40, 5, 8) == [0x1111, KCODE64, 2, 0x8008, KDATA64]


def test_long_mode_ist(cpu: Cpu) -> None:
    long64(cpu)
    st = cpu.state
    idt64(cpu, 2, 0x6000, ist=1)
    st.gpr[RSP] = 0x8000
    st.rip = 0x777
    exceptions.inject_nmi(cpu)
    assert st.nmi_blocked and st.rip == 0x6000
    assert st.gpr[RSP] == 0xA000 - 40  # IST1 = 0xA008, aligned down to 0xA000
    assert words(cpu, 0xA000 - 40, 5, 8) == [0x777, KCODE64, 2, 0x8000, KDATA64]


def test_long_mode_requires_a_64bit_handler(cpu: Cpu) -> None:
    long64(cpu)
    cpu.mem.write_u64(IDT + 16 * 0x31, gate(KCODE, 0x5000, 0xE, 0))  # 32-bit code segment
    cpu.mem.write_u64(IDT + 16 * 0x31 + 8, 0)
    cpu.state.idtr.base, cpu.state.idtr.limit = IDT, 0xFFF
    with pytest.raises(CpuException) as info:
        exceptions.deliver(cpu, 0x31)
    assert (info.value.vector, info.value.error_code) == (Vector.GP, KCODE | 1)  # EXT: hardware interrupt


# --- double and triple faults ---


def test_fault_during_delivery_becomes_double_fault(cpu: Cpu) -> None:
    long64(cpu)
    st = cpu.state
    idt64(cpu, 13, 0x5000, p=0)  # #GP's gate is not present → #NP, contributory twice → #DF
    idt64(cpu, 8, 0x8888, ist=1)
    st.gpr[RSP] = 0x8000
    exceptions.handle(cpu, CpuException(Vector.GP, 0), 0x1234)
    assert st.rip == 0x8888 and st.gpr[RSP] == 0xA000 - 48
    assert words(cpu, 0xA000 - 48, 2, 8) == [0, 0x1234]  # #DF's error code is 0


def test_page_fault_then_gp_is_double_but_benign_first_is_serial(cpu: Cpu) -> None:
    long64(cpu)
    st = cpu.state
    st.gpr[RSP] = 0x8000
    idt64(cpu, 14, 0x5000, p=0)
    idt64(cpu, 8, 0x8888)
    exceptions.handle(cpu, CpuException(Vector.PF, 0, cr2=0x10), 0x1234)
    assert st.rip == 0x8888
    # an external interrupt whose gate is absent: #NP(vector*8+2+EXT) delivered on its own
    long64(cpu)
    st.gpr[RSP] = 0x8000
    idt64(cpu, 0x40, 0x5000, p=0)
    idt64(cpu, 11, 0x9999)
    exceptions.inject_interrupt(cpu, 0x40)
    assert st.rip == 0x9999 and cpu.mem.read_u64(st.gpr[RSP]) == 0x40 * 8 + 3


def test_fault_while_delivering_double_fault_is_a_triple_fault(cpu: Cpu) -> None:
    long64(cpu)
    st = cpu.state
    st.gpr[RSP] = 0x8000
    idt64(cpu, 13, 0x5000, p=0)
    idt64(cpu, 8, 0x8888, p=0)
    with pytest.raises(TripleFault):
        exceptions.handle(cpu, CpuException(Vector.GP, 0), 0x1234)


def test_stack_fault_during_delivery_changes_no_register(cpu: Cpu) -> None:
    protected(cpu)
    st = cpu.state
    idt32(cpu, 0x20, KCODE, 0x5000)
    st.seg[SS].limit = 0xFFF
    st.gpr[RSP] = 0x100C  # beyond the limit
    before = (st.rip, st.gpr[RSP], st.rflags, st.seg[CS].selector)
    with pytest.raises(CpuException) as info:
        exceptions.deliver(cpu, 0x20)
    assert (info.value.vector, info.value.error_code) == (Vector.SS, 1)
    assert (st.rip, st.gpr[RSP], st.rflags, st.seg[CS].selector) == before
