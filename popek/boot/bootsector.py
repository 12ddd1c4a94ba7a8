"""A BIOS-style boot sector: 512 bytes ending in 0x55 0xAA, run in real mode at 0000:7C00 with DL = 0x80."""

from __future__ import annotations

from popek.boot import layout, plan
from popek.boot.entry import EntryState, Mode, real_mode_segment
from popek.boot.loader import BootImage
from popek.errors import BootError
from popek.memory import GuestMemory

SIZE = layout.BOOT_SECTOR_SIZE


def is_boot_sector(data: bytes) -> bool:
    return len(data) == SIZE and data[510:512] == b"\x55\xaa"


def load(mem: GuestMemory, data: bytes, cmdline: str | bytes, initrd: bytes | None) -> BootImage:
    if initrd:
        raise BootError("a boot sector takes no initrd")
    if cmdline:
        raise BootError("a boot sector takes no command line")
    plan.BootPlan(mem, "boot sector", layout.BOOT_SECTOR_AREAS)  # checks that the fixed areas are in RAM
    mem.write(layout.BOOT_SECTOR_ADDR, data)
    entry = EntryState(
        mode=Mode.REAL,
        rip=layout.BOOT_SECTOR_ADDR,
        regs={"rdx": 0x80, "rsp": layout.BOOT_SECTOR_ADDR},
        cs=real_mode_segment(0, code=True),
        ds=real_mode_segment(0),
    )
    return BootImage("boot sector", entry, layout.BOOT_SECTOR_ADDR, layout.BOOT_SECTOR_ADDR + SIZE)
