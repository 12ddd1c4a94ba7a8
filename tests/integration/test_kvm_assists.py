"""Instructions the host's KVM may fail to execute for a ring-0 guest are completed by popek, and the guest sees
architectural results. On hardware that runs them natively the same guests pass without assists, and popek's
software CPU (`--accel soft`) gives the same results."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

KVM_MARKS = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs a usable /dev/kvm"),
]
pytestmark = [pytest.mark.skipif(shutil.which("nasm") is None, reason="needs nasm to build the guest")]
BACKENDS = [pytest.param("kvm", marks=KVM_MARKS), "soft"]

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


def build(tmp_path: Path, body: str) -> Path:
    src = tmp_path / "guest.asm"
    src.write_text("bits 16\norg 0x7c00\n" + body + PRINT + "\ntimes 510-($-$$) db 0\ndw 0xaa55\n")
    out = tmp_path / "guest.bin"
    subprocess.run(["nasm", "-f", "bin", "-o", str(out), str(src)], check=True)
    return out


def run(image: Path, *extra: str, backend: str = "kvm") -> subprocess.CompletedProcess[str]:
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
            "--stats",
            "--timeout",
            "60",
            *extra,
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_int3_at_ring0_is_delivered_as_breakpoint_with_return_after_it(tmp_path: Path, backend: str) -> None:
    image = build(
        tmp_path,
        """
    xor ax, ax
    mov ds, ax
    mov word [3*4], handler
    mov word [3*4+2], 0
    int3
    mov si, after
    call print
    mov al, 0
    out 0xf4, al
handler:
    mov si, inbp
    call print
    iret
inbp: db "in #BP handler", 10, 0
after: db "after int3", 10, 0
""",
    )
    r = run(image, backend=backend)
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines() == ["in #BP handler", "after int3"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fwait_continues_or_raises_nm_when_the_fpu_is_switched_out(tmp_path: Path, backend: str) -> None:
    image = build(
        tmp_path,
        """
    xor ax, ax
    mov ds, ax
    mov word [7*4], nm_handler
    mov word [7*4+2], 0
    fninit
    fwait                       ; nothing pending: a no-op
    mov si, after
    call print
    mov eax, cr0
    or eax, 0xa                 ; CR0.MP | CR0.TS: the FPU belongs to another task
    mov cr0, eax
    fwait                       ; #NM
    mov al, 0x11
    out 0xf4, al
nm_handler:
    mov si, innm
    call print
    mov al, 0
    out 0xf4, al
after: db "after fwait", 10, 0
innm: db "in #NM handler", 10, 0
""",
    )
    r = run(image, backend=backend)
    assert r.stdout.splitlines() == ["after fwait", "in #NM handler"], r.stdout + r.stderr
    assert r.returncode == 1, r.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_popcnt_clac_stac_results_are_architectural(tmp_path: Path, backend: str) -> None:
    image = build(
        tmp_path,
        """
    xor ax, ax
    mov ds, ax
    mov ebx, 0xf0f0f00f
    popcnt eax, ebx
    call hex32
    mov eax, 0x00000100
    tzcnt eax, eax
    call hex32
    stac
    pushfd
    pop eax
    shr eax, 18
    and eax, 1
    call hex32
    clac
    pushfd
    pop eax
    shr eax, 18
    and eax, 1
    call hex32
    mov si, nl
    call print
    mov al, 0
    out 0xf4, al
nl: db 10, 0
""",
    )
    r = run(image, backend=backend)
    assert r.returncode == 1, r.stderr
    assert r.stdout.strip() == "00000010000000080000000100000000"
    assists = re.search(r"^assists: (.*)$", r.stderr, re.MULTILINE)
    assert assists, r.stderr


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


@pytest.mark.kvm
@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs a usable /dev/kvm")
def test_a_hypercall_always_returns_to_the_guest(tmp_path: Path) -> None:
    # KVM_HC_CLOCK_PAIRING with a bad clock type: a host answers an error; one that never does gets -KVM_ENOSYS
    image = build(
        tmp_path,
        PROTECTED_MODE
        + """
    mov eax, 9
    mov ebx, 0x3000
    mov ecx, 0xffff
    vmmcall
    test eax, eax
    js .negative
    mov esi, pos
    call print32
    jmp .end
.negative:
    mov esi, neg
    call print32
.end:
    mov al, 0
    out 0xf4, al
neg: db "hypercall returned an error", 10, 0
pos: db "hypercall returned", 10, 0
"""
        + PRINT32
        + "bits 16\n",
    )
    r = run(image)
    assert r.returncode == 1, r.stderr
    assert "hypercall returned" in r.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_undecodable_bytes_at_ring0_end_in_a_clean_stop(tmp_path: Path, backend: str) -> None:
    # with no IDT, #UD cannot be delivered: #GP, then #DF, then the triple fault that stops the VM
    image = build(
        tmp_path,
        PROTECTED_MODE
        + """
    lidt [idt]
    db 0x0f, 0x0b              ; ud2
    hlt
idt: dw 0
     dd 0
bits 16
""",
    )
    r = run(image, backend=backend)
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "triple fault" in r.stderr and "RIP=" in r.stderr
