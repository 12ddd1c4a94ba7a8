from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from popek.bus import Bus
from popek.devices.irq import IrqLine
from popek.devices.legacy import serial as uart
from popek.devices.legacy.bochs_shutdown import SHUTDOWN, BochsShutdown
from popek.devices.legacy.cmos import Cmos
from popek.devices.legacy.i8042 import I8042
from popek.devices.legacy.misc import DEBUG_EXIT_SIZE, DebugExit
from popek.devices.legacy.reset_control import RESET_VALUE, ResetControl


def make_uart() -> tuple[uart.Serial, list[bytes], list[bool]]:
    out: list[bytes] = []
    levels: list[bool] = []
    return uart.Serial(IrqLine(4, lambda _n, lvl: levels.append(lvl)), out.append), out, levels


def test_uart_transmits_bytes_written_to_thr() -> None:
    dev, out, _ = make_uart()
    for b in b"ok\n":
        dev.write(uart.RBR_THR, bytes([b]))
    assert b"".join(out) == b"ok\n"
    assert dev.read(uart.LSR, 1)[0] & uart.LSR_THRE


def test_uart_divisor_latch_hides_thr_and_ier() -> None:
    dev, out, _ = make_uart()
    dev.write(uart.LCR, b"\x83")
    dev.write(uart.RBR_THR, b"\x01")
    dev.write(uart.IER, b"\x00")
    dev.write(uart.LCR, b"\x03")
    assert out == []
    assert (dev.dll, dev.dlm) == (1, 0)


def test_uart_raises_thre_interrupt_until_iir_is_read() -> None:
    dev, _, levels = make_uart()
    dev.write(uart.IER, bytes([uart.IER_THRE]))
    assert levels == [True]
    assert dev.read(uart.IIR_FCR, 1)[0] & 0x0F == uart.IIR_THRE
    assert levels == [True, False]
    assert dev.read(uart.IIR_FCR, 1)[0] & 0x0F == uart.IIR_NONE


def test_uart_receive_fifo_interrupts_and_fills_up() -> None:
    dev, _, levels = make_uart()
    dev.write(uart.IER, bytes([uart.IER_RDA]))
    assert dev.enqueue_input(b"x" * 100) == uart.RX_FIFO_SIZE
    assert levels[-1] is True
    assert dev.read(uart.LSR, 1)[0] & uart.LSR_DR
    data = bytes(dev.read(uart.RBR_THR, 1)[0] for _ in range(uart.RX_FIFO_SIZE))
    assert data == b"x" * uart.RX_FIFO_SIZE
    assert levels[-1] is False
    assert not dev.read(uart.LSR, 1)[0] & uart.LSR_DR


def test_uart_reports_a_16550a_fifo_when_enabled() -> None:
    dev, _, _ = make_uart()
    dev.write(uart.IIR_FCR, b"\x07")
    assert dev.read(uart.IIR_FCR, 1)[0] & 0xC0 == 0xC0


def test_uart_loopback_feeds_transmit_back_to_receive() -> None:
    dev, out, _ = make_uart()
    dev.write(uart.MCR, bytes([uart.MCR_LOOP | 0x0B]))
    dev.write(uart.RBR_THR, b"Z")
    assert out == []
    assert dev.read(uart.RBR_THR, 1) == b"Z"
    assert dev.read(uart.MSR, 1)[0] & 0xF0 == 0xB0


def test_i8042_pulse_reset_command_resets() -> None:
    resets: list[int] = []
    dev = I8042(lambda: resets.append(1))
    dev.write(4, b"\xfe")
    assert resets == [1]


def test_i8042_answers_ctr_read_and_self_test() -> None:
    dev = I8042(lambda: None)
    dev.write(4, b"\x20")
    assert dev.read(4, 1)[0] & 0x01
    assert dev.read(0, 1) == bytes([0x47])
    dev.write(4, b"\x60")
    dev.write(0, b"\x65")
    dev.write(4, b"\x20")
    assert dev.read(0, 1) == b"\x65"
    dev.write(4, b"\xaa")
    assert dev.read(0, 1) == b"\x55"
    assert not dev.read(4, 1)[0] & 0x01


def test_i8042_output_port_write_without_reset_bit_resets() -> None:
    resets: list[int] = []
    dev = I8042(lambda: resets.append(1))
    dev.write(4, b"\xd1")
    dev.write(0, b"\x00")
    assert resets == [1]


def test_cmos_clock_reads_host_time_in_bcd_and_binary() -> None:
    t = time.mktime((2026, 11, 24, 19, 45, 30, 0, 0, 0)) - time.timezone
    dev = Cmos(clock=lambda: t)

    def reg(n: int) -> int:
        dev.write(0, bytes([n]))
        return dev.read(1, 1)[0]

    assert (reg(4), reg(2), reg(0)) == (0x19, 0x45, 0x30)
    assert (reg(7), reg(8), reg(9), reg(0x32)) == (0x24, 0x11, 0x26, 0x20)
    dev.write(0, b"\x0b")
    dev.write(1, b"\x06")
    assert reg(4) == 19
    assert reg(0x0D) & 0x80


def test_cmos_nvram_keeps_values_and_index_masks_nmi_bit() -> None:
    dev = Cmos()
    dev.write(0, b"\xb0")
    dev.write(1, b"\x5a")
    dev.write(0, b"\x30")
    assert dev.read(1, 1) == b"\x5a"
    assert dev.nmi_disabled is False


def test_debug_exit_status_is_value_shifted_left_plus_one() -> None:
    got: list[int] = []
    DebugExit(got.append).write(0, b"\x2a")
    assert got == [0x55]


def test_debug_exit_takes_the_whole_1_2_or_4_byte_write_at_any_of_its_ports() -> None:
    got: list[int] = []
    bus = Bus("port")
    bus.insert(0xF4, DEBUG_EXIT_SIZE, DebugExit(got.append), "debug exit")
    bus.write(0xF4, (0x1234).to_bytes(4, "little"))  # kvm-unit-tests: outl(code, 0xf4)
    bus.write(0xF4, (0x0102).to_bytes(2, "little"))
    bus.write(0xF7, b"\x03")
    bus.write(0xF6, b"\xff\xff")
    bus.write(0xF4, b"\xff\xff\xff\xff")
    assert got == [0x2469, 0x205, 0x7, 0x1FFFF, 0x1FFFFFFFF]
    assert bus.unclaimed == {}


def test_bochs_shutdown_sequence_powers_off() -> None:
    offs: list[int] = []
    dev = BochsShutdown(lambda: offs.append(1))
    for b in b"Shutdown":
        dev.write(0, bytes([b]))
    assert offs == [1]
    assert dev.matched == 0  # ready for another sequence


def test_bochs_shutdown_wrong_or_wide_writes_do_not_power_off() -> None:
    offs: list[int] = []
    dev = BochsShutdown(lambda: offs.append(1))
    for b in b"Shutdowm" + b"ShutXdown":
        dev.write(0, bytes([b]))
    dev.write(0, b"Sh")
    for b in b"utdown":
        dev.write(0, bytes([b]))
    assert offs == []
    for b in b"SShutdown":  # a fresh 'S' restarts the sequence
        dev.write(0, bytes([b]))
    assert offs == [1]
    assert dev.read(0, 1) == b"\xff"


@given(st.lists(st.binary(min_size=1, max_size=4), max_size=200))
def test_bochs_shutdown_powers_off_exactly_when_the_bytes_end_with_shutdown(writes: list[bytes]) -> None:
    offs: list[int] = []
    dev = BochsShutdown(lambda: offs.append(1))
    stream: list[int | None] = []
    for w in writes:
        dev.write(0, w)
        stream.append(w[0] if len(w) == 1 else None)
        assert 0 <= dev.matched < len(SHUTDOWN)
    expected = 0
    run = 0
    for b in stream:  # a reference matcher: count completed sequences
        if b is not None and b == SHUTDOWN[run]:
            run += 1
        else:
            run = 1 if b == SHUTDOWN[0] else 0
        if run == len(SHUTDOWN):
            expected += 1
            run = 0
    assert len(offs) == expected


def test_reset_control_resets_on_rst_cpu_and_keeps_sys_rst() -> None:
    resets: list[int] = []
    dev = ResetControl(lambda: resets.append(1))
    dev.write(0, b"\x02")  # Linux's reboot=pci writes SYS_RST first...
    assert resets == [] and dev.read(0, 1) == b"\x02"
    dev.write(0, bytes([RESET_VALUE]))  # ...then SYS_RST | RST_CPU, the FADT's reset value
    assert resets == [1]
    dev.write(0, b"\x09")
    assert dev.read(0, 1) == b"\x00" and resets == [1]


@given(st.lists(st.binary(max_size=4), max_size=50))
def test_reset_control_arbitrary_writes(writes: list[bytes]) -> None:
    resets: list[int] = []
    dev = ResetControl(lambda: resets.append(1))
    for w in writes:
        dev.write(0, w)
        assert dev.read(0, 1)[0] in (0, 2)
    assert len(resets) == sum(1 for w in writes if w and w[0] & 4)


@given(st.binary(min_size=1, max_size=4))
def test_debug_exit_status_is_the_whole_write_shifted_plus_one(data: bytes) -> None:
    got: list[int] = []
    DebugExit(got.append).write(0, data)
    assert got == [(int.from_bytes(data, "little") << 1) | 1]
