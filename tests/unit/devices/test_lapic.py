from __future__ import annotations

import pytest

from popek.devices import lapic as lp
from popek.devices.clock import VirtualClock
from popek.devices.platform import SoftPlatform


def enable(apic: lp.LocalApic, spurious: int = 0xFF) -> None:
    apic.write_register(lp.REG_SVR, lp.SVR_ENABLE | spurious)


def make(cpus: int = 2) -> tuple[SoftPlatform, list[tuple[str, int, int]]]:
    platform = SoftPlatform(cpus)
    events: list[tuple[str, int, int]] = []
    platform.on_init = lambda i: events.append(("init", i, 0))
    platform.on_sipi = lambda i, v: events.append(("sipi", i, v))
    platform.on_nmi = lambda i: events.append(("nmi", i, 0))
    for apic in platform.lapics:
        enable(apic)
    return platform, events


def ipi(apic: lp.LocalApic, low: int, dest: int = 0) -> None:
    apic.write(lp.REG_ICR_HIGH, (dest << 24).to_bytes(4, "little"))
    apic.write(lp.REG_ICR_LOW, low.to_bytes(4, "little"))


def test_reset_state() -> None:
    clock = VirtualClock()
    bsp = lp.LocalApic(0, clock, bsp=True)
    ap = lp.LocalApic(3, clock)
    assert bsp.read(lp.REG_VERSION, 4) == (0x00050014).to_bytes(4, "little")
    assert ap.read_register(lp.REG_ID) == 3 << 24
    assert ap.read_register(lp.REG_DFR) == 0xFFFFFFFF
    assert ap.read_register(lp.REG_SVR) == 0xFF
    assert all(ap.read_register(r) == lp.LVT_MASKED for r in lp.LVT_REGS)
    assert bsp.read_register(lp.REG_LVT_LINT0) == 0x700  # ExtINT, unmasked: virtual wire
    assert not ap.software_enabled


def test_software_disabled_apic_refuses_fixed_and_keeps_lvt_masked() -> None:
    platform, _ = make()
    apic = platform.lapic_for(1)
    apic.write_register(lp.REG_SVR, 0xFF)
    ipi(platform.lapic_for(0), 0x4040, dest=1)
    assert not apic.irr
    apic.write_register(lp.REG_LVT_TIMER, 0x30)
    assert apic.read_register(lp.REG_LVT_TIMER) & lp.LVT_MASKED
    enable(apic)
    ipi(platform.lapic_for(0), 0x4040, dest=1)
    assert apic.irr == 1 << 0x40


def test_tpr_blocks_interrupts_at_or_below_its_class() -> None:
    platform, _ = make(1)
    apic = platform.lapic_for(0)
    apic.write_register(lp.REG_TPR, 0x40)
    apic.accept(lp.ApicMessage(0x45, lp.DeliveryMode.FIXED, 0))
    assert not apic.interrupt_pending()
    assert apic.read_register(lp.REG_PPR) == 0x40
    apic.write_register(lp.REG_TPR, 0x3F)
    assert apic.interrupt_pending()
    assert apic.acknowledge() == 0x45
    assert apic.read_register(lp.REG_PPR) == 0x40


def test_isr_nesting_and_eoi_order() -> None:
    platform, _ = make(1)
    apic = platform.lapic_for(0)

    def fixed(v: int) -> None:
        apic.accept(lp.ApicMessage(v, lp.DeliveryMode.FIXED, 0))

    fixed(0x40)
    assert apic.acknowledge() == 0x40
    fixed(0x80)
    assert apic.interrupt_pending()
    assert apic.acknowledge() == 0x80
    fixed(0x50)
    fixed(0x8F)  # same class as the one in service: waits
    assert not apic.interrupt_pending()
    assert apic.read_register(lp.REG_ISR + 0x40) == 1 << 0  # vector 0x80 in ISR word 4
    apic.write_register(lp.REG_EOI, 0)
    assert apic.acknowledge() == 0x8F
    apic.write_register(lp.REG_EOI, 0)
    assert apic.acknowledge() == 0x50
    apic.write_register(lp.REG_EOI, 0)
    apic.write_register(lp.REG_EOI, 0)
    assert apic.isr == 0
    assert apic.acknowledge() == 0xFF  # nothing left: the spurious vector, no ISR bit


def test_illegal_vector_sets_esr_after_write() -> None:
    platform, _ = make(1)
    apic = platform.lapic_for(0)
    apic.write_register(lp.REG_LVT_ERROR, 0xFE)
    ipi(apic, 0x4000 | 0x05)
    assert apic.read_register(lp.REG_ESR) == 0  # latched only by the next ESR write
    apic.write_register(lp.REG_ESR, 0)
    assert apic.read_register(lp.REG_ESR) == lp.ESR_SEND_ILLEGAL_VECTOR
    assert apic.irr == 1 << 0xFE  # the error LVT fired


def test_one_shot_timer() -> None:
    platform, _ = make(1)
    apic, clock = platform.lapic_for(0), platform.clock
    apic.write_register(lp.REG_TIMER_DIVIDE, 0b1011)  # divide by 1: 1 GHz, a count per ns
    apic.write_register(lp.REG_LVT_TIMER, 0xEC)
    apic.write_register(lp.REG_TIMER_INITIAL, 1000)
    clock.advance_to(400)
    assert apic.read_register(lp.REG_TIMER_CURRENT) == 600
    clock.advance_to(999)
    assert not apic.irr
    clock.advance_to(1000)
    assert apic.irr == 1 << 0xEC
    assert apic.read_register(lp.REG_TIMER_CURRENT) == 0
    assert clock.next_deadline() is None


def test_periodic_timer_with_divider() -> None:
    platform, _ = make(1)
    apic, clock = platform.lapic_for(0), platform.clock
    fired: list[int] = []
    apic.write_register(lp.REG_TIMER_DIVIDE, 0b0011)  # divide by 16
    apic.write_register(lp.REG_LVT_TIMER, 1 << 17 | 0xEF)
    apic.write_register(lp.REG_TIMER_INITIAL, 100)  # 1600 ns
    while len(fired) < 5:
        deadline = clock.next_deadline()
        assert deadline is not None
        clock.advance_to(deadline)
        fired.append(clock.now_ns())
        assert apic.acknowledge() == 0xEF
        apic.write_register(lp.REG_EOI, 0)
    assert fired == [1600, 3200, 4800, 6400, 8000]
    clock.advance_to(8000 + 16 * 30)
    assert apic.read_register(lp.REG_TIMER_CURRENT) == 70
    apic.write_register(lp.REG_LVT_TIMER, 1 << 17 | lp.LVT_MASKED | 0xEF)
    clock.advance_to(20000)
    assert not apic.irr  # masked: no interrupts, but the count goes on
    apic.write_register(lp.REG_TIMER_INITIAL, 0)
    assert clock.next_deadline() is None


def test_tsc_deadline_timer() -> None:
    clock = VirtualClock()
    apic = lp.LocalApic(0, clock, tsc_hz=2_000_000_000)
    enable(apic)
    apic.msr_write(lp.MSR_TSC_DEADLINE, 1000)
    assert apic.msr_read(lp.MSR_TSC_DEADLINE) == 0  # ignored outside TSC-deadline mode
    apic.write_register(lp.REG_LVT_TIMER, 2 << 17 | 0xE0)
    apic.write_register(lp.REG_TIMER_INITIAL, 50)  # ignored in TSC-deadline mode
    assert apic.read_register(lp.REG_TIMER_INITIAL) == 0
    apic.msr_write(lp.MSR_TSC_DEADLINE, 3000)  # 1500 ns at 2 GHz
    assert apic.msr_read(lp.MSR_TSC_DEADLINE) == 3000
    clock.advance_to(1499)
    assert not apic.irr
    clock.advance_to(1500)
    assert apic.irr == 1 << 0xE0
    assert apic.msr_read(lp.MSR_TSC_DEADLINE) == 0
    apic.acknowledge()
    apic.write_register(lp.REG_EOI, 0)
    apic.msr_write(lp.MSR_TSC_DEADLINE, 10)  # already passed: fires at once
    assert apic.irr == 1 << 0xE0
    apic.msr_write(lp.MSR_TSC_DEADLINE, 10_000)
    apic.write_register(lp.REG_LVT_TIMER, 0xE0)  # leaving TSC-deadline mode disarms
    assert clock.next_deadline() is None


def test_fixed_ipi_physical_logical_and_shorthands() -> None:
    platform, _ = make(3)
    a0, a1, a2 = platform.lapics
    ipi(a0, 0x4000 | 0x61, dest=2)
    assert (a1.irr, a2.irr) == (0, 1 << 0x61)
    a1.write_register(lp.REG_LDR, 0x02 << 24)
    a2.write_register(lp.REG_LDR, 0x04 << 24)
    ipi(a0, 0x4800 | 0x62, dest=0x06)  # logical flat: APICs 1 and 2
    assert a1.irr >> 0x62 & 1 and a2.irr >> 0x62 & 1 and not a0.irr
    ipi(a0, 0x4000 | 0x63, dest=0xFF)  # physical broadcast
    assert all(a.irr >> 0x63 & 1 for a in platform.lapics)
    ipi(a1, 0x4000 | 1 << 18 | 0x64)  # self
    assert [a.irr >> 0x64 & 1 for a in platform.lapics] == [0, 1, 0]
    ipi(a1, 0x4000 | 3 << 18 | 0x65)  # all but self
    assert [a.irr >> 0x65 & 1 for a in platform.lapics] == [1, 0, 1]
    ipi(a2, 0x4000 | 1 << 8 | 0x66, dest=0xFF)  # lowest priority: one target only
    assert [a.irr >> 0x66 & 1 for a in platform.lapics] == [1, 0, 0]
    assert a0.read_register(lp.REG_ICR_LOW) & 1 << 12 == 0  # delivery status idle


def test_cluster_logical_destination() -> None:
    platform, _ = make(2)
    a0, a1 = platform.lapics
    for a in platform.lapics:
        a.write_register(lp.REG_DFR, 0x0FFFFFFF)
    a0.write_register(lp.REG_LDR, 0x11 << 24)
    a1.write_register(lp.REG_LDR, 0x21 << 24)
    ipi(a0, 0x4800 | 0x70, dest=0x21)
    assert (a0.irr, a1.irr) == (0, 1 << 0x70)


def test_init_sipi_sequence_and_nmi() -> None:
    platform, events = make(2)
    bsp, ap = platform.lapics
    ap.write_register(lp.REG_TPR, 0x20)
    ipi(bsp, 0xC500, dest=1)  # INIT, level assert
    assert events == [("init", 1, 0)]
    assert ap.read_register(lp.REG_TPR) == 0 and not ap.software_enabled  # the AP's APIC was reset
    ipi(bsp, 0x8500, dest=0)  # INIT level de-assert (to all, in old MP code): no effect
    assert events == [("init", 1, 0)]
    ipi(bsp, 0x4600 | 0x9A, dest=1)  # STARTUP at 0x9A000
    ipi(bsp, 0x4400, dest=1)  # NMI
    assert events[1:] == [("sipi", 1, 0x9A), ("nmi", 1, 0)]


def test_lint1_nmi_and_level_lint0() -> None:
    platform, events = make(1)
    apic = platform.lapic_for(0)
    apic.write_register(lp.REG_LVT_LINT1, 0x400)  # NMI
    apic.set_lint(1, True)
    apic.set_lint(1, True)
    assert events == [("nmi", 0, 0)]
    apic.write_register(lp.REG_LVT_LINT0, 0x8000 | 0x33)  # fixed, level-triggered
    apic.set_lint(0, True)
    assert apic.acknowledge() == 0x33
    assert apic.read_register(lp.REG_LVT_LINT0) & lp.LVT_REMOTE_IRR
    apic.write_register(lp.REG_EOI, 0)
    assert apic.acknowledge() == 0x33  # still asserted after the EOI
    apic.set_lint(0, False)
    apic.write_register(lp.REG_EOI, 0)
    assert not apic.interrupt_pending()


def init_pic(platform: SoftPlatform) -> None:
    for port, value in ((0, 0x11), (1, 0x30), (1, 0x04), (1, 0x01), (1, 0x00)):
        platform.pic.master_port.write(port, bytes([value]))


def test_virtual_wire_passes_the_pic_through_lint0() -> None:
    platform = SoftPlatform(2)
    init_pic(platform)
    bsp, ap = platform.lapics
    pending: list[int] = []
    platform.apics.on_pending = pending.append
    platform.irq_line(1).set_level(True)
    assert 0 in pending
    assert bsp.interrupt_pending()  # software-disabled, but LINT0 is ExtINT: the BIOS's virtual wire
    assert not ap.interrupt_pending()  # the AP's LINT0 is masked
    bsp.write_register(lp.REG_TPR, 0xF0)  # ExtINT ignores the task priority
    assert bsp.acknowledge() == 0x31
    assert not bsp.interrupt_pending()
    bsp.write_register(lp.REG_LVT_LINT0, 0x10700)  # masked: the PIC no longer reaches the CPU
    platform.pic.master_port.write(0, b"\x20")
    platform.irq_line(3).set_level(True)
    assert not bsp.interrupt_pending()
    ap.enabled = False  # a globally disabled APIC is no APIC: INTR goes straight in
    assert ap.interrupt_pending()
    assert ap.acknowledge() == 0x33


def test_extint_message_from_ioapic_runs_the_pic_inta() -> None:
    platform = SoftPlatform(1)
    init_pic(platform)
    bsp = platform.lapic_for(0)
    enable(bsp)
    bsp.write_register(lp.REG_LVT_LINT0, 0x10700)
    platform.ioapic.redirection[5] = 7 << 8  # ExtINT to APIC 0
    platform.irq_line(5).set_level(True)
    assert bsp.interrupt_pending()
    assert bsp.acknowledge() == 0x35


def test_x2apic_msrs() -> None:
    platform, _ = make(2)
    a0, a1 = platform.lapics
    with pytest.raises(lp.ApicAccessError):
        a0.msr_read(0x802)
    a0.x2apic = a1.x2apic = True
    assert a1.msr_read(0x802) == 1
    assert a1.msr_read(0x80D) == 1 << 1  # cluster 0, member bit 1
    a0.msr_write(0x830, 1 << 32 | 0x4000 | 0x77)
    assert a1.irr == 1 << 0x77
    a0.msr_write(0x83F, 0x78)
    assert a0.irr == 1 << 0x78
    with pytest.raises(lp.ApicAccessError):
        a0.msr_write(0x80B, 1)
    with pytest.raises(lp.ApicAccessError):
        a0.msr_write(0x802, 5)
    assert a0.read(lp.REG_ID, 4) == b"\0\0\0\0"  # the MMIO page is gone in x2APIC mode


def test_same_clock_advances_same_interrupts() -> None:
    def run() -> list[tuple[int, int, int]]:
        platform, _ = make(2)
        init_pic(platform)
        for port, value in ((3, 0x34), (0, 0xA9), (0, 0x04)):
            platform.pit.write(port, bytes([value]))
        for i, apic in enumerate(platform.lapics):
            apic.write_register(lp.REG_TIMER_DIVIDE, 0b1011)
            apic.write_register(lp.REG_LVT_TIMER, 1 << 17 | (0xE0 + i))
            apic.write_register(lp.REG_TIMER_INITIAL, 333_333 + i * 1000)
        taken = []
        step = 7919
        while platform.clock.now_ns() < 5_000_000:
            platform.clock.advance_by(step)
            for i, apic in enumerate(platform.lapics):
                while apic.interrupt_pending():
                    v = apic.acknowledge()
                    taken.append((platform.clock.now_ns(), i, v))
                    if v < 0x40:
                        platform.pic.master_port.write(0, b"\x20")
                    else:
                        apic.write_register(lp.REG_EOI, 0)
        return taken

    first = run()
    assert first == run()
    assert sum(1 for _, _, v in first if v == 0x30) == 5  # PIT IRQ0 through the virtual wire, 1 kHz
    assert sum(1 for _, i, v in first if (i, v) == (1, 0xE1)) == 14


def test_only_level_triggered_vectors_are_broadcast_at_eoi() -> None:
    platform, _ = make(1)
    apic = platform.lapic_for(0)
    broadcast: list[int] = []
    platform.apics.on_eoi = broadcast.append
    apic.accept(lp.ApicMessage(0x41, lp.DeliveryMode.FIXED, 0))
    apic.accept(lp.ApicMessage(0x52, lp.DeliveryMode.FIXED, 0, level_triggered=True))
    assert apic.read_register(lp.REG_TMR + 0x20) == 1 << (0x52 - 0x40)
    assert apic.acknowledge() == 0x52
    apic.write_register(lp.REG_EOI, 0)
    assert broadcast == [0x52]
    assert apic.acknowledge() == 0x41
    apic.write_register(lp.REG_EOI, 0)
    assert broadcast == [0x52]


def test_tmr_keeps_the_trigger_mode_of_the_last_acceptance_after_eoi() -> None:
    """SDM §11.8.4: TMR is set or cleared when a vector is accepted into IRR; the EOI leaves it alone."""
    platform, _ = make(1)
    apic = platform.lapic_for(0)
    apic.accept(lp.ApicMessage(0x79, lp.DeliveryMode.FIXED, 0, level_triggered=True))
    assert apic.acknowledge() == 0x79
    apic.write_register(lp.REG_EOI, 0)
    assert apic.read_register(lp.REG_TMR + 0x30) >> (0x79 - 0x60) & 1
    apic.accept(lp.ApicMessage(0x79, lp.DeliveryMode.FIXED, 0))
    assert not apic.read_register(lp.REG_TMR + 0x30) >> (0x79 - 0x60) & 1
