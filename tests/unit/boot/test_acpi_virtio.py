"""The DSDT's virtio-mmio devices (issue 7): decoded by a small parser written from ACPI 6.0 §20.2 and §6.4, and
by iasl where acpica-tools is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popek.boot import acpi

PLATFORM = dict(cpus=1, ioapic_id=1, pm1a_evt=0x600, pm1a_evt_len=4, pm1a_cnt=0x604, pm1a_cnt_len=2,
                pm_tmr=0x608, pm_tmr_len=4, pm_timer_32bit=True, sci_irq=9, reset_port=0xCF9, reset_value=6,
                s5_sleep_type=0)  # fmt: skip


def _pkg(data: bytes, at: int) -> tuple[int, int]:
    """(end of the object, start of its body) for a PkgLength at `at` (§20.2.4)."""
    lead = data[at]
    extra = lead >> 6
    value = lead & (0x3F if extra == 0 else 0x0F)
    for i in range(extra):
        value |= data[at + 1 + i] << (4 + 8 * i)
    return at + value, at + 1 + extra


def _int(data: bytes, at: int) -> tuple[int, int]:
    op = data[at]
    if op in (0, 1):
        return op, at + 1
    size = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}[op]
    return int.from_bytes(data[at + 1 : at + 1 + size], "little"), at + 1 + size


def parse_devices(dsdt: bytes) -> list[dict[str, object]]:
    """The Devices in Scope (\\_SB) after the \\_S5_ Name: each as {_HID, _UID, mem: (base, size), irq: (n, flags)}."""
    assert sum(dsdt) % 256 == 0
    aml = dsdt[acpi.HEADER_SIZE :]
    at = aml.index(b"\x10")  # ScopeOp follows Name(\_S5_, Package)
    end, at = _pkg(aml, at + 1)
    assert end == len(aml)
    assert aml[at : at + 5] == b"\\_SB_"
    at += 5
    out = []
    while at < end:
        assert aml[at : at + 2] == b"\x5b\x82"
        dev_end, at = _pkg(aml, at + 2)
        dev: dict[str, object] = {"name": aml[at : at + 4].decode()}
        at += 4
        while at < dev_end:
            assert aml[at] == 0x08
            name, at = aml[at + 1 : at + 5].decode(), at + 5
            if name == "_HID":
                assert aml[at] == 0x0D
                stop = aml.index(b"\0", at)
                dev[name], at = aml[at + 1 : stop].decode(), stop + 1
            elif name == "_UID":
                dev[name], at = _int(aml, at)
            else:
                assert name == "_CRS" and aml[at] == 0x11
                buf_end, at = _pkg(aml, at + 1)
                size, at = _int(aml, at)
                res = aml[at:buf_end]
                assert len(res) == size and sum(res) % 256 == 0
                assert res[0] == 0x86 and res[1:3] == b"\x09\x00"
                dev["mem"] = (int.from_bytes(res[4:8], "little"), int.from_bytes(res[8:12], "little"))
                assert res[12] == 0x89 and res[13:15] == b"\x06\x00" and res[16] == 1
                dev["irq"] = (int.from_bytes(res[17:21], "little"), res[15])
                assert res[21] == 0x79 and len(res) == 23
                at = buf_end
        out.append(dev)
    return out


windows = st.lists(
    st.builds(acpi.VirtioWindow, st.integers(0, (1 << 32) - 0x10000).map(lambda b: b & ~0xFFF),
              st.sampled_from([0x200, 0x1000, 0x10000]), st.integers(0, 23)),
    max_size=16,
).map(tuple)  # fmt: skip


@settings(max_examples=60)
@given(windows)
def test_each_virtio_window_is_one_lnro0005_device_with_its_window_and_edge_high_irq(
    ws: tuple[acpi.VirtioWindow, ...],
) -> None:
    dsdt = acpi.dsdt(acpi.AcpiPlatform(**PLATFORM, virtio=ws))  # type: ignore[arg-type]
    if not ws:
        assert b"LNRO0005" not in dsdt
        return
    devices = parse_devices(dsdt)
    assert [d["_UID"] for d in devices] == list(range(len(ws)))
    for d, w in zip(devices, ws):
        assert d["_HID"] == "LNRO0005"
        assert d["mem"] == (w.base, w.size)
        assert d["irq"] == (w.irq, 0b011)  # consumer, edge, active high, exclusive


def test_a_window_above_4_gib_is_refused() -> None:
    with pytest.raises(ValueError):
        acpi.dsdt(acpi.AcpiPlatform(**PLATFORM, virtio=(acpi.VirtioWindow(0xFFFF_F000, 0x2000, 5),)))  # type: ignore[arg-type]


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) is not installed")
def test_iasl_disassembles_the_virtio_devices(tmp_path: Path) -> None:
    ws = (acpi.VirtioWindow(0xD000_0000, 0x1000, 5), acpi.VirtioWindow(0xD000_1000, 0x1000, 6))
    (tmp_path / "dsdt.dat").write_bytes(acpi.dsdt(acpi.AcpiPlatform(**PLATFORM, virtio=ws)))  # type: ignore[arg-type]
    subprocess.run(["iasl", "-d", "dsdt.dat"], cwd=tmp_path, check=True, capture_output=True)
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert dsl.count('Name (_HID, "LNRO0005")') == 2
    assert "Device (VR01)" in dsl
    assert "0xD0001000" in dsl and "Memory32Fixed (ReadWrite" in dsl
    assert "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )" in dsl
    assert "0x00000006," in dsl
