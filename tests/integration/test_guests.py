"""Small assembly guests, built with nasm, each proving one part of the machine popek gives a guest: the boot
protocols (real mode, Multiboot, PVH), port and MMIO exits, the PIT interrupt through the in-kernel irqchip,
bringing up a second vCPU, the i8042 reset line. (64-bit entry: test_user_mode; triple fault and assists:
test_kvm_assists; bad input: test_cli_errors.)"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from .guests import BACKENDS, PRINT, PRINT32, PROTECTED_MODE, boot_sector, nasm, popek

pytestmark = [
    pytest.mark.skipif(shutil.which("nasm") is None, reason="needs nasm to build the guests"),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_real_mode_boot_sector_prints_and_exits_through_the_debug_port(tmp_path: Path, backend: str) -> None:
    image = boot_sector(
        tmp_path,
        """
    xor ax, ax
    mov ds, ax
    mov si, msg
    call print
    mov al, 0x2a
    out 0xf4, al
msg: db "popek: real mode ok", 10, 0
"""
        + PRINT,
    )
    r = popek(image, backend)
    assert r.stdout == "popek: real mode ok\n"
    assert r.returncode == 0x55, r.stderr
    assert "debug-exit" in r.stderr


def test_port_and_mmio_exits_reach_the_buses_and_are_counted(tmp_path: Path, backend: str) -> None:
    image = boot_sector(
        tmp_path,
        PROTECTED_MODE
        + """
    mov ecx, 1000
    mov dx, 0x710
.out: out dx, al
    loop .out
    mov ecx, 500
    mov dx, 0x711
.in: in al, dx
    cmp al, 0xff
    jne bad
    loop .in
    mov ecx, 300
.w: mov dword [0xd0000000], ecx
    loop .w
    mov ecx, 200
.r: mov eax, [0xd0000004]
    cmp eax, 0xffffffff
    jne bad
    loop .r
    mov esi, ok
    call print32
    mov al, 0
    out 0xf4, al
bad:
    mov esi, badmsg
    call print32
    mov al, 1
    out 0xf4, al
ok: db "popek: pio mmio ok", 10, 0
badmsg: db "bad read", 10, 0
"""
        + PRINT32
        + "bits 16\n",
    )
    r = popek(image, backend, "--stats")
    assert r.stdout == "popek: pio mmio ok\n", r.stderr
    assert r.returncode == 1

    def count(pattern: str) -> int:
        m = re.search(pattern, r.stderr, re.MULTILINE)
        assert m, r.stderr
        return int(m.group(1))

    assert count(r"^io 0x0710: (\d+) \(unclaimed\)") == 1000
    assert count(r"^io 0x0711: (\d+) \(unclaimed\)") == 500
    assert count(r"^mmio 0xd0000000: (\d+) \(unclaimed\)") == 500
    assert count(r"^unclaimed accesses: (\d+)") == 2000
    assert count(r"^exits: .*\bmmio=(\d+)") == 500


def test_pit_interrupts_arrive_through_the_pic(tmp_path: Path, backend: str) -> None:
    image = boot_sector(
        tmp_path,
        """
    cli
    xor ax, ax
    mov ds, ax
    mov ss, ax
    mov sp, 0x7000
    mov word [0x20*4], tick
    mov word [0x20*4+2], 0
    mov al, 0x11            ; ICW1: edge, cascade, ICW4
    out 0x20, al
    mov al, 0x20            ; ICW2: vectors 0x20-0x27
    out 0x21, al
    mov al, 0x04            ; ICW3: slave on IRQ2
    out 0x21, al
    mov al, 0x01            ; ICW4: 8086 mode
    out 0x21, al
    mov al, 0xfe            ; only IRQ0
    out 0x21, al
    mov al, 0x34            ; PIT channel 0, lobyte/hibyte, mode 2
    out 0x43, al
    mov ax, 1193            ; ~1 kHz
    out 0x40, al
    mov al, ah
    out 0x40, al
    sti
.wait:
    hlt
    cmp word [count], 50
    jb .wait
    cli
    mov si, msg
    call print
    mov al, 0
    out 0xf4, al
tick:
    inc word [count]
    push ax
    mov al, 0x20
    out 0x20, al
    pop ax
    iret
count: dw 0
msg: db "popek: 50 pit interrupts", 10, 0
"""
        + PRINT,
    )
    r = popek(image, backend)
    assert r.stdout == "popek: 50 pit interrupts\n", r.stderr
    assert r.returncode == 1


def test_second_vcpu_starts_on_init_sipi_and_runs(tmp_path: Path, backend: str) -> None:
    # the BSP copies a real-mode trampoline to 0x8000 and wakes APIC ID 1 with INIT and STARTUP(vector 8)
    image = boot_sector(
        tmp_path,
        PROTECTED_MODE
        + """
    mov esi, trampoline
    mov edi, 0x8000
    mov ecx, trampoline_end - trampoline
    rep movsb
    mov dword [0x9000], 0
    mov dword [0xfee00310], 1 << 24        ; ICR high: APIC ID 1
    mov dword [0xfee00300], 0x00004500     ; INIT, assert
    call delay
    mov dword [0xfee00300], 0x00004608     ; STARTUP, vector 0x08
    call delay
    mov dword [0xfee00300], 0x00004608
    mov ecx, 200000000
.wait:
    cmp dword [0x9000], 1
    je .up
    pause
    loop .wait
    mov esi, timeout
    call print32
    mov al, 0x11
    out 0xf4, al
.up:
    mov esi, ok
    call print32
    mov al, 0x10
    out 0xf4, al
delay:
    mov ecx, 100000
.d: loop .d
    ret
ok: db "popek: smp ok", 10, 0
timeout: db "ap timeout", 10, 0
bits 16
trampoline:                                 ; runs at 0800:0000 on the AP, in real mode
    mov ax, 0x0800
    mov ds, ax
    mov si, ap_msg - trampoline
    mov dx, 0x3f8
.p: lodsb
    test al, al
    jz .done
    out dx, al
    jmp .p
.done:
    xor ax, ax
    mov ds, ax
    mov dword [0x9000], 1
.halt:
    cli
    hlt
    jmp .halt
ap_msg: db "popek: ap 1 up", 10, 0
trampoline_end:
bits 32
"""
        + PRINT32
        + "bits 16\n",
    )
    r = popek(image, backend, "--cpus", "2")
    assert r.stdout == "popek: ap 1 up\npopek: smp ok\n", r.stderr
    assert r.returncode == 0x21


def test_i8042_reset_line_stops_the_vm_with_reason_reset(tmp_path: Path, backend: str) -> None:
    image = boot_sector(
        tmp_path,
        """
    xor ax, ax
    mov ds, ax
    mov si, msg
    call print
    mov al, 0xfe
    out 0x64, al
.halt:
    hlt
    jmp .halt
msg: db "popek: resetting", 10, 0
"""
        + PRINT,
    )
    r = popek(image, backend)
    assert r.stdout == "popek: resetting\n"
    assert r.returncode == 0, r.stderr
    assert "VM stopped: reset" in r.stderr


MULTIBOOT = """
bits 32
org 0x100000
header:
    dd 0x1BADB002
    dd 0x00010002                       ; memory info, a.out kludge
    dd -(0x1BADB002 + 0x00010002)
    dd header, header, 0, bss_end, entry
entry:
    mov esp, 0x90000
    cmp eax, 0x2BADB002
    jne bad
    mov ebx, ebx
    mov esi, ok
    call print32
    mov esi, cmdmsg
    call print32
    mov esi, [ebx + 16]                 ; cmdline
    call print32
    mov esi, nl
    call print32
    test dword [ebx], 1                 ; mem_lower/mem_upper valid
    jz bad
    mov al, 0x10
    out 0xf4, al
bad:
    mov al, 0x11
    out 0xf4, al
ok: db "popek: multiboot ok", 10, 0
cmdmsg: db "cmdline: ", 0
nl: db 10, 0
"""

PVH = """
bits 32
org 0x200000
ehdr:
    db 0x7f, "ELF", 1, 1, 1, 0
    times 8 db 0
    dw 2, 3                             ; executable, i386
    dd 1, entry, phdrs - ehdr, 0, 0
    dw 52, 32, 2, 0, 0, 0
phdrs:
    dd 1, 0, 0x200000, 0x200000, file_end - ehdr, file_end - ehdr, 5, 0x1000   ; PT_LOAD
    dd 4, note - ehdr, 0, 0, note_end - note, note_end - note, 4, 4          ; PT_NOTE
note:
    dd 4, 4, 18                         ; "Xen", XEN_ELFNOTE_PHYS32_ENTRY
    db "Xen", 0
    dd entry
note_end:
entry:
    mov esp, 0x90000
    cmp dword [ebx], 0x336ec578
    jne bad
    mov esi, ok
    call print32
    mov esi, cmdmsg
    call print32
    mov esi, [ebx + 24]
    call print32
    mov esi, nl
    call print32
    mov al, 0x10
    out 0xf4, al
bad:
    mov al, 0x11
    out 0xf4, al
ok: db "popek: pvh ok", 10, 0
cmdmsg: db "cmdline: ", 0
nl: db 10, 0
"""


def test_multiboot_kernel_gets_magic_and_command_line(tmp_path: Path, backend: str) -> None:
    image = nasm(tmp_path, MULTIBOOT + PRINT32 + "bss_end:\n", "multiboot")
    r = popek(image, backend, "--append", "hello from the command line")
    # as QEMU's loader: the kernel's file name first, as given on popek's command line
    assert r.stdout == f"popek: multiboot ok\ncmdline: {image} hello from the command line\n", r.stderr
    assert r.returncode == 0x21


def test_pvh_elf_kernel_gets_start_info_and_command_line(tmp_path: Path, backend: str) -> None:
    image = nasm(tmp_path, PVH + PRINT32 + "file_end:\n", "pvh")
    r = popek(image, backend, "--append", "console=ttyS0 pvh")
    assert r.stdout == "popek: pvh ok\ncmdline: console=ttyS0 pvh\n", r.stderr
    assert r.returncode == 0x21
