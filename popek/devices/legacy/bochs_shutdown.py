"""The Bochs/QEMU power-off port 0x8900: writing the eight bytes "Shutdown", one OUTB each and in order, powers
the machine off (the BIOS port of Bochs, kept by QEMU's PC for years; kvm-unit-tests' `exit` falls back to it
when the debug-exit port did not end the VM).

A byte that breaks the sequence starts it over (at its first byte if the byte is an 'S', so "SShutdown" still
counts); wider writes are not part of the protocol and start it over too. Reads return the open bus, 0xFF.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from popek.devices import state as st

SHUTDOWN = b"Shutdown"


class BochsShutdown:
    def __init__(self, on_poweroff: Callable[[], None]) -> None:
        self.on_poweroff = on_poweroff
        self.matched = 0  # how many bytes of SHUTDOWN the guest has written in a row
        self._lock = threading.Lock()

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            if len(data) != 1:
                self.matched = 0
                return
            if data[0] == SHUTDOWN[self.matched]:
                self.matched += 1
            else:
                self.matched = 1 if data[0] == SHUTDOWN[0] else 0
            done = self.matched == len(SHUTDOWN)
            if done:
                self.matched = 0
        if done:
            self.on_poweroff()

    def state(self) -> dict[str, Any]:
        """How far into "Shutdown" the guest is: a snapshot between two OUTBs resumes the sequence."""
        with self._lock:
            return {"matched": self.matched}

    def restore(self, state: dict[str, Any]) -> None:
        values = st.load(state, {"matched": st.integer(0, len(SHUTDOWN) - 1)}, "bochs shutdown")
        with self._lock:
            self.matched = values["matched"]
