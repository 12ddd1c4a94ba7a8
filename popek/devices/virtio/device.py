"""What a virtio device type implements, independent of the transport that carries it (virtio 1.2 §2, §3; the
split Firecracker's `VirtioDevice` trait makes): a device ID (§5), feature bits (§2.2, reserved bits §6), its
virtqueues (one `Queue` per index, §2.7), a device-specific configuration space (§2.5), `activate` when the driver
sets DRIVER_OK (§3.1.1 step 8), `process_queue` when the driver notifies a queue, and `reset` (§2.4).

The transport (`popek.devices.virtio.mmio`) owns the register block and the device status; it configures the
queues from the driver's writes, negotiates features, and calls the device with its lock held, so a device needs
no lock of its own. A device reports completed work with `signal_used` (which applies the driver's notification
suppression before it interrupts) and configuration changes with `config_changed`; a rule broken by the driver is
a `QueueError`, which the transport turns into DEVICE_NEEDS_RESET (§2.1.2). Adding a device type (virtio-net,
virtio-vsock) is a subclass: its features, config bytes, queue sizes and `process_queue`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import IntEnum, IntFlag
from typing import Any, ClassVar

from popek.devices import state as st
from popek.devices.event_loop import FdWatch
from popek.devices.virtio.queue import DescriptorChain, Queue
from popek.memory import GuestMemory

# (fd, on_ready) -> a handle that can pause the watch, ask for writability too, or close it (popek.devices.event_loop)
WatchFd = Callable[[int, Callable[[], None]], FdWatch]

# reserved feature bits (§6)
VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
COMMON_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX

# InterruptStatus bits (§4.2.2)
INT_VRING = 1 << 0  # used buffer notification
INT_CONFIG = 1 << 1  # configuration change notification


class DeviceStatus(IntFlag):
    """The device status field (§2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class DeviceId(IntEnum):
    """Virtio device IDs (§5)."""

    NET = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4
    VSOCK = 19


def _no_signal(_bits: int) -> None:
    """A device not yet bound to a transport interrupts nobody."""


class VirtioDevice:
    """Base of every device type. Subclasses set `device_id`, call `__init__` with their queue sizes, and override
    `device_features`, `config_bytes`, `process_queue` (and, where they keep state, `on_activate`, `on_reset`,
    `stats`, `state`, `restore`, `close`)."""

    device_id: ClassVar[DeviceId]

    def __init__(self, name: str, queue_sizes: Sequence[int]) -> None:
        self.name = name
        self.queues = [Queue(size) for size in queue_sizes]
        self.acked_features = 0
        self.mem: GuestMemory | None = None  # set at activation; None while the device is not active
        self._signal: Callable[[int], None] = _no_signal
        self._config_changed: Callable[[], None] = lambda: None

    def bind(self, signal: Callable[[int], None], config_changed: Callable[[], None]) -> None:
        """The transport's interrupt (InterruptStatus bits) and configuration-change hooks."""
        self._signal = signal
        self._config_changed = config_changed

    # --- what a device type defines ---

    def device_features(self) -> int:
        """The feature bits offered (§2.2); every popek device offers VERSION_1, INDIRECT_DESC and EVENT_IDX."""
        return COMMON_FEATURES

    def config_bytes(self) -> bytes:
        """The device-specific configuration space as it is now (little-endian, §2.5)."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to the configuration space; ignored unless a device has writable fields."""

    def process_queue(self, index: int) -> None:
        """The driver notified queue `index` (ready, device active): take its chains."""
        raise NotImplementedError

    def on_activate(self) -> None:
        """DRIVER_OK: the queues are validated and `mem` is set."""

    def on_reset(self) -> None:
        """The driver reset the device: drop device-specific state tied to the driver."""

    def stats(self) -> str:
        """Device-specific counters for `--stats`."""
        return ""

    def counters(self) -> dict[str, int]:
        """The bytes this device moved, by the names of popek.vm.IO_COUNTERS (the daemon's /metrics sums them
        per VM); a device that moves no guest data has none."""
        return {}

    def state(self) -> dict[str, Any]:
        """Device-specific state for a snapshot (the queues and transport are saved by the transport)."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """The inverse of `state`; a device without state takes only an empty one."""
        st.load(state, {}, self.name)

    def on_restored(self) -> None:
        """The whole machine was restored from a snapshot and is about to run (called with the transport's lock
        held, the device active): tell the driver what the snapshot could not keep (vsock's host connections)."""

    def connect_host(self, watch_fd: WatchFd) -> None:
        """Register the host fds the device waits on (a console socket, a TAP device): `watch_fd(fd, on_readable)`.
        The backend calls `on_readable` from its device loop with the transport's lock held. A device whose set of
        fds changes (vsock connections) keeps `watch_fd` and calls it again later, always with that lock held."""

    def on_needs_reset(self) -> None:
        """The transport set DEVICE_NEEDS_RESET (§2.1.2): it will not run the device's host events until the
        driver resets it, so a device must pause its host fds here; a readable fd nobody reads would otherwise
        wake the device loop without end."""

    def close(self) -> None:
        """Release host resources (files, sockets)."""

    # --- used by the transport ---

    @property
    def active(self) -> bool:
        return self.mem is not None

    def activate(self, mem: GuestMemory, features: int) -> None:
        self.acked_features = features
        self.mem = mem
        self.on_activate()

    def reset(self) -> None:
        self.mem = None
        self.acked_features = 0
        for queue in self.queues:
            queue.reset()
        self.on_reset()

    # --- helpers for device types ---

    def has_feature(self, bit: int) -> bool:
        return bool(self.acked_features & bit)

    def serve(self, index: int, handle: Callable[[DescriptorChain], int]) -> None:
        """Take every available chain of queue `index`, `handle` each (it returns the bytes written for the used
        element), re-arm the driver's notification, and interrupt if the driver wants it."""
        queue, mem = self.queues[index], self.mem
        assert mem is not None
        try:
            while True:
                while (chain := queue.pop(mem)) is not None:
                    queue.add_used(mem, chain.head, handle(chain))
                if not queue.rearm(mem):
                    break
        finally:
            self.signal_used(index)

    def signal_used(self, index: int) -> None:
        """Interrupt for queue `index`'s new used elements, unless the driver suppressed it (§2.7.7)."""
        assert self.mem is not None
        if self.queues[index].needs_interrupt(self.mem):
            self._signal(INT_VRING)

    def config_changed(self) -> None:
        """The configuration space changed: new ConfigGeneration and a configuration change notification."""
        self._config_changed()
