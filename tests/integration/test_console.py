"""The serial console on a terminal: keys reach the guest's UART, its output comes back, Ctrl-A x quits."""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .guests import boot_sector

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs a usable /dev/kvm"),
    pytest.mark.skipif(shutil.which("nasm") is None, reason="needs nasm to build the guest"),
]

ECHO = """
    mov dx, 0x3f8
    mov al, '>'
    out dx, al
.poll:
    mov dx, 0x3fd
    in al, dx
    test al, 1
    jz .poll
    mov dx, 0x3f8
    in al, dx
    cmp al, 'q'
    je .quit
    out dx, al
    jmp .poll
.quit:
    mov al, 0
    out 0xf4, al
"""


def read_until(fd: int, needle: bytes, timeout: float = 20) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                seen += os.read(fd, 1024)
            except OSError:
                break
    return seen


def start(image: Path) -> tuple[subprocess.Popen[bytes], int]:
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "popek", "run", "--kernel", str(image), "--timeout", "60"],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    return proc, controller


def test_typed_keys_reach_the_guest_and_ctrl_a_x_quits(tmp_path: Path) -> None:
    proc, tty = start(boot_sector(tmp_path, ECHO))
    try:
        assert b">" in read_until(tty, b">")
        os.write(tty, b"hello")
        assert b"hello" in read_until(tty, b"hello")
        os.write(tty, b"\x01x")
        assert proc.wait(timeout=20) == 0
        assert b"user-quit" in read_until(tty, b"user-quit", timeout=2)
    finally:
        proc.kill()
        os.close(tty)


def test_ctrl_a_ctrl_a_sends_one_ctrl_a_and_the_guest_can_end_the_session(tmp_path: Path) -> None:
    proc, tty = start(boot_sector(tmp_path, ECHO))
    try:
        read_until(tty, b">")
        os.write(tty, b"\x01\x01")
        assert b"\x01" in read_until(tty, b"\x01")
        os.write(tty, b"q")
        assert proc.wait(timeout=20) == 1
    finally:
        proc.kill()
        os.close(tty)
