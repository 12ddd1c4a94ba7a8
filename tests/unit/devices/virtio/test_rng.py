"""virtio-rng (virtio 1.2 §5.4): buffers come back filled, at most MAX_REQUEST bytes each."""

from __future__ import annotations

from popek.devices.virtio import rng
from popek.devices.virtio.mmio import MmioTransport
from popek.devices.virtio.rng import EntropyDevice

from .driver import MEM_SIZE, Driver, Irq, RecordingMemory


def test_buffers_are_filled_with_host_entropy_and_bounded_per_request() -> None:
    with RecordingMemory(MEM_SIZE) as mem:
        drv = Driver(MmioTransport(EntropyDevice(), mem, Irq()), mem)
        features = drv.init()
        assert features == drv.device_features()  # nothing device-specific: VERSION_1, INDIRECT, EVENT_IDX
        small, outs_small = drv.submit(0, [], [16, 16])
        big, outs_big = drv.submit(0, [], [rng.MAX_REQUEST + 4096])
        drv.kick(0)
        assert drv.take_used(0) == [(small, 32), (big, rng.MAX_REQUEST)]
        first = mem.read(outs_small[0], 16) + mem.read(outs_small[1], 16)
        assert first != bytes(32)  # 2^-256 of failing by chance
        assert mem.read(outs_big[0] + rng.MAX_REQUEST, 4096) == bytes(4096)  # nothing past the bound
        views = [a for a in mem.accesses if a[0] == "view"]
        assert sum(size for _, _, size in views) == 32 + rng.MAX_REQUEST
