"""virtio-rng, the entropy device (virtio 1.2 §5.4): one request queue of device-writable buffers, each filled with
bytes from the host's os.urandom (the kernel CSPRNG), at most MAX_REQUEST bytes per buffer (§5.4.6.1: the device
MAY fill fewer bytes than the buffer holds; the used length says how many). No feature bits, no configuration.

On `--accel soft` the bytes are an outside input, like console input: a guest that feeds them to the kernel's
entropy pool behaves the same, but a run that prints them is no longer reproducible."""

from __future__ import annotations

import os
from typing import ClassVar

from popek.devices.virtio.device import DeviceId, VirtioDevice
from popek.devices.virtio.queue import ChainWriter, DescriptorChain

QUEUE_SIZE = 256
MAX_REQUEST = 64 << 10


class EntropyDevice(VirtioDevice):
    device_id: ClassVar[DeviceId] = DeviceId.ENTROPY

    def __init__(self, name: str = "virtio-rng") -> None:
        super().__init__(name, [QUEUE_SIZE])
        self.bytes_given = 0
        self.requests = 0

    def process_queue(self, index: int) -> None:
        self.serve(index, self._fill)

    def _fill(self, chain: DescriptorChain) -> int:
        assert self.mem is not None
        writer = ChainWriter(self.mem, chain.writable)
        written = writer.write(os.urandom(min(writer.remaining, MAX_REQUEST)))
        self.requests += 1
        self.bytes_given += written
        return written

    def stats(self) -> str:
        return f"requests={self.requests} bytes={self.bytes_given}"
