"""The software backend: guest code runs on popek's x86-64 CPU in Python (`popek.cpu`), with the interrupt and
timer platform modelled in Python too (`popek.devices.platform`: PIC, PIT, I/O APIC, one local APIC per vCPU).

Determinism is the design rule: time is virtual, one nanosecond per retired instruction, and all vCPUs run in one
host thread, round-robin, each for a quantum of instructions that never crosses the next timer deadline. PAUSE,
which guests execute in every spin-wait and delay loop, ends the vCPU's quantum: the rest of the quantum counts as
spent spinning, so a guest waiting for time to pass (Linux's udelay, its timer checks) gets there in a few
iterations instead of millions, and the outcome still depends only on the instructions executed. A port access
takes PORT_IO_NS of virtual time, as an ISA bus cycle takes about a microsecond on a PC: loops that poll a port
while time passes (the PIT-based TSC calibration) need a thousand times fewer instructions. The same
guest with the same inputs therefore retires the same instructions and prints the same output on every run,
which is what makes the lockstep checker and instruction-count benchmarks meaningful. (Input typed on the
console is the one outside influence: it enters between quanta.)

Idle time follows wall time (QEMU's `-icount sleep=on`): when every vCPU is halted, the run loop sleeps until the
host time of the next timer deadline, waking early for a host fd, an interrupt raised from another thread or a
stop, and virtual time then advances by the wall time slept (to the deadline exactly when nothing woke it early,
so a guest without outside input keeps its determinism). An idle guest therefore costs no host CPU, and a guest's
sleep(1) takes a second. `virtual_time=True` (`--virtual-time`) keeps pure virtual time instead: a halted machine
skips to its next deadline at once, for replays and instruction-count benchmarks.

`run_vcpu` is this backend's only exit-handling loop. Port and MMIO accesses go to `popek.accel.exits.
handle_exit` exactly as the KVM backend's do, except the local APIC page, which each vCPU sees as its own.

Devices stay inside that determinism: a virtio notification is an MMIO write handled synchronously by the device
(no host thread touches guest memory), its interrupt is an edge on the Python platform, and the host fds devices
wait on (a console socket) are polled between quanta, the same place console input enters. What devices write to
guest RAM reaches the software CPU through a `GuestMemory` write observer, which drops decoded instructions of
rewritten pages, as the MMU does for the guest's own writes.
"""

from __future__ import annotations

import collections
import os
import select
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from popek.accel import soft_snapshot
from popek.accel.exits import MmioRead, MmioWrite, PioIn, PioOut, Stop, StopReason, handle_exit
from popek.boot.entry import EntryState, Mode, Segment
from popek.bus import BoundedCounter, Bus
from popek.cpu.core import Cpu
from popek.cpu.interp import Interpreter, default_cpuid
from popek.cpu.segments import UnsupportedTaskSwitch
from popek.cpu.state import (
    CS,
    GPR_NAMES,
    IF,
    SEGMENT_NAMES,
    CpuException,
    CpuState,
    TableRegister,
    TripleFault,
    Vector,
)
from popek.cpu.state import Segment as CpuSegment
from popek.cpuid import ECX_X2APIC, EDX_APIC, TEMPLATES
from popek.devices.event_loop import FdWatch, Watch
from popek.devices.irq import IrqLine, Pulse
from popek.devices.lapic import REG_TPR, ApicAccessError, LocalApic
from popek.devices.platform import PortRange, SoftPlatform
from popek.errors import ConfigError
from popek.memory import PAGE_SIZE, GuestMemory

NS_PER_INSTRUCTION = 1  # a 1 GHz virtual processor: TSC, APIC timer and PIT all count from this
QUANTUM = 20_000  # instructions a vCPU runs before the next one gets its turn (and before input is taken in)
PORT_IO_NS = 1_000  # virtual time an IN or OUT takes
IDLE_WAIT = 1.0  # seconds a halted machine with no timer sleeps at most before it looks again (a safety net:
# input, interrupts from other threads and stops all wake it at once)
MAX_SLEEP_NS = 60 * 10**9  # the longest one idle sleep lasts before the loop looks again
MAX_CPUS = 16


class _CpuBus:
    """What one vCPU reaches besides RAM: the machine's port and MMIO buses, and its own local APIC."""

    def __init__(self, accel: SoftAccel, index: int, lapic: LocalApic) -> None:
        self.accel = accel
        self.index = index
        self.lapic = lapic
        self.pio: Bus | None = None
        self.mmio: Bus | None = None

    def pio_read(self, port: int, size: int) -> int:
        assert self.pio is not None and self.mmio is not None
        self.accel.exit_counts["io"] += 1
        self.accel.stall(self.index, PORT_IO_NS)
        data = handle_exit(PioIn(port, size), self.pio, self.mmio) or b"\xff" * size
        return int.from_bytes(data[:size].ljust(size, b"\xff"), "little")

    def pio_write(self, port: int, size: int, value: int) -> None:
        assert self.pio is not None and self.mmio is not None
        self.accel.exit_counts["io"] += 1
        self.accel.stall(self.index, PORT_IO_NS)
        handle_exit(PioOut(port, value.to_bytes(size, "little")), self.pio, self.mmio)

    def _is_lapic(self, addr: int) -> bool:
        """The xAPIC page answers at IA32_APIC_BASE while the APIC is enabled in xAPIC mode; disabled or in x2APIC
        mode it is gone and the address reaches the buses like any other (SDM §11.4.4, §11.12)."""
        lapic = self.lapic
        return lapic.base <= addr < lapic.base + PAGE_SIZE and lapic.enabled and not lapic.x2apic

    def mmio_read(self, addr: int, size: int) -> int:
        if self._is_lapic(addr):
            return int.from_bytes(self.lapic.read(addr - self.lapic.base, size), "little")
        assert self.pio is not None and self.mmio is not None
        self.accel.exit_counts["mmio"] += 1
        data = handle_exit(MmioRead(addr, size), self.pio, self.mmio) or b""
        return int.from_bytes(data[:size].ljust(size, b"\xff"), "little")

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        if self._is_lapic(addr):
            self.lapic.write(addr - self.lapic.base, value.to_bytes(size, "little"))
            return
        assert self.pio is not None and self.mmio is not None
        self.accel.exit_counts["mmio"] += 1
        handle_exit(MmioWrite(addr, value.to_bytes(size, "little")), self.pio, self.mmio)


class _ApicPort:
    """A software vCPU's path to its local APIC (`popek.cpu.core.ApicPort`): the APIC's MSRs, with what it
    refuses as #GP(0), and CR8 as TPR[7:4] (SDM vol. 3A §11.8.6.1). The APIC reads the guest's TSC through the
    CPU's offset, so IA32_TSC_DEADLINE compares against what RDTSC returns."""

    def __init__(self, lapic: LocalApic, cpu: Cpu) -> None:
        self.lapic = lapic
        self.cpu = cpu

    def handles_msr(self, index: int) -> bool:
        return self.lapic.handles_msr(index)

    def msr_read(self, index: int) -> int:
        self.lapic.tsc_offset = self.cpu.state.tsc_offset
        try:
            return self.lapic.msr_read(index)
        except ApicAccessError as e:
            raise CpuException(Vector.GP, 0) from e

    def msr_write(self, index: int, value: int) -> None:
        self.lapic.tsc_offset = self.cpu.state.tsc_offset
        try:
            self.lapic.msr_write(index, value)
        except ApicAccessError as e:
            raise CpuException(Vector.GP, 0) from e

    def read_cr8(self) -> int | None:
        return self.lapic.tpr >> 4 if self.lapic.enabled else None

    def write_cr8(self, value: int) -> None:
        if self.lapic.enabled:
            self.lapic.write_register(REG_TPR, value << 4)


def _cpu_segment(seg: Segment) -> CpuSegment:
    return CpuSegment(
        selector=seg.selector, base=seg.base, limit=seg.limit, type=seg.type, s=seg.s, dpl=seg.dpl,
        present=seg.present, db=seg.db, l=seg.l, g=seg.g, avl=seg.avl,
    )  # fmt: skip


def apply_entry(state: CpuState, entry: EntryState) -> None:
    """The boot protocol's entry state on a software vCPU (what `kvm_state.apply_entry` does for KVM)."""
    state.seg[CS] = _cpu_segment(entry.cs)
    for i in range(6):
        if i != CS:
            state.seg[i] = _cpu_segment(entry.ds)
    if entry.tr is not None:
        state.tr = _cpu_segment(entry.tr)
    if entry.mode is not Mode.REAL:
        state.gdtr = TableRegister(*entry.gdt)
        state.idtr = TableRegister(*entry.idt)
        state.cr0, state.cr3, state.cr4, state.efer = entry.cr0, entry.cr3, entry.cr4, entry.efer
    for i, name in enumerate(GPR_NAMES):
        state.gpr[i] = entry.regs.get(name, 0)
    state.rip, state.rflags = entry.rip, entry.rflags
    state.halted = False


def format_state(index: int, s: CpuState) -> str:
    """The register dump of a software vCPU, laid out as the KVM backend's."""
    lines = [f"vCPU {index} (soft):"]
    order = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", *(f"r{i}" for i in range(8, 16)))
    for row in range(4):
        names = order[row * 4 : row * 4 + 4]
        lines.append("  " + " ".join(f"{n.upper():>3}={s.gpr[GPR_NAMES.index(n)]:016x}" for n in names))
    lines.append(f"  RIP={s.rip:016x} RFLAGS={s.rflags:08x}{' (halted)' if s.halted else ''}")
    named = [(n.upper(), s.seg[i]) for i, n in enumerate(SEGMENT_NAMES)] + [("TR", s.tr), ("LDT", s.ldtr)]
    for name, seg in named:
        lines.append(
            f"  {name:<3} sel={seg.selector:04x} base={seg.base:016x} limit={seg.limit:08x} type={seg.type:x} "
            f"s={seg.s} dpl={seg.dpl} p={seg.present} db={seg.db} l={seg.l} g={seg.g}"
        )
    lines.append(f"  GDT={s.gdtr.base:016x}/{s.gdtr.limit:04x} IDT={s.idtr.base:016x}/{s.idtr.limit:04x}")
    lines.append(f"  CR0={s.cr0:08x} CR2={s.cr2:016x} CR3={s.cr3:016x} CR4={s.cr4:08x} EFER={s.efer:x}")
    return "\n".join(lines)


class _PolledFd(Watch):
    """A host fd the run loop polls between quanta (the software backend's `FdWatch`)."""

    @property
    def events(self) -> int:
        """The poll(2) events this watch wants now (0: none)."""
        return (select.POLLIN if self.wants_read else 0) | (select.POLLOUT if self.wants_write else 0)


class SoftAccel:
    name = "soft"
    snapshots = True  # pause, snapshot_state and restore_state (popek.vm.Vm.snapshot)
    run_threads = 1  # every vCPU runs in `run_vcpu(0)`, round-robin, for determinism

    def __init__(
        self, mem: GuestMemory, cpus: int, cpu_template: str = "portable", *, virtual_time: bool = False
    ) -> None:
        if not 1 <= cpus <= MAX_CPUS:
            raise ConfigError(f"--cpus must be between 1 and {MAX_CPUS} with --accel soft, not {cpus}")
        if cpu_template not in TEMPLATES:
            raise ConfigError(f"unknown CPU template {cpu_template!r}: choose one of {', '.join(TEMPLATES)}")
        self.mem = mem
        self.platform = SoftPlatform(cpus)
        self.clock = self.platform.clock
        self.exit_counts: BoundedCounter[str] = BoundedCounter()
        self.assists: BoundedCounter[str] = BoundedCounter()  # nothing to complete: every instruction is popek's
        self.unavailable: frozenset[str] = frozenset()
        self.buses = [_CpuBus(self, i, self.platform.lapic_for(i)) for i in range(cpus)]
        self.cpus = [Cpu(i, mem, self.buses[i], irq=self.platform.lapic_for(i)) for i in range(cpus)]
        for i, cpu in enumerate(self.cpus):
            cpu.apic = _ApicPort(self.platform.lapic_for(i), cpu)
            self.platform.lapic_for(i).now = self.time_ns
        self.interps = [Interpreter(cpu) for cpu in self.cpus]
        for i, interp in enumerate(self.interps):
            interp.cpuid = self._cpuid_for(i, cpus, self.platform.lapic_for(i))
            interp.tsc = self._tsc_for(i)
            interp.on_pause = self._pause_for(i)
        # application processors wait for INIT-SIPI-SIPI, as on a PC
        self.waiting_for_sipi = [i != 0 for i in range(cpus)]
        for cpu, waiting in zip(self.cpus, self.waiting_for_sipi):
            cpu.state.halted = waiting
        self.platform.on_init = self._init
        self.platform.on_sipi = self._sipi
        self.platform.on_nmi = self._nmi
        self._run_thread: int | None = None
        self._running: int | None = None  # the vCPU whose quantum is in progress
        self._pending_irqs: collections.deque[tuple[int, bool]] = collections.deque()
        self.virtual_time = virtual_time
        # the run loop sleeps in poll(2) on this while the machine is idle; other threads write it to wake it
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._close_wake_fd = weakref.finalize(self, os.close, self._wake_fd)
        self.idle_sleeps = 0
        self.idle_wakeups = 0  # sleeps that ended before their deadline: input, an interrupt, a stop
        self.idle_ns = 0  # wall time slept
        # this round's accounting, per vCPU: where its instruction count started, and the extra virtual time
        # it spent (port accesses, PAUSE) beyond one nanosecond per instruction
        self._quantum_start = [0] * cpus
        self._stall_ns = [0] * cpus
        self._quantum_ns = QUANTUM * NS_PER_INSTRUCTION
        self._polled: list[_PolledFd] = []
        mem.add_write_observer(self._memory_written)

    # --- the CPU model ---

    @staticmethod
    def _cpuid_for(index: int, cpus: int, lapic: LocalApic) -> Callable[[int, int], tuple[int, int, int, int]]:
        """The software CPU's own CPUID (what it implements) with what the platform's local APIC adds: this vCPU's
        APIC ID and the vCPU count in leaf 1, the APIC flag tracking IA32_APIC_BASE.EN (SDM vol. 2A CPUID: "APIC
        On-Chip", which a globally disabled APIC clears), x2APIC (leaf 1 ECX bit 21), and the x2APIC topology
        leaf 0xB: one thread per core, `cpus` cores in one package."""

        def cpuid(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
            eax, ebx, ecx, edx = default_cpuid(leaf, subleaf)
            if leaf == 1:
                ebx = (ebx & 0x0000FFFF) | (min(cpus, 255) << 16) | (index << 24)
                edx |= (1 << 28) if cpus > 1 else 0  # HTT: the logical-processor count field is valid
                edx = edx | EDX_APIC if lapic.enabled else edx & ~EDX_APIC
                # TSC-deadline mode works (IA32_TSC_DEADLINE is the APIC's) but is not advertised, as on QEMU TCG:
                # the suite's vmexit_tscdeadline entries, which skip without it, otherwise spin 2^30 TSC cycles
                # of virtual time (some hours at the interpreter's speed)
                ecx |= ECX_X2APIC if lapic.x2apic_supported else 0
            elif leaf == 0xB:
                core_shift = max(cpus - 1, 0).bit_length()
                if subleaf == 0:  # SMT level: one thread
                    eax, ebx, ecx = 0, 1, 1 << 8
                elif subleaf == 1:  # core level: every vCPU, the shift to the package ID
                    eax, ebx, ecx = core_shift, cpus, 1 | 2 << 8
                else:
                    eax, ebx, ecx = 0, 0, subleaf & 0xFF
                edx = lapic.initial_apic_id
            return eax, ebx, ecx, edx

        return cpuid

    def _spent_ns(self, index: int) -> int:
        """Virtual time vCPU `index` has used in this round."""
        retired = self.cpus[index].instructions - self._quantum_start[index]
        return retired * NS_PER_INSTRUCTION + self._stall_ns[index]

    def _tsc_for(self, index: int) -> Callable[[], int]:
        def tsc() -> int:
            return self.clock.now_ns() + self._spent_ns(index)

        return tsc

    def time_ns(self) -> int:
        """The VM's time for devices that read a clock (the ACPI PM timer): the virtual clock plus the running
        vCPU's progress in its quantum, as its TSC sees it, so device reads stay deterministic."""
        running = self._running
        return self.clock.now_ns() + (self._spent_ns(running) if running is not None else 0)

    def stall(self, index: int, ns: int) -> None:
        """vCPU `index` spends `ns` of virtual time without retiring instructions; its turn ends with the round's
        time."""
        self._stall_ns[index] += ns
        if self._spent_ns(index) >= self._quantum_ns:
            self.interps[index].stop_requested = True

    def _pause_for(self, index: int) -> Callable[[], None]:
        def pause() -> None:
            self.stall(index, max(0, self._quantum_ns - self._spent_ns(index)))  # the rest of the round: spinning

        return pause

    def _init(self, index: int) -> None:
        """INIT: the vCPU resets and waits for a STARTUP IPI (the BSP ignores INIT, as popek's firmware-less
        machine has nothing to restart it into)."""
        if index == 0:
            return
        self.cpus[index].state = CpuState(halted=True)
        self.interps[index].s = self.cpus[index].state
        self.cpus[index].mmu.flush(global_too=True)
        self.waiting_for_sipi[index] = True

    def _sipi(self, index: int, vector: int) -> None:
        """STARTUP: a waiting vCPU starts in real mode at vector * 4 KiB."""
        if not self.waiting_for_sipi[index]:
            return
        s = self.cpus[index].state
        s.seg[CS] = CpuSegment(selector=vector << 8, base=vector << 12, type=0xB)
        s.rip = 0
        s.halted = False
        self.waiting_for_sipi[index] = False

    def _nmi(self, index: int) -> None:
        self.cpus[index].nmi_pending = True

    # --- what the VM builder asks of a backend ---

    def irq_line(self, number: int) -> IrqLine:
        return IrqLine(number, self._set_irq)

    def _set_irq(self, number: int, level: bool) -> None:
        """Interrupt lines may be driven from other threads (console input): those changes queue for the run
        loop, which owns the platform."""
        if threading.get_ident() == self._run_thread:
            self.platform.set_irq(number, level)
        else:
            self._pending_irqs.append((number, level))
            self.kick()

    def _memory_written(self, gpa: int, size: int) -> None:
        """The VMM wrote guest RAM (a device's DMA): decoded instructions on those pages are stale."""
        if size <= 0:
            return
        first, last = gpa >> 12, (gpa + size - 1) >> 12
        for cpu in self.cpus:
            pages = cpu.mmu.code_pages
            if not pages:
                continue
            if last - first < len(pages):
                stale = [page for page in range(first, last + 1) if page in pages]
            else:
                stale = [page for page in pages if first <= page <= last]
            for page in stale:
                pages.discard(page)
                cpu.mmu.on_code_write(page)

    # --- devices ---

    def device_interrupt(self, irq: int) -> Pulse:
        return self.irq_line(irq)

    def attach_notify(self, addr: int, value: int, callback: Callable[[], None]) -> bool:
        """No fast path: a notification is an MMIO write the device handles synchronously (deterministic)."""
        return False

    def watch_fd(self, fd: int, callback: Callable[[], None]) -> FdWatch:
        """Poll host fd `fd` between quanta and call `callback` (on the run thread) when it is readable."""
        watch = _PolledFd(fd, callback)
        self._polled.append(watch)
        return watch

    def start_devices(self, on_error: Callable[[str], None]) -> None:
        """Nothing to start: devices run in the run loop."""

    def device_stats(self) -> list[str]:
        return []

    def _poll_host_fds(self) -> None:
        """One non-blocking poll(2) of every watched fd (poll, not select: a VM with many vsock connections has fd
        numbers beyond select's FD_SETSIZE). A callback may add or close watches; a closed one is not called."""
        self._polled = [w for w in self._polled if not w.closed]
        watches = [w for w in self._polled if w.events]
        if not watches:
            return
        poller = select.poll()
        for watch in watches:
            poller.register(watch.fd, watch.events)
        ready = dict(poller.poll(0))
        always = select.POLLHUP | select.POLLERR | select.POLLNVAL  # reported whatever was asked
        for watch in watches:
            events = ready.get(watch.fd, 0)
            if events & (watch.events | always) and watch.events:
                watch.callback()

    def platform_devices(self) -> tuple[list[PortRange], list[PortRange]]:
        """(port ranges, MMIO ranges) of the Python interrupt and timer platform, for the builder to place."""
        return list(self.platform.port_devices()), list(self.platform.mmio_devices())

    def set_boot_state(self, entry: EntryState) -> None:
        apply_entry(self.cpus[0].state, entry)

    def kick(self, only: int | None = None) -> None:
        """End the running quantum, and wake the run loop if it sleeps (callable from any thread)."""
        for i, interp in enumerate(self.interps):
            if only in (None, i):
                interp.stop_requested = True
        if self._close_wake_fd.alive:
            os.eventfd_write(self._wake_fd, 1)

    def watch(self, stopping: threading.Event) -> None:
        """Nothing to watch: the run loop is never blocked inside a host call."""

    def extra_stats(self) -> list[str]:
        total = sum(cpu.instructions for cpu in self.cpus)
        mmus = [cpu.mmu for cpu in self.cpus]
        return [
            f"instructions: {total} retired, virtual time {self.clock.now_ns() / 1e9:.6f} s",
            f"tlb: hits={sum(m.tlb_hits for m in mmus)} misses={sum(m.tlb_misses for m in mmus)} "
            f"walks={sum(m.walks for m in mmus)} flushes={sum(m.flushes for m in mmus)}",
            "idle: pure virtual time (a halted machine skips to its next timer)" if self.virtual_time else
            f"idle: slept {self.idle_ns / 1e9:.3f} s of wall time in {self.idle_sleeps} sleeps "
            f"({self.idle_wakeups} woken early)",
        ]  # fmt: skip

    # --- running ---

    def run_vcpu(self, index: int, pio: Bus, mmio: Bus, stopping: threading.Event) -> Stop | None:
        """Run every vCPU until the guest or the VMM ends the VM; returns why (None: stopped from outside)."""
        self._run_thread = threading.get_ident()
        for bus in self.buses:
            bus.pio, bus.mmio = pio, mmio
        clock = self.clock
        while not stopping.is_set():
            while self._pending_irqs:
                self.platform.set_irq(*self._pending_irqs.popleft())
            if self._polled:
                self._poll_host_fds()
            deadline = clock.next_deadline()
            now = clock.now_ns()
            quantum = QUANTUM if deadline is None else max(1, min(QUANTUM, (deadline - now) // NS_PER_INSTRUCTION))
            self._quantum_ns = quantum * NS_PER_INSTRUCTION
            ran_any = False
            for i, (cpu, interp) in enumerate(zip(self.cpus, self.interps)):
                if stopping.is_set():
                    break
                self._quantum_start[i] = cpu.instructions
                self._stall_ns[i] = 0
                interp.stop_requested = False
                self._running = i
                try:
                    retired = interp.run(quantum)
                except TripleFault:
                    self.exit_counts["shutdown"] += 1
                    return Stop(
                        StopReason.TRIPLE_FAULT,
                        "triple fault (the guest's exception handling failed)\n" + format_state(i, cpu.state),
                    )
                except UnsupportedTaskSwitch as e:
                    return Stop(StopReason.INTERNAL_ERROR, f"{e}: not supported\n" + format_state(i, cpu.state))
                finally:
                    self._running = None
                ran_any = ran_any or retired > 0 or not cpu.state.halted
            if stopping.is_set():
                break
            if ran_any:
                # a port access at the end of a turn may overrun it by a little: time never runs backwards
                clock.advance_by(max(self._quantum_ns, *(self._spent_ns(i) for i in range(len(self.cpus)))))
                continue
            # every vCPU is halted: on to the next timer (at once, or when its time comes), or wait for input
            self.exit_counts["hlt"] += 1
            if deadline is not None:
                if self.virtual_time:
                    clock.advance_to(deadline)
                else:
                    self._sleep_until(deadline)
                continue
            wakeable = [not waiting and cpu.state.rflags & IF for cpu, waiting in zip(self.cpus, self.waiting_for_sipi)]
            if not any(wakeable) and not self._pending_irqs:
                # halted with interrupts disabled, or waiting for a SIPI no running vCPU is left to send
                return Stop(StopReason.HALTED, "the guest halted with interrupts disabled: nothing can wake it")
            if not stopping.is_set():
                self._wait_host(IDLE_WAIT)
        return None

    def _sleep_until(self, deadline: int) -> None:
        """The machine is idle until virtual time `deadline`: sleep that long in wall time, or less if the host
        wakes it; virtual time advances by what was slept, and to the deadline exactly when nothing woke it."""
        clock = self.clock
        start = clock.now_ns()
        began = time.monotonic_ns()
        wait = min(deadline - start, MAX_SLEEP_NS)  # a guest may set a timer centuries away
        self.idle_sleeps += 1  # counted as it begins: a watcher sees a sleep in progress
        woken = self._wait_host(wait / 1e9)
        slept = time.monotonic_ns() - began
        self.idle_ns += slept
        if woken and slept < wait:
            self.idle_wakeups += 1
        if woken or wait < deadline - start:
            clock.advance_to(min(deadline, start + slept))
        else:
            clock.advance_to(deadline)

    def _wait_host(self, seconds: float) -> bool:
        """Sleep up to `seconds` in poll(2) on the wake fd and the watched host fds; whether one of them woke it.
        The watched fds' callbacks run afterwards, in the loop's own poll (`_poll_host_fds`)."""
        self._polled = [w for w in self._polled if not w.closed]
        poller = select.poll()
        poller.register(self._wake_fd, select.POLLIN)
        for watch in self._polled:
            if watch.events:
                poller.register(watch.fd, watch.events)
        ready = poller.poll(max(0.0, seconds) * 1000)
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass
        return bool(ready)

    def register_dumps(self) -> str:
        return "\n".join(format_state(i, cpu.state) for i, cpu in enumerate(self.cpus))

    def close(self) -> None:
        """The wake fd is the one host resource (guest memory belongs to the VM)."""
        self._close_wake_fd()

    # --- pause and snapshots (popek.vm.Vm.pause, Vm.snapshot) ---

    def settle_vcpu(self, index: int) -> None:
        """Nothing is left pending: `run_vcpu` returns between instructions, port and MMIO accesses complete."""

    def pause_devices(self) -> bool:
        """The devices' host fds are polled by `run_vcpu` itself, which has returned: nothing else runs them."""
        return True

    def resume_devices(self) -> None:
        """See pause_devices."""

    def start_dirty_log(self) -> None:
        """The software CPU marks every page it writes in guest memory's dirty map (popek.cpu.mmu), as the VMM's
        own writes are: nothing to start."""

    def collect_dirty(self) -> bool:
        return True

    # --- snapshots ---

    def snapshot_state(self) -> dict[str, Any]:
        """Every vCPU's state and this backend's run state (`popek.accel.soft_snapshot`), taken while no quantum
        runs; the platform devices are saved by `popek.devices.machine_state`."""
        return soft_snapshot.capture(self)

    def restore_state(self, state: object) -> None:
        """Restore `snapshot_state`'s output (checked field by field: SnapshotError names a bad one)."""
        soft_snapshot.restore(self, state)
