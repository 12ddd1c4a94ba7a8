"""Guests that try to wedge popek: output nobody reads, a halt nothing can end, a host that sends signals; and
the command line a Multiboot guest sees. Each ends the VM cleanly with its own reason, on both backends."""

from __future__ import annotations

import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from .guests import BACKENDS, DONE, boot_sector, nasm

pytestmark = pytest.mark.skipif(shutil.which("nasm") is None, reason="needs nasm to build the guests")

MULTIBOOT_ECHO = """
bits 32
org 0x100000
header:
    dd 0x1BADB002, 0x00010002, -(0x1BADB002 + 0x00010002)   ; memory info, a.out kludge
    dd header, header, 0, 0, start
start:
    mov esi, [ebx + 16]          ; the command line
    mov dx, 0x3f8
.next:
    lodsb
    test al, al
    jz .done
    out dx, al
    jmp .next
.done:
    mov al, 0x10
    out 0xf4, al
"""


def run(args: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "popek", "run", *args], stdin=subprocess.DEVNULL, capture_output=True, timeout=120, **kw
    )  # type: ignore[call-overload, no-any-return]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_multiboot_guest_sees_its_file_name_then_the_raw_bytes_of_append(tmp_path: Path, backend: str) -> None:
    kernel = nasm(tmp_path, MULTIBOOT_ECHO, "echo")
    append = b"x=\xff\xfe caf\xc3\xa9"  # not UTF-8: passed through as typed, as QEMU does
    r = subprocess.run(
        [sys.executable, "-m", "popek", "run", "--accel", backend, "--kernel", "./echo.bin", b"--append=" + append,
         "--timeout", "60"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    assert r.returncode == DONE, r.stderr
    assert r.stdout == b"./echo.bin " + append and kernel.name == "echo.bin"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cpus", [1, 2])
def test_halting_with_interrupts_disabled_stops_the_vm_as_halted(tmp_path: Path, backend: str, cpus: int) -> None:
    # with 2 vCPUs the second waits for a SIPI the halted first one can never send
    start = time.monotonic()
    r = run(["--accel", backend, "--cpus", str(cpus), "--kernel", str(boot_sector(tmp_path, "cli\nhlt\njmp $")),
             "--timeout", "60"])  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert b"VM stopped: halted: the guest halted with interrupts disabled" in r.stderr
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("backend", BACKENDS)
def test_halting_with_interrupts_enabled_waits_for_an_interrupt(tmp_path: Path, backend: str) -> None:
    r = run(["--accel", backend, "--kernel", str(boot_sector(tmp_path, "sti\nhlt\njmp $")), "--timeout", "3"])
    assert r.returncode == 124 and b"VM stopped: timeout" in r.stderr, r.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_to_a_pipe_nobody_reads_never_blocks_the_guest(tmp_path: Path, backend: str) -> None:
    image = boot_sector(tmp_path, "mov dx, 0x3f8\nmov al, 'A'\n.again:\nout dx, al\njmp .again")
    errors = tmp_path / "stderr"
    with open(errors, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "popek", "run", "--accel", backend, "--kernel", str(image), "--timeout", "4",
             "--stats"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
        )  # fmt: skip
        try:
            status = proc.wait(timeout=60)  # stdout is never read: its pipe fills after 64 KiB
        finally:
            proc.kill()
            assert proc.stdout is not None
            proc.stdout.close()
    text = errors.read_text()
    assert status == 124 and "VM stopped: timeout" in text, text
    dropped = int(text.split("console: ")[1].split(" bytes")[0])
    out = int(text.split("serial: ")[1].split(" bytes")[0])
    assert dropped > 0 and out > dropped  # what the host never took is counted, not waited for


def start_on_terminal(image: Path, backend: str) -> tuple[subprocess.Popen[bytes], int, int]:
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "popek", "run", "--accel", backend, "--kernel", str(image), "--timeout", "60"],
        stdin=terminal, stdout=terminal, stderr=terminal,
    )  # fmt: skip
    return proc, controller, terminal


def read_until(fd: int, needle: bytes, timeout: float = 30) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_termination_signals_stop_the_vm_and_restore_the_terminal(tmp_path: Path, backend: str, signum: int) -> None:
    image = boot_sector(tmp_path, "mov dx, 0x3f8\nmov al, '>'\nout dx, al\njmp $")
    proc, tty, terminal = start_on_terminal(image, backend)
    try:
        cooked = termios.tcgetattr(terminal)
        assert b">" in read_until(tty, b">")
        assert termios.tcgetattr(terminal) != cooked  # the console put the terminal in raw mode
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == 128 + signum
        said = read_until(tty, b"VM stopped", timeout=5) + read_until(tty, b"\n", timeout=1)
        assert f"VM stopped: signal: {signal.Signals(signum).name}".encode() in said, said
        assert b"Traceback" not in said
        assert termios.tcgetattr(terminal) == cooked
    finally:
        proc.kill()
        os.close(terminal)
        os.close(tty)
