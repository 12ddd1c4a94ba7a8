"""Device snapshots: each device driven into a non-trivial state, saved, carried through the snapshot file's JSON
encoding, restored into a fresh device (on a clock that reads another time, for the timed ones), and then both
devices given the same accesses: they must answer alike. Fuzzed states may only be refused with SnapshotError,
and a state that is taken leaves a device that serves the guest without an exception."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from popek import snapshot
from popek.bus import Bus, Window
from popek.devices import acpi_pm, machine_state, pc_testdev
from popek.devices import lapic as lp
from popek.devices import state as st
from popek.devices.apic_bus import ApicMessage
from popek.devices.clock import NS_PER_SECOND, VirtualClock
from popek.devices.fw_cfg import FwCfg
from popek.devices.ioapic import IOREGSEL, IOWIN, RTE_LEVEL, RTE_MASKED, IoApic
from popek.devices.irq import IrqLine, null_line
from popek.devices.legacy.bochs_shutdown import BochsShutdown
from popek.devices.legacy.cmos import Cmos
from popek.devices.legacy.i8042 import I8042
from popek.devices.legacy.misc import PostCode
from popek.devices.legacy.pic import Pic
from popek.devices.legacy.pit import Pit, SystemControlPort
from popek.devices.legacy.reset_control import ResetControl
from popek.devices.legacy.serial import Serial
from popek.devices.platform import SoftPlatform
from popek.devices.virtio.mmio import MmioTransport
from popek.devices.virtio.rng import EntropyDevice
from popek.memory import GuestMemory
from popek.snapshot import SnapshotError
from popek.vm import Vm, VmSpec
from tests.unit.state_fuzz import at, json_value, paths

LATER = 7 * NS_PER_SECOND + 123_457  # the restored machine's clock: some seconds later, not on a tick boundary


def through_json(state: dict[str, Any]) -> dict[str, Any]:
    """What the snapshot file gives back: the state as `snapshot.write` encodes it."""
    return snapshot.decode_state(snapshot.encode_state({"s": state}))["s"]  # type: ignore[no-any-return]


class Lines:
    """Interrupt lines that record every level delivered, with the time of a clock if given one."""

    def __init__(self, clock: VirtualClock | None = None) -> None:
        self.clock = clock
        self.events: list[tuple[int, int, bool]] = []

    def line(self, number: int = 0) -> IrqLine:
        return IrqLine(number, self._deliver)

    def _deliver(self, number: int, level: bool) -> None:
        self.events.append((self.clock.now_ns() if self.clock else 0, number, level))


class Recorder:
    def __init__(self) -> None:
        self.messages: list[ApicMessage] = []

    def deliver(self, msg: ApicMessage) -> bool:
        self.messages.append(msg)
        return True


# --- serial ---


def test_a_restored_uart_has_the_fifo_bytes_registers_and_interrupt_of_the_saved_one() -> None:
    lines_a, out = Lines(), bytearray()
    a = Serial(lines_a.line(4), out.extend)
    a.write(3, b"\x80")  # DLAB
    a.write(0, b"\x01")  # divisor 115200
    a.write(1, b"\x00")
    a.write(3, b"\x1b")  # 8E1... and DLAB off
    a.write(7, b"\x5a")
    a.write(1, b"\x01")  # receive interrupt
    assert a.enqueue_input(b"hello") == 5
    assert a.read(0, 1) == b"h"
    saved = through_json(a.state())
    lines_b = Lines()
    b = Serial(lines_b.line(4), bytearray().extend)
    b.restore(saved)
    assert b.irq.level and lines_b.events == []  # the line is high as it was, and no second edge was sent
    for device in (a, b):
        device.write(1, b"\x03")
    reads = [[d.read(off, 1) for off in (2, 5, 3, 4, 7, 0, 0, 0, 0, 5, 2, 2)] for d in (a, b)]
    assert reads[0] == reads[1]
    assert reads[1][5:9] == [b"e", b"l", b"l", b"o"]
    assert a.irq.level == b.irq.level


def test_a_uart_state_with_too_many_fifo_bytes_is_refused() -> None:
    a = Serial(Lines().line(), bytearray().extend)
    bad = a.state() | {"rx": [0x41] * 65}
    with pytest.raises(SnapshotError, match="rx"):
        a.restore(bad)


# --- PIC ---


def init_pic(pic: Pic) -> None:
    for port, values in ((pic.master_port, (0x11, 0x20, 0x04, 0x01)), (pic.slave_port, (0x11, 0x28, 0x02, 0x01))):
        port.write(0, bytes([values[0]]))
        for v in values[1:]:
            port.write(1, bytes([v]))


def test_a_restored_pic_pair_resolves_and_acknowledges_as_the_saved_one() -> None:
    a = Pic()
    init_pic(a)
    a.master_port.write(1, b"\xf8")  # IRQ0, 1 and the cascade unmasked
    a.slave_port.write(1, b"\xee")  # IRQ8 and 12 unmasked
    a.elcr_port.write(1, b"\x10")  # IRQ12 level-triggered
    for irq in (1, 8, 12, 3):
        a.set_irq(irq, True)
    assert a.acknowledge() == 0x21  # IRQ1 in service
    a.master_port.write(0, b"\x0b")  # OCW3: read ISR
    b = Pic()
    b.restore(through_json(a.state()))
    assert b.intr == a.intr
    log: list[list[int]] = [[], []]
    for i, pic in enumerate((a, b)):
        log[i].append(pic.master_port.read(0, 1)[0])  # ISR, as OCW3 asked
        pic.master_port.write(0, b"\x20")  # EOI IRQ1
        while pic.interrupt_pending():
            log[i].append(pic.acknowledge())
        pic.slave_port.write(0, b"\x20")
        pic.master_port.write(0, b"\x20")
        pic.set_irq(12, False)
        log[i].append(pic.acknowledge() if pic.interrupt_pending() else -1)
        log[i].extend([pic.master_port.read(1, 1)[0], pic.slave_port.read(1, 1)[0], pic.elcr_port.read(1, 1)[0]])
    assert log[0] == log[1]
    assert log[1][1] == 0x28  # IRQ8 next, then the rest in priority order


def test_a_pic_mid_initialisation_expects_the_same_next_icw() -> None:
    a = Pic()
    a.master_port.write(0, b"\x11")
    a.master_port.write(1, b"\x40")  # ICW2; ICW3 and ICW4 still to come
    b = Pic()
    b.restore(through_json(a.state()))
    for pic in (a, b):
        pic.master_port.write(1, b"\x04")
        pic.master_port.write(1, b"\x01")
        pic.master_port.write(1, b"\xfe")
        pic.set_irq(0, True)
    assert a.acknowledge() == b.acknowledge() == 0x40


def test_an_elcr_bit_the_chip_cannot_have_is_refused() -> None:
    pic = Pic()
    saved = pic.state()
    saved["master"]["elcr"] = 0x01  # IRQ0 is edge-triggered by design
    with pytest.raises(SnapshotError, match="elcr"):
        pic.restore(saved)
    assert pic.master.elcr == 0


# --- PIT ---


def test_a_restored_pit_counts_on_from_the_saved_count_on_a_later_clock() -> None:
    clock_a = VirtualClock()
    lines_a = Lines(clock_a)
    irq_a = lines_a.line(0)
    a = Pit(clock_a, on_out0=irq_a.set_level)
    a.write(3, b"\x34")  # channel 0, lobyte/hibyte, mode 2
    a.write(0, b"\x9c")
    a.write(0, b"\x2e")  # 11932: 100 Hz
    a.write(3, b"\xb0")  # channel 2, mode 0
    a.write(2, b"\xff")
    a.write(2, b"\x7f")
    a.write(3, b"\x80")  # latch channel 2, left unread
    clock_a.advance_by(12_345_678)
    saved = through_json(a.state())
    clock_b = VirtualClock(LATER)
    lines_b = Lines(clock_b)
    irq_b = lines_b.line(0)
    irq_b.restore_level(irq_a.level)
    b = Pit(clock_b, on_out0=irq_b.set_level)
    b.restore(saved)
    assert lines_b.events == []
    reads = []
    for pit, clock in ((a, clock_a), (b, clock_b)):
        seq = [pit.read(2, 1), pit.read(2, 1)]  # the latched count first
        for step in (1_000_000, 3_333_333, 40_000_000):
            clock.advance_by(step)
            pit.write(3, b"\x00")
            seq += [pit.read(0, 1), pit.read(0, 1), pit.read(2, 1), pit.read(2, 1)]
        pit.write(3, b"\xe2")  # read-back status of channel 0
        seq.append(pit.read(0, 1))
        reads.append(seq)
    assert reads[0] == reads[1]
    start_a, start_b = 12_345_678, LATER
    edges_a = [(t - start_a, level) for t, _, level in lines_a.events if t > start_a]
    edges_b = [(t - start_b, level) for t, _, level in lines_b.events]
    assert len(edges_b) >= 8 and edges_a == edges_b  # IRQ0 at the same times after the snapshot


def test_a_pit_period_of_zero_is_refused_not_divided_by() -> None:
    pit = Pit(VirtualClock())
    saved = pit.state()
    saved["channels"][1] |= {"running": True, "period": 0}
    with pytest.raises(SnapshotError, match=r"channel 1\.period"):
        pit.restore(saved)


def test_port_61_keeps_its_gate_and_speaker_bits() -> None:
    clock = VirtualClock()
    pit = Pit(clock)
    a = SystemControlPort(pit)
    a.write(0, b"\x03")
    b = SystemControlPort(Pit(VirtualClock()))
    b.restore(through_json(a.state()))
    assert b.value == 3


# --- clock ---


def test_a_restored_clock_reads_the_saved_time_and_keeps_no_old_timer() -> None:
    a = VirtualClock()
    fired: list[int] = []
    a.advance_by(500)
    b = VirtualClock(10_000)
    b.add_timer(20_000, lambda: fired.append(1))
    b.restore(through_json(a.state()))
    assert b.now_ns() == 500 and b.next_deadline() is None
    b.advance_by(100_000)
    assert fired == []


# --- local APIC ---


def make_apic(clock: VirtualClock) -> lp.LocalApic:
    apic = lp.LocalApic(0, clock, bsp=True)
    apic.write_register(lp.REG_SVR, lp.SVR_ENABLE | 0xFF)
    return apic


@pytest.mark.parametrize("periodic", [False, True], ids=["one-shot", "periodic"])
def test_a_restored_lapic_timer_fires_as_far_ahead_as_it_would_have(periodic: bool) -> None:
    clock_a = VirtualClock(1_000)
    a = make_apic(clock_a)
    a.write_register(lp.REG_TIMER_DIVIDE, 0b0001)  # divide by 4
    a.write_register(lp.REG_LVT_TIMER, 0x40 | (lp.TIMER_PERIODIC << lp.LVT_TIMER_MODE_SHIFT if periodic else 0))
    a.write_register(lp.REG_TIMER_INITIAL, 250_000)  # 1 ms at 1 GHz / 4
    a.write_register(lp.REG_TPR, 0x20)
    a._set_irr(0x55, True)
    clock_a.advance_by(2_500_000 if periodic else 400_000)
    saved = through_json(a.state())
    clock_b = VirtualClock(LATER)
    b = lp.LocalApic(0, clock_b, bsp=True)
    b.restore(saved)
    regs = [lp.REG_TIMER_CURRENT, lp.REG_TIMER_INITIAL, lp.REG_TPR, lp.REG_PPR, lp.REG_SVR, lp.REG_LVT_TIMER]
    regs += [lp.REG_IRR + 16 * i for i in range(8)] + [lp.REG_TMR + 0x20, lp.REG_LVT_LINT0]
    trace: list[list[int]] = [[], []]
    for i, (apic, clock) in enumerate(((a, clock_a), (b, clock_b))):
        for step in (0, 100_000, 500_000, 1_000_000, 2_000_000):
            clock.advance_by(step)
            trace[i] += [apic.read_register(r) for r in regs]
            while apic.interrupt_pending():
                vector = apic.acknowledge()
                trace[i].append(vector)
                apic.eoi()
    assert trace[0] == trace[1]
    assert 0x40 in trace[1] and 0x55 in trace[1]


def test_a_lapic_at_another_timer_rate_is_refused() -> None:
    a = make_apic(VirtualClock())
    b = lp.LocalApic(0, VirtualClock(), timer_hz=25_000_000)
    with pytest.raises(SnapshotError, match="timer_hz"):
        b.restore(a.state())


def test_the_tsc_deadline_is_kept_against_a_tsc_that_goes_on() -> None:
    clock_a = VirtualClock(5_000_000)
    a = make_apic(clock_a)
    a.write_register(lp.REG_LVT_TIMER, 0x41 | lp.TIMER_TSC_DEADLINE << lp.LVT_TIMER_MODE_SHIFT)
    a.msr_write(lp.MSR_TSC_DEADLINE, a.tsc() + 3_000_000)
    clock_a.advance_by(1_000_000)
    clock_b = VirtualClock(LATER)
    b = lp.LocalApic(0, clock_b, bsp=True)
    b.restore(through_json(a.state()))
    assert b.tsc() == a.tsc()
    assert b.msr_read(lp.MSR_TSC_DEADLINE) == a.msr_read(lp.MSR_TSC_DEADLINE)
    clock_b.advance_by(1_999_999)
    assert not b.interrupt_pending()
    clock_b.advance_by(1)
    assert b.acknowledge() == 0x41


# --- I/O APIC ---


def ioapic_write(io: IoApic, reg: int, value: int) -> None:
    io.write(IOREGSEL, struct.pack("<I", reg))
    io.write(IOWIN, struct.pack("<I", value))


def test_a_restored_ioapic_redelivers_a_waiting_level_interrupt_at_eoi() -> None:
    bus_a = Recorder()
    a = IoApic(bus_a, apic_id=2)
    ioapic_write(a, 0x10 + 2 * 9, RTE_LEVEL | 0x39)
    ioapic_write(a, 0x10 + 2 * 4, 0x34)
    ioapic_write(a, 0x10 + 2 * 5, RTE_MASKED | 0x35)
    a.set_irq(9, True)
    a.write(IOREGSEL, b"\x01")
    assert len(bus_a.messages) == 1
    bus_b = Recorder()
    b = IoApic(bus_b, apic_id=0)
    b.restore(through_json(a.state()))
    assert bus_b.messages == []
    reads = []
    for io, bus in ((a, bus_a), (b, bus_b)):
        got = [io.read(IOWIN, 4)]  # IOREGSEL kept: the version register
        io.eoi(0x39)  # line still high: delivered again
        io.set_irq(4, True)
        io.set_irq(5, True)
        io.write(IOREGSEL, b"\x00")
        got.append(io.read(IOWIN, 4))
        reads.append((got, bus.messages[-2:]))
    assert reads[0] == reads[1]
    assert [m.vector for m in reads[1][1]] == [0x39, 0x34]


# --- ACPI PM ---


def test_a_restored_pm_timer_goes_on_from_its_saved_value_on_a_time_base_that_restarted() -> None:
    now = [10 * NS_PER_SECOND]
    lines = Lines()
    a = acpi_pm.AcpiPm(lambda: now[0], lines.line(9), lambda _s: None)
    a.write(2, struct.pack("<H", acpi_pm.TMR_EN | acpi_pm.PWRBTN_EN))
    a.sts |= acpi_pm.PWRBTN_STS
    a.read(0, 2)
    assert a.sci.level
    saved = through_json(a.state())
    later = [1_000]  # a new VM: its time base starts again near 0
    lines_b = Lines()
    b = acpi_pm.AcpiPm(lambda: later[0], lines_b.line(9), lambda _s: None)
    b.restore(saved)
    assert b.sci.level and lines_b.events == []
    assert b.timer() == a.timer()
    later[0] += NS_PER_SECOND
    now[0] += NS_PER_SECOND
    assert b.timer() == a.timer()
    assert b.read(0, 4) == a.read(0, 4)
    for pm in (a, b):
        pm.write(0, struct.pack("<H", acpi_pm.PWRBTN_STS))
    assert not a.sci.level and not b.sci.level


# --- firmware and small devices ---


def test_fw_cfg_reads_on_from_the_saved_offset() -> None:
    a = FwCfg(256 << 20, 2)
    a.write(0, struct.pack("<H", 0x03))
    first = [a.read(1, 1) for _ in range(3)]
    b = FwCfg(256 << 20, 2)
    b.restore(through_json(a.state()))
    assert [b.read(1, 1) for _ in range(6)] == [a.read(1, 1) for _ in range(6)]
    assert b"".join(first) == (256 << 20).to_bytes(8, "little")[:3]
    assert b.offset == a.offset == 8  # the end of the 8-byte item: the last read gave 0


def test_cmos_keeps_its_nvram_index_and_format_and_reads_the_clock_of_the_restore() -> None:
    a = Cmos(clock=lambda: 1_000_000_000.0)
    a.write(0, b"\x0b")
    a.write(1, b"\x06")  # binary, 24 h
    a.write(0, b"\x40")
    a.write(1, b"\xa5")
    a.write(0, b"\x80")  # NMI masked, index 0: seconds
    b = Cmos(clock=lambda: 1_000_000_000.0 + 86_400 * 3 + 61)
    b.restore(through_json(a.state()))
    assert b.nmi_disabled and b.index == 0
    assert b.read(1, 1) == bytes([(40 + 1) % 60])  # the restore's time, in the saved binary format
    b.write(0, b"\x40")
    assert b.read(1, 1) == b"\xa5"


def test_the_i8042_keeps_a_pending_command_and_its_output_bytes() -> None:
    resets: list[int] = []
    a = I8042(lambda: resets.append(1))
    a.write(4, bytes([0x20]))  # read CTR: one byte queued
    a.write(4, bytes([0xD1]))  # write output port: waits for its data byte
    b = I8042(lambda: resets.append(2))
    b.restore(through_json(a.state()))
    assert b.read(4, 1) == a.read(4, 1) and b.read(0, 1) == a.read(0, 1) == b"\x47"
    b.write(0, b"\x00")  # the output port with the reset line low
    assert resets == [2]


def test_small_devices_keep_their_latches() -> None:
    post = PostCode()
    post.write(0, b"\x42")
    post2 = PostCode()
    post2.restore(through_json(post.state()))
    assert post2.read(0, 1) == b"\x42"
    rc = ResetControl(lambda: None)
    rc.write(0, b"\x02")
    rc2 = ResetControl(lambda: None)
    rc2.restore(through_json(rc.state()))
    assert rc2.read(0, 1) == b"\x02"
    off: list[int] = []
    bochs = BochsShutdown(lambda: off.append(1))
    for ch in b"Shut":
        bochs.write(0, bytes([ch]))
    bochs2 = BochsShutdown(lambda: off.append(2))
    bochs2.restore(through_json(bochs.state()))
    for ch in b"down":
        bochs2.write(0, bytes([ch]))
    assert off == [2]


def test_pc_testdev_keeps_its_latch_lines_and_ioram() -> None:
    lines = Lines()
    ports = pc_testdev.PcTestdevPorts(lambda _gpa: None)
    ports.write(0, b"\x11\x22\x33\x44")
    irqs = pc_testdev.PcTestdevIrqLines(lines.line)
    irqs.write(10, b"\x01")
    ram = pc_testdev.Ioram()
    ram.write(0x1234, b"popek")
    lines_b = Lines()
    ports2 = pc_testdev.PcTestdevPorts(lambda _gpa: None)
    irqs2 = pc_testdev.PcTestdevIrqLines(lines_b.line)
    ram2 = pc_testdev.Ioram()
    for src, dst in ((ports, ports2), (irqs, irqs2), (ram, ram2)):
        dst.restore(through_json(src.state()))  # type: ignore[attr-defined]
    assert ports2.read(1, 2) == b"\x22\x33"
    assert ram2.read(0x1234, 5) == b"popek"
    assert irqs2.lines[10].level and lines_b.events == []
    irqs2.write(10, b"\x00")
    assert lines_b.events == [(0, 10, False)]


# --- the software platform and the machine ---


def test_a_restored_software_platform_delivers_the_same_timer_interrupts() -> None:
    a = SoftPlatform(2)
    init_pic(a.pic)
    a.pic.master_port.write(1, b"\xfe")
    a.pit.write(3, b"\x34")
    a.pit.write(0, b"\xa9")
    a.pit.write(0, b"\x04")  # 1193: ~1 kHz
    apic = a.lapics[1]
    apic.write_register(lp.REG_SVR, lp.SVR_ENABLE | 0xFF)
    apic.write_register(lp.REG_LVT_TIMER, 0x50 | lp.TIMER_PERIODIC << lp.LVT_TIMER_MODE_SHIFT)
    apic.write_register(lp.REG_TIMER_INITIAL, 300_000)
    a.clock.advance_by(2_345_678)
    b = SoftPlatform(2)
    b.clock.advance_by(LATER)
    b.restore(through_json(a.state()))
    assert b.clock.now_ns() == a.clock.now_ns()
    seen: list[list[Any]] = [[], []]
    for i, p in enumerate((a, b)):
        for _ in range(20):
            p.clock.advance_by(250_000)
            for cpu in p.lapics:
                while cpu.interrupt_pending():
                    vector = cpu.acknowledge()
                    seen[i].append((p.clock.now_ns(), cpu.index, vector))
                    if vector >= 0x20 and vector != 0x50:
                        p.pic.master_port.write(0, b"\x20")
                    else:
                        cpu.eoi()
    assert seen[0] == seen[1]
    assert {v for _, _, v in seen[1]} >= {0x20, 0x50}


def build_machine(platform: SoftPlatform | None = None) -> tuple[Bus, Bus, dict[str, Any]]:
    pio, mmio = Bus("port"), Bus("mmio", 4096)
    parts: dict[str, Any] = {
        "serial": Serial(Lines().line(4), bytearray().extend),
        "i8042": I8042(lambda: None),
        "pm": acpi_pm.AcpiPm(lambda: 0, Lines().line(9), lambda _s: None),
        "post": PostCode(),
    }
    pio.insert(0x3F8, 8, parts["serial"], "serial COM1")
    pio.insert(0x60, 1, parts["i8042"], "i8042")
    pio.insert(0x64, 1, Window(parts["i8042"], 4), "i8042")
    pio.insert(0x80, 1, parts["post"], "post code")
    pio.insert(0x600, 4, parts["pm"], "acpi pm1a event")
    pio.insert(0x604, 2, Window(parts["pm"], 4), "acpi pm1a control")
    if platform is not None:
        for base, length, device, name in platform.port_devices():
            pio.insert(base, length, device, name)
        for base, length, device, name in platform.mmio_devices():
            mmio.insert(base, length, device, name)
    return pio, mmio, parts


def test_the_machine_state_has_each_device_once_platform_first_and_round_trips() -> None:
    platform = SoftPlatform(1)
    pio, mmio, parts = build_machine(platform)
    parts["post"].write(0, b"\x99")
    parts["serial"].enqueue_input(b"xy")
    machine = machine_state.devices(pio, mmio, platform)
    assert list(machine) == [
        "platform",
        "port 0x60 i8042",
        "port 0x80 post code",
        "port 0x3f8 serial COM1",
        "port 0x600 acpi pm1a event",
    ]
    saved = through_json(machine_state.capture(machine))
    platform2 = SoftPlatform(1)
    pio2, mmio2, parts2 = build_machine(platform2)
    machine_state.restore(machine_state.devices(pio2, mmio2, platform2), saved)
    assert parts2["post"].read(0, 1) == b"\x99"
    assert pio2.find(0x3F8) is not None and parts2["serial"].read(0, 1) == b"x"


def test_a_machine_state_of_other_devices_is_refused_naming_them() -> None:
    pio, mmio, _ = build_machine()
    saved = machine_state.capture(machine_state.devices(pio, mmio))
    del saved["port 0x80 post code"]
    saved["port 0x2f8 serial COM2"] = {}
    with pytest.raises(SnapshotError, match=r"post code.*COM2"):
        machine_state.restore(machine_state.devices(pio, mmio), saved)


# --- hostile states ---


@dataclass
class Case:
    make: Callable[[], Any]
    exercise: Callable[[Any], None]
    restore: Callable[[Any, Any], None] = lambda device, state: device.restore(state)


def _rng_transport() -> MmioTransport:
    transport = MmioTransport(EntropyDevice(), GuestMemory(1 << 20), null_line())
    for status in (1, 3, 0xB):
        transport.write(0x70, status.to_bytes(4, "little"))
    for offset, value in ((0x38, 8), (0x80, 0x1000), (0x90, 0x2000), (0xA0, 0x3000), (0x44, 1), (0x70, 0xF)):
        transport.write(offset, value.to_bytes(4, "little"))
    return transport


def _live_rng_transport() -> MmioTransport:
    """A transport the driver took through §3.1.1 to DRIVER_OK, its queue 0 live."""
    transport = MmioTransport(EntropyDevice(), GuestMemory(1 << 20), null_line())
    for offset, value in ((0x70, 1), (0x70, 3), (0x24, 1), (0x20, 1), (0x70, 0xB), (0x30, 0), (0x38, 8),
                          (0x80, 0x1000), (0x90, 0x2000), (0xA0, 0x3000), (0x44, 1), (0x70, 0xF)):  # fmt: skip
        transport.write(offset, value.to_bytes(4, "little"))
    assert transport.device.active
    return transport


def _exercise_transport(transport: MmioTransport) -> None:
    for offset in range(0, 0x100, 4):
        transport.read(offset, 4)
    transport.notify(0)
    transport.write(0x64, b"\1\0\0\0")
    transport.write(0x70, bytes(4))  # reset


def _exercise_ports(count: int, extra: Callable[[Any], None] | None = None) -> Callable[[Any], None]:
    def exercise(device: Any) -> None:
        for offset in range(count):
            device.read(offset, 1)
            device.write(offset, b"\x5a")
            device.read(offset, 1)
        if extra is not None:
            extra(device)

    return exercise


def _exercise_pic(pic: Pic) -> None:
    for irq in range(16):
        pic.set_irq(irq, True)
        if pic.interrupt_pending():
            pic.acknowledge()
    for port in (pic.master_port, pic.slave_port):
        port.read(0, 1)
        port.read(1, 1)
        port.write(0, b"\x20")
        port.write(0, b"\x0c")  # poll
        port.read(0, 1)


def _exercise_pit(pit: Pit) -> None:
    for _ in range(3):
        for offset in range(3):
            pit.read(offset, 1)
        pit.write(3, b"\xe2")
        pit.write(3, b"\x00")
        pit.read(0, 1)
        pit.clock.advance_by(1_000_000)
    pit.channels[2].set_gate(True)
    pit.channels[2].set_gate(False)
    pit.channels[0].write(5)


def _exercise_lapic(apic: lp.LocalApic) -> None:
    for reg in range(0, 0x400, 0x10):
        apic.read_register(reg)
    apic.clock.advance_by(100_000)
    for _ in range(4):
        if apic.interrupt_pending():
            apic.acknowledge()
        apic.eoi()
    apic.write_register(lp.REG_TIMER_DIVIDE, 3)
    apic.set_lint(0, True)
    apic.set_lint(1, True)
    apic.clock.advance_by(100_000)


def _exercise_ioapic(io: IoApic) -> None:
    for reg in range(0x40):
        io.write(IOREGSEL, bytes([reg]))
        io.read(IOWIN, 4)
    for pin in range(io.pins):
        io.set_irq(pin, True)
    for vector in range(256):
        io.eoi(vector)


def _exercise_platform(p: SoftPlatform) -> None:
    _exercise_pit(p.pit)
    _exercise_pic(p.pic)
    _exercise_ioapic(p.ioapic)
    for apic in p.lapics:
        _exercise_lapic(apic)


def _clocked_pit() -> Pit:
    clock = VirtualClock()
    pit = Pit(clock, on_out0=lambda _level: None)
    pit.write(3, b"\x36")
    pit.write(0, b"\x00")
    pit.write(0, b"\x10")
    clock.advance_by(3_000_000)
    return pit


def _busy_lapic() -> lp.LocalApic:
    apic = make_apic(VirtualClock())
    apic.write_register(lp.REG_LVT_TIMER, 0x40 | lp.TIMER_PERIODIC << lp.LVT_TIMER_MODE_SHIFT)
    apic.write_register(lp.REG_TIMER_INITIAL, 1000)
    return apic


CASES: dict[str, Case] = {
    "serial": Case(lambda: Serial(Lines().line(), bytearray().extend), _exercise_ports(8)),
    "i8042": Case(lambda: I8042(lambda: None), _exercise_ports(5)),
    "cmos": Case(lambda: Cmos(clock=lambda: 0.0), _exercise_ports(2)),
    "post": Case(PostCode, _exercise_ports(1)),
    "reset control": Case(lambda: ResetControl(lambda: None), _exercise_ports(1)),
    "bochs": Case(lambda: BochsShutdown(lambda: None), _exercise_ports(1)),
    "pic": Case(Pic, _exercise_pic),  # type: ignore[arg-type]
    "pit": Case(_clocked_pit, _exercise_pit),  # type: ignore[arg-type]
    "port61": Case(lambda: SystemControlPort(Pit(VirtualClock())), _exercise_ports(1)),
    "clock": Case(VirtualClock, lambda c: c.advance_by(1000)),
    "lapic": Case(_busy_lapic, _exercise_lapic),  # type: ignore[arg-type]
    "ioapic": Case(lambda: IoApic(Recorder()), _exercise_ioapic),  # type: ignore[arg-type]
    "acpi pm": Case(lambda: acpi_pm.AcpiPm(lambda: 5, Lines().line(9), lambda _s: None), _exercise_ports(12)),
    "fw_cfg": Case(lambda: FwCfg(1 << 20, 1), _exercise_ports(2)),
    "pc-testdev ports": Case(lambda: pc_testdev.PcTestdevPorts(lambda _g: None), _exercise_ports(12)),
    "pc-testdev irqs": Case(lambda: pc_testdev.PcTestdevIrqLines(Lines().line), _exercise_ports(24)),
    "platform": Case(lambda: SoftPlatform(2), _exercise_platform),  # type: ignore[arg-type]
    # the transport's own restore checks little; `machine_state.restore` turns what it raises into SnapshotError
    "virtio-rng transport": Case(_rng_transport, _exercise_transport),  # type: ignore[arg-type]
    "live virtio-rng transport": Case(_live_rng_transport, _exercise_transport),  # type: ignore[arg-type]
}

@hs.composite
def mutated(draw: hs.DrawFn, state: dict[str, Any]) -> Any:
    """A valid state with one to three places replaced, removed or added to."""
    state = through_json(state)
    for _ in range(draw(hs.integers(1, 3))):
        nodes = paths(state)
        path = draw(hs.sampled_from(nodes))
        action = draw(hs.sampled_from(["replace", "delete", "add", "flip"]))
        if action == "flip":  # a byte of a raw field changed, its length kept: a register file the device must check
            raws = [p for p in nodes if at(state, p).__class__ is bytes and at(state, p)]
            if not raws:
                continue
            path = draw(hs.sampled_from(raws))
            blob = bytearray(at(state, path))
            blob[draw(hs.integers(0, len(blob) - 1))] = draw(hs.integers(0, 255))
            parent = at(state, path[:-1])
            parent[path[-1]] = bytes(blob)
            continue
        if not path:
            if action == "replace":
                return draw(json_value)
            continue
        parent = state
        for key in path[:-1]:
            parent = parent[key]
        last = path[-1]
        if action == "replace":
            parent[last] = draw(json_value)
        elif action == "delete":
            del parent[last]
        elif isinstance(parent, dict):
            parent[draw(hs.text(max_size=3))] = draw(json_value)
        else:
            parent.append(draw(json_value))
    return state


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=hs.data())
def test_a_fuzzed_state_is_refused_with_a_snapshot_error_or_leaves_a_working_device(name: str, data: Any) -> None:
    case = CASES[name]
    source = case.make()
    case.exercise(source)
    state = data.draw(mutated(source.state()))
    target = case.make()
    try:
        case.restore(target, state)
    except SnapshotError:
        return
    case.exercise(target)
    through_json(target.state())


@given(state=json_value)
@settings(max_examples=100, deadline=None)
def test_a_machine_state_that_is_not_one_is_refused(state: Any) -> None:
    pio, mmio, _ = build_machine(SoftPlatform(1))
    with pytest.raises(SnapshotError):
        machine_state.restore(machine_state.devices(pio, mmio), state)


def test_the_field_checks_refuse_lookalikes() -> None:
    with pytest.raises(ValueError):
        st.uint(8)(True)  # JSON keeps true and 1 apart, and so does a snapshot
    with pytest.raises(ValueError):
        st.boolean(1)
    with pytest.raises(ValueError):
        st.masked(0xC9)(0x02)
    with pytest.raises(SnapshotError, match="missing a; unexpected b"):
        st.load({"b": 1}, {"a": st.uint(1)}, "thing")
    assert st.deque_of(st.uint(8), 2)([1, 2]) == st.deque_of(st.uint(8), 3)([1, 2])


def _multiboot_probe(tmp: Path) -> Path:
    """A Multiboot kernel that is never run: the builder only needs something to load."""
    load = 0x100000
    flags = 0x00010000
    header = struct.pack("<8I", 0x1BADB002, flags, -(0x1BADB002 + flags) & 0xFFFFFFFF, load, load, 0, 0, load + 32)
    path = tmp / "probe.elf"
    path.write_bytes(header + b"\xf4")
    return path


def test_the_devices_the_builder_places_round_trip_into_a_second_vm(tmp_path: Path) -> None:
    spec = VmSpec(_multiboot_probe(tmp_path), accel="soft", pc_testdev=True, rng=True)
    with Vm(spec) as a, Vm(spec) as b:
        a.serial.enqueue_input(b"snap")
        a.pio.find(0x80).device.write(0, b"\x77")  # type: ignore[union-attr]
        assert a.accel is not None
        a.accel.platform.pit.write(3, b"\x34")  # type: ignore[union-attr]
        a.accel.platform.pit.write(0, b"\x10")  # type: ignore[union-attr]
        a.accel.platform.pit.write(0, b"\x20")  # type: ignore[union-attr]
        a.accel.clock.advance_by(1_000_000)  # type: ignore[union-attr]
        saved = through_json(machine_state.capture_vm(a))
        keys = set(saved)
        assert {"platform", "port 0x3f8 serial COM1", "port 0x80 post code", "port 0x510 fw_cfg"} <= keys
        assert any(key.startswith("mmio 0xd0000000 ") for key in keys)  # the virtio transport
        assert any("pc-testdev ioram" in key for key in keys) and any("acpi pm1a event" in key for key in keys)
        machine_state.restore_vm(b, saved)
        assert b.serial.read(0, 1) == b"s" and b.pio.find(0x80).device.read(0, 1) == b"\x77"  # type: ignore[union-attr]
        pits = [vm.accel.platform.pit for vm in (a, b)]  # type: ignore[union-attr]
        counts = [[p.read(0, 1), p.read(0, 1)] for p in pits]
        assert counts[0] == counts[1] and counts[0] != [b"\x00", b"\x00"]


def test_an_i8042_whose_guest_never_reads_queues_a_bounded_number_of_bytes() -> None:
    kbc = I8042(lambda: None)
    for _ in range(10_000):
        kbc.write(0, b"\x00")  # a byte for the absent keyboard: answered with "resend"
    assert len(kbc.out) == 4096
    fresh = I8042(lambda: None)
    fresh.restore(through_json(kbc.state()))
    fresh.write(0, b"\x00")
    assert len(fresh.out) == 4096


def test_a_live_virtqueue_outside_guest_ram_is_refused_before_the_transport_changes() -> None:
    source = _live_rng_transport()
    state = through_json(source.state())
    state["queues"][0]["used_ring"] = (1 << 20) - 8  # the used ring would run past the end of 1 MiB of RAM
    target = _live_rng_transport()
    before = through_json(target.state())
    with pytest.raises(SnapshotError, match="queue 0: the used ring"):
        target.restore(state)
    assert through_json(target.state()) == before


def test_a_restored_virtqueue_takes_the_next_chain_where_the_saved_one_stopped() -> None:
    source = _live_rng_transport()
    state = through_json(source.state())
    state["queues"][0]["next_avail"] = 5
    target = _live_rng_transport()
    target.restore(state)
    assert target.device.queues[0].next_avail == 5
    assert target.device.active


def test_a_transport_active_without_driver_ok_is_refused() -> None:
    state = through_json(_live_rng_transport().state())
    state["status"] = 0xB  # FEATURES_OK, no DRIVER_OK
    with pytest.raises(SnapshotError, match="without DRIVER_OK"):
        _live_rng_transport().restore(state)
