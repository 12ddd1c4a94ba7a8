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


class ApicPort(Protocol):
    """The processor's private path to its own local APIC (SDM vol. 3A §11.4.4, §11.8.6.1, §11.12): the MSRs
    the APIC owns (IA32_APIC_BASE, the x2APIC registers, IA32_TSC_DEADLINE), which RDMSR/WRMSR hand over before
    the CPU's own, and CR8, the task-priority class. `msr_read`/`msr_write` raise `CpuException` (#GP) for
    what the APIC refuses."""

    def handles_msr(self, index: int) -> bool: ...

    def msr_read(self, index: int) -> int: ...

    def msr_write(self, index: int, value: int) -> None: ...

    def read_cr8(self) -> int | None:
        """TPR[7:4], or None while the APIC is globally disabled (CR8 is then the processor's own register)."""
        ...

    def write_cr8(self, value: int) -> None:
        """MOV to CR8 (value already checked to be 0-15): TPR = value << 4 while the APIC is enabled."""
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
        self.apic: ApicPort | None = None  # the backend's local APIC, if it models one
        self.mmu: Mmu = Mmu(self)
        self.instructions = 0  # retired instructions: drives the virtual clock, reported by --stats
        self.nmi_pending = False
        # debug events of the instruction in progress (DR6 B0-B3 of data breakpoints hit, and the interpreter's
        # markers for ICEBP and MOV SS blocking): turned into a #DB trap when the instruction completes
        self.db_pending = 0
