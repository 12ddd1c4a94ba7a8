"""The guest memory one boot writes, claimed range by range before anything is written.

Every loader goes through a `BootPlan`: it starts with the areas its protocol writes (`layout.*_AREAS`), then
claims the kernel's segments, the command line and the initrd. A claim that leaves guest RAM or overlaps an
earlier one is a `BootError` naming both, so a kernel can load anywhere in RAM (below 1 MiB too, as QEMU's
-kernel allows) except where popek's own structures for that protocol go, and two segments of one file can
never overwrite each other (QEMU refuses overlapping ROM images the same way: hw/core/loader.c, "rom: requested
regions overlap"). The initrd is then placed as high as it may go around every claim.
"""

from __future__ import annotations

from collections.abc import Iterable

from popek.boot.layout import HIGH_MEMORY, Area
from popek.errors import BootError
from popek.memory import PAGE_SIZE, GuestMemory


def _span(start: int, end: int) -> str:
    return f"{start:#x}-{end:#x}"


class BootPlan:
    def __init__(self, mem: GuestMemory, protocol: str, areas: Iterable[Area]) -> None:
        self.mem = mem
        self.protocol = protocol
        self.claims: list[Area] = []
        self._popeks: set[Area] = set()  # the claims that are popek's own structures
        for area in areas:
            self.claim(area.start, area.size, area.what, popeks=True)

    def _overlap(self, start: int, end: int) -> Area | None:
        for other in self.claims:
            if start < other.end and other.start < end:
                return other
        return None

    def claim(self, start: int, size: int, what: str, popeks: bool = False) -> None:
        """Reserve [start, start+size) for `what` (one of popek's own structures if `popeks`); BootError if it
        is not in guest RAM or is already taken."""
        if size <= 0:
            return
        end = start + size
        if start < 0 or not self.mem.contains(start, size):
            raise BootError(
                f"{self.protocol}: {what} at {_span(start, end)} is not in guest RAM "
                f"(RAM ends at {self.mem.low_top:#x} below 4 GiB; --mem?)"
            )
        area = Area(start, end, what)
        other = self._overlap(start, end)
        if other is not None:
            # name the kernel's part first and popek's second, whichever was claimed first
            theirs, ours = (other, area) if popeks else (area, other)
            mine = " that popek writes there" if popeks or other in self._popeks else ""
            raise BootError(
                f"{self.protocol}: {theirs.what} at {_span(theirs.start, theirs.end)} overlaps {ours.what} "
                f"at {_span(ours.start, ours.end)}{mine}"
            )
        self.claims.append(area)
        if popeks:
            self._popeks.add(area)

    def place_high(self, size: int, lowest: int, highest: int, what: str) -> int:
        """Claim `size` bytes, page-aligned, as high as possible below `highest` (exclusive) and at or above
        `lowest` and 1 MiB, in low RAM, around earlier claims; returns the address."""
        top = min(highest, self.mem.low_top)
        floor = max(lowest, HIGH_MEMORY)
        addr = (top - size) & ~(PAGE_SIZE - 1)
        while addr >= floor:
            other = self._overlap(addr, addr + size)
            if other is None:
                self.claims.append(Area(addr, addr + size, what))
                return addr
            addr = (other.start - size) & ~(PAGE_SIZE - 1)
        raise BootError(
            f"{what} ({size} bytes) does not fit in guest memory between {floor:#x} and {top:#x} "
            "beside the kernel: give the VM more memory (--mem)"
        )
