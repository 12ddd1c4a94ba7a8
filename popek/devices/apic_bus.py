"""The interrupt messages that travel between I/O APIC and local APICs (Intel SDM vol. 3A §11.6 "Issuing
Interprocessor Interrupts" and §11.12 for x2APIC destinations; 82093AA I/O APIC datasheet §3.2.4 for the
redirection entry fields they come from).

On real hardware these are APIC-bus or system-bus messages; here one call delivers them synchronously, so an
IPI or an I/O APIC interrupt is in the target's IRR before the sending instruction retires, and delivery status
is never seen busy. The I/O APIC depends only on `ApicBus`, not on the local APIC implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol


class DeliveryMode(IntEnum):
    FIXED = 0
    LOWEST = 1
    SMI = 2
    NMI = 4
    INIT = 5
    STARTUP = 6
    EXTINT = 7


class Shorthand(IntEnum):
    NONE = 0
    SELF = 1
    ALL = 2
    ALL_BUT_SELF = 3


BROADCAST = 0xFF  # physical destination 0xFF: every local APIC (xAPIC)
X2APIC_BROADCAST = 0xFFFFFFFF


@dataclass(frozen=True)
class ApicMessage:
    """One interrupt message. `dest` is interpreted by `logical` (the destination mode) unless `shorthand`
    names the targets relative to `source`, the index of the sending local APIC (None for the I/O APIC)."""

    vector: int
    delivery_mode: DeliveryMode
    dest: int
    logical: bool = False
    level_triggered: bool = False
    asserted: bool = True  # the ICR's level bit: False only for an INIT level de-assert
    shorthand: Shorthand = Shorthand.NONE
    source: int | None = None


class ExtIntSource(Protocol):
    """The 8259A as an APIC sees it in ExtINT mode: its INTR line, and its INTA cycle supplying the vector (the
    same shape as the processor's `InterruptSource`, declared here so devices need not import the CPU)."""

    def interrupt_pending(self) -> bool: ...

    def acknowledge(self) -> int: ...


class ApicBus(Protocol):
    def deliver(self, msg: ApicMessage) -> bool:
        """Deliver `msg` to every local APIC it addresses (one of them for lowest priority); True if any
        accepted it."""
        ...
