"""The ACPI tables: structure checked here field by field, and by ACPICA's own tools (iasl -d disassembles each
table, acpiexec loads them and evaluates \\_S5_) where acpica-tools is installed."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from popek.boot import acpi, e820, layout, mptable
from popek.errors import ConfigError
from popek.memory import GuestMemory

MiB = 1 << 20
needs_iasl = pytest.mark.skipif(shutil.which("iasl") is None, reason="needs iasl (Debian's acpica-tools)")
needs_acpiexec = pytest.mark.skipif(shutil.which("acpiexec") is None, reason="needs acpiexec (acpica-tools)")


def platform(cpus: int = 2) -> acpi.AcpiPlatform:
    return acpi.AcpiPlatform(
        cpus=cpus,
        ioapic_id=mptable.ioapic_id(cpus),
        pm1a_evt=0x600,
        pm1a_evt_len=4,
        pm1a_cnt=0x604,
        pm1a_cnt_len=2,
        pm_tmr=0x608,
        pm_tmr_len=4,
        pm_timer_32bit=True,
        sci_irq=9,
        reset_port=0xCF9,
        reset_value=0x06,
        s5_sleep_type=0,
    )


def find_rsdp(mem: GuestMemory) -> int:
    """What Linux's acpi_find_root_pointer and kvm-unit-tests' get_rsdp do: scan the BIOS area by 16 bytes."""
    for addr in range(0xE0000, 0x100000, 16):
        if mem.read(addr, 8) == b"RSD PTR " and sum(mem.read(addr, 20)) % 256 == 0:
            return addr
    raise AssertionError("no RSDP in 0xE0000-0xFFFFF")


def tables_of(mem: GuestMemory) -> dict[bytes, int]:
    """Signature -> address, following RSDP -> XSDT -> entries, and FADT -> DSDT, FACS."""
    rsdp = find_rsdp(mem)
    xsdt = mem.read_u64(rsdp + 24)
    length = mem.read_u32(xsdt + 4)
    found = {b"XSDT": xsdt, b"RSDT": mem.read_u32(rsdp + 16)}
    for i in range((length - 36) // 8):
        addr = mem.read_u64(xsdt + 36 + 8 * i)
        found[mem.read(addr, 4)] = addr
    fadt = found[b"FACP"]
    found[b"FACS"] = mem.read_u32(fadt + 36)
    found[b"DSDT"] = mem.read_u64(fadt + 140)
    return found


def test_rsdp_is_found_by_a_bios_area_scan_and_both_checksums_hold() -> None:
    with GuestMemory(16 * MiB) as mem:
        tables = acpi.write(mem, platform())
        rsdp = find_rsdp(mem)
        assert rsdp == tables.rsdp_addr == layout.ACPI_ADDR and rsdp % 16 == 0
        raw = mem.read(rsdp, 36)
        assert raw[15] == 2  # revision: ACPI 2.0+, XSDT valid
        assert struct.unpack_from("<I", raw, 20)[0] == 36
        assert sum(raw[:20]) % 256 == 0 and sum(raw) % 256 == 0
        assert mem.read(mem.read_u32(rsdp + 16), 4) == b"RSDT"
        assert mem.read(mem.read_u64(rsdp + 24), 4) == b"XSDT"


def test_every_table_has_its_length_and_a_zero_checksum_inside_the_reserved_range() -> None:
    with GuestMemory(16 * MiB) as mem:
        acpi.write(mem, platform(4))
        found = tables_of(mem)
        assert set(found) == {b"RSDT", b"XSDT", b"FACP", b"APIC", b"DSDT", b"FACS"}
        for sig, addr in found.items():
            length = mem.read_u32(addr + 4)
            assert addr >= layout.ACPI_ADDR and addr + length <= layout.ACPI_END, sig
            if sig != b"FACS":  # the FACS has no checksum
                assert sum(mem.read(addr, length)) % 256 == 0, sig
        assert found[b"FACS"] % 64 == 0
        assert mem.read_u32(found[b"FACS"] + 4) == 64
        rsdt = found[b"RSDT"]
        entries = [mem.read_u32(rsdt + 36 + 4 * i) for i in range((mem.read_u32(rsdt + 4) - 36) // 4)]
        assert entries == [found[b"FACP"], found[b"APIC"]]


def test_e820_reserves_the_acpi_range() -> None:
    with GuestMemory(16 * MiB) as mem:
        entries = {(e.addr, e.size, e.type) for e in e820.memory_map(mem)}
    assert (layout.ACPI_ADDR, layout.ACPI_END - layout.ACPI_ADDR, e820.E820_RESERVED) in entries
    assert not any(t == e820.E820_RAM and a < layout.ACPI_END and a + s > layout.ACPI_ADDR for a, s, t in entries)


def test_fadt_points_at_the_pm_blocks_the_reset_register_facs_and_dsdt() -> None:
    with GuestMemory(16 * MiB) as mem:
        acpi.write(mem, platform())
        found = tables_of(mem)
        f = mem.read(found[b"FACP"], acpi.FADT_SIZE)
    assert f[8] == 6 and f[131] == 0  # revision 6.0
    assert struct.unpack_from("<IIBBH", f, 36) == (found[b"FACS"], found[b"DSDT"], 0, 0, 9)
    assert struct.unpack_from("<I", f, 48)[0] == 0  # no SMI_CMD: always in ACPI mode
    assert struct.unpack_from("<6I", f, 56) == (0x600, 0, 0x604, 0, 0, 0x608)
    assert tuple(f[88:92]) == (4, 2, 0, 4)
    flags = struct.unpack_from("<I", f, 112)[0]
    assert flags & acpi.RESET_REG_SUP and flags & acpi.TMR_VAL_EXT and not flags & acpi.FORCE_APIC_CLUSTER_MODEL
    assert f[116:128] == struct.pack("<BBBBQ", 1, 8, 0, 1, 0xCF9) and f[128] == 0x06
    assert struct.unpack_from("<QQ", f, 132) == (0, found[b"DSDT"])  # X_FIRMWARE_CTRL zero, §5.2.9
    assert f[148:160] == struct.pack("<BBBBQ", 1, 32, 0, 0, 0x600)
    assert f[172:184] == struct.pack("<BBBBQ", 1, 16, 0, 0, 0x604)
    assert f[208:220] == struct.pack("<BBBBQ", 1, 32, 0, 0, 0x608)


def test_more_than_eight_cpus_force_the_cluster_apic_model() -> None:
    assert acpi.fadt_flags(platform(9)) & acpi.FORCE_APIC_CLUSTER_MODEL
    assert not acpi.fadt_flags(platform(8)) & acpi.FORCE_APIC_CLUSTER_MODEL


def madt_entries(madt: bytes) -> list[bytes]:
    out, at = [], 44
    while at < len(madt):
        out.append(madt[at : at + madt[at + 1]])
        at += madt[at + 1]
    assert at == len(madt)
    return out


def test_madt_has_one_local_apic_per_cpu_the_ioapic_the_sci_override_and_lint1_nmi() -> None:
    cpus = 5
    madt = acpi.build(platform(cpus)).tables["APIC"][1]
    assert struct.unpack_from("<II", madt, 36) == (mptable.LAPIC_ADDR, acpi.PCAT_COMPAT)
    entries = madt_entries(madt)
    lapics = [e for e in entries if e[0] == 0]
    assert [(e[2], e[3], e[4] & 1) for e in lapics] == [(i, i, 1) for i in range(cpus)]
    (ioapic,) = [e for e in entries if e[0] == 1]
    assert struct.unpack("<BBBBII", ioapic) == (1, 12, mptable.ioapic_id(cpus), 0, mptable.IOAPIC_ADDR, 0)
    # identity routing, IRQ0 included: the SCI's level/active-high override is the only one
    assert [e for e in entries if e[0] == 2] == [struct.pack("<BBBBIH", 2, 10, 0, 9, 9, 0x000D)]
    assert [e for e in entries if e[0] == 4] == [struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)]


def test_the_largest_mp_table_machine_fits_and_more_apic_ids_are_refused() -> None:
    tables = acpi.build(platform(mptable.MAX_CPUS))
    assert layout.ACPI_ADDR + len(tables.blob) <= layout.ACPI_END
    with pytest.raises(ConfigError):
        acpi.build(platform(256))


def test_dsdt_declares_s5_with_the_pm_devices_soft_off_type() -> None:
    p = platform()
    dsdt = acpi.build(p).tables["DSDT"][1]
    assert dsdt[:4] == b"DSDT" and dsdt[8] == 2
    assert dsdt[36:] == bytes.fromhex("08 5c 5f 53 35 5f 12 06 04 00 00 00 00")
    assert b"_S3_" not in dsdt


def iasl_disassemble(tmp: Path, name: str, data: bytes) -> str:
    path = tmp / f"{name}.dat"
    path.write_bytes(data)
    r = subprocess.run(["iasl", "-d", path.name], cwd=tmp, capture_output=True, text=True, timeout=60)
    dsl = (tmp / f"{name}.dsl").read_text()
    return r.stdout + r.stderr + dsl


def problems(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(r"warning|error|incorrect|invalid", line, re.I)]


@needs_iasl
def test_iasl_disassembles_every_table_without_warnings(tmp_path: Path) -> None:
    tables = acpi.build(platform(3))
    out = {}
    for sig, (_, data) in tables.tables.items():
        if sig == "RSD PTR ":
            continue  # iasl 20200925 does not disassemble a bare RSDP; the scan test above checks it
        out[sig] = iasl_disassemble(tmp_path, sig, data)
        assert problems(out[sig]) == [], (sig, problems(out[sig]))

    def field(sig: str, name: str) -> str:
        m = re.search(rf"\] +{re.escape(name)} : (\S+)", out[sig])
        assert m, (sig, name)
        return m.group(1)

    assert field("FACP", "PM1A Event Block Address") == "00000600"
    assert field("FACP", "PM1A Control Block Address") == "00000604"
    assert field("FACP", "PM Timer Block Address") == "00000608"
    assert field("FACP", "SCI Interrupt") == "0009"
    assert field("FACP", "Value to cause reset") == "06"
    assert re.search(r"Reset Register Supported \(V2\) : 1", out["FACP"])
    assert re.search(r"32-bit PM Timer \(V1\) : 1", out["FACP"])
    assert out["APIC"].count("[Processor Local APIC]") == 3
    assert field("APIC", "I/O Apic ID") == "03"
    assert out["APIC"].count("[Interrupt Source Override]") == 1
    assert field("APIC", "Interrupt Input LINT") == "01"
    assert re.search(r"Name \(\\_S5, Package \(0x04\)", out["DSDT"])
    assert field("FACS", "Version") == "02"
    assert len(re.findall(r"ACPI Table Address\s+\d+ : ", out["XSDT"])) == 2


@needs_iasl
def test_the_iasl_check_catches_a_corrupt_table(tmp_path: Path) -> None:
    madt = bytearray(acpi.build(platform()).tables["APIC"][1])
    madt[9] ^= 1
    assert any("checksum" in line.lower() for line in problems(iasl_disassemble(tmp_path, "APIC", bytes(madt))))


@needs_acpiexec
def test_acpica_loads_the_tables_and_evaluates_s5(tmp_path: Path) -> None:
    tables = acpi.build(platform())
    names = []
    for sig in ("DSDT", "FACP", "FACS", "APIC"):
        (tmp_path / f"{sig}.dat").write_bytes(tables.tables[sig][1])
        names.append(f"{sig}.dat")
    r = subprocess.run(
        ["acpiexec", "-b", "evaluate \\_S5_", *names], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    text = r.stdout + r.stderr
    assert "[Package] Contains 4 Elements" in text, text
    assert re.findall(r"\[Integer\] = (\w+)", text) == ["0000000000000000"] * 4
    assert not re.search(r"ACPI (Warning|Error|BIOS)", text), text
