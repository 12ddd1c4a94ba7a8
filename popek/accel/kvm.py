"""The hardware-assisted backend: guest code runs under /dev/kvm, one thread per vCPU in `run_vcpu`.

The VM is set up as Firecracker does on x86: TSS and identity-map pages at the top of the 32-bit space, the
in-kernel irqchip (PIC pair, IOAPIC, per-vCPU LAPIC with LINT0 = ExtINT and LINT1 = NMI as firmware leaves them)
and PIT, one memory slot per RAM region, CPUID from a template. `run_vcpu` is the only exit-handling loop of this
backend; port and MMIO exits go to `popek.accel.exits.handle_exit`, emulation failures to `kvm_assist` (and
through it to the software CPU, `kvm_softcpu`).

Some hosts never complete a hypercall: KVM_RUN retries it in the host forever, the guest still taking its
interrupts in between. Where the probe found that (family "hypercall"), `watch` kicks each vCPU out
periodically, and a vCPU found on the same hypercall instruction at two kicks in a row gets it completed as a
host without that hypercall would: RAX = -KVM_ENOSYS, RIP past the instruction.

A guest that halts with interrupts disabled never leaves KVM_RUN (the in-kernel irqchip keeps HLT in the kernel).
`watch` kicks each vCPU that made no exit to popek during a period; on the EINTR the vCPU reads its MP state,
RFLAGS.IF and pending events (KVM_GET_MP_STATE, KVM_GET_VCPU_EVENTS: `VcpuFd.idle_state`), and when every vCPU
has been found HALT_PROBES times in a row halted with nothing to deliver, or waiting for a SIPI, the VM stops
with StopReason.HALTED, as the software backend does. A vCPU that exits to popek by itself is never kicked for it.

Devices reach the guest without a vCPU exit where the host allows it (KVM_CAP_IOEVENTFD, KVM_CAP_IRQFD): a virtio
QueueNotify register is an ioeventfd (`attach_notify`), a device interrupt an irqfd (`device_interrupt`), both
served by one device event loop thread (`popek.devices.event_loop`) started with the vCPUs. Without those
capabilities, or with `eventfds=False`, notifications exit to `run_vcpu` like any MMIO write and interrupts go
through KVM_IRQ_LINE.

Some hosts leave a SYSCALL from guest ring 3 at CPL 3 (family "syscall"): each vCPU then watches its guest's
#GP and #PF handlers with hardware breakpoints and completes such SYSCALLs (`popek.accel.kvm_syscall`). It
looks for the handlers before every entry until the guest has them, then at the periodic kicks, which follow a
guest that moves its IDT or rewrites a gate.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from popek.accel import kvm_assist
from popek.accel.exits import MmioRead, MmioWrite, PioIn, PioOut, Stop, StopReason, handle_exit
from popek.accel.kvm_probe import VMCALL, VMMCALL, observed_cpuid, unavailable_families
from popek.accel.kvm_snapshot import VmSnapshotter
from popek.accel.kvm_softcpu import SoftStep
from popek.accel.kvm_state import apply_entry, register_dump
from popek.accel.kvm_syscall import UserSyscallAssist
from popek.boot.entry import EntryState
from popek.bus import BoundedCounter, Bus
from popek.cpu import xsave
from popek.cpu.interp import KVM_ENOSYS
from popek.cpuid import apply_template, for_vcpu
from popek.devices import state as st
from popek.devices.event_loop import EventLoop, FdWatch, drain_eventfd
from popek.devices.irq import IrqLine, Pulse
from popek.devices.platform import PortRange
from popek.errors import ConfigError, GuestMemoryError
from popek.features import Features, cpuid_function
from popek.kvm import (
    Cap,
    ExitReason,
    IdleState,
    InternalError,
    Kvm,
    KvmError,
    MemFlag,
    MpState,
    SystemEvent,
    VcpuFd,
)
from popek.kvm.consts import KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
from popek.memory import PAGE_SIZE, GuestMemory

TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4 << 8
APIC_MODE_EXTINT = 0x7 << 8
KICK_SIGNAL = signal.SIGUSR1


WATCHDOG_PERIOD = 0.25
HALT_PROBES = 2  # consecutive watchdog periods every vCPU must be found unable to wake before the VM stops


def can_never_wake(state: IdleState) -> bool:
    """A vCPU halted with interrupts disabled and no event pending, or one still waiting for INIT/SIPI: only
    another vCPU could wake it (the devices popek offers raise maskable interrupts only)."""
    if state.mp_state in (MpState.UNINITIALIZED, MpState.INIT_RECEIVED):
        return True
    return state.mp_state == MpState.HALTED and not state.interrupts_enabled and not state.event_pending


def _ignore_signal(_signum: int, _frame: object) -> None:
    """The kick only has to interrupt KVM_RUN; there is nothing to do in Python."""


def install_kick_handler() -> None:
    """KVM_RUN returns EINTR when its thread gets a signal; a no-op handler makes SIGUSR1 harmless."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(KICK_SIGNAL, _ignore_signal)


class IrqFd:
    """A device interrupt as a KVM irqfd: each write to the eventfd is one edge on the GSI (KVM_IRQFD)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pulses = 0

    def pulse(self) -> None:
        self.pulses += 1
        os.eventfd_write(self.fd, 1)


class KvmAccel:
    snapshots = True  # pause, snapshot_state and restore_state (popek.vm.Vm.snapshot)
    name = "kvm"

    def __init__(
        self,
        mem: GuestMemory,
        cpus: int,
        cpu_template: str = "portable",
        kvm_path: str = "/dev/kvm",
        eventfds: bool = True,
    ) -> None:
        self.mem = mem
        install_kick_handler()
        self.kvm = Kvm(kvm_path)
        max_vcpus = self.kvm.check_extension(Cap.MAX_VCPUS) or self.kvm.check_extension(Cap.NR_VCPUS) or 1
        if not 1 <= cpus <= max_vcpus:
            self.kvm.close()
            raise ConfigError(f"--cpus must be between 1 and {max_vcpus} on this host, not {cpus}")
        self.vm = self.kvm.create_vm()
        self.vm.set_tss_addr(TSS_ADDR)
        self.vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        self.vm.create_irqchip()
        self.vm.create_pit2()
        if self.vm.check_extension(Cap.EXIT_ON_EMULATION_FAILURE):
            self.vm.enable_cap(Cap.EXIT_ON_EMULATION_FAILURE, 1)
        for slot, region in enumerate(mem):
            self.vm.set_user_memory_region(slot, region.gpa, region.size, region.host_address)
        self.unavailable = unavailable_families(self.kvm)
        supported = self.kvm.supported_cpuid()
        self.cpuid = apply_template(supported, cpu_template, self.unavailable)
        # the XSAVE layout the guest sees is the host's, even where the template hides XSAVE from CPUID
        self.xsave_layout = xsave.layout_from_cpuid(
            {e.index: (e.eax, e.ebx, e.ecx, e.edx) for e in supported if e.function == 0xD}
        )
        # what the guest sees when it runs CPUID, which some hosts answer from their own processor for some leaves
        self.features = Features.from_cpuid(cpuid_function(observed_cpuid(self.kvm, for_vcpu(self.cpuid, 0, cpus))))
        if self.vm.check_extension(Cap.X86_MSR_FILTER):
            self.vm.deny_msrs(self.features.absent_msrs())  # what the guest's CPUID does not offer is #GP
        self.vcpus: list[VcpuFd] = []
        for i in range(cpus):
            vcpu = self.vm.create_vcpu(i)
            vcpu.set_cpuid2(for_vcpu(self.cpuid, i, cpus))
            self._set_lint(vcpu)
            self.vcpus.append(vcpu)
        # the software CPU that completes, one vCPU's instruction at a time, what neither KVM nor `kvm_assist` can
        self.soft_steps = [SoftStep(vcpu, mem, for_vcpu(self.cpuid, i, cpus)) for i, vcpu in enumerate(self.vcpus)]
        # hosts that leave SYSCALL half done, or answer INT n from ring 3 with #UD: watch the guest's handlers
        self.syscall_assists: list[UserSyscallAssist | None] = [
            UserSyscallAssist(
                vcpu,
                mem,
                syscall="syscall" in self.unavailable,
                user_int=functools.partial(self._complete_user_int, i) if "int" in self.unavailable else None,
            )
            if self.unavailable & {"syscall", "int"}
            else None
            for i, vcpu in enumerate(self.vcpus)
        ]
        self._buses: tuple[Bus, Bus] | None = None
        self.exit_counts: BoundedCounter[str] = BoundedCounter()
        self.assists: BoundedCounter[str] = BoundedCounter()
        self._threads: dict[int, int] = {}
        self._stats_lock = threading.Lock()
        self._stalled = [False] * cpus
        self._stuck_rip: list[int | None] = [None] * cpus
        # halt detection: exits to userspace per vCPU (kicks not counted), what the watchdog saw last, the
        # watchdog period whose probe each vCPU owes and has made, and how many probes in a row found it dead
        self._exits = [0] * cpus
        self._exits_seen = [0] * cpus
        self._probe_asked = [0] * cpus
        self._probe_done = [0] * cpus
        self._dead_probes = [0] * cpus
        self._halt_lock = threading.Lock()
        self._created_ns = time.monotonic_ns()
        self.ioeventfd = eventfds and bool(self.vm.check_extension(Cap.IOEVENTFD))
        self.irqfd = eventfds and bool(self.vm.check_extension(Cap.IRQFD))
        self.device_loop: EventLoop | None = None
        self._eventfds: list[int] = []
        self._dirty_logging = False

    @property
    def run_threads(self) -> int:
        """One host thread per vCPU: KVM_RUN blocks its caller."""
        return len(self.vcpus)

    @staticmethod
    def _set_lint(vcpu: VcpuFd) -> None:
        lapic = vcpu.get_lapic()
        regs = memoryview(lapic).cast("B")  # the whole 1 KiB register page, NULs included
        for offset, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
            value = struct.unpack_from("<I", regs, offset)[0]
            struct.pack_into("<I", regs, offset, (value & ~0x700) | mode)
        vcpu.set_lapic(lapic)

    def irq_line(self, number: int) -> IrqLine:
        return IrqLine(number, lambda n, level: self.vm.irq_line(n, int(level)))

    def set_boot_state(self, entry: EntryState) -> None:
        apply_entry(self.vcpus[0], entry)

    def time_ns(self) -> int:
        """The VM's time for devices that read a clock (the ACPI PM timer): host monotonic time since the VM was
        created."""
        return time.monotonic_ns() - self._created_ns

    # --- devices served beside the vCPUs ---

    def _eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._eventfds.append(fd)
        return fd

    def _loop(self) -> EventLoop:
        if self.device_loop is None:
            self.device_loop = EventLoop("kvm-devices")
        return self.device_loop

    def device_interrupt(self, irq: int) -> Pulse:
        """An edge-triggered interrupt for a device: an irqfd where KVM has them, else KVM_IRQ_LINE pulses."""
        if not self.irqfd:
            return self.irq_line(irq)
        fd = self._eventfd()
        self.vm.irqfd(fd, irq)
        return IrqFd(fd)

    def attach_notify(self, addr: int, value: int, callback: Callable[[], None]) -> bool:
        """Serve a 4-byte guest write of `value` to MMIO `addr` from the device loop, without a vCPU exit
        (an ioeventfd with datamatch); False where the host has no ioeventfds (the write then exits)."""
        if not self.ioeventfd:
            return False
        fd = self._eventfd()
        self.vm.ioeventfd(fd, addr, 4, pio=False, datamatch=value)

        def notified() -> None:
            if drain_eventfd(fd):
                callback()

        self._loop().watch(fd, notified)
        return True

    def watch_fd(self, fd: int, callback: Callable[[], None]) -> FdWatch:
        """Call `callback` from the device loop whenever host fd `fd` is readable."""
        return self._loop().watch(fd, callback)

    def start_devices(self, on_error: Callable[[str], None]) -> None:
        if self.device_loop is not None:
            self.device_loop.start(on_error)

    def device_stats(self) -> list[str]:
        events = self.device_loop.dispatched if self.device_loop is not None else 0
        fast = f"ioeventfd={'on' if self.ioeventfd else 'off'} irqfd={'on' if self.irqfd else 'off'}"
        return [f"device loop: {events} events ({fast})"]

    def kick(self, only: int | None = None) -> None:
        """Make vCPUs (all, or `only`) leave KVM_RUN soon: now if inside, at their next entry otherwise."""
        handler_installed = signal.getsignal(KICK_SIGNAL) is _ignore_signal
        for i, vcpu in enumerate(self.vcpus):
            if only not in (None, i) or vcpu.closed:
                continue
            vcpu.set_immediate_exit(True)
            ident = self._threads.get(i)
            if handler_installed and ident is not None:
                try:
                    signal.pthread_kill(ident, KICK_SIGNAL)
                except (ProcessLookupError, OSError):
                    pass

    def watch(self, stopping: threading.Event) -> None:
        """Every period, kick each vCPU that left KVM_RUN for nothing since the last one, so `run_vcpu` can tell
        whether it can never wake again (HALTED); a vCPU that exits to popek on its own is never kicked for that.
        On hosts whose hypercalls hang or whose SYSCALL needs completing, kick every vCPU each period so
        `run_vcpu` can look at where it is and at the guest's IDT."""
        assist = bool(self.unavailable & {"hypercall", "syscall", "int"})
        period = 0
        while not stopping.wait(WATCHDOG_PERIOD):
            period += 1
            for i in list(self._threads):
                exits = self._exits[i]
                quiet = exits == self._exits_seen[i]
                self._exits_seen[i] = exits
                if quiet:
                    self._probe_asked[i] = period
                else:
                    with self._halt_lock:
                        self._dead_probes[i] = 0
                if assist:
                    self._stalled[i] = True
                if quiet or assist:
                    self.kick(i)

    def _probe_halt(self, index: int, vcpu: VcpuFd) -> Stop | None:
        """The watchdog's probe of a quiet vCPU: a Stop when no vCPU can ever wake again."""
        self._probe_done[index] = self._probe_asked[index]
        dead = can_never_wake(vcpu.idle_state())
        with self._halt_lock:
            self._dead_probes[index] = self._dead_probes[index] + 1 if dead else 0
            if not all(n >= HALT_PROBES for n in self._dead_probes):
                return None
        return Stop(StopReason.HALTED, "the guest halted with interrupts disabled: nothing can wake it")

    def _check_stuck_hypercall(self, index: int, vcpu: VcpuFd) -> None:
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        linear = regs.rip if sregs.efer & (1 << 10) and sregs.cs.l else (sregs.cs.base + regs.rip) & 0xFFFFFFFF
        try:
            insn = kvm_assist.read_linear(vcpu, self.mem, linear, 3)
        except (kvm_assist.AssistError, GuestMemoryError, KvmError):
            insn = b""
        if insn not in (VMCALL, VMMCALL):
            self._stuck_rip[index] = None
            return
        if self._stuck_rip[index] != linear:
            self._stuck_rip[index] = linear  # give the host one more period to answer
            return
        regs.rax = (-KVM_ENOSYS) & 0xFFFFFFFFFFFFFFFF
        regs.rip += len(insn)
        vcpu.set_regs(regs)
        self._stuck_rip[index] = None
        with self._stats_lock:
            self.assists["vmmcall" if insn == VMMCALL else "vmcall"] += 1

    def _complete_user_int(self, index: int) -> bool:
        """An INT n from ring 3 the host answered with #UD, executed by the software CPU (`kvm_syscall`)."""
        if self._buses is None:
            return False
        return self.soft_steps[index].complete_user_int(*self._buses)

    def run_vcpu(self, index: int, pio: Bus, mmio: Bus, stopping: threading.Event) -> Stop | None:
        """Run vCPU `index` until the guest or the VMM ends the VM; returns why (None: stopped from outside)."""
        self._buses = (pio, mmio)
        vcpu = self.vcpus[index]
        run = vcpu.run_page
        counts: Counter[str] = Counter()
        syscall_assist = self.syscall_assists[index]
        self._threads[index] = threading.get_ident()
        try:
            while not stopping.is_set():
                if syscall_assist is not None and not syscall_assist.armed:
                    syscall_assist.arm()  # every entry until the guest has a #GP handler; then at the kicks
                reason = vcpu.run()
                counts[reason.name if isinstance(reason, ExitReason) else str(reason)] += 1
                if reason != ExitReason.INTR:
                    self._exits[index] += 1
                if reason == ExitReason.IO:
                    io = run.exit.io
                    size, count = io.size, io.count
                    buf = vcpu.io_data()
                    if io.direction:  # out
                        for i in range(count):
                            handle_exit(PioOut(io.port, bytes(buf[i * size : (i + 1) * size])), pio, mmio)
                    else:
                        for i in range(count):
                            data = handle_exit(PioIn(io.port, size), pio, mmio)
                            buf[i * size : (i + 1) * size] = data or b"\xff" * size
                elif reason == ExitReason.MMIO:
                    m = run.exit.mmio
                    if m.is_write:
                        handle_exit(MmioWrite(m.phys_addr, bytes(m.data)[: m.len]), pio, mmio)
                    else:
                        data = handle_exit(MmioRead(m.phys_addr, m.len), pio, mmio) or b""
                        ctypes.memmove(m.data, data, min(len(data), 8))
                elif reason == ExitReason.INTR:
                    vcpu.set_immediate_exit(False)
                    if self._probe_asked[index] != self._probe_done[index]:
                        stop = self._probe_halt(index, vcpu)
                        if stop is not None:
                            return stop
                    if self._stalled[index]:
                        self._stalled[index] = False
                        if "hypercall" in self.unavailable:
                            self._check_stuck_hypercall(index, vcpu)
                        if syscall_assist is not None:
                            syscall_assist.arm(force=True)
                elif reason == ExitReason.DEBUG and syscall_assist is not None:
                    debug = run.exit.debug
                    try:
                        completed = syscall_assist.on_debug_exit(debug.pc, debug.dr6)
                    except kvm_assist.AssistError as e:
                        return Stop(StopReason.INTERNAL_ERROR, f"{e}\n" + register_dump(vcpu))
                    if completed is not None:
                        with self._stats_lock:
                            self.assists[completed] += 1
                else:
                    stop = self._slow_exit(vcpu, reason, pio, mmio)
                    if stop is not None:
                        return stop
            return None
        except KvmError as e:
            return Stop(StopReason.ERROR, f"vCPU {index}: {e}")
        finally:
            self._threads.pop(index, None)
            with self._stats_lock:
                self.exit_counts.update(counts)

    def _slow_exit(self, vcpu: VcpuFd, reason: ExitReason | int, pio: Bus, mmio: Bus) -> Stop | None:
        run = vcpu.run_page
        if reason == ExitReason.SHUTDOWN:
            return Stop(
                StopReason.TRIPLE_FAULT, "triple fault (the guest's exception handling failed)\n" + register_dump(vcpu)
            )
        if reason == ExitReason.SYSTEM_EVENT:
            kind = run.exit.system_event.type
            if kind == SystemEvent.RESET:
                return Stop(StopReason.RESET, "the guest reset the machine")
            if kind == SystemEvent.SHUTDOWN:
                return Stop(StopReason.POWEROFF, "the guest powered off")
            return Stop(StopReason.INTERNAL_ERROR, f"system event {kind}\n" + register_dump(vcpu))
        if reason == ExitReason.INTERNAL_ERROR:
            return self._internal_error(vcpu, pio, mmio)
        if reason == ExitReason.FAIL_ENTRY:
            code = run.exit.fail_entry.hardware_entry_failure_reason
            return Stop(
                StopReason.FAIL_ENTRY,
                f"KVM could not enter the guest (hardware reason {code:#x})\n" + register_dump(vcpu),
            )
        if reason == ExitReason.HLT:
            return Stop(StopReason.POWEROFF, "the guest halted")
        if reason in (ExitReason.IRQ_WINDOW_OPEN, ExitReason.DEBUG):
            return None
        return Stop(StopReason.INTERNAL_ERROR, f"unexpected KVM exit {reason}\n" + register_dump(vcpu))

    def _internal_error(self, vcpu: VcpuFd, pio: Bus, mmio: Bus) -> Stop | None:
        run = vcpu.run_page
        sub = run.exit.internal.suberror
        if sub == InternalError.EMULATION:
            ef = run.exit.emulation_failure
            insn = None
            if ef.ndata >= 2 and ef.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
                insn = bytes(ef.insn_bytes)[: ef.insn_size]
            try:
                soft = self.soft_steps[vcpu.id]
                fallback = functools.partial(soft.execute, pio, mmio)
                memory = functools.partial(soft.linear_memory, pio, mmio)
                mnemonic = kvm_assist.complete(vcpu, self.mem, insn, self.xsave_layout, fallback, memory, self.features)
            except kvm_assist.AssistError as e:
                return Stop(StopReason.INTERNAL_ERROR, f"{e}\n" + register_dump(vcpu))
            with self._stats_lock:
                self.assists[mnemonic] += 1
            return None
        try:
            name = InternalError(sub).name
        except ValueError:
            name = str(sub)
        data = " ".join(f"{x:#x}" for x in list(run.exit.internal.data)[: min(run.exit.internal.ndata, 16)])
        return Stop(StopReason.INTERNAL_ERROR, f"KVM internal error {name} [{data}]\n" + register_dump(vcpu))

    # --- pause and snapshots (popek.vm.Vm.pause, Vm.snapshot) ---

    def settle_vcpu(self, index: int) -> None:
        """Complete what the last exit left pending, on the vCPU's own thread after `run_vcpu` returned: an IN or
        MMIO read is finished (its value in RAX, RIP past it) only by the next KVM_RUN, so one KVM_RUN with
        immediate_exit set completes it without running the guest (api.rst 5, kvm_run: "immediate_exit ... to
        complete pending operations"); a snapshot then sees the vCPU between two instructions."""
        vcpu = self.vcpus[index]
        vcpu.set_immediate_exit(True)
        try:
            vcpu.run()
        finally:
            vcpu.set_immediate_exit(False)

    def pause_devices(self) -> bool:
        """Park the device loop between events (the vCPUs are parked already); False if it did not stop."""
        return self.device_loop.pause() if self.device_loop is not None else True

    def resume_devices(self) -> None:
        if self.device_loop is not None:
            self.device_loop.resume()

    def snapshot_state(self) -> dict[str, Any]:
        """Everything KVM holds of the VM (popek.accel.kvm_snapshot) and the devices' time base, with every vCPU
        settled and parked."""
        return {"kvm": VmSnapshotter(self.vm).capture(self.vcpus), "time_ns": self.time_ns()}

    def restore_state(self, state: object) -> None:
        """The inverse of `snapshot_state`, into a VM that has not run: all checked before the first ioctl."""
        values = st.load(state, {"kvm": st.anything, "time_ns": st.uint(63)}, "KVM backend")
        VmSnapshotter(self.vm).restore(self.vcpus, values["kvm"])
        self._created_ns = time.monotonic_ns() - values["time_ns"]  # the ACPI PM timer goes on, not back

    def start_dirty_log(self) -> None:
        """Log the pages the guest writes from now on (KVM_MEM_LOG_DIRTY_PAGES, api.rst 4.35), for a diff
        snapshot; the first KVM_GET_DIRTY_LOG after this clears what came before."""
        if self._dirty_logging:
            return
        for slot, region in enumerate(self.mem):
            self.vm.set_user_memory_region(slot, region.gpa, region.size, region.host_address, MemFlag.LOG_DIRTY_PAGES)
        self._dirty_logging = True
        for slot, region in enumerate(self.mem):
            self.vm.dirty_log(slot, region.size // PAGE_SIZE)

    def collect_dirty(self) -> bool:
        """Merge the pages the guest wrote since the last call into guest memory's dirty map (where the VMM's
        own writes are); False if dirty logging was not started."""
        if not self._dirty_logging:
            return False
        for slot, region in enumerate(self.mem):
            self.mem.mark_dirty_bitmap(slot, self.vm.dirty_log(slot, region.size // PAGE_SIZE))
        return True

    def register_dumps(self) -> str:
        return "\n".join(register_dump(v) for v in self.vcpus if not v.closed)

    def platform_devices(self) -> tuple[list[PortRange], list[PortRange]]:
        """None: the PIC, PIT and I/O APIC are KVM's, in the kernel (`__init__`)."""
        return [], []

    def extra_stats(self) -> list[str]:
        return []

    def close(self) -> None:
        if self.device_loop is not None:
            self.device_loop.stop()  # before guest memory goes: its callbacks reach into it
            self.device_loop = None
        for vcpu in self.vcpus:
            vcpu.close()
        self.vm.close()
        self.kvm.close()
        for fd in self._eventfds:
            os.close(fd)
        self._eventfds = []
