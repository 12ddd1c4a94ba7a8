"""The paging unit, proven by assembly guests that run on both backends, KVM being the oracle for popek's software
MMU (`popek/cpu/mmu.py`): 4-level page walks with 4-KiB, 2-MiB and 1-GiB pages, the page-fault error code and CR2
for each kind of violation (not present, read-only with and without CR0.WP, user/supervisor, execute-disable,
reserved bits), the accessed and dirty flags, TLB invalidation (INVLPG, MOV CR3, global pages), and 32-bit paging
with 4-MiB pages and PAE paging entered from a boot sector (Intel SDM vol. 3A ch. 4).

Every expected line below is what the SDM says the guest must observe; where the architecture leaves a result open
(a stale TLB entry may or may not be used) the guest does the access but does not print what it saw.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

import pytest

from .guests import BACKENDS, DONE, PROTECTED_MODE, boot_sector, popek, run64

pytestmark = pytest.mark.skipif(shutil.which("nasm") is None, reason="needs nasm to build the guests")
KVM, SOFT = BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
def test_four_level_walk_with_4k_2m_and_1g_pages(tmp_path: Path, backend: str) -> None:
    lines, status, err = run64(
        tmp_path,
        r"""
LIN4K equ 0x00007f1234567000    ; PML4 0xfe, PDPT 0x48, PD 0x1a2, PT 0x167: no index shared with another mapping
LIN2M equ 0x00007f1234800000    ; PD 0x1a4 in the same page directory
LIN1G equ 0x00007f1240000000    ; PDPT 0x49 in the same PDPT
    ; a walk through four fresh tables: PML4[0xfe] -> wpdpt -> wpd -> wpt
    SET [pml4 + I4(LIN4K) * 8], wpdpt + 3
    SET [wpdpt + I3(LIN4K) * 8], wpd + 3
    SET [wpd + I2(LIN4K) * 8], wpt + 3
    SET [wpt + I1(LIN4K) * 8], page_a + 3             ; LIN4K          -> page_a
    SET [wpt + I1(LIN4K) * 8 + 8], page_b + 3         ; LIN4K + 0x1000 -> page_b: the PT index selects the page
    SET [wpt + I1(LIN4K) * 8 + 16], page_a + 3        ; LIN4K + 0x2000 -> page_a again: an alias
    ; written through LIN4K + 0x678, read at page_a + 0x678 (identity) and through the alias LIN4K + 0x2678
    mov rax, 0x1122334455667788
    mov rbx, LIN4K + 0x678
    mov [rbx], rax
    SAY "4k: "
    HEX [page_a + 0x678], 16
    SAY " "
    mov rbx, LIN4K + 0x2678
    HEX [rbx], 16
    ; written at page_b + 0xff8 (identity), read through LIN4K + 0x1ff8
    mov rax, 0x0badf00ddeadbeef
    mov [page_b + 0xff8], rax
    SAY " "
    mov rbx, LIN4K + 0x1ff8
    HEX [rbx], 16
    NL
    ; a 2-MiB page: PDE with PS=1 maps LIN2M to physical 0x200000; bits 20:0 of the address are the offset
    SET [wpd + I2(LIN2M) * 8], 0x200000 + 0x83
    mov rax, 0x2222333344445555
    mov rbx, LIN2M + 0x123458
    mov [rbx], rax
    SAY "2m: "
    HEX [0x323458], 16
    NL
    ; a 1-GiB page, if CPUID.80000001H:EDX[26] says the processor has them: PDPTE with PS=1 maps LIN1G to
    ; physical 0; bits 29:0 of the address are the offset
    mov eax, 0x80000001
    cpuid
    bt edx, 26
    jc .has1g
    SAY "1g: not supported"
    NL
    ret
.has1g:
    SET [wpdpt + I3(LIN1G) * 8], 0x83
    mov rax, 0x6666777788889999
    mov rbx, LIN1G + 0x3456780
    mov [rbx], rax
    SAY "1g: "
    HEX [0x3456780], 16
    NL
    ret
""",
        backend,
    )
    assert lines[:2] == [
        "4k: 1122334455667788 1122334455667788 0BADF00DDEADBEEF",
        "2m: 2222333344445555",
    ], "\n".join(lines) + err
    assert lines[2] in ("1g: 6666777788889999", "1g: not supported"), "\n".join(lines) + err
    assert len(lines) == 3 and status == DONE, "\n".join(lines) + err


@pytest.mark.parametrize("backend", BACKENDS)
def test_page_faults_report_the_error_code_cr2_and_the_faulting_instruction(tmp_path: Path, backend: str) -> None:
    # SDM §4.7 error code: bit 0 P (0: not present; 1: protection or reserved bit), 1 W/R, 2 U/S (CPL 3),
    # 3 RSVD, 4 I/D (instruction fetch, when EFER.NXE=1 or CR4.SMEP=1); CR2 the linear address accessed
    lines, status, err = run64(
        tmp_path,
        r"""    ; test-region pages (T = 512 GiB; tpt maps T + n * 0x1000)
    SET [tpt + 0 * 8], 0                          ; T + 0x0000: not present
    SET [tpt + 1 * 8], page_a + 1                 ; T + 0x1000: read-only, supervisor
    SET [tpt + 2 * 8], page_a + 3                 ; T + 0x2000: read/write, supervisor
    SET [tpt + 3 * 8], page_b + 5                 ; T + 0x3000: read-only, user
    SET [tpt + 4 * 8], page_code + 3 + XD         ; T + 0x4000: execute-disable (bit 63), supervisor
    SET [tpt + 5 * 8], page_c + 3 + (1 << 51)     ; T + 0x5000: bit 51 set, above MAXPHYADDR: reserved
    SET [tpt + 6 * 8], page_code + 7 + XD         ; T + 0x6000: execute-disable, user
    SET [tpt + 7 * 8], page_code + 3              ; T + 0x7000: executable, supervisor
    SET [tpd + 1 * 8], 0x200000 + 0x83 + 0x2000   ; T + 0x200000: a 2-MiB page with bit 13 (reserved) set
    SET [pml4 + 2 * 8], tpdpt + 0x87              ; 0x10000000000: PS set in a PML4E (reserved)
    SET [tpt2], page_code + 3                     ; tpt2 maps page_code (R/W=1 U/S=1 executable) ...
    SET [tpd + 2 * 8], tpt2 + 7 + XD              ; ... at T + 0x400000 under a PDE with XD=1
    SET [tpd + 3 * 8], tpt2 + 5                   ; ... at T + 0x600000 under a PDE with R/W=0
    SET [tpd + 4 * 8], tpt2 + 3                   ; ... at T + 0x800000 under a PDE with U/S=0
    mov eax, 0x80000008                           ; T + 0x8000: bit MAXPHYADDR set, the lowest reserved one
    cpuid
    movzx ecx, al
    mov rax, page_c + 3
    bts rax, rcx
    mov [tpt + 8 * 8], rax
    FLUSH
    mov rbx, T
    ; not present: P=0; W/R says read or write
    TRY mov rax, [rbx + 0x10]                      ; err 0000
    TRY mov qword [rbx + 0x18], rax                ; err 0002
    ; read-only supervisor page: reads work; with CR0.WP=1 a supervisor write faults (P=1 W=1)
    mov dword [page_a + 0x20], 0x5ca1ab1e
    SAY "ro read: "
    HEX [rbx + 0x1020], 8
    NL
    TRY mov dword [rbx + 0x1020], 0x11111111       ; err 0003
    ; with CR0.WP=0 the supervisor write goes through
    mov rax, cr0
    and eax, ~(1 << 16)
    mov cr0, rax
    TRY mov dword [rbx + 0x1020], 0x22222222       ; no fault
    SAY "wp=0 write: "
    HEX [page_a + 0x20], 8
    NL
    ; and with CR0.WP=1 again it faults again (the permission outcome under WP=0 was not kept)
    or eax, 1 << 16
    mov cr0, rax
    TRY mov dword [rbx + 0x1020], 0x33333333       ; err 0003
    SAY "after: "
    HEX [page_a + 0x20], 8
    NL
    ; with EFER.NXE=0, bit 63 of an entry is reserved: P=1 RSVD=1
    TRY mov rax, [rbx + 0x4000]                    ; err 0009
    mov ecx, 0xC0000080
    rdmsr
    or eax, 1 << 11
    wrmsr
    FLUSH
    ; with EFER.NXE=1 the page is readable, but an instruction fetch from it faults with I/D=1
    SAY "nx read: "
    HEX [rbx + 0x4000], 6                         ; the bytes of `jmp r14`: 41 ff e6
    NL
    mov r14, .back1
    lea rax, [rbx + 0x4000]
    TRYAT T + 0x4000, jmp rax                     ; err 0011, at the jump's target
.back1:
    ; the same physical page through an executable mapping runs
    mov r14, .back2
    lea rax, [rbx + 0x7000]
    jmp rax
.back2:
    SAY "fetch from T+0x7000 ran"
    NL
    ; a reserved bit in the PTE: P=1 RSVD=1, with W/R and I/D as for any fault
    TRY mov rax, [rbx + 0x5008]                    ; err 0009
    TRY mov [rbx + 0x5008], rax                    ; err 000B
    lea rax, [rbx + 0x5000]
    TRYAT T + 0x5000, jmp rax                     ; err 0019
    TRY mov rax, [rbx + 0x8000]                    ; bit MAXPHYADDR: err 0009
    ; the rights of every level count: XD, R/W=0 in the PDE deny what the PTE allows
    lea rax, [rbx + 0x400000]
    TRYAT T + 0x400000, jmp rax                   ; err 0011
    mov r14, .back3
    lea rax, [rbx + 0x800000]                     ; (the PTE itself is executable)
    jmp rax
.back3:
    TRY mov eax, [rbx + 0x600000]                  ; a read is allowed
    TRY mov [rbx + 0x600000], eax                  ; err 0003
    ; a fetch from a not-present page says I/D=1 too (EFER.NXE=1)
    lea rax, [rbx + 0x9000]
    TRYAT T + 0x9000, jmp rax                     ; err 0010
    ; a write that straddles a writable and a read-only page faults on the second: CR2 is that page's start
    TRY mov qword [rbx + 0x2ffc], rax              ; err 0003, cr2 T + 0x3000
    ; reserved bits in a 2-MiB PDE (bit 13) and PS in a PML4E
    TRY mov rax, [rbx + 0x200000]                  ; err 0009
    mov rcx, 0x10000000000
    TRY mov rax, [rcx + 0x40]                      ; err 0009
    ; user mode (CPL 3), with CR0.WP=0 to show it only matters to supervisor writes
    mov rax, cr0
    and eax, ~(1 << 16)
    mov cr0, rax
    mov rdi, .user
    call to_user
    SAY "back in ring 0, user read: "
    HEX [scratch], 8
    NL
    ret
.user:
    mov rbx, T
    TRY mov rax, [rbx + 0x2000]                    ; supervisor page: err 0005
    TRY mov [rbx + 0x2000], rax                    ; err 0007
    mov dword [page_b], 0x600dc0de
    mov eax, [rbx + 0x3000]                       ; user read-only page: reads work
    mov [scratch], rax
    TRY mov [rbx + 0x3000], eax                    ; but writes fault even with CR0.WP=0: err 0007
    TRY mov rax, [rbx + 0x0]                       ; not present: err 0004
    mov r14, .uback
    lea rax, [rbx + 0x6000]
    TRYAT T + 0x6000, jmp rax                     ; user page, execute-disable: err 0015
    lea rax, [rbx + 0x7000]
    TRYAT T + 0x7000, jmp rax                     ; supervisor page: err 0015
    TRY mov rax, [rbx + 0x800000]                  ; U/S=0 in the PDE: err 0005
.uback:
    UEXIT
""",
        backend,
    )
    assert lines == [
        "#PF err=0000 cr2=0000008000000010 rip=ok cpl=0",
        "#PF err=0002 cr2=0000008000000018 rip=ok cpl=0",
        "ro read: 5CA1AB1E",
        "#PF err=0003 cr2=0000008000001020 rip=ok cpl=0",
        "wp=0 write: 22222222",
        "#PF err=0003 cr2=0000008000001020 rip=ok cpl=0",
        "after: 22222222",
        "#PF err=0009 cr2=0000008000004000 rip=ok cpl=0",
        "nx read: E6FF41",
        "#PF err=0011 cr2=0000008000004000 rip=ok cpl=0",
        "fetch from T+0x7000 ran",
        "#PF err=0009 cr2=0000008000005008 rip=ok cpl=0",
        "#PF err=000B cr2=0000008000005008 rip=ok cpl=0",
        "#PF err=0019 cr2=0000008000005000 rip=ok cpl=0",
        "#PF err=0009 cr2=0000008000008000 rip=ok cpl=0",
        "#PF err=0011 cr2=0000008000400000 rip=ok cpl=0",
        "#PF err=0003 cr2=0000008000600000 rip=ok cpl=0",
        "#PF err=0010 cr2=0000008000009000 rip=ok cpl=0",
        "#PF err=0003 cr2=0000008000003000 rip=ok cpl=0",
        "#PF err=0009 cr2=0000008000200000 rip=ok cpl=0",
        "#PF err=0009 cr2=0000010000000040 rip=ok cpl=0",
        "#PF err=0005 cr2=0000008000002000 rip=ok cpl=3",
        "#PF err=0007 cr2=0000008000002000 rip=ok cpl=3",
        "#PF err=0007 cr2=0000008000003000 rip=ok cpl=3",
        "#PF err=0004 cr2=0000008000000000 rip=ok cpl=3",
        "#PF err=0015 cr2=0000008000006000 rip=ok cpl=3",
        "#PF err=0015 cr2=0000008000007000 rip=ok cpl=3",
        "#PF err=0005 cr2=0000008000800000 rip=ok cpl=3",
        "back in ring 0, user read: 600DC0DE",
    ], "\n".join(lines) + err
    assert status == DONE, err


@pytest.mark.parametrize("backend", BACKENDS)
def test_ps_in_a_pdpte_is_reserved_where_cpuid_has_no_1g_pages(tmp_path: Path, backend: str) -> None:
    lines, status, err = run64(
        tmp_path,
        r"""
    mov eax, 0x80000001
    cpuid
    bt edx, 26
    jnc .no1g
    SAY "1g pages supported"
    NL
    ret
.no1g:
    ; SDM §4.5.4 table 4-17: without 1-GiB pages, bit 7 of a PDPTE is reserved: a read through it is a #PF with
    ; P=1 RSVD=1 (err 0009), not an access to physical 0x10
    SET [tpdpt + 1 * 8], 0x83
    FLUSH
    mov rbx, T + 0x40000000
    TRY mov rax, [rbx + 0x10]
    ret
""",
        backend,
    )
    if lines == ["1g pages supported"]:
        pytest.skip(f"the {backend} CPU has 1-GiB pages: test_four_level_walk_with_4k_2m_and_1g_pages uses them")
    assert lines == ["#PF err=0009 cr2=0000008040000010 rip=ok cpl=0"], "\n".join(lines) + err
    assert status == DONE, err


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_modify_write_instructions_fault_as_writes(tmp_path: Path, backend: str) -> None:
    # SDM §4.7: W in the error code is the access type; an instruction that reads and writes its operand makes a
    # write access, so a not-present page faults with W=1 before anything is read (ring 3: KVM runs it natively)
    lines, status, err = run64(
        tmp_path,
        r"""
    mov rdi, .user
    call to_user
    ret
.user:
    mov rbx, T + 0x5000                 ; not present
    TRY add [rbx], eax                  ; err 0006
    TRY inc qword [rbx + 8]             ; err 0006
    TRY xchg [rbx + 16], eax            ; err 0006
    TRY lock cmpxchg16b [rbx + 32]      ; err 0006
    TRY lock xadd [rbx + 48], eax       ; err 0006
    TRY bts dword [rbx + 56], 3         ; err 0006
    TRY shl dword [rbx + 64], 3         ; err 0006
    TRY cmp [rbx + 72], eax             ; read only: err 0004
    TRY bt dword [rbx + 80], 3          ; err 0004
    UEXIT
""",
        backend,
    )
    rmw = [f"#PF err=0006 cr2={0x8000005000 + off:016X} rip=ok cpl=3" for off in (0, 8, 16, 32, 48, 56, 64)]
    reads = [f"#PF err=0004 cr2={0x8000005000 + off:016X} rip=ok cpl=3" for off in (72, 80)]
    assert lines == rmw + reads, "\n".join(lines) + err
    assert status == DONE, err


@pytest.mark.parametrize("backend", BACKENDS)
def test_accessed_and_dirty_flags(tmp_path: Path, backend: str) -> None:
    # SDM §4.8: A is set in every paging-structure entry a successful translation used; D in the entry that maps
    # the page, on a write (never in an entry that references a table, and not when the write faults)
    lines, status, err = run64(
        tmp_path,
        r"""%macro FLAGS 2                                    ; FLAGS "name", entry: print the entry's flags (bits 11:0)
    SAY %1
    mov rax, %2
    HEX rax, 3
%endmacro
    mov rbx, T
    ; fresh entries with A=0 D=0 on every level of T + 0x1000's walk; MOV CR3 drops the cached ones
    SET [pml4 + I4(T) * 8], tpdpt + 7
    SET [tpdpt + I3(T) * 8], tpd + 7
    SET [tpd + I2(T) * 8], tpt + 7
    SET [tpt + 1 * 8], page_a + 3
    FLUSH
    FLAGS "before:   pte=", [tpt + 8]
    NL
    ; a read sets A in every entry it used, and D nowhere
    mov rax, [rbx + 0x1000]
    FLAGS "read:     pte=", [tpt + 8]
    FLAGS " pde=", [tpd]
    FLAGS " pdpte=", [tpdpt]
    FLAGS " pml4e=", [pml4 + 8]
    NL
    ; a write sets D in the PTE, the entry that maps the page; D is not set in the entries that reference tables
    mov [rbx + 0x1000], rax
    FLAGS "write:    pte=", [tpt + 8]
    FLAGS " pde=", [tpd]
    FLAGS " pdpte=", [tpdpt]
    FLAGS " pml4e=", [pml4 + 8]
    NL
    ; A cleared and the translation invalidated: the next read sets it again
    SET [tpt + 1 * 8], page_a + 3
    invlpg [rbx + 0x1000]
    mov rax, [rbx + 0x1000]
    FLAGS "again:    pte=", [tpt + 8]
    NL
    ; D cleared (A kept) and invalidated: a read leaves D clear, a write after it sets D
    SET [tpt + 1 * 8], page_a + 0x23
    invlpg [rbx + 0x1000]
    mov rax, [rbx + 0x1000]
    FLAGS "read:     pte=", [tpt + 8]
    mov [rbx + 0x1000], rax
    FLAGS " then write: pte=", [tpt + 8]
    NL
    ; a LOCK CMPXCHG whose comparison fails still writes (the old value back): D set
    SET [tpt + 4 * 8], page_c + 0x23
    mov qword [page_c + 8], 5
    mov eax, 6
    mov ecx, 7
    lock cmpxchg [rbx + 0x4008], rcx
    mov rdx, rax                                  ; the value it found: 5
    FLAGS "failed cmpxchg: pte=", [tpt + 32]
    SAY " found="
    HEX rdx, 1
    NL
    ; a write that faults (read-only page, CR0.WP=1) does not set D
    SET [tpt + 2 * 8], page_b + 0x21
    TRY mov [rbx + 0x2000], rax
    FLAGS "faulting write: pte=", [tpt + 16]
    NL
    ; an instruction fetch sets A, not D
    SET [tpt + 3 * 8], page_code + 3
    mov r14, .back
    lea rax, [rbx + 0x3000]
    jmp rax
.back:
    FLAGS "fetch:    pte=", [tpt + 24]
    NL
    ; a 2-MiB page: A and D live in the PDE that maps it (PS=1)
    SET [tpd + 1 * 8], 0x200000 + 0x83
    mov rax, [rbx + 0x201008]
    FLAGS "2m read:  pde=", [tpd + 8]
    mov [rbx + 0x201008], rax
    FLAGS " then write: pde=", [tpd + 8]
    NL
    ret
""",
        backend,
    )
    assert lines == [
        "before:   pte=003",
        "read:     pte=023 pde=027 pdpte=027 pml4e=027",
        "write:    pte=063 pde=027 pdpte=027 pml4e=027",
        "again:    pte=023",
        "read:     pte=023 then write: pte=063",
        "failed cmpxchg: pte=063 found=5",
        "#PF err=0003 cr2=0000008000002000 rip=ok cpl=0",
        "faulting write: pte=021",
        "fetch:    pte=023",
        "2m read:  pde=0A3 then write: pde=0E3",
    ], "\n".join(lines) + err
    assert status == DONE, err


@pytest.mark.parametrize("backend", BACKENDS)
def test_tlb_invalidation_by_invlpg_cr3_and_cr4_pge(tmp_path: Path, backend: str) -> None:
    # SDM §4.10.4.1: INVLPG drops the translations (global or not, of any page size) for the page holding the
    # address and every paging-structure cache entry; MOV CR3 drops the non-global ones; a MOV CR4 that changes
    # PGE drops them all. Whether a stale translation is used before that is the processor's choice: not printed.
    lines, status, err = run64(
        tmp_path,
        r"""%macro SHOW 2                                     ; SHOW "name", value: print the low dword of a value read
    SAY %1
    mov rax, %2
    HEX rax, 8
%endmacro
    mov rbx, T
    mov dword [page_a], 0xaaaaaaaa
    mov dword [page_b], 0xbbbbbbbb
    mov dword [page_c], 0xcccccccc
    mov dword [0x323000], 0x22222222              ; in the 2-MiB page at physical 0x200000
    mov dword [0x523000], 0x44444444              ; in the 2-MiB page at physical 0x400000
    ; T + 0x1000 -> page_a, used once so the TLB may hold it
    SET [tpt + 1 * 8], page_a + 3
    SHOW "4k: ", [rbx + 0x1000]
    ; the PTE now says page_b; without invalidation either page may be seen (not printed)
    SET [tpt + 1 * 8], page_b + 3
    mov eax, [rbx + 0x1000]
    ; INVLPG: the new translation must be used
    invlpg [rbx + 0x1000]
    SHOW " invlpg: ", [rbx + 0x1000]
    ; back to page_a; MOV CR3 drops every non-global translation
    SET [tpt + 1 * 8], page_a + 3
    FLUSH
    SHOW " cr3: ", [rbx + 0x1000]
    NL
    ; INVLPG also drops the cached upper-level entries: point the PDE at another page table, whose entry for
    ; T + 0x1000 says page_c
    SET [tpt2 + 1 * 8], page_c + 3
    SET [tpd], tpt2 + 7
    invlpg [rbx + 0x1000]
    SHOW "new table: ", [rbx + 0x1000]
    SET [tpd], tpt + 7
    FLUSH
    ; a 2-MiB page: INVLPG of its first 4 KiB drops its translation for T + 0x323000 too
    SET [tpd + 1 * 8], 0x200000 + 0x83
    SHOW " 2m: ", [rbx + 0x323000]
    SET [tpd + 1 * 8], 0x400000 + 0x83
    mov eax, [rbx + 0x323000]
    invlpg [rbx + 0x200000]
    SHOW " invlpg: ", [rbx + 0x323000]
    NL
    ; global pages (CR4.PGE=1, G=1 in the PTE)
    mov rax, cr4
    or eax, 1 << 7
    mov cr4, rax
    SET [tpt + 2 * 8], page_a + 0x103
    SHOW "global: ", [rbx + 0x2000]
    SET [tpt + 2 * 8], page_b + 0x103
    FLUSH                                         ; MOV CR3 may keep a global translation: not printed
    mov eax, [rbx + 0x2000]
    invlpg [rbx + 0x2000]                         ; but INVLPG drops it
    SHOW " invlpg: ", [rbx + 0x2000]
    ; clearing CR4.PGE drops every translation, global ones too
    SET [tpt + 2 * 8], page_a + 0x103
    mov rax, cr4
    and eax, ~(1 << 7)
    mov cr4, rax
    SHOW " pge off: ", [rbx + 0x2000]
    ; a global translation that MOV CR3 did keep is still INVLPG's to drop after CR4.PGE is set again
    mov rax, cr4
    or eax, 1 << 7
    mov cr4, rax
    SET [tpt + 2 * 8], page_c + 0x103
    FLUSH
    mov eax, [rbx + 0x2000]
    invlpg [rbx + 0x2000]
    SHOW " invlpg: ", [rbx + 0x2000]
    NL
    ret
""",
        backend,
    )
    assert lines == [
        "4k: AAAAAAAA invlpg: BBBBBBBB cr3: AAAAAAAA",
        "new table: CCCCCCCC 2m: 22222222 invlpg: 44444444",
        "global: AAAAAAAA invlpg: BBBBBBBB pge off: AAAAAAAA invlpg: CCCCCCCC",
    ], "\n".join(lines) + err
    assert status == DONE, err


# 32-bit guests from a boot sector: PROTECTED_MODE, then the test, which prints with `hex32` (" " and 8 digits)
# and whose #PF handler prints the error code and CR2 and resumes at EBP.
PSE_GUEST = r"""
    ; 32-bit paging (CR4.PSE=1): the page directory at 0x20000, the IDT at 0x21000
    mov edi, 0x20000
    xor eax, eax
    mov ecx, 0x2000 / 4
    rep stosd
    mov dword [0x20000], 0x00000083             ; 0-4 MiB: identity, a 4-MiB page (PS=1)
    mov dword [0x20004], 0x00000083             ; 4-8 MiB: physical 0 again (an alias)
    mov dword [0x20008], 0x00400081             ; 8-12 MiB: physical 4 MiB, read-only
    mov dword [0x2000c], 0x00200083             ; 12-16 MiB: bit 21 set, reserved in a 4-MiB PDE
    mov dword [0x21000 + 14 * 8], 0x00080000 + pf
    mov dword [0x21000 + 14 * 8 + 4], 0x00008e00
    lidt [idtr]
    mov eax, cr4
    or al, 0x10                                 ; CR4.PSE
    mov cr4, eax
    mov eax, 0x20000
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80010000                          ; CR0.PG | CR0.WP
    mov cr0, eax
    ; written through the alias at 4 MiB + 0x9010, read at physical 0x9010: bits 21:0 are the page offset
    mov dword [0x409010], 0x12345678
    mov eax, [0x9010]
    call hex32
    mov eax, [0x20004]                          ; the PDE of the alias: A and D set (0xE3)
    call hex32
    mov eax, [0x800000]                         ; a read of the read-only page works ...
    mov ebp, .r1
    mov dword [0x812344], 1                     ; ... a write faults: err 3 (P, W), CR2 0x812344
.r1:
    mov eax, [0x20008]                          ; its PDE: A set (a successful read), D clear (0x004000A1)
    call hex32
    mov ebp, .r2
    mov eax, [0xc00010]                         ; a reserved bit: err 9 (P, RSVD), CR2 0xC00010
.r2:
    mov ebp, .r3
    mov eax, [0x1000010]                        ; not present: err 0, CR2 0x1000010
.r3:
    mov dx, 0x3f8
    mov al, 10
    out dx, al
    mov al, 0x10
    out 0xf4, al
pf:                                             ; print the error code and CR2, resume at ebp
    pop eax
    call hex32
    mov eax, cr2
    call hex32
    mov [esp], ebp
    iret
hex32:                                          ; print " " and eax as 8 hex digits
    pusha
    mov ebx, eax
    mov dx, 0x3f8
    mov al, ' '
    out dx, al
    mov ecx, 8
.d: rol ebx, 4
    mov al, bl
    and al, 15
    add al, '0'
    cmp al, '9'
    jbe .o
    add al, 7
.o: out dx, al
    loop .d
    popa
    ret
idtr: dw 15 * 8 - 1
      dd 0x21000
"""

PAE_GUEST = r"""
    ; PAE paging: the PDPT at 0x20000, the page directory at 0x21000, a page table at 0x22000, the IDT at 0x23000
    mov edi, 0x20000
    xor eax, eax
    mov ecx, 0x4000 / 4
    rep stosd
    mov dword [0x20000], 0x00021001             ; PDPTE 0 -> the page directory; PDPTEs 1-3 not present
    mov dword [0x21000], 0x00000083             ; 0-2 MiB: identity, a 2-MiB page
    mov dword [0x21008], 0x00022003             ; 2-4 MiB: through the page table
    mov dword [0x22000], 0x00009003             ; 0x200000 -> physical 0x9000
    mov dword [0x22008], 0x00009001             ; 0x201000 -> physical 0x9000, read-only
    mov dword [0x22010], 0x00009003             ; 0x202000 -> physical 0x9000 with bit 52 set: in PAE paging
    mov dword [0x22014], 0x00100000             ;   bits 62:MAXPHYADDR of an entry are reserved
    mov dword [0x22018], 0x00009003             ; 0x203000 -> physical 0x9000, execute-disable (bit 63)
    mov dword [0x2201c], 0x80000000
    mov word [0x9000], 0xe5ff                   ; physical 0x9000 starts with `jmp ebp`
    mov dword [0x23000 + 14 * 8], 0x00080000 + pf
    mov dword [0x23000 + 14 * 8 + 4], 0x00008e00
    lidt [idtr]
    mov eax, cr4
    or al, 0x20                                 ; CR4.PAE
    mov cr4, eax
    mov eax, 0x20000
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80010000                          ; CR0.PG | CR0.WP
    mov cr0, eax
    ; written through 0x200010, read at physical 0x9010
    mov dword [0x200010], 0x12345678
    mov eax, [0x9010]
    call hex32
    mov eax, [0x22000]                          ; its PTE: A and D set (0x9063)
    call hex32
    mov ebp, .r1
    mov dword [0x201010], 1                     ; read-only: err 3 (P, W), CR2 0x201010
.r1:
    mov ebp, .r2
    mov eax, [0x202010]                         ; a reserved bit: err 9 (P, RSVD), CR2 0x202010
.r2:
    mov ebp, .r3
    mov eax, [0x40000010]                       ; PDPTE 1 not present: err 0, CR2 0x40000010
.r3:
    mov ecx, 0xc0000080                         ; EFER.NXE: bit 63 is XD, no longer reserved
    rdmsr
    or ah, 0x08
    wrmsr
    mov ebp, .r4
    mov eax, 0x203000
    jmp eax                                     ; a fetch from an XD page: err 0x11 (P, I/D), CR2 0x203000
.r4:
    mov dx, 0x3f8
    mov al, 10
    out dx, al
    mov al, 0x10
    out 0xf4, al
pf:                                             ; print the error code and CR2, resume at ebp
    pop eax
    call hex32
    mov eax, cr2
    call hex32
    mov [esp], ebp
    iret
hex32:                                          ; print " " and eax as 8 hex digits
    pusha
    mov ebx, eax
    mov dx, 0x3f8
    mov al, ' '
    out dx, al
    mov ecx, 8
.d: rol ebx, 4
    mov al, bl
    and al, 15
    add al, '0'
    cmp al, '9'
    jbe .o
    add al, 7
.o: out dx, al
    loop .d
    popa
    ret
idtr: dw 15 * 8 - 1
      dd 0x23000
"""

PAGING32_PROBE = r"""
    mov edi, 0x20000                            ; identity-map 0-4 MiB with 4-KiB pages, turn paging on
    xor eax, eax
    mov ecx, 0x2000 / 4
    rep stosd
    mov dword [0x20000], 0x21003
    mov edi, 0x21000
    mov eax, 3
    mov ecx, 1024
.fill:
    stosd
    add eax, 0x1000
    loop .fill
    mov eax, 0x20000
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    mov al, 0x10
    out 0xf4, al
"""


@functools.cache
def kvm_runs_32bit_paging() -> bool:
    """Whether this host's KVM can run a guest with 32-bit paging at all. (Some cannot: a PVM host, which
    emulates ring 0 for its guests, triple-faults on the first instruction after CR0.PG is set in protected mode,
    even with an identity map.) Where it cannot there is no oracle, and the KVM half of these tests is skipped."""
    with tempfile.TemporaryDirectory() as tmp:
        image = boot_sector(Path(tmp), PROTECTED_MODE + PAGING32_PROBE + "bits 16\n")
        return popek(image, "kvm").returncode == DONE


def run32(tmp: Path, guest: str, backend: str) -> tuple[str, int, str]:
    if backend == "kvm" and not kvm_runs_32bit_paging():
        pytest.skip("this host's KVM cannot run guests with 32-bit paging (CR0.PG in protected mode triple-faults)")
    r = popek(boot_sector(tmp, PROTECTED_MODE + guest + "bits 16\n"), backend)
    return r.stdout, r.returncode, r.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_32bit_paging_with_4m_pages(tmp_path: Path, backend: str) -> None:
    # SDM §4.3: a PDE with PS=1 (CR4.PSE=1) maps 4 MiB; bit 21 of it is reserved (table 4-4)
    out, status, err = run32(tmp_path, PSE_GUEST, backend)
    assert out == " 12345678 000000E3 00000003 00812344 004000A1 00000009 00C00010 00000000 01000010\n", out + err
    assert status == DONE, err


@pytest.mark.parametrize("backend", BACKENDS)
def test_pae_paging(tmp_path: Path, backend: str) -> None:
    # SDM §4.4: PAE paging without long mode; 2-MiB and 4-KiB pages; in its PDEs and PTEs bits 62:MAXPHYADDR are
    # reserved (not only 51:MAXPHYADDR as in 4-level paging), bit 63 is XD when EFER.NXE=1
    out, status, err = run32(tmp_path, PAE_GUEST, backend)
    expected = " 12345678 00009063 00000003 00201010 00000009 00202010 00000000 40000010 00000011 00203000\n"
    assert out == expected, out + err
    assert status == DONE, err
