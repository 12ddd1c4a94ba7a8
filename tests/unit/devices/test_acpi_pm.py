from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from popek.devices import acpi_pm as pm
from popek.devices.clock import NS_PER_SECOND
from popek.devices.irq import IrqLine


class FakeClock:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


def make(bits: int = 32) -> tuple[pm.AcpiPm, FakeClock, list[bool], list[pm.SleepState]]:
    clock = FakeClock()
    levels: list[bool] = []
    sleeps: list[pm.SleepState] = []
    dev = pm.AcpiPm(clock, IrqLine(9, lambda _n, level: levels.append(level)), sleeps.append, timer_bits=bits)
    return dev, clock, levels, sleeps


def u16(dev: pm.AcpiPm, offset: int) -> int:
    return int(struct.unpack("<H", dev.read(offset, 2))[0])


def tmr(dev: pm.AcpiPm) -> int:
    return int(struct.unpack("<I", dev.read(pm.PM_TMR, 4))[0])


def test_pm_timer_counts_at_3_579545_mhz_of_the_vm_clock() -> None:
    dev, clock, _, _ = make()
    assert tmr(dev) == 0
    clock.ns = NS_PER_SECOND
    assert tmr(dev) == 3_579_545
    clock.ns = 10 * NS_PER_SECOND + 1_000
    assert tmr(dev) == 35_795_453  # 10.000001 s: 35 795 450 + 3.58 ticks
    # byte reads see the same counter, lane by lane
    clock.ns = 13 * NS_PER_SECOND
    assert bytes(dev.read(pm.PM_TMR + i, 1)[0] for i in range(4)) == (13 * 3_579_545).to_bytes(4, "little")


def test_pm_timer_is_monotonic_even_if_the_clock_it_reads_goes_back() -> None:
    dev, clock, _, _ = make()
    clock.ns = 2 * NS_PER_SECOND
    first = tmr(dev)
    clock.ns = NS_PER_SECOND  # another vCPU's earlier view of time (the software backend)
    assert tmr(dev) == first
    clock.ns = 3 * NS_PER_SECOND
    assert tmr(dev) > first


def test_pm_timer_wraps_at_its_width_and_sets_tmr_sts_when_its_top_bit_flips() -> None:
    for bits in (24, 32):
        dev, clock, _, _ = make(bits)
        half = 1 << (bits - 1)
        clock.ns = (half - 1) * NS_PER_SECOND // pm.PM_TIMER_HZ
        assert not u16(dev, pm.PM1_EVT) & pm.TMR_STS
        clock.ns = -(-(half + 5) * NS_PER_SECOND // pm.PM_TIMER_HZ)
        assert tmr(dev) >> (bits - 1) == 1
        assert u16(dev, pm.PM1_EVT) & pm.TMR_STS
        dev.write(pm.PM1_EVT, struct.pack("<H", pm.TMR_STS))  # write 1 to clear
        assert not u16(dev, pm.PM1_EVT) & pm.TMR_STS
        clock.ns = -(-(2 * half + 7) * NS_PER_SECOND // pm.PM_TIMER_HZ)
        assert tmr(dev) == 7
        assert u16(dev, pm.PM1_EVT) & pm.TMR_STS


def test_enabled_timer_event_raises_the_sci_while_sci_en_is_set() -> None:
    dev, clock, levels, _ = make(24)
    dev.write(pm.PM1_EVT + 2, struct.pack("<H", pm.TMR_EN))
    assert u16(dev, pm.PM1_EVT + 2) == pm.TMR_EN
    clock.ns = NS_PER_SECOND * 3  # 10.7 M ticks: bit 23 has flipped
    dev.read(pm.PM1_EVT, 2)
    assert levels == [True]
    dev.write(pm.PM1_CNT, struct.pack("<H", 0))  # SCI_EN off: events go nowhere
    assert levels == [True, False]
    dev.write(pm.PM1_CNT, struct.pack("<H", pm.SCI_EN))
    assert levels[-1] is True
    dev.write(pm.PM1_EVT, struct.pack("<H", pm.TMR_STS))
    assert levels[-1] is False


def test_sci_en_starts_set_and_write_only_bits_read_as_zero() -> None:
    dev, _, _, sleeps = make()
    assert u16(dev, pm.PM1_CNT) == pm.SCI_EN
    dev.write(pm.PM1_CNT, struct.pack("<H", pm.SCI_EN | pm.GBL_RLS | (5 << pm.SLP_TYP_SHIFT)))
    assert u16(dev, pm.PM1_CNT) == pm.SCI_EN | (5 << pm.SLP_TYP_SHIFT)
    assert sleeps == []


def test_slp_en_with_the_s5_type_powers_off() -> None:
    dev, _, _, sleeps = make()
    dev.write(pm.PM1_CNT, struct.pack("<H", pm.SCI_EN | pm.SLP_EN | (pm.SLP_TYP_S5 << pm.SLP_TYP_SHIFT)))
    assert sleeps == [pm.SleepState.S5]
    assert not u16(dev, pm.PM1_CNT) & pm.SLP_EN


def test_slp_en_written_as_the_high_byte_alone_takes_the_type_already_there() -> None:
    dev, _, _, sleeps = make()
    dev.write(pm.PM1_CNT + 1, bytes([(pm.SLP_EN | (pm.SLP_TYP_S4 << pm.SLP_TYP_SHIFT)) >> 8]))
    assert sleeps == [pm.SleepState.S4]


def test_s3_as_kvm_unit_tests_s3_asks_for_it_ends_the_vm_and_unknown_types_do_nothing() -> None:
    dev, _, _, sleeps = make()
    dev.write(pm.PM1_EVT + 2, struct.pack("<H", 0x400))  # s3.c: RTC_EN
    assert u16(dev, pm.PM1_EVT + 2) == pm.RTC_EN
    dev.write(pm.PM1_CNT, struct.pack("<H", 0x2400))  # s3.c: SLP_EN | SLP_TYP 1
    assert sleeps == [pm.SleepState.S3]
    dev.write(pm.PM1_CNT, struct.pack("<H", pm.SLP_EN | (5 << pm.SLP_TYP_SHIFT)))
    assert sleeps == [pm.SleepState.S3]


@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.integers(min_value=0, max_value=pm.PM_BLOCK_SIZE - 1),
            st.sampled_from([1, 2, 4]),
            st.binary(min_size=4, max_size=4),
            st.integers(min_value=-(10**12), max_value=10**13),
        ),
        max_size=40,
    )
)
def test_arbitrary_accesses_keep_the_registers_to_their_defined_bits(
    ops: list[tuple[bool, int, int, bytes, int]],
) -> None:
    dev, clock, _, _ = make()
    for is_write, offset, size, data, now in ops:
        clock.ns = now
        if is_write:
            dev.write(offset, data[:size])
        else:
            assert len(dev.read(offset, size)) == size
        assert dev.en & ~pm.EN_BITS == 0
        assert dev.cnt & ~pm.CNT_KEPT == 0
        assert 0 <= dev.sts < 1 << 16
        assert 0 <= dev.timer() < 1 << 32
