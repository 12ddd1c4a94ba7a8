"""Port-I/O and MMIO buses: address ranges → devices, shared by every backend.

As in Firecracker's `Bus`: a device sees only the offset into its own range; inserting an overlapping range is
an error; an access no device claims is counted and answered as an open bus (reads all ones, writes dropped),
never fatal — guests probe for hardware that is not there.

Statistics a guest drives (addresses it touches, instructions it makes popek complete) are `BoundedCounter`s:
a guest touching a million distinct pages makes popek keep STATS_KEYS counters and one "other", not a million.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass
from typing import Protocol, TypeVar

from popek.errors import ConfigError

K = TypeVar("K")
STATS_KEYS = 1024  # distinct keys a guest-driven statistic keeps; --stats prints one line per key


class BoundedCounter(Counter[K]):
    """A Counter that keeps at most `limit` distinct keys: counts for any further key go to `other`."""

    def __init__(self, limit: int = STATS_KEYS) -> None:
        super().__init__()
        self.limit = limit
        self.other = 0

    def __setitem__(self, key: K, value: int) -> None:
        if key in self or len(self) < self.limit:
            super().__setitem__(key, value)
        else:  # a new key: `value` is the increment (a missing key counts 0)
            self.other += value

    def total_count(self) -> int:
        return sum(self.values()) + self.other


class Device(Protocol):
    """What a bus calls: `read` returns exactly `size` bytes; `write` gets the bytes the guest wrote."""

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


@dataclass(frozen=True)
class Window:
    """Part of a device's register block placed at its own address, for devices whose ports are not contiguous
    (the i8042's 0x60 and 0x64 straddle port 0x61, which belongs to the PIT's system control port)."""

    device: Device
    offset: int

    def read(self, offset: int, size: int) -> bytes:
        return self.device.read(self.offset + offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.device.write(self.offset + offset, data)


@dataclass(frozen=True)
class Range:
    base: int
    size: int
    device: Device
    name: str

    @property
    def end(self) -> int:
        return self.base + self.size


class Bus:
    """One address space (ports or MMIO), with per-address access counts for `--stats`."""

    def __init__(self, kind: str, granule: int = 1) -> None:
        self.kind = kind
        self.granule = granule  # counts are kept per `granule` (a page for MMIO, a port for PIO)
        self._bases: list[int] = []
        self._ranges: list[Range] = []
        self.counts: BoundedCounter[int] = BoundedCounter()
        self.unclaimed: BoundedCounter[int] = BoundedCounter()

    def insert(self, base: int, size: int, device: Device, name: str) -> None:
        if size <= 0:
            raise ConfigError(f"{self.kind} range for {name} must have a positive size")
        i = bisect.bisect_right(self._bases, base)
        before = self._ranges[i - 1] if i else None
        after = self._ranges[i] if i < len(self._ranges) else None
        for other in (before, after):
            if other and base < other.end and other.base < base + size:
                raise ConfigError(
                    f"{self.kind} range {base:#x}+{size:#x} for {name} overlaps "
                    f"{other.name} at {other.base:#x}+{other.size:#x}"
                )
        self._bases.insert(i, base)
        self._ranges.insert(i, Range(base, size, device, name))

    def ranges(self) -> list[Range]:
        return list(self._ranges)

    def find(self, addr: int) -> Range | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            r = self._ranges[i]
            if addr < r.end:
                return r
        return None

    def read(self, addr: int, size: int) -> bytes:
        self.counts[addr - addr % self.granule] += 1
        r = self.find(addr)
        if r is None or addr + size > r.end:
            self.unclaimed[addr - addr % self.granule] += 1
            return b"\xff" * size
        data = r.device.read(addr - r.base, size)
        if len(data) != size:  # a device bug must not desynchronise the guest's access
            data = (bytes(data) + b"\xff" * size)[:size]
        return data

    def write(self, addr: int, data: bytes) -> None:
        self.counts[addr - addr % self.granule] += 1
        r = self.find(addr)
        if r is None or addr + len(data) > r.end:
            self.unclaimed[addr - addr % self.granule] += 1
            return
        r.device.write(addr - r.base, data)

    def name_of(self, addr: int) -> str:
        r = self.find(addr)
        return r.name if r else "unclaimed"
