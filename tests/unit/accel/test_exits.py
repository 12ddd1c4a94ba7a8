"""`handle_exit` is the one place where every backend's port and MMIO exits meet the buses: it must route each
kind of exit to the right bus at the right address and hand a read's bytes back unchanged."""

from __future__ import annotations

from popek.accel.exits import MmioRead, MmioWrite, PioIn, PioOut, handle_exit
from popek.bus import Bus


class Registers:
    """A device with a byte array behind it, so a write can be read back through the same bus."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset : offset + size])

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data


def buses() -> tuple[Bus, Bus, Registers, Registers]:
    pio, mmio = Bus("port"), Bus("mmio", 4096)
    port_dev, mmio_dev = Registers(8), Registers(0x1000)
    pio.insert(0x3F8, 8, port_dev, "uart")
    mmio.insert(0xD000_0000, 0x1000, mmio_dev, "virtio")
    return pio, mmio, port_dev, mmio_dev


def test_port_write_reaches_the_port_device_at_its_offset_and_not_the_mmio_bus() -> None:
    pio, mmio, port_dev, mmio_dev = buses()
    assert handle_exit(PioOut(0x3F9, b"\x5a"), pio, mmio) is None
    assert port_dev.data[1] == 0x5A
    assert not any(mmio_dev.data) and not mmio.counts


def test_port_read_returns_the_device_bytes() -> None:
    pio, mmio, port_dev, _ = buses()
    port_dev.data[2:4] = b"\x12\x34"
    assert handle_exit(PioIn(0x3FA, 2), pio, mmio) == b"\x12\x34"
    assert pio.counts[0x3FA] == 1


def test_mmio_write_then_read_round_trips_through_the_mmio_bus() -> None:
    pio, mmio, _, mmio_dev = buses()
    handle_exit(MmioWrite(0xD000_0010, b"\x01\x02\x03\x04"), pio, mmio)
    assert mmio_dev.data[0x10:0x14] == b"\x01\x02\x03\x04"
    assert handle_exit(MmioRead(0xD000_0010, 4), pio, mmio) == b"\x01\x02\x03\x04"
    assert mmio.counts[0xD000_0000] == 2 and not pio.counts


def test_exits_nobody_claims_read_as_open_bus_and_are_counted() -> None:
    pio, mmio, _, _ = buses()
    assert handle_exit(PioIn(0x510, 4), pio, mmio) == b"\xff" * 4
    assert handle_exit(MmioRead(0xFEE0_0000, 8), pio, mmio) == b"\xff" * 8
    handle_exit(PioOut(0x511, b"\x00"), pio, mmio)
    assert sum(pio.unclaimed.values()) == 2 and sum(mmio.unclaimed.values()) == 1
