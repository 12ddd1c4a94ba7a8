"""The building blocks of the assembly guests: nasm, the boot-sector and bzImage wrappers, the serial print
routines, the switch to protected mode, a 64-bit test kernel with a #PF reporter (KERNEL64), and the backends each
guest runs on (KVM where /dev/kvm is usable, and popek's software CPU)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

KVM_MARKS = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs a usable /dev/kvm"),
]
BACKENDS = [pytest.param("kvm", marks=KVM_MARKS), "soft"]
LINUX_BOOT_TIMEOUT = 1200  # a default-guest boot: ~2 min alone on a nested host, many more beside other guests


@dataclass
class Boot:
    """One `popek run` of a Linux guest and its folder: what it printed, and the `key=value` lines of its script."""

    result: subprocess.CompletedProcess[str]
    tmp: Path

    @property
    def log(self) -> str:
        return f"stdout:\n{self.result.stdout[-6000:]}\nstderr:\n{self.result.stderr[-4000:]}"

    def value(self, key: str) -> str:
        for line in self.result.stdout.splitlines():
            if line.startswith(key + "="):
                return line[len(key) + 1 :].strip()
        raise AssertionError(f"no {key}= in the guest's output\n{self.log}")


def linux_marks(boot_timeout: float = LINUX_BOOT_TIMEOUT) -> list[pytest.MarkDecorator]:
    """A module of tests that boot the default Linux guest on KVM: slow, bounded by the boot's own limit."""
    return [pytest.mark.timeout(boot_timeout + 600), *KVM_MARKS, pytest.mark.linux, pytest.mark.slow]


def nasm(tmp: Path, source: str, name: str = "guest") -> Path:
    src, out = tmp / f"{name}.asm", tmp / f"{name}.bin"
    src.write_text(source)
    subprocess.run(["nasm", "-f", "bin", "-o", str(out), str(src)], check=True)
    return out


def boot_sector(tmp: Path, body: str) -> Path:
    return nasm(tmp, "bits 16\norg 0x7c00\n" + body + "\ntimes 510-($-$$) db 0\ndw 0xaa55\n")


def popek(image: Path, backend: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "popek", "run", "--accel", backend, "--kernel", str(image), "--timeout", "60", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def wrap_bzimage(payload: bytes) -> bytes:
    """A minimal Linux boot-protocol 2.15 header around a 64-bit payload (see tests/unit/boot)."""
    header = bytearray(1024)
    header[0x1F1] = 1
    struct.pack_into("<I", header, 0x1F4, (len(payload) + 15) // 16)
    struct.pack_into("<H", header, 0x1FE, 0xAA55)
    header[0x200:0x202] = b"\xeb\x66"
    header[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", header, 0x206, 0x020F)
    header[0x211] = 1
    struct.pack_into("<I", header, 0x22C, 0x37FFFFFF)
    struct.pack_into("<H", header, 0x236, 1)
    struct.pack_into("<I", header, 0x238, 255)
    struct.pack_into("<I", header, 0x260, len(payload) + 0x10000)
    return bytes(header) + payload.ljust((len(payload) + 15) // 16 * 16, b"\0")


PRINT = """
print:                      ; si -> NUL-terminated string
    mov dx, 0x3f8
.next:
    lodsb
    test al, al
    jz .done
    out dx, al
    jmp .next
.done:
    ret
hex32:                      ; eax -> 8 hex digits
    mov cx, 8
    mov dx, 0x3f8
.digit:
    rol eax, 4
    push eax
    and al, 0x0f
    add al, '0'
    cmp al, '9'
    jbe .out
    add al, 7
.out:
    out dx, al
    pop eax
    loop .digit
    ret
"""


PROTECTED_MODE = """
    cli
    xor ax, ax
    mov ds, ax
    lgdt [gdt_desc]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    jmp 0x08:pm32
gdt: dq 0, 0x00cf9b000000ffff, 0x00cf93000000ffff
gdt_desc: dw 23
          dd gdt
bits 32
pm32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, 0x7000
"""
PRINT32 = """
print32:                    ; esi -> NUL-terminated string
    mov dx, 0x3f8
.next:
    lodsb
    test al, al
    jz .done
    out dx, al
    jmp .next
.done:
    ret
"""


# A 64-bit kernel entered by popek's bzImage loader at 0x100200. It identity-maps the first GiB with 2-MiB pages
# (user-accessible, so ring 3 can run the same code), sets CR0.WP=1, CR4 = PAE only and EFER.NXE = 0, loads a GDT,
# a TSS (ring-3 interrupts land on `istack_top`) and an IDT: #PF goes to `pf`, every other exception to `fatal`.
# Then it runs the test's BODY and ends through the debug-exit port with 0x10 (status 0x21).
#
# The #PF handler prints one line per fault:  "#PF err=EEEE cr2=CCCCCCCCCCCCCCCC rip=ok cpl=N"
# - `err` is the error code the processor pushed, `cr2` the faulting linear address;
# - `rip=ok` says the saved RIP is the faulting instruction (the fault is precise), else the saved RIP is printed;
# - `cpl` is the privilege level the fault came from.
# It then resumes at the address the TRY macro left in `resume`. A #PF with no TRY armed is fatal, except a read of
# USER_EXIT (never mapped), which is how ring-3 code ends: `to_user` then returns to its caller. (Not INT n: the
# nested KVM this was written on answers INT 0x80 from ring 3 with #UD.)
KERNEL64 = r"""bits 64
org 0x100000
times 0x200 db 0

T equ 0x0000008000000000                ; the test region: PML4[1] -> tpdpt -> tpd -> tpt (all U/S=1, R/W=1)
XD equ 0x8000000000000000
USER_EXIT equ T + 0x1ff000              ; tpt[511], never present: ring 3 reads it to return to ring 0
%define I4(x) (((x) >> 39) & 511)
%define I3(x) (((x) >> 30) & 511)
%define I2(x) (((x) >> 21) & 511)
%define I1(x) (((x) >> 12) & 511)

%macro SET 2                            ; SET [memory], 64-bit value   (clobbers r15)
    mov r15, %2
    mov qword %1, r15
%endmacro
%macro SAY 1                            ; print a string
    jmp %%go
%%s: db %1, 0
%%go:
    push rsi
    mov rsi, %%s
    call print
    pop rsi
%endmacro
%macro HEX 2                            ; HEX value, digits: print the low `digits` hex digits of value
    push rcx                            ; (value: a register or memory not addressed through rsp)
    push rax
    mov rax, %1
    mov ecx, %2
    call hex
    pop rax
    pop rcx
%endmacro
%macro NL 0
    call newline
%endmacro
; TRY instruction: run it expecting it may fault; a fault must be reported at this instruction, and execution
; goes on after it either way. (clobbers r15)
%macro TRY 1+
    mov r15, %%at
    mov [fault_rip], r15
    mov r15, %%next
    mov [resume], r15
%%at: %1
    mov qword [resume], 0
%%next:
%endmacro
; TRYAT rip, instruction: the same, for a fault expected at `rip` (an instruction fetch: the target of a jump)
%macro TRYAT 2+
    mov r15, %1
    mov [fault_rip], r15
    mov r15, %%next
    mov [resume], r15
    %2
    mov qword [resume], 0
%%next:
%endmacro
%macro UEXIT 0                          ; end ring-3 code (see to_user)
    mov r15, USER_EXIT
    mov r15, [r15]
%endmacro
%macro FLUSH 0                          ; MOV CR3, CR3: drop every non-global translation
    mov rax, cr3
    mov cr3, rax
%endmacro

start:
    cli
    lgdt [gdtr]
    mov rsp, kstack_top
    ; identity map of the first GiB: PML4[0] -> pdpt0[0] -> pd0, 512 2-MiB pages, U/S=1 R/W=1
    SET [pml4], pdpt0 + 7
    SET [pdpt0], pd0 + 7
    mov rdi, pd0
    mov eax, 0x87
    mov ecx, 512
.fill:
    mov [rdi], rax
    add rax, 0x200000
    add rdi, 8
    loop .fill
    ; the test region's tables, every entry empty until the test fills it
    SET [pml4 + I4(T) * 8], tpdpt + 7
    SET [tpdpt + I3(T) * 8], tpd + 7
    SET [tpd + I2(T) * 8], tpt + 7
    mov rax, pml4
    mov cr3, rax
    mov eax, 0x20                       ; CR4: PAE only (no PGE, PSE, SMEP, SMAP)
    mov cr4, rax
    mov rax, cr0
    or eax, 1 << 16                     ; CR0.WP
    mov cr0, rax
    mov ecx, 0xC0000080                 ; EFER.NXE = 0
    rdmsr
    and eax, ~(1 << 11)
    wrmsr
    push 0x08
    mov rax, .cs
    push rax
    retfq
.cs:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov rax, tss                        ; the TSS descriptor's base
    mov [gdt + 0x30 + 2], ax
    shr rax, 16
    mov [gdt + 0x30 + 4], al
    mov [gdt + 0x30 + 7], ah
    shr rax, 16
    mov [gdt + 0x30 + 8], eax
    mov qword [tss + 4], istack_top     ; RSP0
    mov ax, 0x30
    ltr ax
    xor edi, edi                        ; vectors 0-31 -> fatal stubs
    mov rsi, stubs
.gates:
    mov dl, 0x8E
    call setgate
    add rsi, 16
    inc edi
    cmp edi, 32
    jb .gates
    mov edi, 14
    mov rsi, pf
    mov dl, 0x8E
    call setgate
    lidt [idtr]
    call body
    mov al, 0x10
    out 0xf4, al
    cli
    hlt

; to_user: run the ring-3 code at rdi (on ustack, RFLAGS.IF=0, IOPL 0) until it reads USER_EXIT
to_user:
    mov [saved_rsp], rsp
    push 0x23
    push ustack_top
    push 0x2
    push 0x2B
    push rdi
    iretq

pf:
    push rax
    push rcx
    push rdx
    push rsi
    ; [rsp+32] error code, [rsp+40] RIP, [rsp+48] CS
    mov rax, cr2
    mov rcx, USER_EXIT
    cmp rax, rcx
    jne .fault
    test byte [rsp + 48], 3
    jz .fault
    mov rsp, [saved_rsp]                ; ring 3 is done: return from to_user
    ret
.fault:
    cmp qword [resume], 0
    je .unexpected
    SAY "#PF err="
    mov rax, [rsp + 32]
    HEX rax, 4
    SAY " cr2="
    mov rax, cr2
    HEX rax, 16
    mov rax, [rsp + 40]
    cmp rax, [fault_rip]
    jne .wrong_rip
    SAY " rip=ok"
    jmp .cpl
.wrong_rip:
    SAY " rip="
    HEX rax, 16
.cpl:
    SAY " cpl="
    mov rax, [rsp + 48]
    and eax, 3
    HEX rax, 1
    NL
    mov rax, [resume]
    mov [rsp + 40], rax
    mov qword [resume], 0
    pop rsi
    pop rdx
    pop rcx
    pop rax
    add rsp, 8
    iretq
.unexpected:
    SAY "unexpected #PF err="
    mov rax, [rsp + 32]
    HEX rax, 4
    SAY " cr2="
    mov rax, cr2
    HEX rax, 16
    SAY " rip="
    mov rax, [rsp + 40]
    HEX rax, 16
    NL
    mov al, 0x7e
    out 0xf4, al

align 16
stubs:
%assign v 0
%rep 32
    align 16
    push v
    jmp fatal
%assign v v + 1
%endrep
fatal:
    SAY "unexpected exception "
    mov rax, [rsp]
    HEX rax, 2
    SAY " at "
    mov rax, [rsp + 8]                  ; RIP, or the error code for vectors that push one
    HEX rax, 16
    SAY " "
    mov rax, [rsp + 16]
    HEX rax, 16
    NL
    mov al, 0x7f
    out 0xf4, al

setgate:                                ; edi vector, rsi handler, dl type/attributes
    push rdi
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
    pop rdi
    ret
print:                                  ; rsi: NUL-terminated string; preserves registers but rsi
    push rax
    push rdx
    mov dx, 0x3f8
.n: lodsb
    test al, al
    jz .d
    out dx, al
    jmp .n
.d: pop rdx
    pop rax
    ret
newline:
    push rax
    push rdx
    mov dx, 0x3f8
    mov al, 10
    out dx, al
    pop rdx
    pop rax
    ret
hex:                                    ; rax value, ecx digits (1-16); preserves registers
    push rax
    push rbx
    push rcx
    push rdx
    mov rbx, rax
    mov edx, ecx
    neg ecx
    add ecx, 16
    shl ecx, 2
    rol rbx, cl                         ; the first digit to print is now the top nibble
    mov ecx, edx
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
    pop rdx
    pop rcx
    pop rbx
    pop rax
    ret

body:
%%BODY%%

align 8
resume: dq 0
fault_rip: dq 0
saved_rsp: dq 0
scratch: dq 0

align 16
gdt: dq 0
     dq 0x00af9b000000ffff              ; 0x08 kernel code 64
     dq 0x00cf93000000ffff              ; 0x10 kernel data
     dq 0x00cffb000000ffff              ; 0x18 user code 32
     dq 0x00cff3000000ffff              ; 0x20 user data
     dq 0x00affb000000ffff              ; 0x28 user code 64
     dq 0x0000890000000067, 0           ; 0x30 TSS
gdt_end:
gdtr: dw gdt_end - gdt - 1
      dq gdt
idtr: dw 4095
      dq idt
align 4096
pml4:  times 512 dq 0
pdpt0: times 512 dq 0
pd0:   times 512 dq 0
tpdpt: times 512 dq 0
tpd:   times 512 dq 0
tpt:   times 512 dq 0
tpt2:  times 512 dq 0
wpdpt: times 512 dq 0
wpd:   times 512 dq 0
wpt:   times 512 dq 0
idt:   times 256 dq 0, 0
page_a: times 4096 db 0                 ; data pages the test maps at other linear addresses
page_b: times 4096 db 0
page_c: times 4096 db 0
page_code:                              ; a code page: `jmp r14` returns to where the caller said
    jmp r14
    align 4096, db 0xcc
tss:   times 104 db 0
align 16
       times 4096 db 0
kstack_top:
       times 4096 db 0
istack_top:
       times 4096 db 0
ustack_top:
"""

def pic_init(master_mask: int, slave_mask: int = 0xFF) -> str:
    """Assembly that initialises both 8259As as a protected-mode OS remaps them (ICW1-ICW4: cascade on IR2,
    vectors 0x20 and 0x28, 8086 mode; 8259A datasheet) and then masks them (OCW1) as given."""
    return (
        """
    mov al, 0x11
    out 0x20, al
    out 0xa0, al
    mov al, 0x20
    out 0x21, al
    mov al, 0x28
    out 0xa1, al
    mov al, 4
    out 0x21, al
    mov al, 2
    out 0xa1, al
    mov al, 1
    out 0x21, al
    out 0xa1, al
"""
        f"    mov al, {master_mask:#x}\n    out 0x21, al\n    mov al, {slave_mask:#x}\n    out 0xa1, al\n"
    )


DONE = 0x21  # the status of `out 0xf4` with 0x10


def run64(tmp: Path, body: str, backend: str, *args: str) -> tuple[list[str], int, str]:
    """Build KERNEL64 around `body` (a routine ending in `ret`), run it with popek's `args`, and return (stdout
    lines, status, stderr)."""
    binary = nasm(tmp, KERNEL64.replace("%%BODY%%", body), "kernel")
    image = tmp / "kernel.bzimage"
    image.write_bytes(wrap_bzimage(binary.read_bytes()))
    r = popek(image, backend, *args)
    return r.stdout.splitlines(), r.returncode, r.stderr
