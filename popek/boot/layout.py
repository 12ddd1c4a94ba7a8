"""Where popek puts boot structures in low guest memory (below 1 MiB), as Firecracker's arch/x86_64/layout does,
and which of them each boot protocol writes.

The ranges are chosen to stay clear of what a kernel may overwrite before it has read them: the real-mode IVT
and BDA (0-0x500), the boot-sector address 0x7C00, the EBDA, and the kernel's load address at 1 MiB. The ACPI
tables go where a PC BIOS keeps them, in the 0xE0000-0xFFFFF BIOS area that Linux and kvm-unit-tests scan for
the RSDP (ACPI 6.0 §5.2.5.1), reserved in the e820 map.

Kernels may still ask for any of this memory (kvm-unit-tests' realmode.flat loads at 0x8000; images linked at
1 MiB carry an ELF-headers segment at 0xFF000). `Area` names each range popek writes, and the `*_AREAS` tuples
list exactly the ones a protocol writes, so a kernel segment or an initrd is refused (`popek.boot.plan`) only
where it would really collide: a Multiboot kernel at 0x8000 never gets the 64-bit entry's page tables there.
"""

from __future__ import annotations

from dataclasses import dataclass

GDT_ADDR = 0x500
BOOT_INFO_ADDR = 0x6000  # PVH start_info or Multiboot info, with their tables after them
ZERO_PAGE_ADDR = 0x7000  # Linux boot_params
BOOT_STACK_TOP = 0x8FF0
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000  # four page directories: 0xB000-0xEFFF map the first 4 GiB with 2 MiB pages
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
EBDA_ADDR = 0x9FC00  # the MP table lives here; the last KB of base memory is searched by Linux
EBDA_END = 0xA0000
ACPI_ADDR = 0xE0000  # RSDP first (16-byte aligned), then every table popek builds (popek.boot.acpi)
ACPI_END = 0xF0000
BIOS_AREA_END = 0x100000  # the top 64 KiB of the first MiB, reserved like a PC's system BIOS ROM
HIGH_MEMORY = 0x100000
BOOT_SECTOR_ADDR = 0x7C00
BOOT_SECTOR_SIZE = 512


@dataclass(frozen=True)
class Area:
    """A range of guest-physical memory popek writes for a boot, named for error messages."""

    start: int
    end: int  # exclusive
    what: str

    @property
    def size(self) -> int:
        return self.end - self.start


GDT = Area(GDT_ADDR, GDT_ADDR + 0x40, "the boot GDT")
BOOT_INFO = Area(BOOT_INFO_ADDR, BOOT_INFO_ADDR + 0x1000, "the boot information (start_info / Multiboot info)")
ZERO_PAGE = Area(ZERO_PAGE_ADDR, ZERO_PAGE_ADDR + 0x1000, "the Linux zero page (boot_params)")
BOOT_STACK = Area(BOOT_STACK_TOP & ~0xFFF, PML4_ADDR, "the boot stack of the 64-bit entry")
PAGE_TABLES = Area(PML4_ADDR, PD_ADDR + 4 * 0x1000, "the identity page tables of the 64-bit entry")
MP_TABLE = Area(EBDA_ADDR, EBDA_END, "the MP table (EBDA)")
ACPI = Area(ACPI_ADDR, ACPI_END, "the ACPI tables")
BOOT_SECTOR = Area(BOOT_SECTOR_ADDR, BOOT_SECTOR_ADDR + BOOT_SECTOR_SIZE, "the boot sector")

# What each protocol writes besides the kernel, its command line (claimed at its length) and the initrd; the MP
# table and the ACPI tables are written for every boot.
BZIMAGE_AREAS = (GDT, ZERO_PAGE, BOOT_STACK, PAGE_TABLES, MP_TABLE, ACPI)
PVH_AREAS = (GDT, BOOT_INFO, MP_TABLE, ACPI)
MULTIBOOT_AREAS = (GDT, BOOT_INFO, MP_TABLE, ACPI)
BOOT_SECTOR_AREAS = (BOOT_SECTOR, MP_TABLE, ACPI)
