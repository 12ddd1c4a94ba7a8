"""The state of every platform device of a VM, in one dict: what a snapshot saves beside the vCPUs and memory.

The devices are found where the builder (`popek.vm.Vm`) put them: every device on the port and MMIO buses that
has `state()`/`restore()` (a `Window` is looked through to its device, and a device placed at several ranges,
like the i8042 or the ACPI PM block, is saved once, under its first range), and, on the software backend, the
interrupt and timer platform (`SoftPlatform`: virtual clock, PIC, PIT, port 0x61, I/O APIC, local APICs), saved
first and restored first so that the clock is set before any device arms a timer on it. On KVM that platform
is in the kernel and `popek.accel.kvm_snapshot` saves it.

Each device is keyed by bus, base address and name ("port 0x3f8 serial COM1"): a VM built from the same spec
has the same keys, and a snapshot whose keys differ (another spec, another popek) is refused as a whole,
naming the devices that differ. Devices without guest-visible state (the debug-exit port) are not listed.

Restore goes into a freshly built VM that has not run: a device that refuses its state raises SnapshotError,
after the devices before it took theirs; the caller discards the half-restored VM (nothing has run in it).
"""

from __future__ import annotations

from typing import Any, Protocol

from popek.bus import Bus, Window
from popek.devices.platform import SoftPlatform
from popek.devices.state import Stateful
from popek.snapshot import SnapshotError

PLATFORM = "platform"


class _HasPlatform(Protocol):
    platform: SoftPlatform


def _unwrap(device: object) -> object:
    while isinstance(device, Window):
        device = device.device
    return device


def _is_stateful(device: object) -> bool:
    return callable(getattr(device, "state", None)) and callable(getattr(device, "restore", None))


def devices(pio: Bus, mmio: Bus, platform: SoftPlatform | None = None) -> dict[str, Stateful]:
    """The stateful devices of a machine, in restore order, under their snapshot keys."""
    out: dict[str, Stateful] = {}
    seen: set[int] = set()
    if platform is not None:
        out[PLATFORM] = platform
        seen.update(id(d) for d in (platform.pic, platform.pit, platform.port61, platform.ioapic, *platform.lapics))
    for bus in (pio, mmio):
        for r in bus.ranges():
            device = _unwrap(r.device)
            if id(device) in seen or not _is_stateful(device):
                continue
            seen.add(id(device))
            out[f"{bus.kind} {r.base:#x} {r.name}"] = device  # type: ignore[assignment]
    return out


def vm_devices(vm: Any) -> dict[str, Stateful]:
    """`devices` of a `popek.vm.Vm` (its buses, and its software backend's platform if it has one)."""
    accel = vm.accel
    platform = accel.platform if isinstance(getattr(accel, "platform", None), SoftPlatform) else None
    return devices(vm.pio, vm.mmio, platform)


def capture_vm(vm: Any) -> dict[str, Any]:
    """The one call for a `popek.vm.Vm` whose vCPUs are stopped: `capture(vm_devices(vm))`."""
    return capture(vm_devices(vm))


def restore_vm(vm: Any, state: object) -> None:
    """The one call for a freshly built `popek.vm.Vm`: `restore(vm_devices(vm), state)`."""
    restore(vm_devices(vm), state)


def capture(machine: dict[str, Stateful]) -> dict[str, Any]:
    """Every device's state, keyed as `devices` keys them (call with the vCPUs stopped)."""
    return {key: device.state() for key, device in machine.items()}


def restore(machine: dict[str, Stateful], state: object) -> None:
    """Give each device its saved state, in `devices` order; SnapshotError for a snapshot of other devices or
    a state a device refuses."""
    if not isinstance(state, dict):
        raise SnapshotError(f"the device state is a {type(state).__name__}, not an object")
    missing = [key for key in machine if key not in state]
    extra = sorted(str(key) for key in state if key not in machine)
    if missing or extra:
        parts = ([f"this VM has {', '.join(missing)}, the snapshot does not"] if missing else []) + (
            [f"the snapshot has {', '.join(extra)}, this VM does not"] if extra else []
        )
        raise SnapshotError(f"the snapshot is of other devices: {'; '.join(parts)}")
    for key, device in machine.items():
        saved = state[key]
        if not isinstance(saved, dict):
            raise SnapshotError(f"{key}: the saved state is a {type(saved).__name__}, not an object")
        device.restore(saved)
