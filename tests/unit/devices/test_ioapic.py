from __future__ import annotations

import struct

from popek.boot import mptable
from popek.devices.apic_bus import ApicMessage, DeliveryMode
from popek.devices.ioapic import IOREGSEL, IOWIN, IoApic
from popek.devices.platform import ISA_IRQ_TO_PIN, SoftPlatform


class Recorder:
    def __init__(self) -> None:
        self.messages: list[ApicMessage] = []

    def deliver(self, msg: ApicMessage) -> bool:
        self.messages.append(msg)
        return True


def reg_write(io: IoApic, reg: int, value: int) -> None:
    io.write(IOREGSEL, struct.pack("<I", reg))
    io.write(IOWIN, struct.pack("<I", value))


def reg_read(io: IoApic, reg: int) -> int:
    io.write(IOREGSEL, struct.pack("<I", reg))
    return int(struct.unpack("<I", io.read(IOWIN, 4))[0])


def route(io: IoApic, pin: int, low: int, dest: int = 0) -> None:
    reg_write(io, 0x11 + 2 * pin, dest << 24)
    reg_write(io, 0x10 + 2 * pin, low)


def make() -> tuple[IoApic, Recorder]:
    bus = Recorder()
    return IoApic(bus, apic_id=2), bus


def test_identification_registers() -> None:
    io, _ = make()
    assert reg_read(io, 0x00) == 2 << 24
    assert reg_read(io, 0x01) == 0x00170011  # 24 entries, version 0x11
    assert reg_read(io, 0x02) == 2 << 24
    reg_write(io, 0x00, 0x0F000000)
    assert reg_read(io, 0x00) == 0x0F000000
    assert io.read(IOREGSEL, 4) == b"\x00\x00\x00\x00"


def test_entries_reset_masked_and_read_only_bits_stay() -> None:
    io, bus = make()
    assert reg_read(io, 0x10) == 0x10000
    io.set_irq(4, True)
    assert bus.messages == []
    route(io, 4, 0x0000_5031, dest=3)  # writes delivery status and remote IRR (read-only) too
    assert reg_read(io, 0x10 + 8) == 0x0000_0031
    assert reg_read(io, 0x11 + 8) == 3 << 24


def test_edge_delivers_on_rising_edges_only_and_is_lost_while_masked() -> None:
    io, bus = make()
    route(io, 1, 0x31, dest=1)
    io.set_irq(1, True)
    io.set_irq(1, True)
    io.set_irq(1, False)
    assert bus.messages == [ApicMessage(0x31, DeliveryMode.FIXED, 1)]
    route(io, 1, 0x10031, dest=1)
    io.set_irq(1, True)
    io.set_irq(1, False)
    route(io, 1, 0x31, dest=1)
    assert len(bus.messages) == 1


def test_level_sets_remote_irr_until_eoi() -> None:
    io, bus = make()
    route(io, 9, 0x8000 | 0x0800 | 0x100 | 0x41, dest=0x0F)  # level, logical, lowest priority
    io.set_irq(9, True)
    assert bus.messages == [ApicMessage(0x41, DeliveryMode.LOWEST, 0x0F, logical=True, level_triggered=True)]
    assert reg_read(io, 0x10 + 18) & 0x4000
    io.set_irq(9, False)
    io.set_irq(9, True)
    assert len(bus.messages) == 1  # Remote IRR holds further deliveries
    io.eoi(0x42)
    assert len(bus.messages) == 1  # another vector's EOI
    io.eoi(0x41)
    assert len(bus.messages) == 2  # still asserted: delivered again
    io.set_irq(9, False)
    io.eoi(0x41)
    assert len(bus.messages) == 2
    assert not reg_read(io, 0x10 + 18) & 0x4000


def test_unmasking_an_asserted_level_input_delivers() -> None:
    io, bus = make()
    io.set_irq(20, True)
    route(io, 20, 0x18051)
    assert bus.messages == []
    route(io, 20, 0x08051)
    assert [m.vector for m in bus.messages] == [0x51]


def test_active_low_polarity_and_eoi_register() -> None:
    io, bus = make()
    io.set_irq(16, True)  # idle high for an active-low PCI-style line
    route(io, 16, 0xA061)  # level, active low
    assert bus.messages == []
    io.set_irq(16, False)
    assert len(bus.messages) == 1
    io.write(0x40, b"\x61\x00\x00\x00")
    assert len(bus.messages) == 2


def test_delivery_modes_pass_through() -> None:
    io, bus = make()
    for pin, mode in ((0, DeliveryMode.NMI), (1, DeliveryMode.INIT), (2, DeliveryMode.EXTINT)):
        route(io, pin, int(mode) << 8)
        io.set_irq(pin, True)
    assert [m.delivery_mode for m in bus.messages] == [DeliveryMode.NMI, DeliveryMode.INIT, DeliveryMode.EXTINT]


def test_platform_routing_agrees_with_the_mp_table() -> None:
    blob = mptable.build(2)
    table = blob[16:]
    count = struct.unpack_from("<H", table, 34)[0]
    off = 44
    routes = {}
    ioapic_id = None
    for _ in range(count):
        kind = table[off]
        if kind == mptable.MP_PROCESSOR:
            off += 20
            continue
        if kind == mptable.MP_IOAPIC:
            ioapic_id = table[off + 1]
        if kind == mptable.MP_INTSRC:
            routes[table[off + 5]] = table[off + 7]
        off += 8
    assert routes == ISA_IRQ_TO_PIN
    platform = SoftPlatform(2)
    assert platform.ioapic.id == ioapic_id


def test_level_interrupt_end_to_end_through_lapic_eoi() -> None:
    platform = SoftPlatform(2)
    lapic = platform.lapic_for(1)
    lapic.write_register(0xF0, 0x1FF)
    io = platform.ioapic
    route(io, 11, 0x8000 | 0x59, dest=1)  # level, fixed, physical APIC 1
    line = platform.irq_line(11)
    line.set_level(True)
    assert lapic.interrupt_pending()
    assert not platform.lapic_for(0).irr
    assert lapic.acknowledge() == 0x59
    assert lapic.tmr >> 0x59 & 1
    lapic.write(0xB0, b"\0\0\0\0")  # EOI: broadcast to the I/O APIC, which delivers again
    assert lapic.interrupt_pending()
    assert lapic.acknowledge() == 0x59
    line.set_level(False)
    lapic.write(0xB0, b"\0\0\0\0")
    assert not lapic.interrupt_pending()
    assert not reg_read(io, 0x10 + 22) & 0x4000
