"""Guest user mode and the way back into the guest kernel: SYSCALL from ring 3 and SYSRET back, as Linux does.

On hosts that do only half of a SYSCALL from ring 3 (`popek.accel.kvm_syscall`), popek completes it; the guest
cannot tell the difference, and `--stats` counts the completions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .guests import BACKENDS, wrap_bzimage

pytestmark = [pytest.mark.skipif(shutil.which("nasm") is None, reason="needs nasm to build the guest")]

# A 64-bit kernel entered by popek's bzImage loader at 0x100200: it sets up GDT, TSS, IDT and the SYSCALL MSRs,
# drops to ring 3, and from there issues SYSCALL; the kernel's entry (SWAPGS first, like Linux's) reports over
# COM1 and returns with SYSRET; a second SYSCALL reports again and ends the VM through the debug-exit port.
# With SUPERVISOR_KERNEL defined the kernel's pages are not user-accessible, as in Linux.
GUEST = r"""bits 64
org 0x100000
times 0x200 db 0
start:
    cli
    lgdt [gdtr]
    ; page tables with U/S=1: PML4 -> PDPT -> PD (1 GiB of 2 MiB pages)
    mov rdi, pml4
    lea rax, [pdpt + 7]
    mov [rdi], rax
    mov rdi, pdpt
    lea rax, [pd + 7]
    mov [rdi], rax
    mov rdi, pd
    mov rax, 0x87
    mov rcx, 512
.fill: mov [rdi], rax
    add rax, 0x200000
    add rdi, 8
    loop .fill
%ifdef SUPERVISOR_KERNEL
    ; the kernel's 2 MiB supervisor-only (as Linux maps its text); user mode runs through an alias at 2 MiB
    mov qword [pd], 0x83
    mov qword [pd + 8], 0x87
%define USER_ALIAS 0x200000
%else
%define USER_ALIAS 0
%endif
    mov rax, pml4
    mov cr3, rax
    ; reload segments
    push 0x08
    lea rax, [.cs]
    push rax
    retfq
.cs:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    ; TSS
    mov rax, tss
    mov [gdt + 0x30 + 2], ax
    shr rax, 16
    mov [gdt + 0x30 + 4], al
    mov [gdt + 0x30 + 7], ah
    shr rax, 16
    mov [gdt + 0x30 + 8], eax
    mov qword [tss + 4], kstack_top
    mov ax, 0x30
    ltr ax
    ; IDT: vector 0x80 (DPL 3) and 14 (#PF) and 13 (#GP)
    mov rdi, 0x80
    mov rsi, int80
    mov dl, 0xEE
    call setgate
    mov rdi, 14
    mov rsi, pf
    mov dl, 0x8E
    call setgate
    mov rdi, 13
    mov rsi, gp
    mov dl, 0x8E
    call setgate
    lidt [idtr]
    ; SYSCALL MSRs
    mov ecx, 0xC0000080
    rdmsr
    or eax, 1
    wrmsr
    mov ecx, 0xC0000081          ; STAR
    xor eax, eax
    mov edx, (0x18 << 16) | 0x08
    wrmsr
    mov ecx, 0xC0000082          ; LSTAR
    mov rax, sysentry
    mov rdx, rax
    shr rdx, 32
    wrmsr
    mov ecx, 0xC0000084          ; SFMASK
    mov eax, 0x200
    xor edx, edx
    wrmsr
    mov rsi, msg_kernel
    call print
    ; after an exit (so popek has seen the IDT), a #GP the kernel expects and recovers from: an MSR that
    ; does not exist, as Linux's rdmsr_safe reads
    mov byte [expect_gp], 1
    mov ecx, 0x4000ffff
    rdmsr
    cmp byte [expect_gp], 0
    jne gp
    ; to user mode
    push 0x23                    ; ss = 0x20 | 3
    push ustack_top + USER_ALIAS
    push 0x202
    push 0x2B                    ; cs = 0x28 | 3
    push user + USER_ALIAS
    iretq

user:
%ifdef FORGE
    ; a user program that jumps to the kernel's entry itself, with RCX and R11 of its choosing (IOPL 3 in R11)
    mov rcx, user
    mov r11, 0x3202
    mov rax, sysentry            ; absolute: the real entry, not its user-mode alias
    jmp rax
%endif
    mov rax, 1
    mov rbx, 0x1234
    syscall
    cmp rbx, 0x1234              ; the kernel preserved it, and we are back after the SYSCALL
    jne .spin
    mov rax, 2
    syscall
.spin: jmp .spin

int80:
    iretq
sysentry:
    swapgs                       ; privileged: faults if SYSCALL left the CPU in ring 3
    mov r15, rsp                 ; the user's stack, as SYSCALL leaves it
    mov rsp, kstack_top
    push rcx
    push r11
    cmp rax, 2
    je .second
    mov rsi, msg_syscall
    call print
    pop r11
    pop rcx
    mov rsp, r15
    swapgs
    o64 sysret
.second:
    mov rsi, msg_sysret
    call print
    mov al, 0x10
    out 0xf4, al
pf:
    mov rsi, msg_pf
    call print
    mov rax, cr2
    call hex64
    mov al, 0x11
    out 0xf4, al
gp:
    cmp byte [expect_gp], 1
    jne .fatal
    mov byte [expect_gp], 0
    add qword [rsp + 8], 2        ; past the 2-byte RDMSR
    add rsp, 8                    ; the error code
    iretq
.fatal:
    mov rsi, msg_gp
    call print
    mov al, 0x12
    out 0xf4, al

setgate:                          ; rdi vector, rsi handler, dl type/attr
    shl rdi, 4
    add rdi, idt
    mov rax, rsi
    mov [rdi], ax
    mov word [rdi + 2], 0x08
    mov byte [rdi + 4], 0
    mov [rdi + 5], dl
    shr rax, 16
    mov [rdi + 6], ax
    shr rax, 16
    mov [rdi + 8], eax
    mov dword [rdi + 12], 0
    ret
print:
    mov dx, 0x3f8
.n: lodsb
    test al, al
    jz .d
    out dx, al
    jmp .n
.d: ret
hex64:
    mov rcx, 16
    mov rbx, rax
    mov dx, 0x3f8
.h: rol rbx, 4
    mov al, bl
    and al, 15
    add al, '0'
    cmp al, '9'
    jbe .o
    add al, 7
.o: out dx, al
    loop .h
    mov al, 10
    out dx, al
    ret

expect_gp: db 0
msg_kernel: db "kernel: going to user mode", 10, 0
msg_sysret: db "sysret returned to user mode, whose second syscall reached the kernel", 10, 0
msg_syscall: db "syscall from user mode reached the kernel", 10, 0
msg_pf: db "page fault at ", 0
msg_gp: db "general protection fault", 10, 0

align 16
gdt: dq 0
     dq 0x00af9b000000ffff       ; 0x08 kernel code 64
     dq 0x00cf93000000ffff       ; 0x10 kernel data
     dq 0x00cffb000000ffff       ; 0x18 user code 32
     dq 0x00cff3000000ffff       ; 0x20 user data
     dq 0x00affb000000ffff       ; 0x28 user code 64
     dq 0x0000890000000067, 0    ; 0x30 TSS
gdt_end:
gdtr: dw gdt_end - gdt - 1
      dq gdt
idtr: dw 4095
      dq idt
align 4096
pml4: times 512 dq 0
pdpt: times 512 dq 0
pd:   times 512 dq 0
idt:  times 256 dq 0, 0
tss:  times 104 db 0
align 16
      times 4096 db 0
kstack_top:
      times 4096 db 0
ustack_top:
"""


def run_user_mode_guest(
    tmp: Path, supervisor_kernel: bool = False, forge: bool = False, backend: str = "kvm"
) -> subprocess.CompletedProcess[str]:
    src = tmp / "user.asm"
    src.write_text(GUEST)
    defines = ["-DSUPERVISOR_KERNEL"] if supervisor_kernel else []
    defines += ["-DFORGE"] if forge else []
    subprocess.run(["nasm", "-f", "bin", *defines, "-o", str(tmp / "user.bin"), str(src)], check=True)
    image = tmp / "user.bzimage"
    image.write_bytes(wrap_bzimage((tmp / "user.bin").read_bytes()))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "popek",
            "run",
            "--accel",
            backend,
            "--kernel",
            str(image),
            "--timeout",
            "30",
            "--stats",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("supervisor_kernel", [False, True], ids=["user-accessible-kernel", "supervisor-kernel"])
def test_syscall_from_user_mode_enters_the_kernel_and_sysret_returns(
    tmp_path: Path, supervisor_kernel: bool, backend: str
) -> None:
    r = run_user_mode_guest(tmp_path, supervisor_kernel, backend=backend)
    assert r.stdout == (
        "kernel: going to user mode\n"
        "syscall from user mode reached the kernel\n"
        "sysret returned to user mode, whose second syscall reached the kernel\n"
    ), r.stdout + r.stderr
    assert r.returncode == 0x21, r.stderr


@pytest.mark.kvm
@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs a usable /dev/kvm")
@pytest.mark.parametrize("supervisor_kernel", [False, True], ids=["user-accessible-kernel", "supervisor-kernel"])
def test_completed_syscalls_are_counted_where_the_host_needs_them(tmp_path: Path, supervisor_kernel: bool) -> None:
    from popek.accel.kvm_probe import unavailable_families
    from popek.kvm import Kvm

    with Kvm() as kvm:
        needs_assist = "syscall" in unavailable_families(kvm)
    r = run_user_mode_guest(tmp_path, supervisor_kernel)
    assists = next(line for line in r.stderr.splitlines() if line.startswith("assists:"))
    if needs_assist:
        assert "syscall=2" in assists.split(), r.stderr
    else:
        assert "syscall=" not in assists, r.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_user_jump_to_the_syscall_entry_is_a_page_fault_not_a_syscall(tmp_path: Path, backend: str) -> None:
    r = run_user_mode_guest(tmp_path, supervisor_kernel=True, forge=True, backend=backend)
    lines = r.stdout.splitlines()
    assert lines[0] == "kernel: going to user mode", r.stdout + r.stderr
    assert lines[1].startswith("page fault at "), r.stdout + r.stderr  # the kernel's entry is supervisor-only
    assert r.returncode == 0x23, r.stderr
    assert "syscall=" not in r.stderr
