"""Where popek puts boot structures in low guest memory (below 1 MiB), as Firecracker's arch/x86_64/layout does.

The ranges are chosen to stay clear of what a kernel may overwrite before it has read them: the real-mode IVT
and BDA (0-0x500), the boot-sector address 0x7C00, the EBDA, and the kernel's load address at 1 MiB. The ACPI
tables go where a PC BIOS keeps them, in the 0xE0000-0xFFFFF BIOS area that Linux and kvm-unit-tests scan for
the RSDP (ACPI 6.0 §5.2.5.1), reserved in the e820 map.
"""

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
