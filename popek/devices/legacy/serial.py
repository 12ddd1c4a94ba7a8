"""A 16550A UART (National Semiconductor PC16550D datasheet), as on COM1 of a PC.

Transmission is instantaneous: every byte written to THR goes straight to `output`, so the transmitter is always
empty, which is what makes the THRE interrupt (IIR=0x02) the driver's signal to send more. Received bytes wait in
a 64-byte FIFO fed by `enqueue_input` from the console thread.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from popek.devices import state as st
from popek.devices.irq import IrqLine

# register offsets
RBR_THR = 0
IER = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDA = 0x01
IER_THRE = 0x02
IER_RLS = 0x04
IER_MS = 0x08

IIR_NONE = 0x01
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_FIFO = 0xC0

LCR_DLAB = 0x80
MCR_LOOP = 0x10
MCR_OUT2 = 0x08

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_DCD = 0x80

RX_FIFO_SIZE = 64

STATE_FIELDS: dict[str, st.Check] = {
    "ier": st.masked(0x0F),
    "lcr": st.uint(8),
    "mcr": st.masked(0x1F),
    "scr": st.uint(8),
    "fcr": st.masked(0xC9),
    "dll": st.uint(8),
    "dlm": st.uint(8),
    "lsr": st.uint(8),
    "thre_pending": st.boolean,
    "rx": st.deque_of(st.uint(8), RX_FIFO_SIZE),
}


class Serial:
    def __init__(self, irq: IrqLine, output: Callable[[bytes], None]) -> None:
        self.irq = irq
        self.output = output
        self._lock = threading.Lock()
        self.ier = 0
        self.lcr = 0x03
        self.mcr = MCR_OUT2
        self.scr = 0
        self.fcr = 0
        self.dll = 0x0C
        self.dlm = 0
        self.lsr = LSR_THRE | LSR_TEMT
        self.thre_pending = False
        self.rx: deque[int] = deque()
        self.bytes_out = 0
        self.bytes_in = 0

    # --- host side ---

    def enqueue_input(self, data: bytes) -> int:
        """Queue bytes typed on the host; returns how many fit (the rest is for the caller to retry)."""
        with self._lock:
            room = RX_FIFO_SIZE - len(self.rx)
            taken = data[:room]
            self.rx.extend(taken)
            self.bytes_in += len(taken)
            if taken:
                self._update_irq()
            return len(taken)

    def rx_room(self) -> int:
        with self._lock:
            return RX_FIFO_SIZE - len(self.rx)

    # --- guest side ---

    def _iir(self) -> int:
        fifo = IIR_FIFO if self.fcr & 1 else 0
        if self.ier & IER_RDA and self.rx:
            return IIR_RDA | fifo
        if self.ier & IER_THRE and self.thre_pending:
            return IIR_THRE | fifo
        return IIR_NONE | fifo

    def _update_irq(self) -> None:
        self.irq.set_level(not self._iir() & IIR_NONE)

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            value = self._read(offset)
            self._update_irq()
        return bytes([value]) + b"\0" * (size - 1)

    def _read(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR:
            if dlab:
                return self.dll
            return self.rx.popleft() if self.rx else 0
        if offset == IER:
            return self.dlm if dlab else self.ier
        if offset == IIR_FCR:
            iir = self._iir()
            if iir & 0x0F == IIR_THRE:
                self.thre_pending = False  # reading IIR acknowledges THRE
            return iir
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            return self.lsr | (LSR_DR if self.rx else 0)
        if offset == MSR:
            if self.mcr & MCR_LOOP:
                # loopback: DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD
                m = self.mcr
                return ((m & 1) << 5) | ((m & 2) << 3) | ((m & 4) << 4) | ((m & 8) << 4)
            return MSR_CTS | MSR_DSR | MSR_DCD
        return self.scr

    def write(self, offset: int, data: bytes) -> None:
        value = data[0] if data else 0
        with self._lock:
            self._write(offset, value)
            self._update_irq()

    def _write(self, offset: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR:
            if dlab:
                self.dll = value
                return
            if self.mcr & MCR_LOOP:
                if len(self.rx) < RX_FIFO_SIZE:
                    self.rx.append(value)
            else:
                self.output(bytes([value]))
                self.bytes_out += 1
            self.thre_pending = True
        elif offset == IER:
            if dlab:
                self.dlm = value
                return
            newly_thre = value & IER_THRE and not self.ier & IER_THRE
            self.ier = value & 0x0F
            if newly_thre:
                self.thre_pending = True  # the transmitter is empty: tell the driver at once
        elif offset == IIR_FCR:
            self.fcr = value & 0xC9
            if value & 0x02:
                self.rx.clear()
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
        elif offset == SCR:
            self.scr = value

    # --- snapshots ---

    def state(self) -> dict[str, Any]:
        """The registers, the receive FIFO's bytes and the IRQ line's level. Transmission is instantaneous, so
        there is no transmit FIFO to save."""
        with self._lock:
            return {**st.save(self, STATE_FIELDS), "irq_level": self.irq.level}

    def restore(self, state: dict[str, Any]) -> None:
        values = st.load(state, {**STATE_FIELDS, "irq_level": st.boolean}, "serial")
        level = values.pop("irq_level")
        with self._lock:
            for name, value in values.items():
                setattr(self, name, value)
            self.irq.restore_level(level)
            self._update_irq()  # a snapshot whose line disagrees with its registers: the registers win
