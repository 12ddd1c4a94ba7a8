"""The architectural CPU state a boot protocol hands to a kernel, independent of the backend that applies it.

Segments are described as the processor caches them (Intel SDM vol. 3A §3.4.5): base, limit, type and flags.
`segment_from_descriptor` decodes an 8-byte GDT entry so that the cached state always agrees with the GDT the
kernel will later reload from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10


class Mode(Enum):
    REAL = "real"
    PROTECTED = "protected32"
    LONG = "long64"


@dataclass(frozen=True)
class Segment:
    selector: int
    base: int = 0
    limit: int = 0xFFFF
    type: int = 0x3
    s: int = 1
    dpl: int = 0
    present: int = 1
    db: int = 0
    l: int = 0
    g: int = 0
    avl: int = 0


def descriptor(base: int, limit: int, access: int, flags: int) -> int:
    """Encode a GDT entry: `access` is the byte with P/DPL/S/type, `flags` the nibble with G/DB/L/AVL."""
    return (
        (limit & 0xFFFF)
        | ((base & 0xFFFFFF) << 16)
        | ((access & 0xFF) << 40)
        | (((limit >> 16) & 0xF) << 48)
        | ((flags & 0xF) << 52)
        | (((base >> 24) & 0xFF) << 56)
    )


def segment_from_descriptor(selector: int, desc: int) -> Segment:
    base = ((desc >> 16) & 0xFFFFFF) | (((desc >> 56) & 0xFF) << 24)
    limit = (desc & 0xFFFF) | (((desc >> 48) & 0xF) << 16)
    access = (desc >> 40) & 0xFF
    flags = (desc >> 52) & 0xF
    g = (flags >> 3) & 1
    return Segment(
        selector=selector,
        base=base,
        limit=(limit << 12) | 0xFFF if g else limit,
        type=access & 0xF,
        s=(access >> 4) & 1,
        dpl=(access >> 5) & 3,
        present=(access >> 7) & 1,
        avl=flags & 1,
        l=(flags >> 1) & 1,
        db=(flags >> 2) & 1,
        g=g,
    )


def real_mode_segment(selector: int, code: bool = False) -> Segment:
    return Segment(selector=selector, base=selector << 4, limit=0xFFFF, type=0xB if code else 0x3)


@dataclass
class EntryState:
    """Registers at the kernel's first instruction. `regs` holds general registers by lower-case name."""

    mode: Mode
    rip: int
    regs: dict[str, int] = field(default_factory=dict)
    cs: Segment = field(default_factory=lambda: real_mode_segment(0, code=True))
    ds: Segment = field(default_factory=lambda: real_mode_segment(0))
    tr: Segment | None = None
    gdt: tuple[int, int] = (0, 0xFFFF)  # base, limit
    idt: tuple[int, int] = (0, 0xFFFF)
    cr0: int = CR0_ET
    cr3: int = 0
    cr4: int = 0
    efer: int = 0
    rflags: int = 0x2
