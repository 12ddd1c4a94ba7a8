"""Small port devices: the POST-code port and a debug-exit port like QEMU's isa-debug-exit."""

from __future__ import annotations

from collections.abc import Callable


class PostCode:
    """Port 0x80: firmware and kernels write progress codes (and Linux uses it as an I/O delay)."""

    def __init__(self) -> None:
        self.last = 0

    def read(self, offset: int, size: int) -> bytes:
        return bytes([self.last]) * size

    def write(self, offset: int, data: bytes) -> None:
        if data:
            self.last = data[0]


class DebugExit:
    """A guest write of `value` ends the VM; popek exits with `(value << 1) | 1`, as QEMU's isa-debug-exit does
    (so a test guest cannot be mistaken for one that exited 0 by other means)."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self.on_exit = on_exit

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        self.on_exit((value << 1) | 1)
