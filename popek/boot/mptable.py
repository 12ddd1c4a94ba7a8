"""The Intel MultiProcessor Specification 1.4 tables: how a kernel without ACPI finds the CPUs and the IOAPIC.

Placed in the last KB of base memory, which Linux's `smp_scan_config` searches. ISA IRQs 0-15 are routed to the
IOAPIC pins of the same number, which is how KVM's default GSI routing wires the in-kernel PIT and PIC lines.
"""

from __future__ import annotations

import struct

from popek.boot import layout
from popek.errors import ConfigError
from popek.memory import GuestMemory

IOAPIC_ADDR = 0xFEC00000
LAPIC_ADDR = 0xFEE00000
APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
MAX_CPUS = 254

MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = 0, 1, 2, 3, 4
MP_INT, MP_NMI, MP_EXTINT = 0, 1, 3
CPU_ENABLED, CPU_BSP = 1, 2


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def ioapic_id(cpus: int) -> int:
    """The I/O APIC's ID: the first after the CPUs' APIC IDs 0..cpus-1 (the ACPI MADT gives it too)."""
    return cpus


def build(cpus: int, cpu_signature: int = 0x600, feature_flags: int = 0x201) -> bytes:
    if not 1 <= cpus <= MAX_CPUS:
        raise ConfigError(f"the MP table can describe 1 to {MAX_CPUS} CPUs, not {cpus}")
    ioapic = ioapic_id(cpus)
    entries = b""
    for i in range(cpus):
        flags = CPU_ENABLED | (CPU_BSP if i == 0 else 0)
        entries += struct.pack("<BBBBII8x", MP_PROCESSOR, i, APIC_VERSION, flags, cpu_signature, feature_flags)
    entries += struct.pack("<BB6s", MP_BUS, 0, b"ISA   ")
    entries += struct.pack("<BBBBI", MP_IOAPIC, ioapic, IOAPIC_VERSION, 1, IOAPIC_ADDR)
    for irq in range(16):
        entries += struct.pack("<BBHBBBB", MP_INTSRC, MP_INT, 0, 0, irq, ioapic, irq)
    entries += struct.pack("<BBHBBBB", MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0xFF, 0)
    entries += struct.pack("<BBHBBBB", MP_LINTSRC, MP_NMI, 0, 0, 0, 0xFF, 1)
    count = cpus + 1 + 1 + 16 + 2

    header_size = 44
    table_addr = layout.EBDA_ADDR + 16
    header = struct.pack(
        "<4sHBB8s12sIHHIHBB",
        b"PCMP",
        header_size + len(entries),
        4,
        0,
        b"POPEK   ",
        b"000000000000",
        0,
        0,
        count,
        LAPIC_ADDR,
        0,
        0,
        0,
    )
    table = header + entries
    table = table[:7] + bytes([_checksum(table)]) + table[8:]

    mpf = struct.pack("<4sIBBB5s", b"_MP_", table_addr, 1, 4, 0, bytes(5))
    mpf = mpf[:10] + bytes([_checksum(mpf)]) + mpf[11:]
    blob = mpf + table
    if layout.EBDA_ADDR + len(blob) > layout.EBDA_END:
        raise ConfigError(f"{cpus} CPUs do not fit the MP table in the EBDA")
    return blob


def write(mem: GuestMemory, cpus: int) -> None:
    mem.write(layout.EBDA_ADDR, build(cpus))
