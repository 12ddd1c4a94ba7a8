from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popek.bus import Bus
from popek.devices import fw_cfg
from popek.devices.fw_cfg import FwCfg
from popek.errors import ConfigError

PORT = 0x510


def bus_with(dev: FwCfg) -> Bus:
    bus = Bus("port")
    bus.insert(PORT, fw_cfg.PORT_COUNT, dev, "fw_cfg")
    return bus


def get(bus: Bus, key: int, n: int) -> bytes:
    """kvm-unit-tests' fwcfg_get_u: a 16-bit OUT of the key to 0x510, then n byte INs from 0x511."""
    bus.write(PORT, struct.pack("<H", key))
    return b"".join(bus.read(PORT + 1, 1) for _ in range(n))


def test_signature_id_ram_size_and_cpu_counts() -> None:
    bus = bus_with(FwCfg(256 << 20, 3))
    assert get(bus, fw_cfg.FW_CFG_SIGNATURE, 4) == b"QEMU"
    assert get(bus, fw_cfg.FW_CFG_ID, 4) == struct.pack("<I", 1)  # traditional interface, no DMA
    assert get(bus, fw_cfg.FW_CFG_RAM_SIZE, 8) == struct.pack("<Q", 256 << 20)
    assert get(bus, fw_cfg.FW_CFG_NB_CPUS, 2) == struct.pack("<H", 3)
    assert get(bus, fw_cfg.FW_CFG_MAX_CPUS, 2) == struct.pack("<H", 3)


def test_reads_past_the_end_and_of_unknown_items_are_zero_and_select_rewinds() -> None:
    bus = bus_with(FwCfg(1 << 20, 1))
    assert get(bus, fw_cfg.FW_CFG_SIGNATURE, 6) == b"QEMU\0\0"
    assert get(bus, fw_cfg.FW_CFG_SIGNATURE, 2) == b"QE"
    assert get(bus, 0x11, 8) == bytes(8)  # kvm-unit-tests' FW_CFG_MAX_RAM: 0, no limit
    assert get(bus, 0x8002, 4) == bytes(4)  # FW_CFG_IRQ0_OVERRIDE: no override
    assert get(bus, fw_cfg.FW_CFG_INVALID, 2) == bytes(2)


def test_write_channel_bit_is_ignored_and_arch_local_bit_picks_another_table() -> None:
    bus = bus_with(FwCfg(1 << 20, 2))
    assert get(bus, fw_cfg.FW_CFG_WRITE_CHANNEL | fw_cfg.FW_CFG_NB_CPUS, 2) == struct.pack("<H", 2)
    assert get(bus, fw_cfg.FW_CFG_ARCH_LOCAL | fw_cfg.FW_CFG_NB_CPUS, 2) == bytes(2)


def test_byte_port_accesses_follow_qemus_combined_region() -> None:
    dev = FwCfg(1 << 20, 1)
    bus = bus_with(dev)
    bus.write(PORT + 1, struct.pack("<H", fw_cfg.FW_CFG_SIGNATURE))  # outw 0x511 would span 0x512: unclaimed
    assert bus.unclaimed[PORT + 1] == 1
    bus.write(PORT + 1, struct.pack("<H", fw_cfg.FW_CFG_ID)[:1])  # a data write: ignored
    assert bus.read(PORT, 1) == b"Q"  # a byte read of either port reads data
    assert bus.read(PORT + 1, 2) == b"\xff\xff"  # not a valid access
    assert bus.read(PORT + 1, 1) == b"E"


def test_file_directory_lists_named_items_big_endian() -> None:
    bus = bus_with(FwCfg(1 << 20, 1, files={"etc/popek/b": b"xyz", "etc/popek/a": b"12"}))
    (count,) = struct.unpack(">I", get(bus, fw_cfg.FW_CFG_FILE_DIR, 4))
    assert count == 2
    raw = get(bus, fw_cfg.FW_CFG_FILE_DIR, 4 + 64 * 2)[4:]
    entries = [struct.unpack(">IHH56s", raw[i * 64 : (i + 1) * 64]) for i in range(2)]
    assert [(size, name.rstrip(b"\0")) for size, _, _, name in entries] == [(2, b"etc/popek/a"), (3, b"etc/popek/b")]
    assert get(bus, entries[1][1], 3) == b"xyz"
    assert entries[0][1] == fw_cfg.FW_CFG_FILE_FIRST


def test_file_directory_is_empty_by_default() -> None:
    assert get(bus_with(FwCfg(1 << 20, 1)), fw_cfg.FW_CFG_FILE_DIR, 8) == bytes(8)


def test_bad_file_names_are_refused() -> None:
    with pytest.raises(ConfigError):
        FwCfg(1 << 20, 1, files={"x" * 56: b""})


@given(st.lists(st.tuples(st.integers(0, 1), st.sampled_from([1, 2, 4]), st.binary(min_size=4, max_size=4))))
def test_arbitrary_port_accesses_never_fail_and_the_offset_stays_within_the_item(
    ops: list[tuple[int, int, bytes]],
) -> None:
    dev = FwCfg(64 << 20, 4)
    bus = bus_with(dev)
    for port, size, data in ops:
        if data[0] & 1:
            bus.write(PORT + port, data[:size])
        else:
            assert len(bus.read(PORT + port, size)) == size
        item = dev.items.get(dev.selector & 0xBFFF, b"")
        assert 0 <= dev.offset <= len(item)
