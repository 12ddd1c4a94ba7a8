from __future__ import annotations

import pytest

from popek.bus import STATS_KEYS, BoundedCounter, Bus
from popek.errors import ConfigError


class Recorder:
    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        return bytes([offset]) * size

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


def test_device_sees_offsets_into_its_own_range() -> None:
    bus, dev = Bus("port"), Recorder()
    bus.insert(0x3F8, 8, dev, "uart")
    bus.write(0x3FB, b"\x80")
    assert dev.writes == [(3, b"\x80")]
    assert bus.read(0x3FD, 1) == b"\x05"


def test_overlapping_ranges_are_refused() -> None:
    bus = Bus("mmio")
    bus.insert(0x1000, 0x100, Recorder(), "a")
    with pytest.raises(ConfigError, match="overlaps a"):
        bus.insert(0x10F0, 0x20, Recorder(), "b")
    with pytest.raises(ConfigError):
        bus.insert(0x0FF0, 0x20, Recorder(), "c")
    bus.insert(0x1100, 0x10, Recorder(), "adjacent")


def test_unclaimed_access_is_counted_and_reads_as_open_bus() -> None:
    bus = Bus("port")
    assert bus.read(0x510, 2) == b"\xff\xff"
    bus.write(0x510, b"\x01")
    assert bus.unclaimed[0x510] == 2
    assert bus.counts[0x510] == 2


def test_access_straddling_the_end_of_a_range_is_unclaimed() -> None:
    bus, dev = Bus("mmio"), Recorder()
    bus.insert(0x1000, 4, dev, "reg")
    assert bus.read(0x1002, 4) == b"\xff" * 4
    assert dev.writes == []


def test_counts_are_kept_per_granule() -> None:
    bus = Bus("mmio", granule=4096)
    bus.read(0xD0000004, 4)
    bus.read(0xD0000FFC, 4)
    assert bus.counts[0xD0000000] == 2


def test_a_guest_touching_a_million_pages_makes_popek_keep_a_bounded_number_of_counters() -> None:
    mmio = Bus("mmio", 4096)
    mmio.insert(0, 4096, Recorder(), "dev")
    for page in range(1_000_000):
        mmio.read(page * 4096, 4)
    assert len(mmio.counts) == STATS_KEYS and len(mmio.unclaimed) == STATS_KEYS
    assert mmio.counts[0] == 1  # the first pages seen keep their own counters
    assert mmio.counts.other == 1_000_000 - STATS_KEYS
    assert mmio.counts.total_count() == 1_000_000 and mmio.unclaimed.total_count() == 999_999


def test_bounded_counter_adds_to_existing_keys_past_its_limit() -> None:
    c: BoundedCounter[str] = BoundedCounter(limit=2)
    c["a"] += 1
    c.update({"b": 2, "c": 3})
    c["a"] += 4
    c.update(["d", "a"])
    assert dict(c) == {"a": 6, "b": 2} and c.other == 4 and c.total_count() == 12
