"""Small port devices: the POST-code port and a debug-exit port like QEMU's isa-debug-exit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from popek.devices import state as st

# QEMU's `-device isa-debug-exit,iobase=0xf4,iosize=0x4`, as kvm-unit-tests runs it: ports 0xF4-0xF7
DEBUG_EXIT_SIZE = 4


class PostCode:
    """Port 0x80: firmware and kernels write progress codes (and Linux uses it as an I/O delay)."""

    def __init__(self) -> None:
        self.last = 0

    def read(self, offset: int, size: int) -> bytes:
        return bytes([self.last]) * size

    def write(self, offset: int, data: bytes) -> None:
        if data:
            self.last = data[0]

    def state(self) -> dict[str, Any]:
        return {"last": self.last}

    def restore(self, state: dict[str, Any]) -> None:
        st.apply(self, state, {"last": st.uint(8)}, "post code")


class DebugExit:
    """A guest write of `value` ends the VM; popek exits with `(value << 1) | 1`, as QEMU's isa-debug-exit does
    (so a test guest cannot be mistaken for one that exited 0 by other means). As there, the value is the whole
    write, 1, 2 or 4 bytes, at any port of the device's range (QEMU's `debug_exit_write` ignores the address)."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self.on_exit = on_exit

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        self.on_exit((value << 1) | 1)
