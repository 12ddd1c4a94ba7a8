"""Every device type against garbage in its live queues: hypothesis writes descriptor tables, available rings and
indices into guest memory after a correct initialization, and the driver notifies. Each case must end in completed
requests, DEVICE_NEEDS_RESET, or nothing: no exception out of the transport, no access outside guest RAM (the
recording memory asserts it), and guest accesses bounded by the queue size."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popek.devices.virtio.blk import BlockDevice, DiskImage, DiskSpec
from popek.devices.virtio.console import ConsoleDevice, ConsoleHost
from popek.devices.virtio.device import DeviceStatus, VirtioDevice
from popek.devices.virtio.mmio import MmioTransport
from popek.devices.virtio.net import NetDevice, StreamHost
from popek.devices.virtio.rng import EntropyDevice

from .driver import MEM_SIZE, Driver, Irq, RecordingMemory

QSIZE = 16
ADDRESSES = st.one_of(
    st.integers(0x100000, 0x100000 + 0x4000),  # the driver's data area: plausible buffers
    st.integers(0, MEM_SIZE + 0x1000),
    st.sampled_from([MEM_SIZE - 1, MEM_SIZE, 0xD000_0000, (1 << 64) - 8]),
)
DESCRIPTOR = st.tuples(
    ADDRESSES,
    st.one_of(st.integers(0, 600), st.sampled_from([16, 512, 513, 0xFFFF_FFFF])),
    st.integers(0, 7),
    st.one_of(st.integers(0, QSIZE + 1), st.integers(0, 0xFFFF)),
)


def blk(tmp: Path) -> VirtioDevice:
    path = tmp / "fuzz.img"
    if not path.exists():
        path.write_bytes(bytes(64 * 512))
    return BlockDevice(DiskImage(DiskSpec(path)))


def console(_tmp: Path) -> VirtioDevice:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    ours.sendall(b"input from the host")
    device = ConsoleDevice(ConsoleHost(theirs.detach(), True))
    device.pending += b"buffered input"
    device._fuzz_peer = ours  # type: ignore[attr-defined]  # keep the other end open for the test
    return device


def net(_tmp: Path) -> VirtioDevice:
    ours, theirs = socket.socketpair()
    frame = b"\xff" * 12 + b"\x08\x00" + b"frame from the host"
    ours.sendall(struct.pack(">I", len(frame)) + frame)
    device = NetDevice(StreamHost(theirs), bytes.fromhex("525400000001"))
    device._fuzz_peer = ours  # type: ignore[attr-defined]  # keep the other end open for the test
    return device


FACTORIES: dict[str, Callable[[Path], VirtioDevice]] = {
    "blk": blk,
    "rng": lambda _t: EntropyDevice(),
    "console": console,
    "net": net,
}


@pytest.mark.parametrize("kind", sorted(FACTORIES))
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    table=st.lists(DESCRIPTOR, min_size=QSIZE, max_size=QSIZE),
    heads=st.lists(st.one_of(st.integers(0, QSIZE - 1), st.integers(0, 0xFFFF)), min_size=QSIZE, max_size=QSIZE),
    avail_idx=st.one_of(st.integers(0, QSIZE + 1), st.integers(0, 0xFFFF)),
    event_idx=st.booleans(),
    queue=st.integers(0, 1),
)
def test_garbage_in_a_live_queue_never_escapes_the_device(
    tmp_path: Path,
    kind: str,
    table: list[tuple[int, int, int, int]],
    heads: list[int],
    avail_idx: int,
    event_idx: bool,
    queue: int,
) -> None:
    device = FACTORIES[kind](tmp_path)
    with RecordingMemory(MEM_SIZE) as mem:
        try:
            drv = Driver(MmioTransport(device, mem, Irq()), mem)
            offered = drv.device_features()
            drv.init(features=offered if event_idx else offered & ~(1 << 29), size=QSIZE)
            q = drv.queues[queue % len(device.queues)]
            for i, (addr, length, flags, nxt) in enumerate(table):
                mem.write(q.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))
            for i, head in enumerate(heads):
                mem.write_u16(q.avail + 4 + 2 * i, head)
            mem.write_u16(q.avail + 2, avail_idx)
            mem.accesses.clear()
            drv.kick(q.index)
            if isinstance(device, ConsoleDevice):
                drv.t.run_device(device.on_host_input)  # host input arriving, as the backends deliver it
            if isinstance(device, NetDevice):
                drv.t.run_device(device.on_host_readable)
            used = drv.take_used(q.index)
            if drv.status & DeviceStatus.DEVICE_NEEDS_RESET:
                assert drv.t.error
            assert len(used) <= QSIZE
            # per chain: its ring entry, at most QSIZE descriptors, and the buffers' views; plus ring bookkeeping
            assert len(mem.accesses) <= 16 + QSIZE * (3 + 3 * QSIZE)
        finally:
            device.close()
