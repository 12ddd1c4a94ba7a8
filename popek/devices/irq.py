"""Interrupt lines as devices see them: a level they raise and lower, or an edge they send. Backends supply the
wiring."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Pulse(Protocol):
    """An edge-triggered interrupt source: each `pulse()` is one rising edge (an `IrqLine`, or a KVM irqfd)."""

    def pulse(self) -> None: ...


class IrqLine:
    """A level-sensitive line; only changes of level reach the interrupt controller."""

    def __init__(self, number: int, deliver: Callable[[int, bool], None]) -> None:
        self.number = number
        self._deliver = deliver
        self.level = False
        self.raised = 0

    def set_level(self, level: bool) -> None:
        if level != self.level:
            self.level = level
            if level:
                self.raised += 1
            self._deliver(self.number, level)

    def restore_level(self, level: bool) -> None:
        """Take the level a snapshot recorded without delivering it: the interrupt controller's state, restored
        beside the device, already holds it, and a delivery would count a second edge."""
        self.level = level

    def pulse(self) -> None:
        """One edge: raise the line and lower it again (an edge-triggered input latches the rising edge)."""
        self.set_level(True)
        self.set_level(False)

    def drive(self, level: bool) -> None:
        """Deliver `level` even if unchanged, as a device does whose every write reaches the interrupt controller
        (pc-testdev's IRQ ports, like QEMU's `qemu_set_irq`): a level-triggered I/O APIC input whose Remote IRR is
        clear delivers again when it is driven high again."""
        if level and not self.level:
            self.raised += 1
        self.level = level
        self._deliver(self.number, level)


def null_line(number: int = 0) -> IrqLine:
    """A line connected to nothing (tests, or a device whose interrupts the guest never enables)."""
    return IrqLine(number, lambda _n, _level: None)
