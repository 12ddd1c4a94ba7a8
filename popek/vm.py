"""A virtual machine built from a `VmSpec`, run on one of the backends, stopped cleanly with a reason.

`Vm.__init__` is the builder, in Firecracker's order and read top to bottom: guest memory → accelerator →
buses, legacy devices and the firmware-visible ones (`_attach_*`: fw_cfg, the ACPI PM block, the reset
register, the Bochs shutdown port, pc-testdev if asked) → virtio devices (`_attach_virtio`, which also extends the
kernel command line) → kernel, initrd and command line → MP table and ACPI tables → boot vCPU state. Every device
goes on a bus under its own name, which `--stats` reports.
`Vm.run` starts one thread per vCPU and returns the `Stop` that ended the VM, whoever caused it: the guest
(reset, debug-exit port, triple fault), the VMM (an error), or the host (a signal, a timeout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from popek import snapshot as snapshot_files
from popek import vm_snapshot
from popek.accel import portable
from popek.accel.backend import Backend
from popek.accel.exits import Stop, StopReason
from popek.accel.kvm import KvmAccel
from popek.accel.lockstep import LockstepAccel
from popek.accel.soft import SoftAccel
from popek.boot import acpi, load_kernel, mptable
from popek.boot.bootsector import is_boot_sector
from popek.boot.loader import BootFiles, BootImage, encode_cmdline, read_file
from popek.bus import Bus, Window
from popek.devices import acpi_pm, machine_state, pc_testdev
from popek.devices.fw_cfg import PORT_COUNT as FW_CFG_PORTS
from popek.devices.fw_cfg import FwCfg
from popek.devices.legacy.bochs_shutdown import BochsShutdown
from popek.devices.legacy.cmos import Cmos
from popek.devices.legacy.i8042 import I8042
from popek.devices.legacy.misc import DEBUG_EXIT_SIZE, DebugExit, PostCode
from popek.devices.legacy.reset_control import RESET_VALUE, ResetControl
from popek.devices.legacy.serial import Serial
from popek.devices.virtio.blk import BlockDevice, DiskImage, DiskSpec
from popek.devices.virtio.console import ConsoleDevice, ConsoleHost
from popek.devices.virtio.device import VirtioDevice
from popek.devices.virtio.mmio import MMIO_WINDOW, QUEUE_NOTIFY, MmioTransport
from popek.devices.virtio.net import NetDevice, NetSpec, open_host
from popek.devices.virtio.rng import EntropyDevice
from popek.devices.virtio.vsock import VsockDevice, VsockSpec
from popek.errors import ConfigError, VmStateError
from popek.memory import PAGE_SIZE, GuestMemory

COM1_PORT, COM1_IRQ = 0x3F8, 4
I8042_PORT = 0x60
CMOS_PORT = 0x70
POST_PORT = 0x80
DEBUG_EXIT_PORT = 0xF4
FW_CFG_PORT = 0x510
ACPI_PM_BASE = 0x600  # PIIX4's PMBA under QEMU: PM1a_EVT 0x600, PM1a_CNT 0x604, PM_TMR 0x608
SCI_IRQ = 9
RESET_CONTROL_PORT = 0xCF9
BOCHS_SHUTDOWN_PORT = 0x8900
MMIO_STATS_GRANULE = PAGE_SIZE
SERIAL_TAIL = 1 << 20
# the bytes a VM's devices moved, by kind (VirtioDevice.counters): the daemon's /metrics per VM
IO_COUNTERS = ("disk_read_bytes", "disk_written_bytes", "net_tx_bytes", "net_rx_bytes",
               "vsock_to_guest_bytes", "vsock_to_host_bytes")  # fmt: skip
ACCELS = ("kvm", "soft", "lockstep")
# 64 TiB: the 46 physical address bits popek's CPU reports (CPUID 0x80000008) and KVM hosts commonly have, and
# well inside the 128 TiB of address space a Linux process has for the mapping; beyond it a size is a typo
MAX_MEM = 1 << 46
# virtio-mmio devices: 4 KiB windows from 3.25 GiB, in the 32-bit MMIO hole (RAM ends at 3 GiB, popek.memory) and
# far below the KVM TSS (0xFFFBD000), the I/O APIC (0xFEC00000), the local APIC (0xFEE00000) and pc-testdev's
# IORAM (0xFF000000); one edge-triggered ISA IRQ each, from those no popek device, legacy driver or ACPI uses
# (0 PIT, 1 keyboard, 2 cascade, 4 COM1, 8 RTC, 9 ACPI SCI, 12 mouse, 14/15 IDE). The MP table routes ISA IRQs only.
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_IRQS = (5, 6, 7, 10, 11, 3, 13)


@dataclass
class VmSpec:
    """Everything a VM is built from; the CLI and the Python API both fill one in."""

    kernel: str | Path  # as given on the command line: Multiboot passes it to the guest
    initrd: str | Path | None = None
    cmdline: str | bytes = ""
    mem: int = 512 << 20
    cpus: int = 1
    accel: str = "kvm"
    cpu_template: str = "portable"
    timeout: float | None = None
    debug_exit: bool = True
    kvm_device: str = "/dev/kvm"
    acpi: bool = True  # ACPI tables and the PM registers (--no-acpi: MP table only, as for a pre-ACPI PC)
    pc_testdev: bool = False  # QEMU's pc-testdev (--pc-testdev), for kvm-unit-tests
    disks: list[DiskSpec] = field(default_factory=list)
    rng: bool = False
    console2: Path | None = None  # a second console (virtio-console, /dev/hvc0 in the guest)
    vsock: VsockSpec | None = None  # virtio-vsock with Firecracker's Unix-socket convention (--vsock CID:SOCKET)
    kvm_eventfds: bool = True  # KVM: virtio notifications by ioeventfd, interrupts by irqfd, where the host can
    net: NetSpec | None = None  # a virtio-net device (eth0) on passt or a TAP device
    # --accel soft: a halted machine skips to its next timer at once instead of sleeping until then (replays,
    # instruction-count benchmarks). How this host paces the VM, not part of the machine: snapshots leave it out.
    virtual_time: bool = False

    @property
    def virtio_devices(self) -> int:
        return (len(self.disks) + int(self.rng) + int(self.console2 is not None) + int(self.vsock is not None)
                + int(self.net is not None))  # fmt: skip

    def validate(self) -> None:
        if self.mem > MAX_MEM:
            raise ConfigError(
                f"guest memory of {self.mem} bytes is more than popek can address ({MAX_MEM >> 40} TiB, "
                "the guest-physical address width of popek's CPU)"
            )
        if self.mem <= 0:
            raise ConfigError(f"guest memory must be more than 0 bytes (got {self.mem})")
        if self.mem % PAGE_SIZE:
            raise ConfigError(f"guest memory must be a multiple of 4 KiB (got {self.mem})")
        if self.mem < 1 << 20:
            raise ConfigError("guest memory must be at least 1 MiB")
        if self.cpus < 1:
            raise ConfigError(f"a VM needs at least one vCPU (got {self.cpus})")
        if self.accel not in ACCELS:
            raise ConfigError(f"unknown accelerator {self.accel!r}: choose one of {', '.join(ACCELS)}")
        if self.virtual_time and self.accel != "soft":
            raise ConfigError(
                f"--virtual-time is the software CPU's (--accel soft); --accel {self.accel} runs in real time"
            )
        if self.timeout is not None and not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ConfigError(f"the timeout must be a positive number of seconds, not {self.timeout}")
        if self.virtio_devices and self.accel == "lockstep":
            raise ConfigError("virtio devices need --accel kvm or soft (lockstep keeps two copies of guest memory)")
        if self.virtio_devices > len(VIRTIO_IRQS):
            raise ConfigError(f"at most {len(VIRTIO_IRQS)} virtio devices (one free ISA IRQ each), not "
                              f"{self.virtio_devices}")  # fmt: skip
        for disk in self.disks:
            disk.validate()
        if self.vsock is not None:
            self.vsock.validate()
        if self.net is not None:
            self.net.validate()


class HostSignal(BaseException):
    """A termination signal (SIGTERM, SIGHUP) arrived: raised in the main thread, as Python raises
    KeyboardInterrupt for SIGINT, so `Vm.run` stops the VM with StopReason.SIGNAL wherever it was waiting."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise `HostSignal` in the main thread (the previous handlers return
    after). Raising, rather than stopping the VM from the handler, keeps the handler free of locks."""

    def handler(signum: int, _frame: object) -> None:
        raise HostSignal(signum)

    saved = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


@dataclass(frozen=True)
class VirtioSlot:
    """Where the builder put a virtio device: its transport, MMIO window and IRQ."""

    transport: MmioTransport
    base: int
    irq: int

    @property
    def cmdline(self) -> str:
        """Linux's virtio_mmio.device=<size>@<base>:<irq> (Documentation/admin-guide/kernel-parameters.txt)."""
        return f"virtio_mmio.device={MMIO_WINDOW // 1024}K@{self.base:#x}:{self.irq}"


def extend_cmdline(cmdline: str | bytes, params: list[str]) -> str | bytes:
    """Add kernel parameters to a command line, before any `--` (what follows it is init's)."""
    if not params:
        return cmdline
    head, sep, tail = encode_cmdline(cmdline).partition(b" -- ")
    return b" ".join(x for x in (head, *(p.encode() for p in params)) if x) + sep + tail


@dataclass
class SerialLog:
    """The console's output as it passes to the sink: a bounded tail kept for parsing, and a byte count."""

    sink: Callable[[bytes], None] | None = None
    tail: bytearray = field(default_factory=bytearray)
    total: int = 0

    def __call__(self, data: bytes) -> None:
        self.total += len(data)
        self.tail += data
        if len(self.tail) > SERIAL_TAIL:
            del self.tail[: len(self.tail) - SERIAL_TAIL]
        if self.sink is not None:
            self.sink(data)


def _placements(bus: Bus) -> str:
    """The devices on a bus and where, as `--stats` lists them."""
    return ", ".join(f"{r.name} {r.base:#x}" + (f"-{r.end - 1:#x}" if r.size > 1 else "") for r in bus.ranges())


class RunState(enum.Enum):
    """Where a VM is in its life: built and not run, running, paused (every vCPU parked between two
    instructions and the devices' host events held: what a snapshot needs), stopped for good."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


PAUSE_TIMEOUT = 30.0  # how long pause() waits for the vCPUs to park (a vCPU in a long host-emulated instruction)


class Vm:
    def __init__(
        self,
        spec: VmSpec,
        console: Callable[[bytes], None] | None = None,
        *,
        memory: GuestMemory | None = None,
    ) -> None:
        """Build the machine `spec` describes and load its kernel; with `memory` (a snapshot's, `Vm.restore`)
        build the same machine around that memory and load nothing: its state comes from the snapshot."""
        try:
            spec.validate()
        except BaseException:
            if memory is not None:
                memory.close()
            raise
        self.spec = spec
        kernel, initrd = b"", None
        if memory is None:
            # neither file can be larger than the guest it goes into: refused before it is read
            kernel = read_file(spec.kernel, "kernel", spec.mem)
            initrd = read_file(spec.initrd, "initrd", spec.mem) if spec.initrd is not None else None
        files = BootFiles(str(spec.kernel), str(spec.initrd) if spec.initrd is not None else "")

        self.mem = GuestMemory(spec.mem) if memory is None else memory
        self.accel: Backend | None = None
        self.virtio: list[VirtioSlot] = []
        self._unattached: list[VirtioDevice] = []
        try:
            if spec.accel == "soft":
                self.accel = SoftAccel(self.mem, spec.cpus, spec.cpu_template, virtual_time=spec.virtual_time)
            elif spec.accel == "lockstep":
                self.accel = LockstepAccel(self.mem, spec.cpus, spec.cpu_template, spec.kvm_device)
            else:
                self.accel = KvmAccel(self.mem, spec.cpus, spec.cpu_template, spec.kvm_device, spec.kvm_eventfds)
            self.pio = Bus("port", 1)
            self.mmio = Bus("mmio", MMIO_STATS_GRANULE)
            self.serial_log = SerialLog(console)
            self._stop: Stop | None = None
            self._stop_lock = threading.Lock()
            self.stopping = threading.Event()
            # the vCPUs leave run_vcpu when this is set: to stop (`stopping` is set too) or to pause
            self._leave = threading.Event()
            self._state = RunState.CREATED
            self._cond = threading.Condition()
            self._parked = 0
            self._resumes = 0  # bumped by resume(): the parked vCPUs go on
            self._paused_at: float | None = None
            self.paused_s = 0.0  # time spent paused, which the --timeout does not count
            self._diff_base: tuple[Path, str] | None = None  # the full snapshot a diff applies to
            self._dirty: set[int] = set()  # pages written since that snapshot
            self._attach_legacy_devices()
            self._attach_firmware_devices()
            if spec.pc_testdev:
                self._attach_pc_testdev()
            self._attach_virtio_devices()
            self.boot: BootImage | None = None
            self.acpi: acpi.AcpiTables | None = None
            if memory is None:
                # a boot sector takes no command line: it finds the devices at their fixed addresses
                announce = [] if is_boot_sector(kernel) else [slot.cmdline for slot in self.virtio]
                if spec.net is not None and announce:
                    announce += spec.net.kernel_parameters()  # a static address for the default guest's init
                cmdline = extend_cmdline(spec.cmdline, announce)
                self.boot = load_kernel(self.mem, kernel, cmdline, initrd, files)
                mptable.write(self.mem, spec.cpus)
                self.acpi = acpi.write(self.mem, self._acpi_platform()) if spec.acpi else None
                self.accel.set_boot_state(self.boot.entry)
        except BaseException:
            self.close()
            raise
        self.started_at: float | None = None
        self.stopped_at: float | None = None

    # --- devices ---

    def _attach_legacy_devices(self) -> None:
        assert self.accel is not None
        ports, ranges = self.accel.platform_devices()  # KVM keeps these in the kernel, the software backend in Python
        for base, length, device, name in ports:
            self.pio.insert(base, length, device, name)
        for base, length, device, name in ranges:
            self.mmio.insert(base, length, device, name)
        self.serial = Serial(self.accel.irq_line(COM1_IRQ), self.serial_log)
        self.pio.insert(COM1_PORT, 8, self.serial, "serial COM1")
        self.i8042 = I8042(lambda: self.request_stop(Stop(StopReason.RESET, "the guest reset the machine (i8042)")))
        self.pio.insert(I8042_PORT, 1, self.i8042, "i8042")  # 0x60 data
        self.pio.insert(I8042_PORT + 4, 1, Window(self.i8042, 4), "i8042")  # 0x64 status/command
        self.cmos = Cmos()
        self.pio.insert(CMOS_PORT, 2, self.cmos, "cmos rtc")
        self.pio.insert(POST_PORT, 1, PostCode(), "post code")
        if self.spec.debug_exit:
            exit_dev = DebugExit(
                lambda status: self.request_stop(
                    Stop(StopReason.DEBUG_EXIT, f"the guest wrote to the debug-exit port (status {status})", status)
                )
            )
            self.pio.insert(DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, exit_dev, "debug exit")

    def _attach_firmware_devices(self) -> None:
        """What QEMU's PC gives firmware-less guests: fw_cfg, the PIIX's reset control register, the Bochs
        shutdown port and, with ACPI, the PIIX4 power-management registers the FADT points at."""
        assert self.accel is not None
        self.fw_cfg = FwCfg(self.spec.mem, self.spec.cpus)
        self.pio.insert(FW_CFG_PORT, FW_CFG_PORTS, self.fw_cfg, "fw_cfg")
        self.reset_control = ResetControl(
            lambda: self.request_stop(Stop(StopReason.RESET, "the guest reset the machine (reset control 0xcf9)"))
        )
        self.pio.insert(RESET_CONTROL_PORT, 1, self.reset_control, "reset control")
        self.bochs_shutdown = BochsShutdown(
            lambda: self.request_stop(Stop(StopReason.POWEROFF, "the guest powered off (Bochs shutdown port)"))
        )
        self.pio.insert(BOCHS_SHUTDOWN_PORT, 1, self.bochs_shutdown, "bochs shutdown")
        self.acpi_pm: acpi_pm.AcpiPm | None = None
        if self.spec.acpi:
            pm = acpi_pm.AcpiPm(
                self.accel.time_ns,
                self.accel.irq_line(SCI_IRQ),
                lambda state: self.request_stop(Stop(StopReason.POWEROFF, f"the guest entered {state.value}")),
            )
            self.pio.insert(ACPI_PM_BASE + acpi_pm.PM1_EVT, acpi_pm.PM1_EVT_LEN, pm, "acpi pm1a event")
            self.pio.insert(
                ACPI_PM_BASE + acpi_pm.PM1_CNT, acpi_pm.PM1_CNT_LEN, Window(pm, acpi_pm.PM1_CNT), "acpi pm1a control"
            )
            self.pio.insert(
                ACPI_PM_BASE + acpi_pm.PM_TMR, acpi_pm.PM_TMR_LEN, Window(pm, acpi_pm.PM_TMR), "acpi pm timer"
            )
            self.acpi_pm = pm

    def _attach_pc_testdev(self) -> None:
        assert self.accel is not None
        ports = pc_testdev.PcTestdevPorts(self.mem.remap_page)
        base = pc_testdev.IOPORT_BASE
        size = pc_testdev.PORT_BLOCK_LEN
        self.pio.insert(base + pc_testdev.IOPORT, size, Window(ports, pc_testdev.IOPORT), "pc-testdev ioport")
        self.pio.insert(
            base + pc_testdev.FLUSH_PAGE, size, Window(ports, pc_testdev.FLUSH_PAGE), "pc-testdev flush-page"
        )
        self.pio.insert(
            base + pc_testdev.IOPORT_BYTE, size, Window(ports, pc_testdev.IOPORT_BYTE), "pc-testdev ioport-byte"
        )
        irqs = pc_testdev.PcTestdevIrqLines(self.accel.irq_line)
        self.pio.insert(pc_testdev.IRQ_PORT_BASE, len(irqs.lines), irqs, "pc-testdev irq-line")
        self.mmio.insert(pc_testdev.IORAM_BASE, pc_testdev.IORAM_SIZE, pc_testdev.Ioram(), "pc-testdev ioram")

    def _acpi_platform(self) -> acpi.AcpiPlatform:
        """The machine as the ACPI tables describe it: what `_attach_firmware_devices` placed, and the MP table's
        I/O APIC."""
        return acpi.AcpiPlatform(
            cpus=self.spec.cpus,
            ioapic_id=mptable.ioapic_id(self.spec.cpus),
            pm1a_evt=ACPI_PM_BASE + acpi_pm.PM1_EVT,
            pm1a_evt_len=acpi_pm.PM1_EVT_LEN,
            pm1a_cnt=ACPI_PM_BASE + acpi_pm.PM1_CNT,
            pm1a_cnt_len=acpi_pm.PM1_CNT_LEN,
            pm_tmr=ACPI_PM_BASE + acpi_pm.PM_TMR,
            pm_tmr_len=acpi_pm.PM_TMR_LEN,
            pm_timer_32bit=acpi_pm.PM_TIMER_BITS == 32,
            sci_irq=SCI_IRQ,
            reset_port=RESET_CONTROL_PORT,
            reset_value=RESET_VALUE,
            s5_sleep_type=acpi_pm.SLP_TYP_S5,
            virtio=tuple(acpi.VirtioWindow(slot.base, MMIO_WINDOW, slot.irq) for slot in self.virtio),
        )

    def _attach_virtio_devices(self) -> None:
        """`--disk` (vda, vdb, ...), `--rng`, `--console2`, `--vsock`, `--net`, in that order of MMIO windows and
        IRQs."""
        seen: dict[tuple[int, int], Path] = {}
        for i, disk in enumerate(self.spec.disks):
            try:
                st = os.stat(disk.path)
            except OSError:
                pass  # DiskImage says what is wrong with it
            else:  # checked before opening: the first open's lock would hide the cause
                if (st.st_dev, st.st_ino) in seen:
                    raise ConfigError(f"disk image {disk.path} is given twice (as {seen[st.st_dev, st.st_ino]} too)")
                seen[st.st_dev, st.st_ino] = disk.path
            self._unattached.append(BlockDevice(DiskImage(disk), "vd" + chr(ord("a") + i)))
        if self.spec.rng:
            self._unattached.append(EntropyDevice())
        if self.spec.console2 is not None:
            self._unattached.append(ConsoleDevice(ConsoleHost.open(self.spec.console2)))
        if self.spec.vsock is not None:
            self._unattached.append(VsockDevice(self.spec.vsock))
        if self.spec.net is not None:
            self._unattached.append(NetDevice(open_host(self.spec.net), self.spec.net.mac))
        while self._unattached:  # each stays in `_unattached` (closed by `close`) until it is attached
            self._attach_virtio(self._unattached[0])
            self._unattached.pop(0)

    def _attach_virtio(self, device: VirtioDevice) -> MmioTransport:
        """Place a virtio device: its MMIO window and IRQ, its notifications and host fds on the backend's fast
        path, and its kernel parameter (`VirtioSlot.cmdline`). The VM owns the device once this returns."""
        assert self.accel is not None
        accel = self.accel
        index = len(self.virtio)
        if index >= len(VIRTIO_IRQS):
            raise ConfigError(f"at most {len(VIRTIO_IRQS)} virtio devices (one free ISA IRQ each)")
        base, irq = VIRTIO_MMIO_BASE + index * MMIO_WINDOW, VIRTIO_IRQS[index]
        transport = MmioTransport(device, self.mem, accel.device_interrupt(irq))
        self.mmio.insert(base, MMIO_WINDOW, transport, device.name)
        for queue in range(len(device.queues)):
            accel.attach_notify(base + QUEUE_NOTIFY, queue, functools.partial(transport.notify, queue))
        device.connect_host(
            lambda fd, on_readable: accel.watch_fd(fd, functools.partial(transport.run_device, on_readable))
        )
        self.virtio.append(VirtioSlot(transport, base, irq))
        return transport

    # --- running ---

    def request_stop(self, stop: Stop) -> None:
        """Record why the VM ends (the first reason wins) and make every vCPU leave the guest."""
        with self._stop_lock:
            if self._stop is None:
                self._stop = stop
        self.stopping.set()
        self._leave.set()
        with self._cond:
            self._cond.notify_all()  # parked vCPUs end too
        if self.accel is not None:
            self.accel.kick()

    def console_input(self, data: bytes) -> int:
        """Type bytes on the serial console; returns how many the UART took."""
        return self.serial.enqueue_input(data)

    def run(self) -> Stop:
        assert self.accel is not None
        accel = self.accel
        with self._cond:
            if self._state is not RunState.CREATED:
                raise VmStateError(f"a VM runs once: this one is {self._state.value}")
            self._state = RunState.RUNNING
        self.started_at = time.monotonic()

        def vcpu_thread(index: int) -> None:
            while True:
                try:
                    stop = accel.run_vcpu(index, self.pio, self.mmio, self._leave)
                    if stop is None and not self.stopping.is_set():
                        accel.settle_vcpu(index)  # paused: between two instructions, for a snapshot
                except Exception as e:  # a VMM bug must still end the VM cleanly, with its cause
                    stop = Stop(StopReason.ERROR, f"vCPU {index}: {type(e).__name__}: {e}")
                if stop is not None:
                    self.request_stop(stop)
                if self.stopping.is_set():
                    return
                with self._cond:  # parked until resume() or a stop
                    self._parked += 1
                    self._cond.notify_all()
                    resumes = self._resumes
                    while self._resumes == resumes and not self.stopping.is_set():
                        self._cond.wait()
                    self._parked -= 1

        accel.start_devices(lambda error: self.request_stop(Stop(StopReason.ERROR, error)))
        threads = [
            threading.Thread(target=vcpu_thread, args=(i,), name=f"vcpu{i}", daemon=True)
            for i in range(accel.run_threads)
        ]
        watchdog = threading.Thread(target=accel.watch, args=(self.stopping,), name="vcpu-watchdog", daemon=True)
        try:  # a signal can come as soon as the guest runs, even before the first wait
            for t in [*threads, watchdog]:
                t.start()
            timeout = self.spec.timeout
            while not self.stopping.wait(0.2 if timeout is None else max(0.0, min(0.2, self._time_left(timeout)))):
                if timeout is not None and self._time_left(timeout) <= 0:
                    self.request_stop(Stop(StopReason.TIMEOUT, f"the VM ran longer than {timeout:g} s"))
        except KeyboardInterrupt:
            self.request_stop(Stop(StopReason.SIGNAL, "interrupted (SIGINT)", signum=signal.SIGINT))
        except HostSignal as e:
            self.request_stop(
                Stop(StopReason.SIGNAL, f"{signal.Signals(e.signum).name} from the host", signum=e.signum)
            )
        for t in threads:
            while t.is_alive():
                try:
                    accel.kick()
                    t.join(0.05)
                except (KeyboardInterrupt, HostSignal):
                    pass  # already stopping: the first reason stands
        self.stopped_at = time.monotonic()
        with self._cond:
            self._state = RunState.STOPPED
        accel.resume_devices()  # a loop paused when the VM stopped must not hold the VM's close
        assert self._stop is not None
        if self._stop.reason in (StopReason.TIMEOUT, StopReason.SIGNAL):
            # where the guest was is the first question about a VM that had to be stopped from outside
            self._stop = dataclasses.replace(self._stop, detail=self._stop.detail + "\n" + accel.register_dumps())
        return self._stop

    def _time_left(self, timeout: float) -> float:
        """Seconds of `timeout` left: time spent paused does not count (the guest did not run)."""
        assert self.started_at is not None
        with self._cond:
            if self._paused_at is not None:
                return 0.2  # it does not run out while paused
            return self.started_at + self.paused_s + timeout - time.monotonic()

    @property
    def stop_reason(self) -> Stop | None:
        return self._stop

    # --- pause, resume, snapshots ---

    @property
    def state(self) -> RunState:
        return self._state

    def pause(self, timeout: float = PAUSE_TIMEOUT) -> None:
        """Stop every vCPU between two instructions (what a KVM exit left pending completed: `settle_vcpu`) and
        hold the devices' host events, so nothing changes guest memory or device state until resume(). Called
        from any thread but the vCPUs'; VmStateError if the VM is not running or stops meanwhile."""
        accel = self.accel
        if accel is None or not accel.snapshots:
            raise VmStateError(f"--accel {self.spec.accel} cannot pause a VM (kvm and soft can)")
        with self._cond:
            if self._state is not RunState.RUNNING:
                raise VmStateError(f"only a running VM pauses: this one is {self._state.value}")
            self._leave.set()
            accel.kick()
            deadline = time.monotonic() + timeout
            while self._parked < accel.run_threads and not self.stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.05))
                accel.kick()  # a vCPU between its stop check and KVM_RUN would miss one kick
            parked = self._parked == accel.run_threads and not self.stopping.is_set()
            if parked:
                self._state = RunState.PAUSED
                self._paused_at = time.monotonic()
        if not parked:
            if self.stopping.is_set():
                raise VmStateError("the VM stopped while it was pausing")
            self._resume_vcpus()
            raise VmStateError(f"the vCPUs did not stop within {timeout:g} s")
        if not accel.pause_devices():
            self.resume()
            raise VmStateError("the device loop did not stop (a device is stuck in a host call)")

    def resume(self) -> None:
        """Let a paused VM go on from where it stopped."""
        accel = self.accel
        with self._cond:
            if self._state is not RunState.PAUSED or accel is None:
                raise VmStateError(f"only a paused VM resumes: this one is {self._state.value}")
            self._state = RunState.RUNNING
            if self._paused_at is not None:
                self.paused_s += time.monotonic() - self._paused_at
                self._paused_at = None
        accel.resume_devices()
        self._resume_vcpus()

    def _resume_vcpus(self) -> None:
        with self._cond:
            self._leave.clear()
            if self.stopping.is_set():
                self._leave.set()
            self._resumes += 1
            self._cond.notify_all()

    def snapshot(self, path: str | os.PathLike[str], *, diff: bool = False) -> snapshot_files.Manifest:
        """Write the paused (or not yet run) VM into the snapshot directory `path` (popek.snapshot: atomic, the
        previous generation kept until the new one is complete). With diff, only the pages written since the
        last full snapshot of this VM into `path` (KVM's dirty log and the VMM's own writes): restoring it needs
        that full snapshot's memory file, which stays beside it."""
        accel = self.accel
        if accel is None or not accel.snapshots:
            raise VmStateError(f"--accel {self.spec.accel} takes no snapshots (kvm and soft do)")
        with self._cond:
            if self._state not in (RunState.PAUSED, RunState.CREATED):
                raise VmStateError(f"pause the VM before a snapshot: it is {self._state.value}")
        folder = Path(path).resolve()
        state = self.capture_state()
        if not diff:
            accel.start_dirty_log()
            accel.collect_dirty()
            self.mem.dirty_pages(clear=True)
            manifest = snapshot_files.write(folder, state, self.mem)
            self._diff_base, self._dirty = (folder, manifest.generation), set()
            return manifest
        if self._diff_base is None or self._diff_base[0] != folder:
            raise VmStateError(f"a diff snapshot follows a full snapshot of this VM into {folder}: take one first")
        current = snapshot_files.read_manifest(folder)
        if (current.parent or current.generation) != self._diff_base[1]:
            raise snapshot_files.SnapshotError(
                f"snapshot {folder}: it no longer holds this VM's last full snapshot (written over since)"
            )
        accel.collect_dirty()
        self._dirty.update(self.mem.dirty_pages(clear=True))
        return snapshot_files.write(folder, state, self.mem, diff_pages=self._dirty)

    def forget_diff_base(self) -> None:
        """The dirty map was consumed by something else (a migration's rounds): the next diff snapshot needs a
        full one first."""
        self._diff_base, self._dirty = None, set()

    @classmethod
    def restore(
        cls,
        path: str | os.PathLike[str],
        console: Callable[[bytes], None] | None = None,
        *,
        adjust: Callable[[VmSpec], VmSpec] | None = None,
        verify_memory: bool = False,
        check_cpuid: bool = True,
    ) -> Vm:
        """A VM built from a snapshot, ready to run() from the instruction where it was paused. Guest memory is
        the snapshot's memory file mapped privately (restore time does not grow with guest memory; clones share
        the pages they do not write). `adjust` changes the saved spec first, for what belongs to the new VM and
        not to the snapshot: its vsock socket, disks, network; or the backend: a snapshot of `--accel kvm`
        restores on `soft` and the reverse, converted by `popek.accel.portable` (which refuses, naming it,
        what cannot cross: a CPUID the other backend lacks, AVX state in use, kvm-clock enabled, ...;
        `check_cpuid=False` waives the CPUID rule, for a guest known never to have run CPUID).
        SnapshotError for a snapshot that is damaged, foreign or of another machine, with nothing left open."""
        snap = snapshot_files.read(path, verify_memory=verify_memory)
        spec = cls.spec_of_state(snap.state, adjust)
        vm = cls(spec, console, memory=snap.memory(spec.mem))
        try:
            vm.restore_state(snap.state, check_cpuid=check_cpuid)
        except BaseException:
            vm.close()
            raise
        return vm

    def capture_state(self) -> dict[str, Any]:
        """The state beside memory that a snapshot or a migration carries (popek.vm_snapshot), with the vCPUs
        parked: the machine's record, the spec, the backend's state and every device's."""
        assert self.accel is not None
        return {
            "machine": {"backend": self.accel.name},
            "spec": vm_snapshot.spec_state(self.spec),
            "accel": self.accel.snapshot_state(),
            "devices": machine_state.capture_vm(self),
        }

    @staticmethod
    def spec_of_state(state: object, adjust: Callable[[VmSpec], VmSpec] | None = None) -> VmSpec:
        """The spec a captured state says to build (checked), changed by `adjust`; SnapshotError if it would
        run on a backend the state cannot be converted to (kvm and soft convert into each other)."""
        top = vm_snapshot.parse_state(state)
        spec: VmSpec = vm_snapshot.spec_from_state(top["spec"])
        if adjust is not None:
            spec = adjust(spec)
        source = top["machine"]["backend"]
        if spec.accel != source and {spec.accel, source} != {"kvm", "soft"}:
            raise snapshot_files.SnapshotError(
                f"the snapshot was taken on --accel {source}, and restores on it only, or on the other of kvm and "
                f"soft (not on {spec.accel})"
            )
        return spec

    def restore_state(self, state: object, *, check_cpuid: bool = True) -> None:
        """`capture_state`'s output into this freshly built VM (built with the memory it was captured with):
        the backend first (KVM's irqchip and clock), then the devices, then each virtio transport's
        after-restore step; a state of the other backend is converted first (popek.accel.portable).
        SnapshotError for a field that is wrong; the caller discards the VM then."""
        assert self.accel is not None
        top = vm_snapshot.parse_state(state)
        if top["machine"]["backend"] != self.accel.name:
            # across backends: the new VM's own state, taken before it ran, gives the conversion the target's
            # structures, CPUID and reset values
            fresh = {"accel": self.accel.snapshot_state(), "devices": machine_state.capture_vm(self)}
            top = portable.convert(top, self.accel.name, fresh=fresh, check_cpuid=check_cpuid)
        self.accel.restore_state(top["accel"])
        machine_state.restore_vm(self, top["devices"])
        for slot in self.virtio:
            slot.transport.after_restore()

    def stats(self) -> str:
        """Exit counts per reason, per port and per MMIO page, and assists, as `--stats` prints them."""
        assert self.accel is not None
        lines = []
        elapsed = (self.stopped_at or time.monotonic()) - (self.started_at or time.monotonic())
        exits = self.accel.exit_counts
        lines.append(f"popek stats: {exits.total_count()} exits in {elapsed:.3f} s")
        reasons = [f"{k.lower()}={v}" for k, v in exits.most_common()]
        reasons += [f"other={exits.other}"] if exits.other else []
        lines.append("exits: " + " ".join(reasons))
        for port, n in sorted(self.pio.counts.items()):
            lines.append(f"io 0x{port:04x}: {n} ({self.pio.name_of(port)})")
        if self.pio.counts.other:
            lines.append(f"io other: {self.pio.counts.other} (ports beyond the first {self.pio.counts.limit} seen)")
        for page, n in sorted(self.mmio.counts.items()):
            lines.append(f"mmio 0x{page:08x}: {n} ({self.mmio.name_of(page)})")
        if self.mmio.counts.other:
            lines.append(f"mmio other: {self.mmio.counts.other} (pages beyond the first {self.mmio.counts.limit} seen)")
        unclaimed = self.pio.unclaimed.total_count() + self.mmio.unclaimed.total_count()
        lines.append(f"unclaimed accesses: {unclaimed}")
        lines.append("port devices: " + _placements(self.pio))
        lines.append("mmio devices: " + (_placements(self.mmio) or "none"))
        assists = [f"{k}={v}" for k, v in self.accel.assists.most_common()]
        if self.accel.assists.other:
            assists.append(f"other={self.accel.assists.other}")
        lines.append("assists: " + (" ".join(assists) or "none"))
        if self.accel.unavailable:
            families = ", ".join(sorted(self.accel.unavailable))
            lines.append(f"host cannot execute (hidden from CPUID or completed by popek): {families}")
        lines.extend(self.accel.extra_stats())
        lines.append(f"serial: {self.serial_log.total} bytes out, {self.serial.bytes_in} bytes in")
        if self.virtio:
            lines.extend(self.accel.device_stats())
        for slot in self.virtio:
            lines.append(f"{slot.transport.device.name} @{slot.base:#x} irq {slot.irq}: {slot.transport.stats()}")
        return "\n".join(lines)

    def io_counters(self) -> dict[str, int]:
        """The bytes the VM's devices moved (IO_COUNTERS, each 0 where no device of its kind exists), summed over
        devices of one kind: the daemon's /metrics reports them per VM."""
        totals = dict.fromkeys(IO_COUNTERS, 0)
        for slot in self.virtio:
            for name, value in slot.transport.device.counters().items():
                totals[name] += value
        return totals

    def close(self) -> None:
        if self.accel is not None:
            self.accel.close()  # the device loop stops here, before devices and memory go
            self.accel = None
        for device in [*(slot.transport.device for slot in self.virtio), *self._unattached]:
            device.close()
        self.virtio, self._unattached = [], []
        self.mem.close()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
