"""Instructions the host's KVM may fail to execute for a ring-0 guest are completed by popek, and the guest sees
architectural results. On hardware that runs them natively the same guests pass without assists, and popek's
software CPU (`--accel soft`) gives the same results."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .guests import BACKENDS, DONE, KVM_MARKS, PRINT, PRINT32, PROTECTED_MODE, run64

pytestmark = [pytest.mark.skipif(shutil.which("nasm") is None, reason="needs nasm to build the guest")]


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


# XSAVE/XRSTOR/XSETBV/XGETBV and CMPXCHG16B at ring 0 in 64-bit mode: the families a host's instruction emulator
# may fail on (KVM_EXIT_INTERNAL_ERROR); popek completes them. The guest uses each family only if CPUID
# advertises it, as a kernel would. Expected values follow SDM vol. 1 ch. 13 (XSAVE) and vol. 2A (CMPXCHG16B).
CX16_AND_XSAVE_BODY = r"""
    mov eax, 1
    cpuid
    mov r12d, ecx                       ; leaf 1 ECX: CX16 is bit 13, XSAVE bit 26
    bt r12d, 13
    jc .cx16
    SAY "cmpxchg16b not advertised"
    NL
    jmp .xsave
.cx16:
    SET [page_b], 0x1111111111111111
    SET [page_b + 8], 0x2222222222222222
    mov rax, 0x1111111111111111         ; RDX:RAX equals m128: ZF=1, m128 <- RCX:RBX
    mov rdx, 0x2222222222222222
    mov rbx, 0x3333333333333333
    mov rcx, 0x4444444444444444
    lock cmpxchg16b [page_b]
    setz r13b
    SAY "cmpxchg16b equal "
    movzx eax, r13b
    HEX rax, 1
    SAY " "
    HEX [page_b + 8], 16
    HEX [page_b], 16
    NL
    xor eax, eax                        ; RDX:RAX differs: ZF=0, RDX:RAX <- m128, m128 unchanged
    xor edx, edx
    lock cmpxchg16b [page_b]
    setz r13b
    SAY "cmpxchg16b differ "
    movzx r13d, r13b
    HEX r13, 1
    SAY " "
    HEX rdx, 16
    HEX rax, 16
    NL
.xsave:
    bt r12d, 26
    jc .xs
    SAY "xsave not advertised"
    NL
    ret
.xs:
    mov rax, cr4
    or eax, (1 << 9) | (1 << 18)        ; CR4.OSFXSR, CR4.OSXSAVE
    mov cr4, rax
    xor ecx, ecx
    mov eax, 3                          ; XCR0 = x87 | SSE
    xor edx, edx
    xsetbv
    SET [page_c], 0x0123456789abcdef
    SET [page_c + 8], 0xfedcba9876543210
    movdqu xmm0, [page_c]
    mov eax, 3
    xor edx, edx
    xsave [page_a]                      ; XMM0 goes to offset 160 of the legacy region
    pxor xmm0, xmm0
    xrstor [page_a]
    movdqu [page_c + 16], xmm0
    SAY "xrstor "
    HEX [page_c + 24], 16
    HEX [page_c + 16], 16
    SAY " saved "
    HEX [page_a + 168], 16
    HEX [page_a + 160], 16
    SAY " sse-in-use "
    mov rax, [page_a + 512]             ; XSTATE_BV
    shr eax, 1
    and eax, 1
    HEX rax, 1
    NL
    and qword [page_a + 512], ~2        ; SSE marked as in its initial state: XRSTOR zeroes XMM0
    mov eax, 3
    xor edx, edx
    xrstor [page_a]
    movdqu [page_c + 16], xmm0
    SAY "xrstor init "
    HEX [page_c + 24], 16
    HEX [page_c + 16], 16
    NL
    xor ecx, ecx
    xgetbv
    SAY "xcr0 "
    HEX rax, 8
    NL
    ret
"""


def _families_and_assists(stats: str) -> tuple[set[str], dict[str, int]]:
    families = re.search(r"^host cannot execute [^:]*: (.*)$", stats, re.MULTILINE)
    assists = re.search(r"^assists: (.*)$", stats, re.MULTILINE)
    assert assists, stats
    counts = {k: int(v) for k, v in (a.split("=") for a in assists.group(1).split() if "=" in a)}
    return (set(families.group(1).split(", ")) if families else set()), counts


@pytest.mark.parametrize(
    "backend,template",
    [
        pytest.param("kvm", "portable", marks=KVM_MARKS),
        pytest.param("kvm", "host", marks=KVM_MARKS),  # nothing hidden: the guest uses what the host cannot run
        ("soft", "portable"),
    ],
)
def test_cmpxchg16b_and_xsave_family_at_ring0_give_architectural_results(
    tmp_path: Path, backend: str, template: str
) -> None:
    lines, status, err = run64(tmp_path, CX16_AND_XSAVE_BODY, backend, "--stats", "--cpu-template", template)
    assert status == DONE, "\n".join(lines) + err
    families, assists = _families_and_assists(err)
    out = "\n".join(lines)
    if lines[0] != "cmpxchg16b not advertised":
        assert lines[:2] == [
            "cmpxchg16b equal 1 44444444444444443333333333333333",
            "cmpxchg16b differ 0 44444444444444443333333333333333",
        ], out
        lines = lines[2:]
        if "cmpxchg16b" in families:  # the host cannot run it: both executions were popek's
            assert assists.get("cmpxchg16b") == 2, err
    else:
        lines = lines[1:]
    if lines != ["xsave not advertised"]:
        assert lines == [
            "xrstor FEDCBA98765432100123456789ABCDEF saved FEDCBA98765432100123456789ABCDEF sse-in-use 1",
            "xrstor init 00000000000000000000000000000000",
            "xcr0 00000003",
        ], out
        if "xsave" in families:
            assert assists.get("xsave", 0) >= 1 and assists.get("xrstor", 0) >= 2, err
    if backend == "soft":  # the software CPU implements CMPXCHG16B and says so (XSAVE it does not advertise)
        assert "cmpxchg16b not advertised" not in out, out


# Where popek's software CPU completes an instruction for KVM, a fault it raises reaches the guest as the processor
# would deliver it: #PF with the error code and CR2 of the access, RIP at the instruction (SDM vol. 3A §4.7).
FAULTING_OPERANDS_BODY = r"""
    mov rax, cr4
    or eax, 1 << 9                      ; CR4.OSFXSR: SSE
    mov cr4, rax
    mov rbx, T + 0x5000                 ; in the test region, where nothing is mapped yet
    TRY pxor xmm0, [rbx]                ; a read of a not-present page
    TRY popcnt rax, [rbx + 8]
    TRY lock cmpxchg16b [rbx + 16]      ; a locked read-modify-write: a write access
    SET [tpt + I1(T + 0x5000) * 8], page_a + 3
    SET [page_a + 8], 0xf0f0
    popcnt rax, [rbx + 8]               ; mapped now: no fault
    SAY "popcnt "
    HEX rax, 2
    NL
    ret
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_faults_of_completed_instructions_reach_the_guest_as_page_faults(tmp_path: Path, backend: str) -> None:
    lines, status, err = run64(tmp_path, FAULTING_OPERANDS_BODY, backend, "--cpu-template", "host")
    assert lines == [
        "#PF err=0000 cr2=0000008000005000 rip=ok cpl=0",
        "#PF err=0000 cr2=0000008000005008 rip=ok cpl=0",
        "#PF err=0002 cr2=0000008000005010 rip=ok cpl=0",
        "popcnt 08",
    ], "\n".join(lines) + err
    assert status == DONE, err


@pytest.mark.parametrize("backend", BACKENDS)
def test_xsave_with_32_bit_addressing_and_a_segment_base(tmp_path: Path, backend: str) -> None:
    # in protected mode the operand's linear address is the segment base plus a 32-bit effective address
    image = build(
        tmp_path,
        PROTECTED_MODE
        + """
    lgdt [gdt2_desc]
    mov ax, 0x18                ; ES: a data segment based at 0x1000
    mov es, ax
    mov eax, 1
    cpuid
    bt ecx, 26
    jc .xsave
    mov esi, none
    jmp .say
.xsave:
    mov eax, cr4
    or eax, (1 << 9) | (1 << 18)
    mov cr4, eax
    xor ecx, ecx
    mov eax, 3
    xor edx, edx
    xsetbv
    movdqu xmm1, [marker]
    mov ebx, 0x8000
    xsave [es:ebx]              ; linear 0x9000; XMM1 at offset 176
    mov esi, bad
    mov eax, [0x9000 + 176]
    cmp eax, [marker]
    jne .say
    mov eax, [0x9000 + 188]
    cmp eax, [marker + 12]
    jne .say
    mov esi, good
.say:
    call print32
    mov al, 0
    out 0xf4, al
align 8
gdt2: dq 0, 0x00cf9b000000ffff, 0x00cf93000000ffff, 0x00cf93001000ffff
gdt2_desc: dw 31
           dd gdt2
marker: dd 0x11223344, 0x55667788, 0x99aabbcc, 0xddeeff00
none: db "xsave not advertised", 10, 0
bad: db "xsave stored elsewhere", 10, 0
good: db "xsave stored at es:ebx", 10, 0
"""
        + PRINT32
        + "bits 16\n",
    )
    r = run(image, *(["--cpu-template", "host"] if backend == "kvm" else []), backend=backend)
    assert r.returncode == 1, r.stdout + r.stderr
    expected = "xsave not advertised" if backend == "soft" else "xsave stored at es:ebx"  # the soft CPU has none
    assert r.stdout.strip() == expected, r.stdout + r.stderr


# The XSAVE family completed for KVM reaches its save area through the guest's page tables as the processor does:
# an area on a not-present page, or a read-only one with CR0.WP set, is the guest's #PF with the error code and
# CR2 of the access (SDM vol. 3A §4.7), and XSAVE retried after the handler maps the page succeeds. Linux's signal
# delivery XSAVEs at ring 0 into the user's signal frame and relies on exactly this to fault the frame's page in.
XSAVE_FAULT_BODY = r"""
    mov eax, 1
    cpuid
    bt ecx, 26
    jc .xs
    SAY "xsave not advertised"
    NL
    ret
.xs:
    mov rax, cr4
    or eax, (1 << 9) | (1 << 18)        ; CR4.OSFXSR, CR4.OSXSAVE
    mov cr4, rax
    mov rax, cr0
    or eax, 1 << 16                     ; CR0.WP: ring 0 honours read-only pages
    mov cr0, rax
    xor ecx, ecx
    mov eax, 3
    xor edx, edx
    xsetbv
    mov rbx, T + 0x6000                 ; not mapped yet
    mov eax, 3
    xor edx, edx
    TRY xsave [rbx]
    SET [tpt + I1(T + 0x6000) * 8], page_a + 1   ; present, read-only
    mov eax, 3
    xor edx, edx
    TRY xsave [rbx]
    mov eax, 3
    xor edx, edx
    TRY xrstor [rbx]                    ; reading a read-only page is allowed: no fault, nothing printed
    SET [tpt + I1(T + 0x6000) * 8], page_a + 3   ; writable now
    invlpg [rbx]
    mov eax, 3
    xor edx, edx
    xsave [rbx]
    SAY "xsave fcw "
    movzx eax, word [page_a]
    HEX rax, 4
    SAY " dirty "
    mov rax, [tpt + I1(T + 0x6000) * 8]
    shr eax, 6                          ; the D bit the page walk set for the write
    and eax, 1
    HEX rax, 1
    NL
    ret
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_xsave_into_a_not_present_or_read_only_page_is_the_guests_page_fault(tmp_path: Path, backend: str) -> None:
    lines, status, err = run64(tmp_path, XSAVE_FAULT_BODY, backend, "--cpu-template", "host")
    assert status == DONE, "\n".join(lines) + err
    if lines == ["xsave not advertised"]:
        assert backend == "soft", err  # the software CPU has no XSAVE; every KVM host here advertises it
        return
    assert lines == [
        "#PF err=0002 cr2=0000008000006000 rip=ok cpl=0",
        "#PF err=0003 cr2=0000008000006000 rip=ok cpl=0",
        "xsave fcw 037F dirty 1",
    ], "\n".join(lines) + err


@pytest.mark.parametrize("backend", BACKENDS)
def test_x87_arithmetic_and_bcd_adjusts_at_ring0_give_the_same_results_on_both_backends(
    tmp_path: Path, backend: str
) -> None:
    """x87 arithmetic, conversions, a transcendental, the status word after a masked divide by zero, an
    FNSAVE/FRSTOR round trip, and DAA/AAM, in real mode (ring 0: on KVM hosts that emulate it, each instruction
    is completed by popek's software CPU through the KVM assist path)."""
    image = build(
        tmp_path,
        """
    xor ax, ax
    mov ds, ax
    fninit
    fldpi
    fimul dword [million]
    fistp dword [0x8000]        ; round(pi * 1e6)
    mov eax, [0x8000]
    call hex32
    fild dword [two]
    fsqrt
    fild dword [two30]
    fmulp st1, st0
    fistp dword [0x8000]        ; round(sqrt(2) * 2**30)
    mov eax, [0x8000]
    call hex32
    fld dword [half]
    fsin
    fimul dword [billion]
    fistp dword [0x8000]        ; round(sin(0.5) * 1e9)
    mov eax, [0x8000]
    call hex32
    fnclex
    fld1
    fldz
    fdivp st1, st0              ; 1/0, masked: +inf, ZE
    fnstsw ax
    and eax, 0x3f
    call hex32
    fnsave [0x8100]
    fninit
    frstor [0x8100]
    fxam                        ; ST(0) = +inf after the round trip: C3,C2,C0 = 0,1,1
    fnstsw ax
    and eax, 0x4700
    call hex32
    fild dword [bcd_in]
    fbstp [0x8000]
    mov eax, [0x8000]
    call hex32
    mov al, 0x19
    add al, 0x28
    daa
    mov ah, 77
    xchg al, ah
    aam                         ; AH:AL = 7:7, the DAA result in the high byte
    rol eax, 16
    mov ax, 0
    rol eax, 16
    call hex32
    mov si, nl
    call print
    mov al, 0
    out 0xf4, al
million: dd 1000000
billion: dd 1000000000
two: dd 2
two30: dd 0x40000000
half: dd 0.5
bcd_in: dd 1234567
nl: db 10, 0
""",
    )
    r = run(image, backend=backend)
    assert r.returncode == 1, r.stderr
    expected = [round(math.pi * 1e6), round(math.sqrt(2) * 2**30), round(math.sin(0.5) * 1e9), 0x04, 0x0500,
                0x01234567, 0x0707]  # fmt: skip
    assert r.stdout.strip() == "".join(f"{v:08X}" for v in expected), r.stdout + r.stderr


# MMX moves at ring 0 right after FNINIT (the x87 state in its initial configuration, which XSAVE records by
# clearing XSTATE_BV[0]): a host that cannot emulate them leaves them to popek, whose write of MM0 must survive
# the next entry, and the host's own emulation of the following move must see it (SDM vol. 1 §9.5.1, §13.6).
MMX_BODY = r"""
    mov rax, cr0
    and eax, ~0xc                       ; CR0.EM and CR0.TS clear: MMX usable
    mov cr0, rax
    fninit
    mov rax, 0x0102030405060708
    movq mm0, rax
    movq [rel mmx_slot], mm0
    SAY "store "
    HEX [rel mmx_slot], 16
    NL
    mov qword [rel mmx_slot], 0x1122334455667788
    movq mm1, [rel mmx_slot]
    movd eax, mm1
    movq rbx, mm0
    SAY "load "
    HEX rax, 16
    SAY " mm0 "
    HEX rbx, 16
    NL
    fnstsw ax
    SAY "fsw "
    HEX rax, 4
    NL
    ret
align 8
mmx_slot: dq 0
"""


@pytest.mark.parametrize("backend", [pytest.param("kvm", marks=KVM_MARKS)])
def test_mmx_moves_at_ring0_after_fninit_keep_their_values(tmp_path: Path, backend: str) -> None:
    lines, status, err = run64(tmp_path, MMX_BODY, backend)
    assert status == DONE, "\n".join(lines) + err
    assert lines == ["store 0102030405060708", "load 0000000055667788 mm0 0102030405060708", "fsw 0000"], err


# INT n from ring 3 (SDM vol. 2A INT n; vol. 3A §6.12.1.1): through a DPL-3 gate it reaches its handler, which
# sees CPL 3 in the frame and returns to ring 3; through a DPL-0 gate it is #GP with error code vector * 8 + 2
# (IDT, EXT clear). Hosts that answer it with #UD have it completed by popek (kvm_syscall, DR2 on the #UD handler),
# which finds the guest's #UD handler at the first exit after the guest loads its IDT (here the first line out).
USER_INT_BODY = r"""
    mov edi, 0x80
    mov rsi, int80
    mov dl, 0xEE                        ; present, DPL 3, 64-bit interrupt gate
    call setgate
    mov edi, 0x81
    mov rsi, int80
    mov dl, 0x8E                        ; DPL 0: not for ring 3
    call setgate
    mov edi, 13
    mov rsi, gp13
    mov dl, 0x8E
    call setgate
    SAY "to ring 3"
    NL
    mov rdi, user
    call to_user
    SAY "back in ring 0"
    NL
    ret
user:
    mov eax, 0x1234
    int 0x80
    mov eax, 0x5678
    int 0x80
    int 0x81
    UEXIT
int80:
    mov [rel int_rax], rax
    SAY "int80 rax="
    HEX [rel int_rax], 4
    mov rax, [rsp + 8]                  ; CS of the frame
    and eax, 3
    mov [rel int_rax], rax
    SAY " cpl="
    HEX [rel int_rax], 1
    NL
    iretq
gp13:
    mov rax, [rsp]
    mov [rel int_rax], rax
    SAY "#GP err="
    HEX [rel int_rax], 4
    mov rax, [rsp + 16]
    and eax, 3
    mov [rel int_rax], rax
    SAY " cpl="
    HEX [rel int_rax], 1
    NL
    mov rsp, [saved_rsp]                ; end the ring-3 code: return from to_user
    ret
align 8
int_rax: dq 0
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_int_n_from_ring3_is_delivered_through_the_idt_with_its_gate_dpl_checked(tmp_path: Path, backend: str) -> None:
    lines, status, err = run64(tmp_path, USER_INT_BODY, backend)
    assert status == DONE, "\n".join(lines) + err
    assert lines == [
        "to ring 3",
        "int80 rax=1234 cpl=3",
        "int80 rax=5678 cpl=3",
        "#GP err=040A cpl=3",
        "back in ring 0",
    ], err


# YMM moves at ring 0 where the guest sees AVX (SDM vol. 2C VMOVDQA, VZEROALL): the value goes through two
# registers (both encodings of the register form) to memory, and VZEROALL clears it.
AVX_BODY = r"""
    mov eax, 1
    cpuid
    and ecx, (1 << 26) | (1 << 28)      ; XSAVE and AVX
    cmp ecx, (1 << 26) | (1 << 28)
    je .avx
    SAY "avx not advertised"
    NL
    ret
.avx:
    mov rax, cr4
    or eax, (1 << 18) | (1 << 9)        ; CR4.OSXSAVE, CR4.OSFXSR
    mov cr4, rax
    xor ecx, ecx
    xor edx, edx
    mov eax, 7                          ; XCR0 = x87 | SSE | AVX
    xsetbv
    vmovdqa ymm1, [rel avx_in]
    vmovdqa ymm9, ymm1                  ; VEX.L1 0F 6F /r
    db 0xc5, 0x7d, 0x7f, 0xca           ; vmovdqa ymm2, ymm9 (VEX.L1 0F 7F /r, the store form)
    vmovdqa [rel avx_out], ymm2
    SAY "ymm "
    HEX [rel avx_out + 24], 16
    HEX [rel avx_out], 16
    NL
    vzeroall
    vmovdqa [rel avx_out], ymm9
    SAY "zeroed "
    HEX [rel avx_out + 24], 16
    HEX [rel avx_out], 16
    NL
    ret
align 32
avx_in: dq 0x1111111111111111, 0x2222222222222222, 0x3333333333333333, 0x4444444444444444
avx_out: dq 0, 0, 0, 0
"""


@pytest.mark.parametrize("backend", [pytest.param("kvm", marks=KVM_MARKS)])
def test_ymm_moves_and_vzeroall_at_ring0_give_architectural_results(tmp_path: Path, backend: str) -> None:
    lines, status, err = run64(tmp_path, AVX_BODY, backend)
    assert status == DONE, "\n".join(lines) + err
    if lines != ["avx not advertised"]:
        assert lines == ["ymm 44444444444444441111111111111111", "zeroed 00000000000000000000000000000000"], err
