"""The PIIX3/PIIX4 Reset Control Register at port 0xCF9 (Intel 82371AB PIIX4 datasheet §4.1.17, "RC — Reset
Control Register"), as QEMU's `pc` machine has it: writing a value with RST_CPU (bit 2) set resets the machine;
SYS_RST (bit 1), the choice between a hard and a soft reset, is kept and read back. popek names this port as the
ACPI reset register in its FADT (value 0x06, SYS_RST | RST_CPU, the hard reset Linux's `reboot=pci` also
writes), so both ACPI and PCI-style reboots reach it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from popek.devices import state as st

SYS_RST = 1 << 1
RST_CPU = 1 << 2
RESET_VALUE = SYS_RST | RST_CPU


class ResetControl:
    def __init__(self, on_reset: Callable[[], None]) -> None:
        self.on_reset = on_reset
        self.value = 0
        self.resets = 0
        self._lock = threading.Lock()

    def read(self, offset: int, size: int) -> bytes:
        return (bytes([self.value]) + bytes(size))[:size]

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            if data[0] & RST_CPU:
                self.resets += 1
                reset = True
            else:
                self.value = data[0] & SYS_RST
                reset = False
        if reset:
            self.on_reset()

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {"value": self.value}

    def restore(self, state: dict[str, Any]) -> None:
        values = st.load(state, {"value": st.masked(SYS_RST)}, "reset control")
        with self._lock:
            self.value = values["value"]
