"""The guest's physical memory map, in the e820 form every x86 boot protocol passes on (ACPI spec §15)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from popek.boot import layout
from popek.memory import GuestMemory

E820_RAM = 1
E820_RESERVED = 2


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int

    def pack(self) -> bytes:
        return struct.pack("<QQI", self.addr, self.size, self.type)


def memory_map(mem: GuestMemory) -> list[E820Entry]:
    """Usable RAM minus the EBDA (where the MP table is), the legacy VGA/ROM hole, the ACPI tables' range and the
    BIOS area above it."""
    entries = [
        E820Entry(0, layout.EBDA_ADDR, E820_RAM),
        E820Entry(layout.EBDA_ADDR, layout.EBDA_END - layout.EBDA_ADDR, E820_RESERVED),
        E820Entry(layout.ACPI_ADDR, layout.ACPI_END - layout.ACPI_ADDR, E820_RESERVED),
        E820Entry(layout.ACPI_END, layout.BIOS_AREA_END - layout.ACPI_END, E820_RESERVED),
    ]
    for region in mem:
        start = max(region.gpa, layout.HIGH_MEMORY)
        if region.end > start:
            entries.append(E820Entry(start, region.end - start, E820_RAM))
    return entries
