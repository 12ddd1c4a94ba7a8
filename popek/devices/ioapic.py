"""The I/O APIC (Intel 82093AA I/O Advanced Programmable Interrupt Controller datasheet, order 290566), at
0xFEC00000 as popek's MP table says.

The guest reaches its registers indirectly: IOREGSEL (offset 0x00) selects, IOWIN (offset 0x10) reads or writes
the selected 32-bit register: ID (0x00), VER (0x01: version 0x11, 24 redirection entries), ARB (0x02) and the
redirection table (0x10 + 2n low, 0x11 + 2n high). The EOI register at 0x40 of later I/O APICs (version 0x20,
ICH datasheets) is also answered, harmlessly: a version-0x11 I/O APIC is never told about it by the guest.

Each input is sampled as an active-high level after the entry's polarity bit is applied. Edge-triggered inputs
deliver on their asserting edge, and are lost while masked (datasheet §3.2.4, "Interrupt Mask"). Level-triggered
inputs deliver while asserted, unmasked and with Remote IRR clear; delivery sets Remote IRR, and the local APIC's
EOI broadcast of the vector (`eoi`) clears it, delivering again if the line is still asserted. Messages go out
synchronously through an `ApicBus`, so Delivery Status always reads idle.
"""

from __future__ import annotations

from typing import Any

from popek.devices import state as st
from popek.devices.apic_bus import ApicBus, ApicMessage, DeliveryMode

IOAPIC_BASE = 0xFEC00000
IOAPIC_SIZE = 0x1000
PINS = 24
VERSION = 0x11

IOREGSEL = 0x00
IOWIN = 0x10
IOEOI = 0x40

REG_ID, REG_VER, REG_ARB, REG_REDTBL = 0x00, 0x01, 0x02, 0x10

RTE_VECTOR = 0xFF
RTE_DELIVERY_SHIFT = 8
RTE_DEST_LOGICAL = 1 << 11
RTE_DELIVERY_STATUS = 1 << 12
RTE_POLARITY_LOW = 1 << 13
RTE_REMOTE_IRR = 1 << 14
RTE_LEVEL = 1 << 15
RTE_MASKED = 1 << 16
RTE_READ_ONLY = RTE_DELIVERY_STATUS | RTE_REMOTE_IRR
RTE_WRITABLE_LOW = 0x0001FFFF & ~RTE_READ_ONLY
RTE_DEST_SHIFT = 56


class IoApic:
    def __init__(self, bus: ApicBus, apic_id: int = 0, pins: int = PINS) -> None:
        self.bus = bus
        self.id = apic_id & 0xF
        self.pins = pins
        self.select = 0
        self.redirection = [RTE_MASKED] * pins  # every input masked at reset
        self.levels = [False] * pins  # the electrical level of each input
        self.delivered = 0

    # --- the device side ---

    def _asserted(self, pin: int) -> bool:
        return self.levels[pin] != bool(self.redirection[pin] & RTE_POLARITY_LOW)

    def set_irq(self, pin: int, level: bool) -> None:
        if not 0 <= pin < self.pins:
            raise ValueError(f"the I/O APIC has pins 0-{self.pins - 1}, not {pin}")
        was = self._asserted(pin)
        self.levels[pin] = level
        now = self._asserted(pin)
        entry = self.redirection[pin]
        if entry & RTE_LEVEL:
            if now:
                self._service(pin)
        elif now and not was and not entry & RTE_MASKED:
            self._send(pin)

    def _service(self, pin: int) -> None:
        """A level input: deliver if it is asserted, unmasked and not already waiting for its EOI."""
        entry = self.redirection[pin]
        if entry & RTE_LEVEL and not entry & (RTE_MASKED | RTE_REMOTE_IRR) and self._asserted(pin):
            self.redirection[pin] |= RTE_REMOTE_IRR
            self._send(pin)

    def _send(self, pin: int) -> None:
        entry = self.redirection[pin]
        mode = (entry >> RTE_DELIVERY_SHIFT) & 7
        try:
            delivery = DeliveryMode(mode)
        except ValueError:
            return  # reserved delivery modes go nowhere
        self.delivered += 1
        self.bus.deliver(
            ApicMessage(
                vector=entry & RTE_VECTOR,
                delivery_mode=delivery,
                dest=entry >> RTE_DEST_SHIFT,
                logical=bool(entry & RTE_DEST_LOGICAL),
                level_triggered=bool(entry & RTE_LEVEL),
            )
        )

    def eoi(self, vector: int) -> None:
        """The local APICs' EOI broadcast for a level-triggered vector: clears Remote IRR of each entry with that
        vector, which delivers again if its input is still asserted."""
        for pin, entry in enumerate(self.redirection):
            if entry & RTE_REMOTE_IRR and entry & RTE_VECTOR == vector:
                self.redirection[pin] &= ~RTE_REMOTE_IRR
                self._service(pin)

    # --- the guest side ---

    def _read_register(self, reg: int) -> int:
        if reg == REG_ID:
            return self.id << 24
        if reg == REG_VER:
            return (self.pins - 1) << 16 | VERSION
        if reg == REG_ARB:
            return self.id << 24  # the arbitration ID is loaded from the ID
        if REG_REDTBL <= reg < REG_REDTBL + 2 * self.pins:
            entry = self.redirection[(reg - REG_REDTBL) // 2]
            return (entry >> 32 if reg & 1 else entry) & 0xFFFFFFFF
        return 0

    def _write_register(self, reg: int, value: int) -> None:
        if reg == REG_ID:
            self.id = (value >> 24) & 0xF
        elif REG_REDTBL <= reg < REG_REDTBL + 2 * self.pins:
            pin = (reg - REG_REDTBL) // 2
            entry = self.redirection[pin]
            if reg & 1:
                entry = (entry & 0xFFFFFFFF) | (value & 0xFF000000) << 32
            else:
                entry = (entry & ~RTE_WRITABLE_LOW) | (value & RTE_WRITABLE_LOW)
                if not entry & RTE_LEVEL:
                    entry &= ~RTE_REMOTE_IRR  # Remote IRR has no meaning for edge inputs
            self.redirection[pin] = entry
            self._service(pin)  # unmasking a still-asserted level input delivers it

    def read(self, offset: int, size: int) -> bytes:
        base = offset & ~3
        if base == IOREGSEL:
            value = self.select
        elif base == IOWIN:
            value = self._read_register(self.select)
        else:
            value = 0
        shift = (offset & 3) * 8
        return ((value >> shift) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        base = offset & ~3
        if not data or base not in (IOREGSEL, IOWIN, IOEOI):
            return
        value = int.from_bytes(data, "little")
        if base == IOREGSEL:
            self.select = value & 0xFF
        elif base == IOWIN:
            if len(data) < 4 or offset & 3:  # a narrow write merges into the register, as the bus would
                shift = (offset & 3) * 8
                mask = ((1 << (8 * len(data))) - 1) << shift
                value = (self._read_register(self.select) & ~mask) | (value << shift & mask)
            self._write_register(self.select, value & 0xFFFFFFFF)
        else:
            self.eoi(value & 0xFF)

    # --- snapshots ---

    def state(self) -> dict[str, Any]:
        """ID, IOREGSEL, the redirection table (Remote IRR included: a level interrupt waiting for its EOI) and
        the input levels, which are the IRR of an I/O APIC whose Delivery Status never reads pending."""
        return st.save(self, self._fields())

    def restore(self, state: dict[str, Any]) -> None:
        """Taken as saved, nothing delivered: an asserted level input with Remote IRR clear is delivered on its
        next change or EOI, as the guest left it."""
        st.apply(self, state, self._fields(), "ioapic")

    def _fields(self) -> dict[str, st.Check]:
        return {
            "id": st.uint(4),
            "select": st.uint(8),
            "redirection": st.list_of(st.masked(0xFF << RTE_DEST_SHIFT | 0x1FFFF), length=self.pins),
            "levels": st.list_of(st.boolean, length=self.pins),
        }
