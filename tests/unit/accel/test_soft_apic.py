"""A software vCPU's own local APIC (SDM vol. 3A ch. 11): IA32_APIC_BASE with its mode transitions, the x2APIC MSRs,
CR8 as TPR[7:4], the xAPIC page where IA32_APIC_BASE puts it, the TSC-deadline timer against the vCPU's own
TSC, and CPUID reporting what the APIC offers (the APIC flag following IA32_APIC_BASE.EN, leaf 0xB's x2APIC ID)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from popek.accel.soft import SoftAccel
from popek.cpu.state import CpuException, Vector
from popek.cpuid import ECX_TSC_DEADLINE, ECX_X2APIC, EDX_APIC
from popek.devices import lapic as lp
from popek.memory import GuestMemory

EN, EXTD, BSP = lp.APIC_BASE_EN, lp.APIC_BASE_EXTD, lp.APIC_BASE_BSP
XAPIC = lp.LAPIC_BASE | EN


@pytest.fixture
def accel() -> Iterator[SoftAccel]:
    with GuestMemory(1 << 20) as mem:
        yield SoftAccel(mem, 2)


def gp(fn: object, *args: int) -> bool:
    try:
        fn(*args)  # type: ignore[operator]
    except CpuException as e:
        assert e.vector == Vector.GP
        return True
    return False


def test_apic_base_reads_the_bsp_flag_per_vcpu(accel: SoftAccel) -> None:
    assert accel.interps[0].read_msr(lp.MSR_APIC_BASE) == XAPIC | BSP
    assert accel.interps[1].read_msr(lp.MSR_APIC_BASE) == XAPIC


@pytest.mark.parametrize(
    "start,value,faults",
    [
        (XAPIC, XAPIC | EXTD, False),  # xAPIC -> x2APIC
        (XAPIC, lp.LAPIC_BASE | EXTD, True),  # EXTD without EN: invalid
        (XAPIC, lp.LAPIC_BASE, False),  # xAPIC -> disabled
        (lp.LAPIC_BASE, XAPIC | EXTD, True),  # disabled -> x2APIC directly
        (XAPIC | EXTD, XAPIC, True),  # x2APIC -> xAPIC without passing through disabled
        (XAPIC | EXTD, lp.LAPIC_BASE, False),  # x2APIC -> disabled
        (XAPIC, XAPIC | 1, True),  # reserved low bit
        (XAPIC, XAPIC | 1 << 46, True),  # beyond MAXPHYADDR (46 bits)
    ],
)
def test_apic_base_writes_follow_the_sdm_mode_transitions(
    accel: SoftAccel, start: int, value: int, faults: bool
) -> None:
    interp = accel.interps[1]
    if start & EXTD:
        interp.write_msr(lp.MSR_APIC_BASE, XAPIC | EXTD)
    elif start == lp.LAPIC_BASE:
        interp.write_msr(lp.MSR_APIC_BASE, lp.LAPIC_BASE)
    assert interp.read_msr(lp.MSR_APIC_BASE) == start
    assert gp(interp.write_msr, lp.MSR_APIC_BASE, value) == faults
    assert interp.read_msr(lp.MSR_APIC_BASE) == (start if faults else value)


def test_cpuid_apic_flag_follows_the_global_enable_and_offers_x2apic(accel: SoftAccel) -> None:
    interp = accel.interps[0]
    _, _, ecx, edx = interp.cpuid(1, 0)
    assert edx & EDX_APIC and ecx & ECX_X2APIC
    assert not ecx & ECX_TSC_DEADLINE  # implemented (below) but not advertised, as on QEMU TCG
    interp.write_msr(lp.MSR_APIC_BASE, lp.LAPIC_BASE)
    assert not interp.cpuid(1, 0)[3] & EDX_APIC
    assert [accel.interps[i].cpuid(0xB, 0)[3] for i in (0, 1)] == [0, 1]  # x2APIC IDs
    assert accel.interps[0].cpuid(0xB, 1)[1] == 2  # logical processors at the core level


def test_x2apic_msrs_answer_only_in_x2apic_mode(accel: SoftAccel) -> None:
    interp = accel.interps[1]
    assert gp(interp.read_msr, 0x802)  # the x2APIC ID register, in xAPIC mode
    interp.write_msr(lp.MSR_APIC_BASE, XAPIC | EXTD)
    assert interp.read_msr(0x802) == 1
    assert gp(interp.write_msr, 0x802, 5)  # read-only in x2APIC mode


def test_cr8_is_the_tpr_class_while_the_apic_is_enabled(accel: SoftAccel) -> None:
    cpu = accel.cpus[0]
    apic = accel.platform.lapic_for(0)
    assert cpu.apic is not None
    apic.write_register(lp.REG_TPR, 0x50)
    assert cpu.apic.read_cr8() == 5
    cpu.apic.write_cr8(0xF)
    assert apic.read_register(lp.REG_TPR) == 0xF0
    accel.interps[0].write_msr(lp.MSR_APIC_BASE, lp.LAPIC_BASE)  # disabled: CR8 is the CPU's own
    assert cpu.apic.read_cr8() is None


def test_the_xapic_page_moves_with_apic_base_and_is_gone_in_x2apic_mode(accel: SoftAccel) -> None:
    bus = accel.buses[1]
    version = lp.MAX_LVT << 16 | lp.VERSION
    assert bus._is_lapic(lp.LAPIC_BASE + lp.REG_VERSION)
    assert bus.mmio_read(lp.LAPIC_BASE + lp.REG_VERSION, 4) == version
    accel.interps[1].write_msr(lp.MSR_APIC_BASE, 0xFED40000 | EN)
    assert not bus._is_lapic(lp.LAPIC_BASE + lp.REG_VERSION)
    assert bus.mmio_read(0xFED40000 + lp.REG_VERSION, 4) == version
    accel.interps[1].write_msr(lp.MSR_APIC_BASE, 0xFED40000 | EN | EXTD)
    assert not bus._is_lapic(0xFED40000 + lp.REG_VERSION)


def test_a_tsc_deadline_already_reached_fires_at_once(accel: SoftAccel) -> None:
    interp = accel.interps[0]
    apic = accel.platform.lapic_for(0)
    apic.write_register(lp.REG_SVR, lp.SVR_ENABLE | 0xFF)
    apic.write_register(lp.REG_LVT_TIMER, lp.TIMER_TSC_DEADLINE << lp.LVT_TIMER_MODE_SHIFT | 0xEF)
    interp.write_msr(0x10, 1_000_000)  # IA32_TSC: the vCPU's TSC runs ahead of the virtual clock
    interp.write_msr(lp.MSR_TSC_DEADLINE, interp.read_msr(0x10))
    assert apic.irr >> 0xEF & 1
    assert interp.read_msr(lp.MSR_TSC_DEADLINE) == 0


def test_x2apic_reads_of_reserved_registers_and_reserved_self_ipi_bits_are_gp(accel: SoftAccel) -> None:
    """SDM §11.12.1.2: only the registers of table 11-6 are readable as MSRs; SELF IPI takes a vector only."""
    interp = accel.interps[1]
    interp.write_msr(lp.MSR_APIC_BASE, XAPIC | EXTD)
    for msr in (0x800, 0x801, 0x804, 0x807, 0x809, 0x80B, 0x829, 0x831, 0x83F, 0x840, 0x8FF):
        assert gp(interp.read_msr, msr), hex(msr)
    for msr in (0x802, 0x803, 0x808, 0x80A, 0x80D, 0x80F, 0x810, 0x828, 0x830, 0x832, 0x839, 0x83E):
        assert not gp(interp.read_msr, msr), hex(msr)
    assert gp(interp.write_msr, 0x83F, 0x100)
    assert not gp(interp.write_msr, 0x83F, 0x40)
