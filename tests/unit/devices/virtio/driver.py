"""A minimal virtio-mmio driver for the tests: the §3.1.1 initialization sequence through the register block, split
rings laid out in guest memory, chains submitted and used elements read back, as Linux's virtio_mmio and
virtio_ring do it. Also `RecordingMemory`, a GuestMemory that checks and records every access a device makes."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from popek.devices.virtio import mmio
from popek.devices.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceStatus,
)
from popek.devices.virtio.mmio import MmioTransport
from popek.devices.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from popek.memory import GuestMemory

MEM_SIZE = 4 << 20
RING_BASE = 0x10000  # queue q's rings at RING_BASE + q * RING_STRIDE
RING_STRIDE = 0x10000
DATA_BASE = 0x100000


class RecordingMemory(GuestMemory):
    """Guest memory that records (kind, gpa, size) of every access and asserts each lies inside guest RAM."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.accesses: list[tuple[str, int, int]] = []

    def _record(self, kind: str, gpa: int, size: int) -> None:
        assert self.contains(gpa, size) or size == 0, f"{kind} outside guest RAM: {gpa:#x}+{size:#x}"
        self.accesses.append((kind, gpa, size))

    def read(self, gpa: int, size: int) -> bytes:
        data = super().read(gpa, size)  # raises GuestMemoryError outside RAM, before any host access
        self._record("read", gpa, size)
        return data

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        super().write(gpa, data)
        self._record("write", gpa, len(data))

    def view(self, gpa: int, size: int) -> memoryview:
        view = super().view(gpa, size)
        self._record("view", gpa, size)
        return view


class Irq:
    """An edge-triggered line that counts its pulses."""

    def __init__(self) -> None:
        self.pulses = 0

    def pulse(self) -> None:
        self.pulses += 1


@dataclass
class DriverQueue:
    index: int
    size: int
    desc: int
    avail: int
    used: int
    free: list[int] = field(default_factory=list)
    avail_idx: int = 0
    last_used: int = 0


class Driver:
    """Programs one transport the way a guest driver would, with buffers from a bump allocator."""

    def __init__(self, transport: MmioTransport, mem: GuestMemory) -> None:
        self.t = transport
        self.mem = mem
        self.queues: dict[int, DriverQueue] = {}
        self._next_data = DATA_BASE

    # --- registers ---

    def reg(self, offset: int) -> int:
        return int.from_bytes(self.t.read(offset, 4), "little")

    def set(self, offset: int, value: int) -> None:
        self.t.write(offset, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    @property
    def status(self) -> DeviceStatus:
        return DeviceStatus(self.reg(mmio.STATUS))

    def device_features(self) -> int:
        self.set(mmio.DEVICE_FEATURES_SEL, 0)
        low = self.reg(mmio.DEVICE_FEATURES)
        self.set(mmio.DEVICE_FEATURES_SEL, 1)
        return low | self.reg(mmio.DEVICE_FEATURES) << 32

    def write_features(self, features: int) -> None:
        for sel in (0, 1):
            self.set(mmio.DRIVER_FEATURES_SEL, sel)
            self.set(mmio.DRIVER_FEATURES, features >> (32 * sel))

    def add_status(self, bits: DeviceStatus) -> None:
        self.set(mmio.STATUS, int(self.status | bits))

    def init(self, features: int | None = None, queues: int | None = None, size: int | None = None) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, features (all offered, by default), FEATURES_OK, queues, DRIVER_OK."""
        self.set(mmio.STATUS, 0)
        self.add_status(DeviceStatus.ACKNOWLEDGE)
        self.add_status(DeviceStatus.DRIVER)
        offered = self.device_features()
        chosen = offered if features is None else features
        self.write_features(chosen)
        self.add_status(DeviceStatus.FEATURES_OK)
        assert self.status & DeviceStatus.FEATURES_OK, "the device refused the features"
        for q in range(len(self.t.device.queues) if queues is None else queues):
            self.setup_queue(q, size)
        self.add_status(DeviceStatus.DRIVER_OK)
        return chosen

    def setup_queue(self, index: int, size: int | None = None) -> DriverQueue:
        self.set(mmio.QUEUE_SEL, index)
        assert self.reg(mmio.QUEUE_READY) == 0
        size = size or self.reg(mmio.QUEUE_NUM_MAX)
        base = RING_BASE + index * RING_STRIDE
        q = DriverQueue(index, size, base, base + 0x4000, base + 0x8000, free=list(range(size)))
        for addr, length in ((q.desc, 16 * size), (q.avail, 6 + 2 * size), (q.used, 6 + 8 * size)):
            self.mem.fill(addr, length, 0)
        self.set(mmio.QUEUE_NUM, size)
        for low, addr in (
            (mmio.QUEUE_DESC_LOW, q.desc),
            (mmio.QUEUE_DRIVER_LOW, q.avail),
            (mmio.QUEUE_DEVICE_LOW, q.used),
        ):
            self.set(low, addr)
            self.set(low + 4, addr >> 32)
        self.set(mmio.QUEUE_READY, 1)
        self.queues[index] = q
        return q

    # --- buffers ---

    def alloc(self, size: int, data: bytes = b"") -> int:
        addr = self._next_data
        self._next_data += (max(size, 1) + 15) // 16 * 16
        assert self._next_data < self.mem.size
        self.mem.write(addr, data.ljust(size, b"\0")[:size] if size else b"")
        return addr

    def write_desc(self, table: int, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(table + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def submit(
        self, index: int, readable: list[bytes], writable: list[int], indirect: bool = False
    ) -> tuple[int, list[int]]:
        """Make a chain available: the readable buffers' bytes, then writable buffers of the given sizes.
        Returns the head and the writable buffers' addresses. Does not notify."""
        q = self.queues[index]
        parts = [(self.alloc(len(b), b), len(b), 0) for b in readable]
        outs = [self.alloc(n) for n in writable]
        parts += [(addr, n, VIRTQ_DESC_F_WRITE) for addr, n in zip(outs, writable)]
        if indirect:
            table = self.alloc(16 * len(parts))
            for i, (addr, n, flags) in enumerate(parts):
                more = VIRTQ_DESC_F_NEXT if i + 1 < len(parts) else 0
                self.write_desc(table, i, addr, n, flags | more, i + 1 if more else 0)
            head = q.free.pop(0)
            self.write_desc(q.desc, head, table, 16 * len(parts), VIRTQ_DESC_F_INDIRECT, 0)
        else:
            slots = [q.free.pop(0) for _ in parts]
            for i, ((addr, n, flags), slot) in enumerate(zip(parts, slots)):
                more = VIRTQ_DESC_F_NEXT if i + 1 < len(parts) else 0
                self.write_desc(q.desc, slot, addr, n, flags | more, slots[i + 1] if more else 0)
            head = slots[0]
        self.publish(index, head)
        return head, outs

    def publish(self, index: int, head: int) -> None:
        q = self.queues[index]
        self.mem.write_u16(q.avail + 4 + 2 * (q.avail_idx % q.size), head)
        q.avail_idx = (q.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(q.avail + 2, q.avail_idx)

    def kick(self, index: int) -> None:
        self.set(mmio.QUEUE_NOTIFY, index)

    def take_used(self, index: int) -> list[tuple[int, int]]:
        """The used elements published since the last call, (head, length)."""
        q = self.queues[index]
        used_idx = self.mem.read_u16(q.used + 2)
        out = []
        while q.last_used != used_idx:
            slot = q.last_used % q.size
            out.append(struct.unpack("<II", self.mem.read(q.used + 4 + 8 * slot, 8)))
            q.last_used = (q.last_used + 1) & 0xFFFF
        return out

    def ack(self) -> int:
        status = self.reg(mmio.INTERRUPT_STATUS)
        self.set(mmio.INTERRUPT_ACK, status)
        return status


ALL_RING_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX
