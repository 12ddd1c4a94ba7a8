"""The boot GDT, the identity page tables for 64-bit entry, and the segment state that matches them.

Selectors follow the Linux boot protocol's 64-bit entry (__BOOT_CS = 0x10, __BOOT_DS = 0x18); 0x08 is a flat
32-bit code segment for the 32-bit entries (PVH, Multiboot); 0x20 is a TSS, because VT-x refuses to enter a
guest whose TR is unusable.
"""

from __future__ import annotations

import struct

from popek.boot import layout
from popek.boot.entry import (
    CR0_ET,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    EntryState,
    Mode,
    descriptor,
    segment_from_descriptor,
)
from popek.memory import GuestMemory

CODE32_SEL, CODE64_SEL, DATA_SEL, TSS_SEL = 0x08, 0x10, 0x18, 0x20

GDT_ENTRIES = [
    0,
    descriptor(0, 0xFFFFF, 0x9B, 0xC),  # 0x08 code, 32-bit, 4 GiB
    descriptor(0, 0xFFFFF, 0x9B, 0xA),  # 0x10 code, 64-bit
    descriptor(0, 0xFFFFF, 0x93, 0xC),  # 0x18 data, 4 GiB
    descriptor(0, 0x67, 0x8B, 0x0),  # 0x20 busy 32-bit TSS
]


assert len(GDT_ENTRIES) * 8 <= layout.GDT.size, "the GDT outgrew its area in layout.py"


def write_gdt(mem: GuestMemory) -> tuple[int, int]:
    mem.write(layout.GDT_ADDR, struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES))
    return layout.GDT_ADDR, len(GDT_ENTRIES) * 8 - 1


def write_identity_page_tables(mem: GuestMemory) -> int:
    """Map the first 4 GiB 1:1 with 2 MiB pages; returns CR3."""
    mem.write(layout.PML4_ADDR, struct.pack("<Q", layout.PDPT_ADDR | 0x3) + bytes(4096 - 8))
    mem.write(
        layout.PDPT_ADDR, struct.pack("<4Q", *[(layout.PD_ADDR + i * 4096) | 0x3 for i in range(4)]) + bytes(4096 - 32)
    )
    pds = struct.pack("<2048Q", *[(i << 21) | 0x83 for i in range(2048)])
    mem.write(layout.PD_ADDR, pds)
    assert layout.PD_ADDR + len(pds) <= layout.PAGE_TABLES.end
    return layout.PML4_ADDR


def protected_mode_entry(mem: GuestMemory, rip: int, regs: dict[str, int]) -> EntryState:
    """Flat 32-bit protected mode, paging off: the PVH and Multiboot entry state."""
    gdt = write_gdt(mem)
    data = segment_from_descriptor(DATA_SEL, GDT_ENTRIES[DATA_SEL >> 3])
    return EntryState(
        mode=Mode.PROTECTED,
        rip=rip,
        regs=regs,
        cs=segment_from_descriptor(CODE32_SEL, GDT_ENTRIES[CODE32_SEL >> 3]),
        ds=data,
        tr=segment_from_descriptor(TSS_SEL, GDT_ENTRIES[TSS_SEL >> 3]),
        gdt=gdt,
        idt=(0, 0),
        cr0=CR0_PE | CR0_ET | CR0_NE,
    )


def long_mode_entry(mem: GuestMemory, rip: int, regs: dict[str, int]) -> EntryState:
    """64-bit mode with the identity map: the Linux 64-bit boot protocol's entry state."""
    gdt = write_gdt(mem)
    cr3 = write_identity_page_tables(mem)
    return EntryState(
        mode=Mode.LONG,
        rip=rip,
        regs=regs,
        cs=segment_from_descriptor(CODE64_SEL, GDT_ENTRIES[CODE64_SEL >> 3]),
        ds=segment_from_descriptor(DATA_SEL, GDT_ENTRIES[DATA_SEL >> 3]),
        tr=segment_from_descriptor(TSS_SEL, GDT_ENTRIES[TSS_SEL >> 3]),
        gdt=gdt,
        idt=(0, 0),
        cr0=CR0_PE | CR0_ET | CR0_NE | CR0_PG,
        cr3=cr3,
        cr4=CR4_PAE,
        efer=EFER_LME | EFER_LMA,
    )
