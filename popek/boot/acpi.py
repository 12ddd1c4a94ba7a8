"""The ACPI tables popek builds for every guest, as a PC's firmware would leave them (ACPI 6.0 specification,
§5.2): how an OS finds the CPUs, the I/O APIC, the power-management registers, the reset register and the
sleep types without a BIOS.

- RSDP (§5.2.5): revision 2, on a 16-byte boundary at the start of the 0xE0000-0xEFFFF range popek reserves in
  the e820 map (`layout.ACPI_ADDR`); Linux and kvm-unit-tests scan 0xE0000-0xFFFFF for it (§5.2.5.1).
- RSDT (§5.2.7) and XSDT (§5.2.8): both list the FADT and the MADT.
- FADT (§5.2.9), revision 6.0: PM1a event block, PM1a control block and PM timer at the ports the builder
  gives (QEMU's PIIX4 addresses 0x600, 0x604, 0x608), in the 32-bit fields and as X_ Generic Address
  Structures; SCI on ISA IRQ 9; no SMI command port (the machine is always in ACPI mode); no GPE blocks; C2 and
  C3 unsupported; the reset register (port 0xCF9, the PIIX's Reset Control Register) and its value; the RTC's
  century index. Flags as QEMU's `pc` machine sets them (WBINVD, PROC_C1, SLP_BUTTON, RTC_S4,
  USE_PLATFORM_CLOCK, FORCE_APIC_CLUSTER_MODEL above 8 CPUs), plus RESET_REG_SUP (as QEMU's q35) and
  TMR_VAL_EXT for popek's 32-bit PM timer. IA-PC boot flags: legacy devices and an 8042 are present, VGA is
  not. The FACS address is in FIRMWARE_CTRL only: §5.2.9 requires X_FIRMWARE_CTRL to be zero when
  FIRMWARE_CTRL is not (kvm-unit-tests reads the 32-bit field); the DSDT address is in both DSDT and X_DSDT.
- FACS (§5.2.10): version 2, 64-byte aligned, no global lock owner, waking vector 0.
- DSDT (§5.2.11.1): a definition block whose AML (`popek.boot.aml`) declares \\_S5_, the soft-off sleep type
  (Linux's ACPI power-off reads it). There is no \\_S3_: popek cannot resume a suspended guest
  (`popek.devices.acpi_pm`).
- MADT (§5.2.12): the local APIC address, PCAT_COMPAT (there are 8259s), one Processor Local APIC entry per CPU
  (ACPI processor UID and APIC ID 0..n-1, as the MP table and CPUID give them), the I/O APIC with the ID and
  address of the MP table (`popek.boot.mptable`) and GSI base 0, and a Local APIC NMI entry for LINT1 of every
  processor. Interrupt source overrides appear only where an ISA IRQ is not an edge-triggered, active-high
  input of the I/O APIC pin of its own number: popek routes ISA IRQ n to pin n, IRQ0 included, as KVM's
  default GSI routing does (QEMU instead overrides IRQ0 to pin 2), so the only override is the SCI's, IRQ 9
  level-triggered and active high (§5.2.12.5), as QEMU declares it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from popek.boot import aml, layout, mptable
from popek.devices.legacy.cmos import REG_CENTURY
from popek.errors import ConfigError
from popek.memory import GuestMemory

OEM_ID = b"POPEK "
OEM_TABLE_ID = b"POPEKVM "
OEM_REVISION = 1
CREATOR_ID = b"PPEK"
CREATOR_REVISION = 1
HEADER_SIZE = 36
RSDP_SIGNATURE = b"RSD PTR "
RSDP_SIZE = 36
RSDP_V1_SIZE = 20

RSDT_REVISION = 1
XSDT_REVISION = 1
FADT_REVISION, FADT_MINOR_REVISION = 6, 0
FADT_SIZE = 276
FACS_VERSION = 2
FACS_SIZE = 64
DSDT_REVISION = 2  # 2 and up: AML integers are 64-bit
MADT_REVISION = 4  # ACPI 6.0

# Generic Address Structure (§5.2.3.2)
GAS_SYSTEM_IO = 1
ACCESS_UNDEFINED, ACCESS_BYTE = 0, 1

# FADT fixed feature flags (§5.2.9, Table 5-35)
WBINVD = 1 << 0
PROC_C1 = 1 << 2
SLP_BUTTON = 1 << 5
RTC_S4 = 1 << 7
TMR_VAL_EXT = 1 << 8
RESET_REG_SUP = 1 << 10
USE_PLATFORM_CLOCK = 1 << 15
FORCE_APIC_CLUSTER_MODEL = 1 << 18
FLAT_LOGICAL_MAX_CPUS = 8  # the "Flat Logical" APIC destination model addresses at most 8 CPUs

# IA-PC boot architecture flags (§5.2.9.3)
LEGACY_DEVICES = 1 << 0
I8042_PRESENT = 1 << 1
VGA_NOT_PRESENT = 1 << 2

C2_UNSUPPORTED = 0x0FFF  # P_LVL2_LAT > 100: no C2
C3_UNSUPPORTED = 0x0FFF  # P_LVL3_LAT > 1000: no C3

# MADT (§5.2.12)
PCAT_COMPAT = 1 << 0
MADT_LOCAL_APIC, MADT_IO_APIC, MADT_INT_SRC_OVERRIDE, MADT_LOCAL_APIC_NMI = 0, 1, 2, 4
LAPIC_ENABLED = 1 << 0
POLARITY_ACTIVE_HIGH = 0b01
TRIGGER_LEVEL = 0b11 << 2
ALL_PROCESSORS = 0xFF
MAX_APIC_ID = 0xFE  # 0xFF is the xAPIC broadcast ID
ISA_BUS = 0

TABLE_ALIGN = 16
FACS_ALIGN = 64


VIRTIO_MMIO_HID = "LNRO0005"  # Linux drivers/virtio/virtio_mmio.c's ACPI match


@dataclass(frozen=True)
class VirtioWindow:
    """A virtio-mmio transport (virtio 1.2 §4.2.2): its register window and its edge-triggered ISA IRQ."""

    base: int
    size: int
    irq: int


@dataclass(frozen=True)
class AcpiPlatform:
    """The machine the tables describe: what the VM builder placed where."""

    cpus: int
    ioapic_id: int
    pm1a_evt: int
    pm1a_evt_len: int
    pm1a_cnt: int
    pm1a_cnt_len: int
    pm_tmr: int
    pm_tmr_len: int
    pm_timer_32bit: bool
    sci_irq: int
    reset_port: int
    reset_value: int
    s5_sleep_type: int
    ioapic_addr: int = mptable.IOAPIC_ADDR
    lapic_addr: int = mptable.LAPIC_ADDR
    rtc_century: int = REG_CENTURY
    virtio: tuple[VirtioWindow, ...] = ()


@dataclass(frozen=True)
class AcpiTables:
    """The tables laid out for `base`: `blob` goes at `base`; `tables` maps each signature ("RSD PTR " for the
    RSDP) to its guest-physical address and bytes."""

    base: int
    blob: bytes
    tables: dict[str, tuple[int, bytes]] = field(default_factory=dict)

    @property
    def rsdp_addr(self) -> int:
        return self.tables[RSDP_SIGNATURE.decode()][0]


def checksum(data: bytes) -> int:
    """The byte that makes `data` plus itself sum to 0 mod 256 (§5.2.5.3, §5.2.6)."""
    return (-sum(data)) & 0xFF


def _with_checksum(data: bytes, at: int, length: int | None = None) -> bytes:
    """`data` with byte `at` set so that its first `length` bytes (all of them by default) sum to 0."""
    length = len(data) if length is None else length
    zeroed = data[:at] + b"\0" + data[at + 1 :]
    return zeroed[:at] + bytes([checksum(zeroed[:length])]) + zeroed[at + 1 :]


def table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: the common header (§5.2.6) with length and checksum, then `body`."""
    if len(signature) != 4:
        raise ValueError(f"an ACPI table signature has 4 characters, not {signature!r}")
    header = struct.pack(
        "<4sIBB6s8sI4sI",
        signature,
        HEADER_SIZE + len(body),
        revision,
        0,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        CREATOR_ID,
        CREATOR_REVISION,
    )
    return _with_checksum(header + body, 9)


def gas(address: int, bit_width: int, access_size: int = ACCESS_UNDEFINED, space: int = GAS_SYSTEM_IO) -> bytes:
    """A Generic Address Structure (§5.2.3.2) for a register block; an address of 0 means none."""
    if not address:
        return bytes(12)
    return struct.pack("<BBBBQ", space, bit_width, 0, access_size, address)


def rsdp(rsdt_addr: int, xsdt_addr: int) -> bytes:
    """The Root System Description Pointer, revision 2 (§5.2.5.3): a checksum over the ACPI 1.0 part, and an
    extended checksum over all 36 bytes."""
    raw = struct.pack("<8sB6sBIIQB3x", RSDP_SIGNATURE, 0, OEM_ID, 2, rsdt_addr, RSDP_SIZE, xsdt_addr, 0)
    raw = _with_checksum(raw, 8, RSDP_V1_SIZE)
    return _with_checksum(raw, 32)


def rsdt(entries: list[int]) -> bytes:
    return table(b"RSDT", RSDT_REVISION, b"".join(struct.pack("<I", a) for a in entries))


def xsdt(entries: list[int]) -> bytes:
    return table(b"XSDT", XSDT_REVISION, b"".join(struct.pack("<Q", a) for a in entries))


def fadt_flags(p: AcpiPlatform) -> int:
    flags = WBINVD | PROC_C1 | SLP_BUTTON | RTC_S4 | USE_PLATFORM_CLOCK | RESET_REG_SUP
    if p.pm_timer_32bit:
        flags |= TMR_VAL_EXT
    if p.cpus > FLAT_LOGICAL_MAX_CPUS:
        flags |= FORCE_APIC_CLUSTER_MODEL
    return flags


def fadt(p: AcpiPlatform, facs_addr: int, dsdt_addr: int) -> bytes:
    """The Fixed ACPI Description Table, revision 6.0 (§5.2.9, Table 5-34)."""
    body = struct.pack(
        "<IIBBHIBBBBIIIIIIIIBBBBBBBBHHHHBBBBBHBI",
        facs_addr,  # FIRMWARE_CTRL
        dsdt_addr,  # DSDT
        0,  # reserved (ACPI 1.0's INT_MODEL)
        0,  # Preferred_PM_Profile: unspecified
        p.sci_irq,  # SCI_INT
        0,  # SMI_CMD: none, the machine is in ACPI mode from the start
        0,  # ACPI_ENABLE
        0,  # ACPI_DISABLE
        0,  # S4BIOS_REQ
        0,  # PSTATE_CNT
        p.pm1a_evt,  # PM1a_EVT_BLK
        0,  # PM1b_EVT_BLK
        p.pm1a_cnt,  # PM1a_CNT_BLK
        0,  # PM1b_CNT_BLK
        0,  # PM2_CNT_BLK
        p.pm_tmr,  # PM_TMR_BLK
        0,  # GPE0_BLK
        0,  # GPE1_BLK
        p.pm1a_evt_len,  # PM1_EVT_LEN
        p.pm1a_cnt_len,  # PM1_CNT_LEN
        0,  # PM2_CNT_LEN
        p.pm_tmr_len,  # PM_TMR_LEN
        0,  # GPE0_BLK_LEN
        0,  # GPE1_BLK_LEN
        0,  # GPE1_BASE
        0,  # CST_CNT
        C2_UNSUPPORTED,  # P_LVL2_LAT
        C3_UNSUPPORTED,  # P_LVL3_LAT
        0,  # FLUSH_SIZE
        0,  # FLUSH_STRIDE
        0,  # DUTY_OFFSET
        0,  # DUTY_WIDTH
        0,  # DAY_ALRM
        0,  # MON_ALRM
        p.rtc_century,  # CENTURY
        LEGACY_DEVICES | I8042_PRESENT | VGA_NOT_PRESENT,  # IAPC_BOOT_ARCH
        0,  # reserved
        fadt_flags(p),  # Flags
    )
    body += gas(p.reset_port, 8, ACCESS_BYTE)  # RESET_REG
    body += struct.pack("<BHB", p.reset_value, 0, FADT_MINOR_REVISION)  # RESET_VALUE, ARM_BOOT_ARCH, minor
    body += struct.pack("<QQ", 0, dsdt_addr)  # X_FIRMWARE_CTRL (zero: FIRMWARE_CTRL holds the FACS), X_DSDT
    body += gas(p.pm1a_evt, 8 * p.pm1a_evt_len)  # X_PM1a_EVT_BLK
    body += gas(0, 0)  # X_PM1b_EVT_BLK
    body += gas(p.pm1a_cnt, 8 * p.pm1a_cnt_len)  # X_PM1a_CNT_BLK
    body += gas(0, 0)  # X_PM1b_CNT_BLK
    body += gas(0, 0)  # X_PM2_CNT_BLK
    body += gas(p.pm_tmr, 8 * p.pm_tmr_len)  # X_PM_TMR_BLK
    body += gas(0, 0) + gas(0, 0)  # X_GPE0_BLK, X_GPE1_BLK
    body += gas(0, 0) + gas(0, 0)  # SLEEP_CONTROL_REG, SLEEP_STATUS_REG: hardware-reduced ACPI only
    body += b"POPEK   "  # Hypervisor Vendor Identity
    out = table(b"FACP", FADT_REVISION, body)
    assert len(out) == FADT_SIZE, len(out)
    return out


def facs() -> bytes:
    """The Firmware ACPI Control Structure, version 2 (§5.2.10): no checksum, 64-byte aligned by the caller."""
    out = struct.pack("<4sIIIIIQB3xI24x", b"FACS", FACS_SIZE, 0, 0, 0, 0, 0, FACS_VERSION, 0)
    assert len(out) == FACS_SIZE
    return out


def dsdt(p: AcpiPlatform) -> bytes:
    """The Differentiated System Description Table: the \\_S5_ package (SLP_TYPa, SLP_TYPb, reserved, reserved)
    that an OS writes to PM1a_CNT.SLP_TYP to power off (§7.3.4.5)."""
    s5 = aml.name("\\_S5_", aml.package(*(aml.integer(v) for v in (p.s5_sleep_type, p.s5_sleep_type, 0, 0))))
    return table(b"DSDT", DSDT_REVISION, s5 + virtio_devices(p.virtio))


def virtio_devices(windows: tuple[VirtioWindow, ...]) -> bytes:
    """Scope (\\_SB) with one Device per virtio-mmio transport, as Firecracker and QEMU's microvm declare them:
    _HID LNRO0005, _UID its index, _CRS its window (Memory32Fixed) and its IRQ (Extended Interrupt, edge and
    active high: the MADT overrides no ISA IRQ but the SCI, §5.2.12.5). Nothing when there are none."""
    if not windows:
        return b""
    if len(windows) > 256:
        raise ConfigError(f"at most 256 virtio-mmio devices in the DSDT, not {len(windows)}")
    devices = [
        aml.device(
            f"VR{i:02X}",
            aml.name("_HID", aml.string_const(VIRTIO_MMIO_HID)),
            aml.name("_UID", aml.integer(i)),
            aml.name("_CRS", aml.resource_template(
                aml.memory32_fixed(w.base, w.size), aml.extended_interrupt(w.irq, edge=True))),
        )
        for i, w in enumerate(windows)
    ]
    return aml.scope("\\_SB_", *devices)


def madt(p: AcpiPlatform) -> bytes:
    """The Multiple APIC Description Table (§5.2.12)."""
    if not 1 <= p.cpus <= MAX_APIC_ID + 1:
        raise ConfigError(f"the MADT's xAPIC entries describe 1 to {MAX_APIC_ID + 1} CPUs, not {p.cpus}")
    body = struct.pack("<II", p.lapic_addr, PCAT_COMPAT)
    for i in range(p.cpus):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, i, i, LAPIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, p.ioapic_id, 0, p.ioapic_addr, 0)
    body += struct.pack(
        "<BBBBIH", MADT_INT_SRC_OVERRIDE, 10, ISA_BUS, p.sci_irq, p.sci_irq, POLARITY_ACTIVE_HIGH | TRIGGER_LEVEL
    )
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, 1)
    return table(b"APIC", MADT_REVISION, body)


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def build(p: AcpiPlatform, base: int = layout.ACPI_ADDR, end: int = layout.ACPI_END) -> AcpiTables:
    """Every table, laid out from `base`: RSDP, FACS, DSDT, FADT, MADT, RSDT, XSDT."""
    if base % TABLE_ALIGN:
        raise ValueError("the RSDP must be on a 16-byte boundary")
    blob = bytearray()
    tables: dict[str, tuple[int, bytes]] = {}

    def place(name: str, data: bytes, alignment: int = TABLE_ALIGN) -> int:
        offset = _align(len(blob), alignment)
        blob.extend(bytes(offset - len(blob)))
        blob.extend(data)
        tables[name] = (base + offset, data)
        return base + offset

    rsdp_at = place(RSDP_SIGNATURE.decode(), bytes(RSDP_SIZE))  # filled in once the RSDT and XSDT are placed
    facs_at = place("FACS", facs(), FACS_ALIGN)
    dsdt_at = place("DSDT", dsdt(p))
    fadt_at = place("FACP", fadt(p, facs_at, dsdt_at))
    madt_at = place("APIC", madt(p))
    rsdt_at = place("RSDT", rsdt([fadt_at, madt_at]))
    xsdt_at = place("XSDT", xsdt([fadt_at, madt_at]))
    pointer = rsdp(rsdt_at, xsdt_at)
    blob[rsdp_at - base : rsdp_at - base + RSDP_SIZE] = pointer
    tables[RSDP_SIGNATURE.decode()] = (rsdp_at, pointer)
    if base + len(blob) > end:
        raise ConfigError(f"the ACPI tables for {p.cpus} CPUs ({len(blob)} bytes) do not fit {base:#x}-{end:#x}")
    return AcpiTables(base, bytes(blob), tables)


def write(mem: GuestMemory, p: AcpiPlatform) -> AcpiTables:
    tables = build(p)
    mem.write(tables.base, tables.blob)
    return tables
