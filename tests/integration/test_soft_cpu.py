"""What the software backend promises beyond running the same guests as KVM (test_guests, test_kvm_assists):
determinism, and bad guest code ending in architectural events, never in a Python exception."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from .guests import PRINT, PRINT32, PROTECTED_MODE, boot_sector, popek

pytestmark = pytest.mark.skipif(shutil.which("nasm") is None, reason="needs nasm to build the guests")

PIT_TICKS = """
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7000
    mov word [0x20*4], tick
    mov word [0x20*4+2], 0
    mov al, 0x11
    out 0x20, al
    mov al, 0x20
    out 0x21, al
    mov al, 0x04
    out 0x21, al
    mov al, 0x01
    out 0x21, al
    mov al, 0xfe
    out 0x21, al
    mov dword [spins], 0
    mov word [count], 0
    mov al, 0x34
    out 0x43, al
    mov ax, 119             ; ~10 kHz
    out 0x40, al
    mov al, ah
    out 0x40, al
    sti
.spin:                      ; busy, not halted: how far it gets between ticks depends only on virtual time
    inc dword [spins]
    cmp word [count], 5
    jb .spin
    cli
    mov eax, [spins]
    call hex32
    mov al, 0
    out 0xf4, al
tick:
    inc word [count]
    push ax
    mov al, 0x20
    out 0x20, al
    pop ax
    iret
count equ 0x500             ; data away from the code's page, as real programs keep it
spins equ 0x504
"""


def retired(stderr: str) -> int:
    found = re.search(r"^instructions: (\d+) retired", stderr, re.MULTILINE)
    assert found, stderr
    return int(found.group(1))


def test_the_same_guest_retires_the_same_instructions_and_prints_the_same_output(tmp_path: Path) -> None:
    image = boot_sector(tmp_path, PIT_TICKS + PRINT)
    first, second = popek(image, "soft", "--stats"), popek(image, "soft", "--stats")
    assert first.returncode == second.returncode == 1, first.stderr
    assert re.fullmatch(r"[0-9A-F]{8}", first.stdout), first.stdout
    assert int(first.stdout, 16) > 1000  # it really spun between the timer interrupts
    assert first.stdout == second.stdout
    assert retired(first.stderr) == retired(second.stderr)


def test_an_undefined_opcode_raises_ud_in_the_guest(tmp_path: Path) -> None:
    image = boot_sector(
        tmp_path,
        """
    xor ax, ax
    mov ds, ax
    mov word [6*4], ud_handler
    mov word [6*4+2], 0
    db 0x0f, 0xff               ; UD0 without its ModRM: not an instruction
    mov al, 0x11
    out 0xf4, al
ud_handler:
    mov si, msg
    call print
    mov al, 0
    out 0xf4, al
msg: db "#UD", 10, 0
"""
        + PRINT,
    )
    r = popek(image, "soft")
    assert r.stdout == "#UD\n", r.stderr
    assert r.returncode == 1, r.stderr


def test_a_jump_into_garbage_ends_in_a_clean_triple_fault(tmp_path: Path) -> None:
    # no IDT: the #UD of the garbage becomes #GP, then #DF, then a triple fault, which stops the VM
    image = boot_sector(
        tmp_path,
        PROTECTED_MODE
        + """
    lidt [idt]
    mov edi, 0x20000
    mov ecx, 4096
    mov al, 0xff
    rep stosb
    jmp 0x20000
idt: dw 0
     dd 0
"""
        + PRINT32
        + "bits 16\n",
    )
    r = popek(image, "soft")
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "triple fault" in r.stderr and "RIP=0000000000020000" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_pause_loop_waiting_for_the_tsc_costs_few_instructions(tmp_path: Path) -> None:
    # 10 ms of TSC at 1 instruction per ns would be 10 M instructions of spinning; PAUSE ends the quantum instead
    image = boot_sector(
        tmp_path,
        """
    rdtsc
    mov ebx, eax
.wait:
    pause
    rdtsc
    sub eax, ebx
    cmp eax, 10000000
    jb .wait
    mov al, 0
    out 0xf4, al
""",
    )
    r = popek(image, "soft", "--stats")
    assert r.returncode == 1, r.stderr
    instructions = retired(r.stderr)
    assert instructions < 20_000, instructions
    virtual = re.search(r"virtual time (\d+\.\d+) s", r.stderr)
    assert virtual and float(virtual.group(1)) >= 0.010, r.stderr  # and the guest did wait 10 ms of its time


def test_polling_a_port_while_the_pit_counts_costs_few_instructions(tmp_path: Path) -> None:
    # Linux calibrates the TSC this way: PIT channel 2 one-shot for 10 ms, poll port 0x61 until OUT2 rises.
    # A port access takes a microsecond of virtual time, so the loop runs about ten thousand times, not millions.
    image = boot_sector(
        tmp_path,
        """
    in al, 0x61
    and al, 0xfd
    or al, 0x01             ; gate channel 2 on, speaker off
    out 0x61, al
    mov al, 0xb0            ; channel 2, lobyte/hibyte, mode 0
    out 0x43, al
    mov ax, 11932           ; 10 ms at 1.193182 MHz
    out 0x42, al
    mov al, ah
    out 0x42, al
    xor ecx, ecx
.poll:
    inc ecx
    in al, 0x61
    test al, 0x20           ; OUT2
    jz .poll
    mov eax, ecx
    call hex32
    mov al, 0
    out 0xf4, al
"""
        + PRINT,
    )
    r = popek(image, "soft", "--stats")
    assert r.returncode == 1, r.stderr
    polls = int(r.stdout, 16)
    assert 5_000 <= polls <= 12_000, polls  # ~10 ms / (1 µs per IN + a few ns per instruction)
    assert retired(r.stderr) < 100_000
