"""The host side of the serial console: the terminal in raw mode, keys to the guest, Ctrl-A x to quit (as
QEMU's -nographic does), and piped standard input forwarded as it arrives when stdin is not a terminal.

Guest output never waits for the host: `write` (called on a vCPU thread, from the UART) only appends to a
bounded buffer, which a writer thread drains to standard output. When standard output is a pipe nobody reads,
the writer blocks, not the vCPU: output beyond OUTPUT_BUFFER is dropped and counted (`dropped`, in --stats),
and the VM's timeout, Ctrl-C and signals still work.
"""

from __future__ import annotations

import os
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable
from types import TracebackType

CTRL_A = 0x01
OUTPUT_BUFFER = 1 << 20  # guest output waiting for the host terminal; a screenful is ~10 KB
WRITE_CHUNK = 1 << 16
FLUSH_TIMEOUT = 2.0  # seconds the console waits at the end for the host to take what is still buffered


class HostConsole:
    def __init__(
        self, feed: Callable[[bytes], int], on_quit: Callable[[], None], stdin_fd: int = 0, stdout_fd: int = 1
    ) -> None:
        self.feed = feed
        self.on_quit = on_quit
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.interactive = os.isatty(stdin_fd)
        self._saved: list[int | list[bytes | int]] | None = None
        self._stop = threading.Event()
        self._escape = False
        self._out = bytearray()
        self._out_cond = threading.Condition()
        self._closing = False
        self._writer: threading.Thread | None = None
        self.dropped = 0  # bytes of guest output the host never took

    def write(self, data: bytes) -> None:
        """Guest output: buffered for the writer thread, never blocking; what does not fit is dropped."""
        with self._out_cond:
            room = max(0, OUTPUT_BUFFER - len(self._out))
            if len(data) > room:
                self.dropped += len(data) - room
                data = data[:room]
            if data:
                self._out += data
                self._out_cond.notify()

    def _drain(self) -> None:
        while True:
            with self._out_cond:
                while not self._out and not self._closing:
                    self._out_cond.wait()
                if not self._out:
                    return
                chunk = bytes(self._out[:WRITE_CHUNK])
            try:
                written = os.write(self.stdout_fd, chunk)
            except OSError:  # closed or broken: what is left can never be shown
                with self._out_cond:
                    self.dropped += len(self._out)
                    self._out.clear()
                    self._out_cond.notify_all()
                return
            with self._out_cond:
                del self._out[:written]
                self._out_cond.notify_all()

    def _close_output(self) -> None:
        """Let the writer finish what is buffered, for at most FLUSH_TIMEOUT; count the rest as dropped."""
        with self._out_cond:
            self._closing = True
            self._out_cond.notify_all()
        if self._writer is not None:
            self._writer.join(FLUSH_TIMEOUT)
        with self._out_cond:
            self.dropped += len(self._out)
            self._out.clear()

    def __enter__(self) -> HostConsole:
        if self.interactive:
            self._saved = termios.tcgetattr(self.stdin_fd)
            tty.setraw(self.stdin_fd)
            sys.stderr.write("popek: console on this terminal; Ctrl-A x quits\r\n")
        threading.Thread(target=self._reader, name="console-input", daemon=True).start()
        self._writer = threading.Thread(target=self._drain, name="console-output", daemon=True)
        self._writer.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._close_output()
        if self._saved is not None:
            termios.tcsetattr(self.stdin_fd, termios.TCSADRAIN, self._saved)

    def _reader(self) -> None:
        while not self._stop.is_set():
            try:
                data = os.read(self.stdin_fd, 256)
            except OSError:
                return
            if not data:
                return
            if self.interactive:
                data = self._filter_escape(data)
            while data and not self._stop.is_set():
                taken = self.feed(data)
                data = data[taken:]
                if data:
                    time.sleep(0.01)  # the UART's FIFO is full: let the guest drain it

    def _filter_escape(self, data: bytes) -> bytes:
        out = bytearray()
        for byte in data:
            if self._escape:
                self._escape = False
                if byte in (ord("x"), ord("X")):
                    self.on_quit()
                    self._stop.set()
                    return bytes(out)
                if byte == CTRL_A:
                    out.append(CTRL_A)
                continue
            if byte == CTRL_A:
                self._escape = True
                continue
            out.append(byte)
        return bytes(out)
