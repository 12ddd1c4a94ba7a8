"""The host side of the serial console: the terminal in raw mode, keys to the guest, Ctrl-A x to quit (as
QEMU's -nographic does), and piped standard input forwarded as it arrives when stdin is not a terminal."""

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

    def write(self, data: bytes) -> None:
        """Guest output; in raw mode the terminal needs CR before LF only if the guest omits it (Linux does not)."""
        try:
            os.write(self.stdout_fd, data)
        except (BlockingIOError, BrokenPipeError):
            pass

    def __enter__(self) -> HostConsole:
        if self.interactive:
            self._saved = termios.tcgetattr(self.stdin_fd)
            tty.setraw(self.stdin_fd)
            sys.stderr.write("popek: console on this terminal; Ctrl-A x quits\r\n")
        threading.Thread(target=self._reader, name="console-input", daemon=True).start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
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
