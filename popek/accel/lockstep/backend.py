"""`--accel lockstep` as a backend of the builder (popek.accel.backend): KVM drives the machine, the
single-step driver (`Lockstep`) follows it with the software CPU."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from popek.accel.exits import Stop, StopReason
from popek.accel.kvm import KvmAccel
from popek.accel.lockstep.compare import Outcome
from popek.accel.lockstep.driver import Lockstep, copy_guest_memory
from popek.accel.soft import format_state
from popek.boot.entry import EntryState
from popek.bus import BoundedCounter, Bus
from popek.cpu.interp import Interpreter
from popek.devices.event_loop import FdWatch
from popek.devices.irq import IrqLine, Pulse
from popek.devices.platform import PortRange
from popek.errors import ConfigError, VmStateError
from popek.memory import GuestMemory


class LockstepAccel:
    """`--accel lockstep`: the KVM backend drives the machine (its devices, its in-kernel irqchip), a software CPU
    follows every instruction on its own copy of guest memory; the first divergence stops the VM."""

    name = "lockstep"
    run_threads = 1

    def __init__(
        self,
        mem: GuestMemory,
        cpus: int,
        cpu_template: str = "portable",
        kvm_path: str = "/dev/kvm",
        interpreter: type[Interpreter] = Interpreter,
    ) -> None:
        if cpus != 1:
            raise ConfigError(f"--accel lockstep runs one vCPU, not {cpus}")
        self.mem = mem
        self.kvm = KvmAccel(mem, 1, cpu_template, kvm_path)
        try:
            self.soft_mem = GuestMemory(mem.size)
        except BaseException:
            self.kvm.close()
            raise
        self.interpreter = interpreter
        self.unavailable = self.kvm.unavailable
        self.exit_counts: BoundedCounter[str] = BoundedCounter()
        self.assists: BoundedCounter[str] = BoundedCounter()
        self.lockstep: Lockstep | None = None
        self.outcome: Outcome | None = None

    def irq_line(self, number: int) -> IrqLine:
        return self.kvm.irq_line(number)

    def time_ns(self) -> int:
        """KVM's clock: KVM drives the devices, and the software CPU replays what they answered."""
        return self.kvm.time_ns()

    # Devices that write guest memory behind the CPU (virtio DMA) would make the software CPU's copy of memory
    # diverge from KVM's: the builder refuses them with --accel lockstep, and these say so if called anyway.
    NO_DMA_DEVICES = "virtio devices need --accel kvm or soft (lockstep keeps two copies of guest memory)"

    def device_interrupt(self, irq: int) -> Pulse:
        raise ConfigError(self.NO_DMA_DEVICES)

    def attach_notify(self, addr: int, value: int, callback: Callable[[], None]) -> bool:
        raise ConfigError(self.NO_DMA_DEVICES)

    def watch_fd(self, fd: int, callback: Callable[[], None]) -> FdWatch:
        raise ConfigError(self.NO_DMA_DEVICES)

    def start_devices(self, on_error: Callable[[str], None]) -> None:
        """No devices to start."""

    def platform_devices(self) -> tuple[list[PortRange], list[PortRange]]:
        """None: the interrupt platform is the KVM side's, in the kernel."""
        return [], []

    def device_stats(self) -> list[str]:
        return []

    def set_boot_state(self, entry: EntryState) -> None:
        """Called once the VM has loaded the guest: the moment to give the software CPU its copy of memory."""
        self.kvm.set_boot_state(entry)
        copy_guest_memory(self.mem, self.soft_mem)
        self.lockstep = Lockstep(
            self.kvm.vcpus[0], self.mem, self.soft_mem, xsave_layout=self.kvm.xsave_layout,
            interpreter=self.interpreter, assist=self.kvm.soft_steps[0],
        )  # fmt: skip
        self.lockstep.exit_counts = self.exit_counts
        self.lockstep.assists = self.assists

    def run_vcpu(self, index: int, pio: Bus, mmio: Bus, stopping: threading.Event) -> Stop | None:
        assert self.lockstep is not None, "set_boot_state first"
        outcome = self.lockstep.run(pio, mmio, stopping=stopping)
        self.outcome = outcome
        if outcome.reason == "divergence":
            return Stop(StopReason.DIVERGENCE, outcome.detail)
        if outcome.reason == "halted":
            return Stop(StopReason.POWEROFF, "the guest halted")
        if outcome.reason == "shutdown":
            return Stop(StopReason.TRIPLE_FAULT, "triple fault on both sides (the guest's exception handling failed)")
        if outcome.reason == "error":
            return Stop(StopReason.ERROR, outcome.detail)
        return None

    snapshots = False  # two machines compared step by step: a snapshot of one would not restore the pair

    def kick(self, only: int | None = None) -> None:
        if self.lockstep is not None and only in (None, 0):
            self.lockstep.kick()

    def watch(self, stopping: threading.Event) -> None:
        """Nothing to watch: every KVM_RUN is one instruction long."""

    # --- pause and snapshots: not for a pair of machines (`snapshots` is False, and Vm asks it first) ---

    def settle_vcpu(self, index: int) -> None:
        """Never paused: `run_vcpu` returns only when the VM stops."""

    def pause_devices(self) -> bool:
        return True

    def resume_devices(self) -> None:
        """See pause_devices: no device loop (no virtio devices under lockstep)."""

    def snapshot_state(self) -> dict[str, Any]:
        raise VmStateError("--accel lockstep takes no snapshots")

    def restore_state(self, state: object) -> None:
        raise VmStateError("--accel lockstep restores no snapshots")

    def start_dirty_log(self) -> None:
        raise VmStateError("--accel lockstep keeps no dirty log")

    def collect_dirty(self) -> bool:
        return False

    def extra_stats(self) -> list[str]:
        ls = self.lockstep
        steps, retired = (ls.steps, ls.instructions) if ls is not None else (0, 0)
        return [f"lockstep: {steps} steps compared, {retired} instructions retired"]

    def register_dumps(self) -> str:
        soft = format_state(0, self.lockstep.cpu.state) if self.lockstep is not None else ""
        return "\n".join(x for x in (self.kvm.register_dumps(), soft) if x)

    def close(self) -> None:
        self.kvm.close()
        self.soft_mem.close()
