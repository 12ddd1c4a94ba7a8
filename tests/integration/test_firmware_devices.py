"""The firmware-visible devices as guests reach them, on both backends: fw_cfg, the ACPI tables and PM
registers (timer, S5 power-off), the reset control register, the Bochs shutdown port, the 4-byte debug-exit
port, pc-testdev behind its option, and `--stats` naming each device."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from .guests import BACKENDS, PRINT, PRINT32, PROTECTED_MODE, boot_sector, popek

pytestmark = [
    pytest.mark.skipif(shutil.which("nasm") is None, reason="needs nasm to build the guests"),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


REAL_MODE_START = """
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7000
"""

# fw_cfg's signature and CPU count, the RSDP at 0xE0000 (what the guest's own scan would find first), and two
# PM timer reads 2000 port accesses apart; then the debug-exit port with 0
PROBE = (
    REAL_MODE_START
    + """
    mov dx, 0x510
    mov ax, 0                   ; FW_CFG_SIGNATURE
    out dx, ax
    inc dx
    mov di, sig
    mov cx, 4
.sig: in al, dx
    mov [di], al
    inc di
    loop .sig
    mov si, sig
    call print
    mov dx, 0x510
    mov ax, 5                   ; FW_CFG_NB_CPUS
    out dx, ax
    inc dx
    in al, dx
    mov bl, al
    in al, dx
    mov bh, al
    movzx eax, bx
    call hex32
    mov si, nl
    call print
    push ds
    mov ax, 0xe000
    mov ds, ax
    mov eax, [0]
    mov ebx, [4]
    pop ds
    mov si, no_rsdp
    cmp eax, 'RSD '
    jne .rsdp_said
    cmp ebx, 'PTR '
    jne .rsdp_said
    mov si, rsdp
.rsdp_said:
    call print
    mov dx, 0x608
    in eax, dx
    mov ebx, eax
    mov cx, 2000
.spin: in eax, dx
    loop .spin
    mov si, no_timer
    cmp ebx, 0xffffffff
    je .timer_said
    cmp eax, ebx
    jbe .timer_said
    mov si, timer
.timer_said:
    call print
    mov eax, 0
    mov dx, 0xf4
    out dx, eax
sig: db 0, 0, 0, 0, 0
nl: db 10, 0
rsdp: db "rsdp found", 10, 0
no_rsdp: db "no rsdp", 10, 0
timer: db "pm timer runs", 10, 0
no_timer: db "no pm timer", 10, 0
"""
    + PRINT
)


def test_guest_finds_fw_cfg_the_rsdp_and_a_running_pm_timer(tmp_path: Path, backend: str) -> None:
    r = popek(boot_sector(tmp_path, PROBE), backend, "--cpus", "2", "--stats")
    assert r.stdout == "QEMU00000002\nrsdp found\npm timer runs\n", r.stderr
    assert r.returncode == 1, r.stderr
    for name in ("fw_cfg", "acpi pm timer"):
        assert re.search(rf"^io 0x0\w+: \d+ \({name}\)$", r.stderr, re.MULTILINE), r.stderr
    assert "acpi pm1a control 0x604-0x605" in r.stderr


def test_no_acpi_leaves_neither_tables_nor_pm_registers(tmp_path: Path, backend: str) -> None:
    r = popek(boot_sector(tmp_path, PROBE), backend, "--no-acpi")
    assert r.stdout == "QEMU00000001\nno rsdp\nno pm timer\n", r.stderr
    assert r.returncode == 1


TIMER_VALUE = (
    REAL_MODE_START
    + """
    mov dx, 0x608
    mov cx, 500
.spin: in eax, dx
    loop .spin
    call hex32
    mov al, 0
    out 0xf4, al
"""
    + PRINT
)


def test_pm_timer_is_deterministic_on_the_software_cpu(tmp_path: Path) -> None:
    image = boot_sector(tmp_path, TIMER_VALUE)
    first, second = popek(image, "soft"), popek(image, "soft")
    assert first.stdout == second.stdout and len(first.stdout) == 8, first.stderr
    # 500 port reads of 1 µs of virtual time each and a few hundred instructions: about 1.8 k ticks
    assert 500 * 3.579545 < int(first.stdout, 16) < 600 * 3.579545


def one_write(port: int, value: int, size: int = 1) -> str:
    reg = {1: "al", 2: "ax", 4: "eax"}[size]
    return REAL_MODE_START + f"    mov dx, {port:#x}\n    mov {reg}, {value:#x}\n    out dx, {reg}\n    hlt\n"


def test_slp_en_with_the_s5_type_powers_the_vm_off(tmp_path: Path, backend: str) -> None:
    r = popek(boot_sector(tmp_path, one_write(0x604, 0x2001, 2)), backend)  # SLP_EN | SLP_TYP 0 | SCI_EN
    assert r.returncode == 0
    assert "poweroff: the guest entered soft off (ACPI S5)" in r.stderr


def test_s3_ends_the_vm_and_says_why(tmp_path: Path, backend: str) -> None:
    r = popek(boot_sector(tmp_path, one_write(0x604, 0x2400, 2)), backend)  # what kvm-unit-tests' s3.flat writes
    assert r.returncode == 0
    assert "suspend to RAM (ACPI S3)" in r.stderr


def test_reset_control_register_resets(tmp_path: Path, backend: str) -> None:
    r = popek(boot_sector(tmp_path, one_write(0xCF9, 0x06)), backend)
    assert r.returncode == 0
    assert "reset: the guest reset the machine (reset control 0xcf9)" in r.stderr


def test_debug_exit_takes_a_4_byte_write(tmp_path: Path, backend: str) -> None:
    r = popek(boot_sector(tmp_path, one_write(0xF4, 0x12, 4)), backend)
    assert r.returncode == (0x12 << 1) | 1
    assert "status 37" in r.stderr


def test_bochs_shutdown_port_powers_off(tmp_path: Path, backend: str) -> None:
    body = (
        REAL_MODE_START
        + """
    mov si, word_
    mov dx, 0x8900
.next: lodsb
    test al, al
    jz .done
    out dx, al
    jmp .next
.done:
    hlt
word_: db "Shutdown", 0
"""
    )
    r = popek(boot_sector(tmp_path, body), backend)
    assert r.returncode == 0
    assert "poweroff: the guest powered off (Bochs shutdown port)" in r.stderr


TESTDEV = (
    PROTECTED_MODE
    + """
    mov dword [0xff000000 + 4094], 0x12345678   ; across a page boundary of the window
    mov eax, [0xff000000 + 4094]
    mov esi, absent
    cmp eax, 0x12345678
    jne .said
    mov dx, 0xe0
    mov ax, 0x9999
    out dx, ax
    in al, dx
    cmp al, 0x99
    jne .said
    mov dx, 0x2000 + 5
    mov al, 1
    out dx, al
    mov al, 0
    out dx, al
    mov esi, present
.said:
    call print32
    mov al, 0
    out 0xf4, al
present: db "pc-testdev ok", 10, 0
absent: db "no pc-testdev", 10, 0
"""
    + PRINT32
)


def test_pc_testdev_only_with_its_option_and_named_in_stats(tmp_path: Path, backend: str) -> None:
    image = boot_sector(tmp_path, TESTDEV)
    r = popek(image, backend, "--pc-testdev", "--stats")
    assert r.stdout == "pc-testdev ok\n", r.stderr
    assert re.search(r"^mmio 0xff000000: \d+ \(pc-testdev ioram\)$", r.stderr, re.MULTILINE), r.stderr
    assert re.search(r"^mmio 0xff001000: \d+ \(pc-testdev ioram\)$", r.stderr, re.MULTILINE), r.stderr
    assert re.search(r"^io 0x2005: 2 \(pc-testdev irq-line\)$", r.stderr, re.MULTILINE), r.stderr
    assert "mmio devices: " in r.stderr and "pc-testdev ioram 0xff000000-0xff00ffff" in r.stderr
    r = popek(image, backend, "--stats")
    assert r.stdout == "no pc-testdev\n", r.stderr
    assert "pc-testdev" not in r.stderr
