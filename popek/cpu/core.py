"""One software logical processor: its state, the guest memory it reaches through its MMU, and what lies outside
it (ports, MMIO, its interrupt controller).

The parts live in their own modules and meet here:
- `popek.cpu.state`: registers, `CpuException`, `TripleFault`;
- `popek.cpu.mmu`: paging (walker, TLB) and linear-address memory access;
- `popek.cpu.segments`: segmentation (limits, descriptor loads, far transfers, IRET, SYSCALL/SYSENTER);
- `popek.cpu.exceptions`: delivery of exceptions and interrupts through the IDT;
- `popek.cpu.interp`: fetch, decode (iced-x86) and execute.
The backend (`popek.accel.soft`) owns the loop around them and the platform devices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from popek.cpu.state import CpuState

if TYPE_CHECKING:
    from popek.cpu.mmu import Mmu
    from popek.memory import GuestMemory


class SystemBus(Protocol):
    """Everything outside the processor that an instruction can reach besides RAM."""

    def pio_read(self, port: int, size: int) -> int: ...

    def pio_write(self, port: int, size: int, value: int) -> None: ...

    def mmio_read(self, addr: int, size: int) -> int: ...

    def mmio_write(self, addr: int, size: int, value: int) -> None: ...


class InterruptSource(Protocol):
    """The processor's view of its interrupt controller (the LAPIC, or the PIC's INTR line without one)."""

    def interrupt_pending(self) -> bool:
        """A maskable interrupt is waiting (the processor takes it only if RFLAGS.IF and no interrupt shadow)."""
        ...

    def acknowledge(self) -> int:
        """The interrupt acknowledge cycle: the vector of the highest-priority pending interrupt."""
        ...


class Cpu:
    """A processor: `state` plus the machinery that the interpreter, MMU and exception delivery share."""

    def __init__(self, index: int, mem: GuestMemory, bus: SystemBus, irq: InterruptSource | None = None) -> None:
        from popek.cpu.mmu import Mmu

        self.index = index
        self.state = CpuState()
        self.mem = mem
        self.bus = bus
        self.irq = irq
        self.mmu: Mmu = Mmu(self)
        self.instructions = 0  # retired instructions: drives the virtual clock, reported by --stats
        self.nmi_pending = False
