"""The i8042 keyboard controller, reduced to what guests use it for: the CPU reset line, and enough of the
command set (controller self-test, command byte, output port) that Linux's i8042 driver does not hang probing.
The controller has no keyboard attached: scan codes never arrive."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from popek.devices import state as st

DATA = 0x0  # port 0x60
STATUS_COMMAND = 0x4  # port 0x64

STATUS_OBF = 0x01
STATUS_SYS = 0x04
STATUS_CMD = 0x08

CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_DISABLE_AUX = 0xA7
CMD_ENABLE_AUX = 0xA8
CMD_TEST_AUX = 0xA9
CMD_SELF_TEST = 0xAA
CMD_TEST_KBD = 0xAB
CMD_DISABLE_KBD = 0xAD
CMD_ENABLE_KBD = 0xAE
CMD_READ_OUTPORT = 0xD0
CMD_WRITE_OUTPORT = 0xD1
CMD_PULSE_RESET = 0xFE


OUTPUT_LIMIT = 4096  # bytes queued for the guest to read (the controller's one-byte buffer, generously)

STATE_FIELDS: dict[str, st.Check] = {
    "ctr": st.uint(8),
    "outport": st.uint(8),
    "status": st.masked(STATUS_SYS | STATUS_CMD),
    "pending_cmd": st.optional(st.one_of(CMD_WRITE_CTR, CMD_WRITE_OUTPORT)),
    "out": st.deque_of(st.uint(8), OUTPUT_LIMIT),
}


class I8042:
    def __init__(self, on_reset: Callable[[], None]) -> None:
        self.on_reset = on_reset
        self.ctr = 0x47
        self.outport = 0x01
        self.status = STATUS_SYS
        self.pending_cmd: int | None = None
        # a guest that writes and never reads would queue bytes without end; past OUTPUT_LIMIT the oldest go
        self.out: deque[int] = deque(maxlen=OUTPUT_LIMIT)
        self.resets = 0

    def read(self, offset: int, size: int) -> bytes:
        if offset == STATUS_COMMAND:
            value = self.status | (STATUS_OBF if self.out else 0)
        elif offset == DATA:
            value = self.out.popleft() if self.out else 0
        else:
            value = 0xFF  # 0x61-0x63 are not the controller's
        return bytes([value]) * size

    def write(self, offset: int, data: bytes) -> None:
        value = data[0] if data else 0
        if offset == STATUS_COMMAND:
            self.status |= STATUS_CMD
            self._command(value)
        elif offset == DATA:
            self.status &= ~STATUS_CMD
            cmd, self.pending_cmd = self.pending_cmd, None
            if cmd == CMD_WRITE_CTR:
                self.ctr = value
            elif cmd == CMD_WRITE_OUTPORT:
                self.outport = value
                if not value & 0x01:  # bit 0 is the CPU reset line, active low
                    self._reset()
            else:
                self.out.append(0xFE)  # no keyboard to take the byte: "resend"

    def _command(self, cmd: int) -> None:
        if cmd == CMD_READ_CTR:
            self.out.append(self.ctr)
        elif cmd in (CMD_WRITE_CTR, CMD_WRITE_OUTPORT):
            self.pending_cmd = cmd
        elif cmd == CMD_SELF_TEST:
            self.out.append(0x55)
        elif cmd in (CMD_TEST_KBD, CMD_TEST_AUX):
            self.out.append(0x00)
        elif cmd == CMD_READ_OUTPORT:
            self.out.append(self.outport)
        elif cmd == CMD_DISABLE_KBD:
            self.ctr |= 0x10
        elif cmd == CMD_ENABLE_KBD:
            self.ctr &= ~0x10
        elif cmd == CMD_DISABLE_AUX:
            self.ctr |= 0x20
        elif cmd == CMD_ENABLE_AUX:
            self.ctr &= ~0x20
        elif 0xF0 <= cmd <= 0xFF and not cmd & 0x01:  # pulse output-port bits; bit 0 low = reset
            self._reset()

    def _reset(self) -> None:
        self.resets += 1
        self.on_reset()

    # --- snapshots ---

    def state(self) -> dict[str, Any]:
        return st.save(self, STATE_FIELDS)

    def restore(self, state: dict[str, Any]) -> None:
        values = st.apply(self, state, STATE_FIELDS, "i8042")
        self.out = deque(values["out"], maxlen=OUTPUT_LIMIT)
