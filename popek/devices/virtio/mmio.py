"""The virtio-mmio transport, modern interface (virtio 1.2 §4.2, Version 2; the legacy Version 1 interface is not
offered, and a driver that does not accept VIRTIO_F_VERSION_1 never gets FEATURES_OK).

`MmioTransport` is the 4 KiB register block of one device (§4.2.2): identification, the 64 feature bits in two
32-bit words, queue configuration through QueueSel, QueueNotify, InterruptStatus/InterruptACK, Status, the queue
area addresses, ConfigGeneration and, from 0x100, the device's configuration space. Control registers take only
32-bit aligned accesses (§4.2.2.2); others are ignored (reads return zero) and counted.

Status follows the initialization sequence of §3.1.1: ACKNOWLEDGE, DRIVER, (features), FEATURES_OK — granted only
if the driver accepted VIRTIO_F_VERSION_1 and nothing the device did not offer (§2.2.1) — queue set-up, DRIVER_OK.
A write that clears a bit or skips a step is ignored (the driver MUST NOT clear a bit, §2.1.1), writing 0 resets
the device (§4.2.3.1), FAILED is always accepted. Feature words are accepted only between DRIVER and FEATURES_OK,
queue registers only between FEATURES_OK and DRIVER_OK and while the selected queue is not ready (§4.2.2.2). At
DRIVER_OK the ready queues are validated; a bad one, or any later `QueueError` from the device, sets
DEVICE_NEEDS_RESET with a configuration change interrupt (§2.1.2), and the device touches no queue until reset.

Interrupts are edges on an ISA IRQ (an `IrqLine` pulse, or a KVM irqfd), as Firecracker wires virtio-mmio. An
edge cannot be "lost" by this protocol: the device sets the InterruptStatus bit, after publishing the used
elements, and then sends an edge, every time; Linux's handler (vm_interrupt) reads InterruptStatus, writes the
same bits to InterruptACK, and only then walks the used rings. Work the device completes before the ACK is
found by that walk; work completed after it comes with a new edge that arrives after the handler has begun, so
the interrupt controller latches it and delivers it again after EOI. Nothing needs the line to stay high, which
is what a level-triggered line (and KVM's irqfd resampling) would add.

All state changes happen under one lock: register accesses come from vCPU threads, notifications and host input
from the KVM device event loop (or, on the software backend, the one run thread). The transport calls the device
with the lock held, and no exception from the device escapes: a device bug is reported like a driver error.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

from popek.devices import state as st
from popek.devices.irq import Pulse
from popek.devices.virtio.device import (
    INT_CONFIG,
    INT_VRING,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceStatus,
    VirtioDevice,
)
from popek.devices.virtio.queue import Queue, QueueError
from popek.errors import GuestMemoryError
from popek.memory import GuestMemory
from popek.snapshot import SnapshotError

MMIO_WINDOW = 0x1000
MAGIC_VALUE = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = int.from_bytes(b"popk", "little")
CONFIG_OFFSET = 0x100

# register offsets (§4.2.2)
MAGIC = 0x000
VERSION_REG = 0x004
DEVICE_ID = 0x008
VENDOR = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC

_QUEUE_ADDRESS = {
    QUEUE_DESC_LOW: ("desc_table", 0),
    QUEUE_DESC_HIGH: ("desc_table", 32),
    QUEUE_DRIVER_LOW: ("avail_ring", 0),
    QUEUE_DRIVER_HIGH: ("avail_ring", 32),
    QUEUE_DEVICE_LOW: ("used_ring", 0),
    QUEUE_DEVICE_HIGH: ("used_ring", 32),
}
_S = DeviceStatus
_ALL_STATUS = functools.reduce(lambda a, b: a | b, (int(s) for s in DeviceStatus))
MAX_ERROR = 4096  # a saved DEVICE_NEEDS_RESET reason longer than this was not written by popek
# each status bit and the bits that must already be set when the driver sets it (§3.1.1)
_PREREQUISITES = {
    _S.ACKNOWLEDGE: _S(0),
    _S.DRIVER: _S.ACKNOWLEDGE,
    _S.FEATURES_OK: _S.ACKNOWLEDGE | _S.DRIVER,
    _S.DRIVER_OK: _S.ACKNOWLEDGE | _S.DRIVER | _S.FEATURES_OK,
}


class MmioTransport:
    """One virtio device behind a virtio-mmio register block (a bus `Device`: `read` / `write` at an offset)."""

    def __init__(self, device: VirtioDevice, mem: GuestMemory, interrupt: Pulse) -> None:
        self.device = device
        self.mem = mem
        self.interrupt = interrupt
        self.lock = threading.RLock()
        device.bind(self._signal, self._config_changed)
        self.config_generation = 0
        # statistics
        self.notifies = [0] * len(device.queues)
        self.ignored_notifies = 0
        self.notify_exits = 0  # notifications that came as register writes (not through a KVM ioeventfd)
        self.bad_accesses = 0
        self.refused_status = 0
        self.interrupts = 0
        self.resets_needed = 0  # how often the device went into DEVICE_NEEDS_RESET, and the last reason
        self.last_error: str | None = None
        self._clear()

    def _clear(self) -> None:
        self.status = DeviceStatus(0)
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.shm_sel = 0
        self.interrupt_status = 0
        self.error: str | None = None  # why the device needs a reset

    # --- the bus interface ---

    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            if offset >= CONFIG_OFFSET:
                config = self.device.config_bytes()
                start = offset - CONFIG_OFFSET
                return config[start : start + size].ljust(size, b"\0")
            if size != 4 or offset % 4:
                self.bad_accesses += 1
                return bytes(size)
            return (self._read_register(offset) & 0xFFFFFFFF).to_bytes(4, "little")

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            if offset >= CONFIG_OFFSET:
                self._contained(lambda: self.device.write_config(offset - CONFIG_OFFSET, bytes(data)))
                return
            if len(data) != 4 or offset % 4:
                self.bad_accesses += 1
                return
            self._write_register(offset, int.from_bytes(data, "little"))

    # --- registers ---

    def _selected_queue_field(self, name: str) -> int:
        if self.queue_sel < len(self.device.queues):
            return int(getattr(self.device.queues[self.queue_sel], name))
        return 0

    def _read_register(self, offset: int) -> int:
        if offset == MAGIC:
            return MAGIC_VALUE
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return int(self.device.device_id)
        if offset == VENDOR:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            sel = self.device_features_sel
            return self.device.device_features() >> (32 * sel) if sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            return self._selected_queue_field("max_size")
        if offset == QUEUE_READY:
            return self._selected_queue_field("ready")
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return int(self.status)
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFFFFFF  # no shared memory regions: length -1, base all ones (§4.2.2)
        if offset == CONFIG_GENERATION:
            return self.config_generation
        return 0  # write-only and reserved registers read as zero (QueueReset: VIRTIO_F_RING_RESET not offered)

    def _write_register(self, offset: int, value: int) -> None:
        status = self.status
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            if status & _S.DRIVER and not status & (_S.FEATURES_OK | _S.FAILED) and self.driver_features_sel < 2:
                shift = 32 * self.driver_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
            else:
                self.bad_accesses += 1
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset in (QUEUE_NUM, QUEUE_READY, *_QUEUE_ADDRESS):
            self._write_queue_register(offset, value)
        elif offset == QUEUE_NOTIFY:
            self.notify_exits += 1
            self.notify(value)
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif offset == STATUS:
            self._write_status(value)
        elif offset == SHM_SEL:
            self.shm_sel = value
        else:
            self.bad_accesses += 1  # read-only, reserved, or legacy (GuestPageSize, QueueAlign, QueuePFN)

    def _write_queue_register(self, offset: int, value: int) -> None:
        status = self.status
        configurable = status & _S.FEATURES_OK and not status & (_S.DRIVER_OK | _S.FAILED | _S.DEVICE_NEEDS_RESET)
        if not configurable or self.queue_sel >= len(self.device.queues):
            self.bad_accesses += 1
            return
        queue = self.device.queues[self.queue_sel]
        if offset == QUEUE_READY:
            queue.ready = bool(value & 1)
        elif queue.ready:
            self.bad_accesses += 1  # §4.2.2.2: not while QueueReady is set
        elif offset == QUEUE_NUM:
            queue.size = value
        else:
            name, shift = _QUEUE_ADDRESS[offset]
            old = int(getattr(queue, name))
            setattr(queue, name, (old & ~(0xFFFFFFFF << shift)) | (value << shift))

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old = self.status
        new = _S(value & 0xFF) & ~_S.DEVICE_NEEDS_RESET | (old & _S.DEVICE_NEEDS_RESET)
        if old & ~new:
            self.refused_status += 1  # the driver MUST NOT clear a bit (only a reset does)
            return
        added = new & ~old
        if added & _S.FAILED:
            self.status = old | _S.FAILED  # the driver gave up on the device
            return
        for bit, needed in _PREREQUISITES.items():
            if added & bit and (new & needed) != needed:
                self.refused_status += 1
                return
        if added & ~(_S.ACKNOWLEDGE | _S.DRIVER | _S.FEATURES_OK | _S.DRIVER_OK):
            self.refused_status += 1  # reserved bits
            return
        if added & _S.FEATURES_OK and not self._features_acceptable():
            self.refused_status += 1
            self.status = new & ~(_S.FEATURES_OK | _S.DRIVER_OK)  # the driver re-reads Status and sees no FEATURES_OK
            return
        self.status = new
        if added & _S.DRIVER_OK:
            self._activate()

    def _features_acceptable(self) -> bool:
        """§2.2.1 / §3.1.1 step 5: the driver accepted a subset of the offered features, including VERSION_1."""
        offered = self.device.device_features()
        return not self.driver_features & ~offered and bool(self.driver_features & VIRTIO_F_VERSION_1)

    def _activate(self) -> None:
        features = self.driver_features
        for queue in self.device.queues:
            queue.indirect = bool(features & VIRTIO_F_INDIRECT_DESC)
            queue.event_idx = bool(features & VIRTIO_F_EVENT_IDX)
        try:
            for index, queue in enumerate(self.device.queues):
                if queue.ready:
                    try:
                        queue.validate(self.mem)
                    except QueueError as e:
                        raise QueueError(f"queue {index}: {e}") from None
        except QueueError as e:
            self._needs_reset(str(e))
            return
        self._contained(lambda: self.device.activate(self.mem, features))
        # a driver may have notified before DRIVER_OK (the notification was dropped then): look at every queue once
        for index, queue in enumerate(self.device.queues):
            if queue.ready and self.device.active and not self.status & _S.DEVICE_NEEDS_RESET:
                self._contained(functools.partial(self.device.process_queue, index))

    # --- what the device and the backends call ---

    def notify(self, index: int) -> None:
        """An available buffer notification for queue `index` (QueueNotify, or its KVM ioeventfd)."""
        with self.lock:
            queues = self.device.queues
            if index < len(queues):
                self.notifies[index] += 1
            if (
                index >= len(queues)
                or not queues[index].ready
                or not self.device.active
                or self.status & (_S.DEVICE_NEEDS_RESET | _S.FAILED)
            ):
                self.ignored_notifies += 1
                return
            self._contained(lambda: self.device.process_queue(index))

    def run_device(self, event: Callable[[], object]) -> None:
        """Run a host-side event of the device (`event()`: console input arriving, for one) under the lock, with the
        device's errors contained as for a notification."""
        with self.lock:
            if self.status & (_S.DEVICE_NEEDS_RESET | _S.FAILED):
                return
            self._contained(event)

    def after_restore(self) -> None:
        """Once the machine is restored, before it runs: the device's own step (`VirtioDevice.on_restored`), then
        every ready queue served once, as for a notification, because one the old VM's device had not served yet
        (its ioeventfd count is not in a snapshot) would otherwise leave a driver waiting for ever. Serving a
        queue with nothing new in it changes nothing (§2.7.13: the device takes what is past its last index)."""
        with self.lock:
            if not self.device.active or self.status & (_S.DEVICE_NEEDS_RESET | _S.FAILED):
                return
            self._contained(self.device.on_restored)
            for index, queue in enumerate(self.device.queues):
                if queue.ready and not self.status & _S.DEVICE_NEEDS_RESET:
                    self._contained(functools.partial(self.device.process_queue, index))

    def reset(self) -> None:
        """Status 0 (§4.2.3.1): InterruptStatus and every QueueReady cleared, features forgotten."""
        with self.lock:
            self._clear()
            self._contained(self.device.reset)
            self.error = None

    def _contained(self, action: Callable[[], object]) -> None:
        try:
            action()
        except (QueueError, GuestMemoryError) as e:
            self._needs_reset(str(e))
        except Exception as e:  # a device bug: the guest sees a broken device, the VM goes on, --stats says why
            self._needs_reset(f"device error: {type(e).__name__}: {e}")

    def _needs_reset(self, reason: str) -> None:
        if self.status & _S.DEVICE_NEEDS_RESET:
            return
        self.error = self.last_error = reason
        self.resets_needed += 1
        self.status |= _S.DEVICE_NEEDS_RESET
        try:
            self.device.on_needs_reset()  # host fds paused: run_device will not run their events now
        except Exception as e:  # a device bug here must not hide the error that broke it
            self.last_error = f"{reason}; then, pausing its host fds: {type(e).__name__}: {e}"
        if self.status & _S.DRIVER_OK:
            self._signal(INT_CONFIG)  # §2.1.2: a configuration change notification tells the driver

    def _signal(self, bits: int) -> None:
        self.interrupt_status |= bits
        self.interrupts += 1
        self.interrupt.pulse()

    def _config_changed(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        if self.status & _S.DRIVER_OK:
            self._signal(INT_CONFIG)

    # --- reporting and snapshots ---

    def stats(self) -> str:
        with self.lock:
            queues = " ".join(
                f"q{i}[notifies={self.notifies[i]} chains={q.chains} irqs={q.interrupts} suppressed={q.suppressed}]"
                for i, q in enumerate(self.device.queues)
            )
            parts = [f"status={int(self.status):#x}", queues, f"notify-exits={self.notify_exits}"]
            if extra := self.device.stats():
                parts.append(extra)
            if self.ignored_notifies or self.bad_accesses or self.refused_status:
                parts.append(
                    f"ignored: notifies={self.ignored_notifies} accesses={self.bad_accesses} "
                    f"status={self.refused_status}"
                )
            if self.error is not None:
                parts.append(f"NEEDS RESET: {self.error}")
            elif self.last_error is not None:
                parts.append(f"needed a reset {self.resets_needed} time(s), last: {self.last_error}")
            return " ".join(parts)

    def state(self) -> dict[str, Any]:
        with self.lock:
            return {
                "status": int(self.status), "device_features_sel": self.device_features_sel,
                "driver_features_sel": self.driver_features_sel, "driver_features": self.driver_features,
                "queue_sel": self.queue_sel, "shm_sel": self.shm_sel, "interrupt_status": self.interrupt_status,
                "config_generation": self.config_generation, "error": self.error,
                "acked_features": self.device.acked_features, "active": self.device.active,
                "queues": [q.state() for q in self.device.queues], "device": self.device.state(),
            }  # fmt: skip

    def restore(self, state: dict[str, Any]) -> None:
        """The inverse of `state`, for a transport that has not run. Everything is checked before anything
        changes (a snapshot is hostile input: popek.snapshot): the registers against their widths, every queue,
        and a live device's queues against guest RAM as DRIVER_OK checks them (§4.2.3.1.1); the device's own
        part is the device's to check."""
        what = f"virtio-mmio {self.device.name}"
        queues = len(self.device.queues)
        values = st.load(state, {
            "status": st.masked(_ALL_STATUS), "device_features_sel": st.uint(32), "driver_features_sel": st.uint(32),
            "driver_features": st.uint(64), "queue_sel": st.uint(32), "shm_sel": st.uint(32),
            "interrupt_status": st.masked(INT_VRING | INT_CONFIG),
            "config_generation": st.uint(32), "error": st.optional(st.text(MAX_ERROR)),
            "acked_features": st.uint(64), "active": st.boolean,
            "queues": st.list_of(st.anything, length=queues), "device": st.anything,
        }, what)  # fmt: skip
        saved = [q.load_state(s, f"{what} queue {i}") for i, (q, s) in enumerate(zip(self.device.queues,
                                                                                  values["queues"], strict=True))]
        if values["active"]:
            if not values["status"] & DeviceStatus.DRIVER_OK:
                raise SnapshotError(f"{what}: active without DRIVER_OK in its status {values['status']:#x}")
            offered = self.device.device_features()
            if values["acked_features"] & ~offered:
                raise SnapshotError(f"{what}: acked features {values['acked_features']:#x} beyond {offered:#x}")
            for i, fields in enumerate(saved):
                if not fields["ready"]:
                    continue
                probe = Queue(fields["max_size"])
                for name, value in fields.items():
                    setattr(probe, name, value)
                try:
                    probe.validate(self.mem)
                except QueueError as e:
                    raise SnapshotError(f"{what} queue {i}: {e}") from None
        with self.lock:
            self.status = DeviceStatus(values["status"])
            for name in ("device_features_sel", "driver_features_sel", "driver_features", "queue_sel", "shm_sel",
                         "interrupt_status", "config_generation", "error"):  # fmt: skip
                setattr(self, name, values[name])
            for queue, fields in zip(self.device.queues, saved, strict=True):
                for name, value in fields.items():
                    setattr(queue, name, value)
            self.device.acked_features = values["acked_features"]
            self.device.mem = self.mem if values["active"] else None
            self.device.restore(values["device"])
