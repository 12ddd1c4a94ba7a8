from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from popek.bus import Bus, Window
from popek.devices import pc_testdev as td
from popek.devices.irq import IrqLine
from popek.memory import GuestMemory


def port_bus(flushes: list[int] | None = None) -> tuple[Bus, td.PcTestdevPorts]:
    sink = flushes if flushes is not None else []
    ports = td.PcTestdevPorts(sink.append)
    bus = Bus("port")
    for part, name in ((td.IOPORT, "ioport"), (td.FLUSH_PAGE, "flush-page"), (td.IOPORT_BYTE, "ioport-byte")):
        bus.insert(td.IOPORT_BASE + part, td.PORT_BLOCK_LEN, Window(ports, part), name)
    return bus, ports


def test_ioport_is_a_32_bit_latch_written_and_read_by_byte_lane() -> None:
    bus, _ = port_bus()
    bus.write(0xE0, (0x11223344).to_bytes(4, "little"))
    assert bus.read(0xE0, 4) == (0x11223344).to_bytes(4, "little")
    bus.write(0xE2, b"\xaa")
    assert bus.read(0xE0, 4) == (0x11AA3344).to_bytes(4, "little")
    assert bus.read(0xE1, 2) == b"\x33\xaa"
    bus.write(0xE0, (0x9999).to_bytes(2, "little"))  # kvm-unit-tests' string_io_mmio
    assert bus.read(0xE0, 1) == b"\x99"
    assert bus.read(0xE8, 4) == (0x11AA9999).to_bytes(4, "little")  # the byte port shares the latch
    bus.write(0xEB, b"\x55")
    assert bus.read(0xE3, 1) == b"\x55"


def test_rep_outsb_leaves_the_last_byte_as_the_emulator_test_expects() -> None:
    bus, _ = port_bus()
    for b in b"abcdefghijklmnop":
        bus.write(0xE0, bytes([b]))
    assert bus.read(0xE0, 1) == b"p"


def test_flush_page_takes_4_byte_writes_of_an_address_and_reads_zero() -> None:
    flushed: list[int] = []
    bus, ports = port_bus(flushed)
    bus.write(0xE4, (0x12345678).to_bytes(4, "little"))
    bus.write(0xE4, b"\x00\x10")  # not a valid access: ignored
    bus.write(0xE5, b"\x01")
    assert flushed == [0x12345000] and ports.flushes == 1
    assert bus.read(0xE4, 4) == bytes(4)


def test_flush_page_keeps_the_pages_contents() -> None:
    with GuestMemory(1 << 20) as mem:
        ports = td.PcTestdevPorts(mem.remap_page)
        mem.write(0x5000, b"stack")
        ports.write(td.FLUSH_PAGE, (0x5123).to_bytes(4, "little"))
        ports.write(td.FLUSH_PAGE, (0x7FFFF000).to_bytes(4, "little"))  # outside RAM: nothing to do
        assert mem.read(0x5000, 5) == b"stack"
        mem.write(0x5000, b"S")
        assert mem.read(0x5000, 5) == b"Stack"


def test_irq_line_ports_drive_every_write_through_to_the_controller() -> None:
    delivered: list[tuple[int, bool]] = []
    irqs = td.PcTestdevIrqLines(lambda n: IrqLine(n, lambda num, level: delivered.append((num, level))))
    assert len(irqs.lines) == td.IRQ_LINES
    irqs.write(0x0E, b"\x01")
    irqs.write(0x0E, b"\x01")  # ioapic.c's "sequential level interrupts": a second high reaches the I/O APIC
    irqs.write(0x0E, b"\x00")
    irqs.write(23, b"\x05")
    irqs.write(0x0E, b"\x01\x00")  # only byte accesses are valid
    irqs.write(24, b"\x01")
    assert delivered == [(14, True), (14, True), (14, False), (23, True)]
    assert irqs.read(0, 1) == b"\x00"


def test_ioram_is_ram_like_and_accesses_across_its_end_do_not_reach_it() -> None:
    ioram = td.Ioram()
    bus = Bus("mmio", 4096)
    bus.insert(td.IORAM_BASE, td.IORAM_SIZE, ioram, "pc-testdev ioram")
    bus.write(td.IORAM_BASE + 4095, (0x88AA).to_bytes(2, "little"))  # emulator.c: a cross-page MMIO write
    assert ioram.data[4095] == 0xAA and ioram.data[4096] == 0x88
    assert bus.read(td.IORAM_BASE + 4095, 2) == b"\xaa\x88"
    end = td.IORAM_BASE + td.IORAM_SIZE
    bus.write(end - 2, b"\x01\x02\x03\x04")
    assert bus.read(end - 4, 4) == bytes(4)
    assert bus.unclaimed[end - 4096] == 1  # the write that crossed the end
    # the device itself clips too, whoever calls it
    ioram.write(td.IORAM_SIZE - 1, b"\x07\x08")
    assert ioram.read(td.IORAM_SIZE - 1, 2) == b"\x07\x00"
    assert len(ioram.data) == td.IORAM_SIZE


@given(
    st.lists(
        st.tuples(st.integers(0, td.IORAM_SIZE + 16), st.sampled_from([1, 2, 4, 8]), st.binary(min_size=8, max_size=8)),
        max_size=50,
    )
)
def test_arbitrary_ioram_and_port_accesses_stay_bounded(ops: list[tuple[int, int, bytes]]) -> None:
    ioram = td.Ioram()
    ports = td.PcTestdevPorts(lambda _addr: None)
    irqs = td.PcTestdevIrqLines(lambda n: IrqLine(n, lambda _n, _l: None))
    for offset, size, data in ops:
        ioram.write(offset, data[:size])
        assert len(ioram.read(offset, size)) == size
        ports.write(offset % 12, data[:size])
        assert len(ports.read(offset % 12, size)) == size
        irqs.write(offset % 32, data[:size])
        assert len(ioram.data) == td.IORAM_SIZE and len(ports.latch) == 4
