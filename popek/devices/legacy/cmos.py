"""The MC146818 CMOS real-time clock and its NVRAM, at ports 0x70 (index) and 0x71 (data).

The clock reads the host's time (UTC, as Linux expects of a VM's RTC) at the moment of each read, in BCD or
binary and 12- or 24-hour form as register B asks. Update-in-progress is never set: there is no update cycle to
race. Bit 7 of the index write is the NMI mask, kept but unused.

A snapshot saves the index, the NMI mask and the 128 bytes of registers and NVRAM, not the time: the time
registers are computed from the host clock at each read, so a restored guest reads the host's time of the
restore, as a laptop's RTC reads the wall time after a suspend. The guest's clock jumps forward by the time the
VM spent saved; Linux reads the RTC only at boot and on resume, so its system time steps when its kvm-clock or
TSC says it should (KVM_SET_CLOCK, `popek.accel.kvm_snapshot`), or NTP corrects it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from popek.devices import state as st

INDEX = 0
DATA = 1

REG_SECONDS, REG_MINUTES, REG_HOURS = 0x00, 0x02, 0x04
REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
REG_CENTURY = 0x32

B_24H = 0x02
B_BINARY = 0x04


STATE_FIELDS: dict[str, st.Check] = {"index": st.uint(7), "nmi_disabled": st.boolean, "ram": st.raw(128)}


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


class Cmos:
    def __init__(self, clock: Callable[[], float] = time.time, nvram: dict[int, int] | None = None) -> None:
        self.clock = clock
        self.index = 0
        self.nmi_disabled = False
        self.ram = bytearray(128)
        self.ram[REG_A] = 0x26
        self.ram[REG_B] = B_24H
        self.ram[REG_D] = 0x80  # battery good
        for reg, value in (nvram or {}).items():
            self.ram[reg] = value

    def _time_register(self, reg: int) -> int | None:
        t = time.gmtime(self.clock())
        binary = self.ram[REG_B] & B_BINARY

        def enc(v: int) -> int:
            return v if binary else _bcd(v)

        if reg == REG_SECONDS:
            return enc(t.tm_sec)
        if reg == REG_MINUTES:
            return enc(t.tm_min)
        if reg == REG_HOURS:
            if self.ram[REG_B] & B_24H:
                return enc(t.tm_hour)
            hour12 = t.tm_hour % 12 or 12
            return enc(hour12) | (0x80 if t.tm_hour >= 12 else 0)
        if reg == REG_WEEKDAY:
            return enc((t.tm_wday + 1) % 7 + 1)
        if reg == REG_DAY:
            return enc(t.tm_mday)
        if reg == REG_MONTH:
            return enc(t.tm_mon)
        if reg == REG_YEAR:
            return enc(t.tm_year % 100)
        if reg == REG_CENTURY:
            return enc(t.tm_year // 100)
        return None

    def read(self, offset: int, size: int) -> bytes:
        if offset == INDEX:
            return bytes([0xFF]) * size
        reg = self.index
        value = self._time_register(reg)
        if value is None:
            value = self.ram[reg]
            if reg == REG_C:
                self.ram[REG_C] = 0  # reading C acknowledges interrupt flags
        return bytes([value]) * size

    def write(self, offset: int, data: bytes) -> None:
        value = data[0] if data else 0
        if offset == INDEX:
            self.nmi_disabled = bool(value & 0x80)
            self.index = value & 0x7F
        elif self.index in (REG_C, REG_D):
            pass  # read-only
        elif self.index == REG_A:
            self.ram[REG_A] = value & 0x7F  # UIP is read-only
        else:
            self.ram[self.index] = value

    def state(self) -> dict[str, Any]:
        return st.save(self, STATE_FIELDS)

    def restore(self, state: dict[str, Any]) -> None:
        values = st.load(state, STATE_FIELDS, "cmos")
        self.index, self.nmi_disabled, self.ram = values["index"], values["nmi_disabled"], bytearray(values["ram"])
