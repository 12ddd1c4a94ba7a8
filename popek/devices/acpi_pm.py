"""The ACPI fixed-hardware power-management registers of a PC: PM1a event and control blocks and the PM timer,
laid out as the PIIX4's power-management function that QEMU's `pc` machine emulates (PM base 0x600: PM1a_EVT at
+0, PM1a_CNT at +4, PM_TMR at +8), so the FADT popek builds (`popek.boot.acpi`) points where QEMU's does.

ACPI 6.0 §4.8.3 defines the registers:
- PM1_STS (+0, 16 bits, §4.8.3.1.1): status bits, each cleared by writing 1 (TMR_STS, BM_STS, GBL_STS,
  PWRBTN_STS, SLPBTN_STS, RTC_STS, PCIEXP_WAKE_STS, WAK_STS). TMR_STS is set whenever the PM timer's top bit
  changes; popek notices that when the guest touches the block (it schedules no timer for it), which is when a
  polling guest looks, and raises the SCI then if TMR_EN asks for it.
- PM1_EN (+2, 16 bits, §4.8.3.1.2): the matching enables. The SCI (a level-triggered line, IRQ 9 on a PC) is
  asserted while SCI_EN is set and some enabled event's status bit is set (§4.8.3.1, §5.6.1).
- PM1_CNT (+4, 16 bits, §4.8.3.2.1): SCI_EN (set from the start: there is no SMI_CMD port, so the machine is
  always in ACPI mode, §5.2.9 SMI_CMD = 0), BM_RLD, GBL_RLS (write-only), SLP_TYPx and SLP_EN (write-only).
  Writing SLP_EN enters the sleep state SLP_TYPx names, with PIIX4's values as QEMU's DSDT gives them and as
  its `acpi_pm1_cnt_write` acts on them: 0 is S5 (soft off: the VM powers off), 2 is S4 (the OS has saved its
  image: QEMU powers off, and so does popek), 1 is S3 (suspend to RAM). QEMU suspends the VM and resumes it
  through the firmware, which jumps to the FACS waking vector; popek has no firmware to resume a guest and no
  wake source (its RTC has no alarm), so S3 ends the VM, said as such (`SleepState.S3`), and popek's DSDT offers
  no \\_S3 package, so an OS that reads it never asks for S3 (kvm-unit-tests' s3.flat writes the register
  directly and is told the VM ended). Other sleep types are ignored, as by QEMU.
- PM_TMR (+8, 32 bits, §4.8.3.3): a free-running 3.579545 MHz counter, read-only. popek's is 32 bits wide
  (TMR_VAL_EXT in the FADT flags); QEMU's is 24. Its value is derived from the VM's time, a `Callable[[], int]`
  of nanoseconds the backend supplies (host monotonic time on KVM, virtual time on the software CPU, so that
  there it is deterministic), and never goes back, whichever vCPU reads it.

Accesses of any size within a block are answered byte by byte from the registers' little-endian images, as
QEMU's memory core splits and combines them; a write touches only the bytes it covers. One lock serialises the
vCPU threads, the SCI level included (so two vCPUs cannot deliver their levels out of order); the sleep callback
runs after the lock is released.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import Enum
from typing import Any

from popek.devices import state as st
from popek.devices.clock import ticks_at
from popek.devices.irq import IrqLine

PM_TIMER_HZ = 3_579_545
PM_TIMER_BITS = 32

# register blocks, as offsets from the PM base (PIIX4 function 3's PMBA, 0x600 under QEMU)
PM1_EVT = 0x00  # PM1_STS at +0, PM1_EN at +2
PM1_EVT_LEN = 4
PM1_CNT = 0x04
PM1_CNT_LEN = 2
PM_TMR = 0x08
PM_TMR_LEN = 4
PM_BLOCK_SIZE = PM_TMR + PM_TMR_LEN

# PM1_STS / PM1_EN bits (§4.8.3.1.1, §4.8.3.1.2)
TMR_STS = 1 << 0
BM_STS = 1 << 4
GBL_STS = 1 << 5
PWRBTN_STS = 1 << 8
SLPBTN_STS = 1 << 9
RTC_STS = 1 << 10
PCIEXP_WAKE_STS = 1 << 14
WAK_STS = 1 << 15
TMR_EN = 1 << 0
GBL_EN = 1 << 5
PWRBTN_EN = 1 << 8
SLPBTN_EN = 1 << 9
RTC_EN = 1 << 10
PCIEXP_WAKE_DIS = 1 << 14
EN_BITS = TMR_EN | GBL_EN | PWRBTN_EN | SLPBTN_EN | RTC_EN | PCIEXP_WAKE_DIS
SCI_EVENTS = TMR_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS  # status bits whose enable raises the SCI

# PM1_CNT bits (§4.8.3.2.1)
SCI_EN = 1 << 0
BM_RLD = 1 << 1
GBL_RLS = 1 << 2
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13
CNT_KEPT = SCI_EN | BM_RLD | SLP_TYP_MASK  # GBL_RLS and SLP_EN are write-only and read as 0

# SLP_TYPx values of the PIIX4 (the \_Sx packages of QEMU's DSDT for the pc machine)
SLP_TYP_S5 = 0
SLP_TYP_S3 = 1
SLP_TYP_S4 = 2


class SleepState(Enum):
    """A sleep state the guest entered through SLP_EN; the VM ends with each (see the module docstring)."""

    S3 = "suspend to RAM (ACPI S3): popek has no firmware to resume the guest, so the VM ends"
    S4 = "suspend to disk (ACPI S4): the VM powers off"
    S5 = "soft off (ACPI S5): the VM powers off"


SLEEP_TYPES = {SLP_TYP_S3: SleepState.S3, SLP_TYP_S4: SleepState.S4, SLP_TYP_S5: SleepState.S5}


class AcpiPm:
    """PM1a event, PM1a control and PM timer blocks, at their offsets from the PM base (the builder places each
    block on the port bus through a `Window`, under its own name; there is a gap between PM1_CNT and PM_TMR)."""

    def __init__(
        self,
        time_ns: Callable[[], int],
        sci: IrqLine,
        on_sleep: Callable[[SleepState], None],
        timer_bits: int = PM_TIMER_BITS,
    ) -> None:
        if timer_bits not in (24, 32):
            raise ValueError(f"the ACPI PM timer is 24 or 32 bits wide, not {timer_bits}")
        self.time_ns = time_ns
        self.sci = sci
        self.on_sleep = on_sleep
        self.timer_bits = timer_bits
        self.sts = 0
        self.en = 0
        self.cnt = SCI_EN
        self._lock = threading.Lock()
        self._last_ticks = 0
        self._time_offset = 0  # added to the time base: a restored timer goes on from its saved time
        self._msb_epoch = self._ticks() >> (timer_bits - 1)

    def _ticks(self) -> int:
        """Timer ticks since time 0, never fewer than at the last look (lock held): the counter is one for the
        whole machine, while vCPUs of the software backend each see the time of their own quantum."""
        now = ticks_at(max(0, self._time()), PM_TIMER_HZ)
        self._last_ticks = max(self._last_ticks, now)
        return self._last_ticks

    def _time(self) -> int:
        """The PM timer's time: the VM's time base, moved by a restore to go on from the snapshot's."""
        return self.time_ns() + self._time_offset

    def timer(self) -> int:
        """The PM_TMR value now."""
        with self._lock:
            return self._sample_timer()

    def _sample_timer(self) -> int:
        """The timer's value, and TMR_STS set if its top bit changed since the last look (lock held)."""
        ticks = self._ticks()
        epoch = ticks >> (self.timer_bits - 1)
        if epoch != self._msb_epoch:
            self._msb_epoch = epoch
            self.sts |= TMR_STS
        return ticks & ((1 << self.timer_bits) - 1)

    def _sci_level(self) -> bool:
        return bool(self.cnt & SCI_EN) and bool(self.sts & self.en & SCI_EVENTS)

    def _image(self) -> bytes:
        """The block's bytes, offsets 0 to PM_BLOCK_SIZE - 1 (the gap at +6 reads 0)."""
        tmr = self._sample_timer()
        return (
            self.sts.to_bytes(2, "little")
            + self.en.to_bytes(2, "little")
            + self.cnt.to_bytes(2, "little")
            + bytes(2)
            + tmr.to_bytes(4, "little")
        )

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            image = self._image()
            self.sci.set_level(self._sci_level())
        return image[offset : offset + size].ljust(size, b"\0")

    def write(self, offset: int, data: bytes) -> None:
        def field(base: int, length: int) -> tuple[int, int]:
            """(value, mask) of the bytes of `data` that fall on the register at base..base+length."""
            value = mask = 0
            for i, byte in enumerate(data):
                at = offset + i - base
                if 0 <= at < length:
                    value |= byte << (8 * at)
                    mask |= 0xFF << (8 * at)
            return value, mask

        sleep: SleepState | None = None
        with self._lock:
            self._sample_timer()
            value, mask = field(PM1_EVT, 2)
            self.sts &= ~(value & mask)  # write 1 to clear
            value, mask = field(PM1_EVT + 2, 2)
            self.en = (self.en & ~mask) | (value & mask & EN_BITS)
            value, mask = field(PM1_CNT, PM1_CNT_LEN)
            if mask:
                written = (self.cnt & ~mask) | (value & mask)
                self.cnt = written & CNT_KEPT
                if value & mask & SLP_EN:
                    sleep = SLEEP_TYPES.get((written & SLP_TYP_MASK) >> SLP_TYP_SHIFT)
            self.sci.set_level(self._sci_level())
        if sleep is not None:
            self.on_sleep(sleep)

    # --- snapshots ---

    def state(self) -> dict[str, Any]:
        """PM1 status, enable and control, the SCI level, and the PM timer's time and count: the time base of a
        restored VM (host time since it was created, on KVM) starts elsewhere, and the timer must go on from
        where it was, not back (ACPI §4.8.3.3: it runs monotonically while the system is in S0)."""
        with self._lock:
            self._sample_timer()
            return {
                "sts": self.sts,
                "en": self.en,
                "cnt": self.cnt,
                "time_ns": max(0, self._time()),
                "ticks": self._last_ticks,
                "msb_epoch": self._msb_epoch,
                "timer_bits": self.timer_bits,
                "sci_level": self.sci.level,
            }

    def restore(self, state: dict[str, Any]) -> None:
        fields: dict[str, st.Check] = {
            "sts": st.uint(16),
            "en": st.masked(EN_BITS),
            "cnt": st.masked(CNT_KEPT),
            "time_ns": st.integer(0, st.MAX_TIME_NS),
            "ticks": st.integer(0, 1 << 62),
            "msb_epoch": st.integer(0, 1 << 62),
            "timer_bits": st.one_of(self.timer_bits),
            "sci_level": st.boolean,
        }
        values = st.load(state, fields, "acpi pm")
        with self._lock:
            self.sts, self.en, self.cnt = values["sts"], values["en"], values["cnt"]
            self._time_offset = values["time_ns"] - self.time_ns()
            self._last_ticks = values["ticks"]
            self._msb_epoch = values["msb_epoch"]
            self.sci.restore_level(values["sci_level"])
            self.sci.set_level(self._sci_level())
