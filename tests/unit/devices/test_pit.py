from __future__ import annotations

from popek.devices.clock import VirtualClock, ns_of_tick, ticks_at
from popek.devices.legacy.pit import PIT_HZ, Pit, SystemControlPort
from popek.devices.platform import SoftPlatform


def make() -> tuple[VirtualClock, Pit, list[tuple[int, bool]]]:
    clock = VirtualClock()
    edges: list[tuple[int, bool]] = []
    pit = Pit(clock, on_out0=lambda level: edges.append((clock.now_ns(), level)))
    return clock, pit, edges


def at_tick(clock: VirtualClock, tick: int) -> None:
    clock.advance_to(ns_of_tick(tick, PIT_HZ))


def out(v: int) -> bytes:
    return bytes([v])


def program(pit: Pit, channel: int, mode: int, count: int, rw: int = 3) -> None:
    pit.write(3, out(channel << 6 | rw << 4 | mode << 1))
    if rw in (1, 3):
        pit.write(channel, out(count & 0xFF))
    if rw in (2, 3):
        pit.write(channel, out(count >> 8 & 0xFF))


def latched(pit: Pit, channel: int) -> int:
    pit.write(3, out(channel << 6))  # counter latch command
    return pit.read(channel, 1)[0] | pit.read(channel, 1)[0] << 8


def test_mode2_rate_generator_gives_irq0_at_1khz() -> None:
    clock, pit, edges = make()
    program(pit, 0, 2, 1193)  # what Linux's PIT clockevent writes for HZ=1000
    clock.advance_to(10_000_000)
    rises = [t for t, level in edges if level]
    falls = [t for t, level in edges if not level]
    assert len(rises) == 10
    # the count is loaded on the clock after the write; OUT drops for the one clock of count 1, then rises
    assert falls == [ns_of_tick(1 + 1193 * k + 1192, PIT_HZ) for k in range(10)]
    assert rises == [ns_of_tick(1 + 1193 * (k + 1), PIT_HZ) for k in range(10)]
    period = rises[1] - rises[0]
    assert 999_000 < period < 1_000_700


def test_mode2_counter_reads_and_new_count_at_end_of_period() -> None:
    clock, pit, _ = make()
    program(pit, 0, 2, 1000)
    at_tick(clock, 1)
    assert latched(pit, 0) == 1000
    at_tick(clock, 101)
    assert latched(pit, 0) == 900
    pit.write(0, out(500 & 0xFF))
    pit.write(0, out(500 >> 8))
    at_tick(clock, 1000)
    assert latched(pit, 0) == 1  # still the old period
    at_tick(clock, 1001)
    assert latched(pit, 0) == 500
    at_tick(clock, 1501)
    assert latched(pit, 0) == 500


def test_mode0_one_shot_rises_n_plus_1_clocks_after_the_write_and_keeps_counting() -> None:
    clock, pit, edges = make()
    program(pit, 0, 0, 100)
    assert edges == [(0, False)] or edges == []
    assert not pit.channels[0].out()
    at_tick(clock, 100)
    assert not pit.channels[0].out()
    assert latched(pit, 0) == 1
    at_tick(clock, 103)
    assert latched(pit, 0) == 0xFFFE  # wrapped past zero, still counting
    clock.advance_to(10_000_000)
    assert [e for e in edges if e[1]] == [(ns_of_tick(101, PIT_HZ), True)]
    assert pit.channels[0].out()


def test_mode0_rewrite_lowers_out_and_restarts() -> None:
    clock, pit, edges = make()
    program(pit, 0, 0, 10)
    at_tick(clock, 20)
    assert pit.channels[0].out()
    pit.write(0, out(50))  # first byte: counting stops, OUT low at once
    assert edges[-1] == (clock.now_ns(), False)
    at_tick(clock, 40)
    assert not pit.channels[0].out()
    pit.write(0, out(0))
    at_tick(clock, 40 + 50)
    assert not pit.channels[0].out()
    at_tick(clock, 40 + 51)
    assert pit.channels[0].out()


def test_lobyte_hibyte_reads_without_latch_as_quick_pit_calibrate_does() -> None:
    clock, pit, _ = make()
    program(pit, 2, 0, 0xFFFF)
    port61 = SystemControlPort(pit)
    port61.write(0, b"\x01")  # gate high
    at_tick(clock, 0x300)
    start_tick = ticks_at(clock.now_ns(), PIT_HZ)
    lsb = pit.read(2, 1)[0]
    msb = pit.read(2, 1)[0]
    # the gate went high at tick 0: the count was loaded on the next clock
    assert msb << 8 | lsb == 0xFFFF - (start_tick - 1)
    pit.write(3, b"\xa0")  # channel 2, MSB only, mode 0
    pit.write(2, b"\x80")
    at_tick(clock, ticks_at(clock.now_ns(), PIT_HZ) + 1 + 0x100)
    assert pit.read(2, 1) == b"\x7f"


def test_latch_holds_its_value_and_second_latch_is_ignored() -> None:
    clock, pit, _ = make()
    program(pit, 1, 2, 5000)
    at_tick(clock, 11)
    pit.write(3, b"\x40")
    at_tick(clock, 500)
    pit.write(3, b"\x40")  # ignored: the first latch has not been read
    assert pit.read(1, 1)[0] | pit.read(1, 1)[0] << 8 == 4990
    assert latched(pit, 1) == 5000 - 499


def test_read_back_status_and_count() -> None:
    clock, pit, _ = make()
    pit.write(3, b"\x34")  # channel 0, lo/hi, mode 2
    pit.write(3, b"\xe2")  # read-back status of channel 0
    assert pit.read(0, 1)[0] == 0x40 | 0x30 | 0x04 | 0x80  # null count, OUT high (mode 2), rw=3, mode 2
    pit.write(0, b"\x10")
    pit.write(0, b"\x00")
    pit.write(3, b"\xe2")
    assert pit.read(0, 1)[0] & 0x40  # the count is not in CE until the next clock
    at_tick(clock, 5)
    pit.write(3, b"\xc2")  # read-back both status and count
    assert pit.read(0, 1)[0] == 0x80 | 0x34  # status first, no null count
    assert pit.read(0, 1)[0] | pit.read(0, 1)[0] << 8 == 16 - 4
    # mode 0 status shows OUT low until terminal count
    pit.write(3, b"\xb0")
    pit.write(2, b"\x02")
    pit.write(2, b"\x00")
    pit.write(3, b"\xe8")
    assert pit.read(2, 1)[0] & 0x80 == 0


def test_port61_gate_and_out2_as_linux_calibration_uses_them() -> None:
    """pit_hpet_ptimer_calibrate_cpu: gate on, speaker off, channel 2 mode 0 with a 50 ms latch, then poll
    bit 5 of port 0x61 until OUT2 rises."""
    clock = VirtualClock()
    pit = Pit(clock)
    port61 = SystemControlPort(pit)
    latch = PIT_HZ // 20
    port61.write(0, bytes([(port61.read(0, 1)[0] & ~0x02) | 0x01]))
    pit.write(3, b"\xb0")
    pit.write(2, out(latch & 0xFF))
    pit.write(2, out(latch >> 8))
    start = clock.now_ns()
    polls = 0
    while not port61.read(0, 1)[0] & 0x20:
        clock.advance_by(1000)
        polls += 1
    elapsed = clock.now_ns() - start
    assert 50_000_000 <= elapsed < 50_002_000
    assert polls > 1000
    assert port61.read(0, 1)[0] & 0x03 == 0x01


def test_gate_low_stops_mode0_counting() -> None:
    clock = VirtualClock()
    pit = Pit(clock)
    port61 = SystemControlPort(pit)
    port61.write(0, b"\x01")
    program(pit, 2, 0, 1000)
    at_tick(clock, 101)
    assert latched(pit, 2) == 900
    port61.write(0, b"\x00")
    at_tick(clock, 5000)
    assert latched(pit, 2) == 900
    assert not port61.read(0, 1)[0] & 0x20
    port61.write(0, b"\x01")
    at_tick(clock, 5000 + 900)
    assert port61.read(0, 1)[0] & 0x20
    at_tick(clock, 5000 + 899)  # time cannot go back: still high
    assert port61.read(0, 1)[0] & 0x20


def test_mode3_square_wave_even_and_odd() -> None:
    clock, pit, edges = make()
    program(pit, 0, 3, 10)
    at_tick(clock, 1 + 10 * 3)
    assert [(ticks_at(t, PIT_HZ), lv) for t, lv in edges] == [
        (6, False),
        (11, True),
        (16, False),
        (21, True),
        (26, False),
        (31, True),
    ]
    at_tick(clock, 33)
    assert latched(pit, 0) == 6  # two clocks into the high half, counting by two
    clock2, pit2, edges2 = make()
    program(pit2, 0, 3, 5)
    at_tick(clock2, 11)
    assert [(ticks_at(t, PIT_HZ), lv) for t, lv in edges2] == [(4, False), (6, True), (9, False), (11, True)]


def test_mode1_and_mode5_are_triggered_by_the_gate() -> None:
    clock = VirtualClock()
    pit = Pit(clock)
    port61 = SystemControlPort(pit)
    ch = pit.channels[2]
    program(pit, 2, 1, 20)
    at_tick(clock, 50)
    assert ch.out()  # waiting for a trigger
    port61.write(0, b"\x01")
    at_tick(clock, 51)
    assert not ch.out()
    at_tick(clock, 70)
    assert not ch.out()
    port61.write(0, b"\x00")
    port61.write(0, b"\x01")  # retrigger: the count restarts, OUT stays low
    at_tick(clock, 90)
    assert not ch.out()
    at_tick(clock, 91)
    assert ch.out()
    port61.write(0, b"\x00")
    program(pit, 2, 5, 10)
    port61.write(0, b"\x01")
    trigger = ticks_at(clock.now_ns(), PIT_HZ)
    at_tick(clock, trigger + 10)
    assert ch.out()
    at_tick(clock, trigger + 11)
    assert not ch.out()  # the one-clock strobe
    at_tick(clock, trigger + 12)
    assert ch.out()


def test_mode4_software_strobe() -> None:
    clock, pit, edges = make()
    program(pit, 0, 4, 30)
    clock.advance_to(1_000_000)
    assert [(ticks_at(t, PIT_HZ), lv) for t, lv in edges] == [(31, False), (32, True)]


def test_bcd_counting() -> None:
    clock, pit, edges = make()
    pit.write(3, b"\x35")  # mode 2, BCD
    pit.write(0, b"\x00")
    pit.write(0, b"\x01")  # 0100 BCD = 100 counts
    at_tick(clock, 1 + 100 * 3)
    assert [ticks_at(t, PIT_HZ) for t, lv in edges if lv] == [101, 201, 301]
    at_tick(clock, 1 + 100 * 3 + 11)
    assert latched(pit, 0) == 0x0089


def test_pit_drives_irq0_through_the_pic_deterministically() -> None:
    def run() -> list[tuple[int, int]]:
        platform = SoftPlatform(1)
        pic = platform.pic
        for port, value in ((0, 0x11), (1, 0x20), (1, 0x04), (1, 0x01), (1, 0xFE)):
            pic.master_port.write(port, bytes([value]))
        platform.lapics[0].enabled = False  # the PIC straight to the processor
        pit = platform.pit
        program(pit, 0, 2, 1193)
        taken: list[tuple[int, int]] = []
        clock = platform.clock
        while clock.now_ns() < 20_000_000:
            deadline = clock.next_deadline()
            assert deadline is not None
            clock.advance_to(deadline)
            lapic = platform.lapic_for(0)
            if lapic.interrupt_pending():
                taken.append((clock.now_ns(), lapic.acknowledge()))
                pic.master_port.write(0, b"\x20")
        return taken

    first = run()
    assert len(first) == 20
    assert {v for _, v in first} == {0x20}
    assert first == run()
