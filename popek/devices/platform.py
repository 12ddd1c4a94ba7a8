"""The interrupt and timer platform of the software backend, modelled in Python: what KVM's in-kernel irqchip
and PIT provide to the KVM backend.

`SoftPlatform` builds the `VirtualClock`, the 8259A pair, the 8254 with port 0x61, the I/O APIC and one local
APIC per vCPU, and wires them as a PC and popek's MP table (`popek.boot.mptable`) describe them:
- ISA IRQ n goes to PIC input n and to I/O APIC pin n, IRQ0 included (the MP table routes ISA IRQ n to pin n,
  as KVM's default GSI routing does; there is no IRQ0 → pin 2 override), except that IRQ2 is the PIC's cascade;
- the I/O APIC has the ID the MP table gives it (the number of CPUs, in the 4 bits the 82093AA keeps);
- the PIC's INTR drives LINT0 of every local APIC and the MP table declares LINT0 ExtINT and LINT1 NMI for all
  of them; the bootstrap processor's LINT0 starts unmasked in ExtINT mode (virtual wire);
- the local APICs' EOI broadcast goes to the I/O APIC; channel 0 of the PIT drives IRQ0.

The builder places `port_devices()` on the port bus and `mmio_devices()` on the MMIO bus. The local APIC page
is not among them: every vCPU sees its own APIC at the same address, so the CPU's memory path must route
0xFEE00000-0xFEE00FFF to `lapic_for(cpu_index)`, which is also that CPU's `InterruptSource`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from popek.boot import mptable
from popek.bus import Device
from popek.devices.clock import NS_PER_SECOND, VirtualClock
from popek.devices.ioapic import IOAPIC_BASE, IOAPIC_SIZE, IoApic
from popek.devices.irq import IrqLine
from popek.devices.lapic import LAPIC_BASE, ApicSystem, LocalApic
from popek.devices.legacy.pic import CASCADE_IRQ, Pic
from popek.devices.legacy.pit import Pit, SystemControlPort
from popek.snapshot import SnapshotError

PIC_MASTER_PORT = 0x20
PIC_SLAVE_PORT = 0xA0
ELCR_PORT = 0x4D0
PIT_PORT = 0x40
SYSTEM_CONTROL_PORT = 0x61
ISA_IRQS = 16
ISA_IRQ_TO_PIN = {irq: irq for irq in range(ISA_IRQS)}  # the MP table's I/O interrupt entries

assert IOAPIC_BASE == mptable.IOAPIC_ADDR and LAPIC_BASE == mptable.LAPIC_ADDR

PortRange = tuple[int, int, Device, str]


class SoftPlatform:
    def __init__(
        self,
        cpus: int,
        clock: VirtualClock | None = None,
        *,
        tsc_hz: int = NS_PER_SECOND,
        apic_timer_hz: int = NS_PER_SECOND,
    ) -> None:
        if cpus < 1:
            raise ValueError("a platform needs at least one CPU")
        self.clock = clock if clock is not None else VirtualClock()
        self.pic = Pic()
        self.lapics = [
            LocalApic(i, self.clock, bsp=i == 0, timer_hz=apic_timer_hz, tsc_hz=tsc_hz, extint=self.pic)
            for i in range(cpus)
        ]
        self.apics = ApicSystem(self.lapics)
        self.ioapic = IoApic(self.apics, apic_id=mptable.ioapic_id(cpus))
        self.apics.on_eoi = self.ioapic.eoi
        self.pic.on_intr_change = lambda level: self.apics.set_lint(0, level)
        self.pit = Pit(self.clock, on_out0=lambda level: self.set_irq(0, level))
        self.port61 = SystemControlPort(self.pit)

    # --- callbacks the backend sets (forwarded to the APIC system) ---

    @property
    def on_init(self) -> Callable[[int], None] | None:
        return self.apics.on_init

    @on_init.setter
    def on_init(self, callback: Callable[[int], None] | None) -> None:
        self.apics.on_init = callback

    @property
    def on_sipi(self) -> Callable[[int, int], None] | None:
        return self.apics.on_sipi

    @on_sipi.setter
    def on_sipi(self, callback: Callable[[int, int], None] | None) -> None:
        self.apics.on_sipi = callback

    @property
    def on_nmi(self) -> Callable[[int], None] | None:
        return self.apics.on_nmi

    @on_nmi.setter
    def on_nmi(self, callback: Callable[[int], None] | None) -> None:
        self.apics.on_nmi = callback

    # --- interrupt lines ---

    def set_irq(self, irq: int, level: bool) -> None:
        """An interrupt line: ISA IRQs 0-15 reach the PIC and the I/O APIC, GSIs 16-23 the I/O APIC only."""
        if irq < ISA_IRQS:
            if irq != CASCADE_IRQ:
                self.pic.set_irq(irq, level)
            self.ioapic.set_irq(ISA_IRQ_TO_PIN[irq], level)
        else:
            self.ioapic.set_irq(irq, level)

    def irq_line(self, number: int) -> IrqLine:
        if not 0 <= number < self.ioapic.pins:
            raise ValueError(f"no interrupt line {number}")
        return IrqLine(number, self.set_irq)

    # --- what the builder places ---

    def port_devices(self) -> list[PortRange]:
        return [
            (PIC_MASTER_PORT, 2, self.pic.master_port, "pic master"),
            (PIT_PORT, 4, self.pit, "pit"),
            (SYSTEM_CONTROL_PORT, 1, self.port61, "system control port b"),
            (PIC_SLAVE_PORT, 2, self.pic.slave_port, "pic slave"),
            (ELCR_PORT, 2, self.pic.elcr_port, "pic elcr"),
        ]

    def mmio_devices(self) -> list[PortRange]:
        return [(IOAPIC_BASE, IOAPIC_SIZE, self.ioapic, "ioapic")]

    def lapic_for(self, cpu_index: int) -> LocalApic:
        return self.lapics[cpu_index]

    # --- snapshots ---

    def state(self) -> dict[str, Any]:
        """The clock, then every device on it; `restore` takes them in this order (the clock first, so that the
        PIT and the local APICs arm their timers on the restored time)."""
        return {
            "clock": self.clock.state(),
            "pic": self.pic.state(),
            "pit": self.pit.state(),
            "port61": self.port61.state(),
            "ioapic": self.ioapic.state(),
            "lapics": [lapic.state() for lapic in self.lapics],
        }

    def restore(self, state: dict[str, Any]) -> None:
        keys = {"clock", "pic", "pit", "port61", "ioapic", "lapics"}
        if not isinstance(state, dict) or set(state) != keys:
            raise SnapshotError(f"platform: the state has {', '.join(sorted(keys))}, nothing else")
        lapics = state["lapics"]
        if not isinstance(lapics, list) or len(lapics) != len(self.lapics):
            raise SnapshotError(f"platform: {len(self.lapics)} local APICs here, the snapshot has another number")
        self.clock.restore(state["clock"])
        self.pic.restore(state["pic"])
        self.pit.restore(state["pit"])
        self.port61.restore(state["port61"])
        self.ioapic.restore(state["ioapic"])
        for lapic, saved in zip(self.lapics, lapics, strict=True):
            lapic.restore(saved)
