"""The interpreter on small guest programs in real mode, 32-bit protected mode and 64-bit mode: each instruction
class, faults (RIP restored, no partial state), events (interrupts, STI shadow, HLT), the decode cache and
self-modifying code, REP string instructions, system registers and SSE."""

from __future__ import annotations

from collections.abc import Iterator

import iced_x86
import pytest

from popek.cpu import exceptions
from popek.cpu import interp as interp_module
from popek.cpu.core import Cpu
from popek.cpu.interp import default_cpuid, vendor_of
from popek.cpu.state import (
    CF,
    CR0_PG,
    CR0_TS,
    CR4_OSXSAVE,
    DF,
    EFER_NXE,
    EFER_SCE,
    FS,
    GS,
    IF,
    MSR_STAR,
    ZF,
    CpuException,
    Vector,
)

from .machine import CODE, STACK_TOP, Machine, nasm_available

pytestmark = pytest.mark.skipif(not nasm_available(), reason="needs nasm to assemble guest code")


class Faults:
    """Records exceptions the interpreter hands to `exceptions.handle` instead of delivering them."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int | None, int]] = []

    def __call__(self, cpu: Cpu, exc: CpuException, return_rip: int) -> None:
        self.seen.append((exc.vector, exc.error_code, return_rip))
        cpu.state.halted = True  # stop the run here


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Iterator[Faults]:
    rec = Faults()
    monkeypatch.setattr(exceptions, "handle", rec)
    yield rec


def run(mode: int, source: str, **regs: int) -> Machine:
    m = Machine(mode)
    m.load(source)
    names = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")
    for name, v in regs.items():
        m.gpr[names.index(name)] = v
    m.run(100_000)
    return m


# ---------------------------------------------------------------- 64-bit


def test_arithmetic_loop_and_stack_64() -> None:
    m = run(
        64,
        """
        mov rcx, 100
        xor eax, eax
    l:  add rax, rcx
        loop l
        mov rbx, 0x1122334455667788
        bswap rbx
        push rbx
        pop rdx
        call f
        mov r8, rax
        hlt
    f:  mov eax, -1         ; zero-extends into RAX
        ret
    """,
    )
    assert m.gpr[2] == 0x8877665544332211
    assert m.gpr[8] == 0xFFFFFFFF
    assert m.gpr[4] == STACK_TOP
    assert m.cpu.state.halted
    assert m.cpu.instructions == 2 + 200 + 9


def test_partial_register_writes_and_rip_relative() -> None:
    m = run(
        64,
        """
        mov rax, -1
        mov al, 0x12
        mov ah, 0x34
        mov rbx, -1
        mov bx, 0x5678
        mov rcx, [rel data]
        lea rdx, [rel data]
        mov r9, -1
        mov r9d, 7
        mov r10b, 0x55
        hlt
    data: dq 0xdeadbeefcafebabe
    """,
    )
    assert m.gpr[0] == 0xFFFFFFFFFFFF3412
    assert m.gpr[3] == 0xFFFFFFFFFFFF5678
    assert m.gpr[1] == 0xDEADBEEFCAFEBABE
    assert CODE < m.gpr[2] < CODE + 64
    assert m.gpr[9] == 7
    assert m.gpr[10] & 0xFF == 0x55


def test_memory_forms_cmpxchg16b_xadd_and_bit_strings() -> None:
    m = run(
        64,
        """
        mov rdi, 0x20000
        mov qword [rdi], 5
        mov qword [rdi+8], 6
        mov rax, 5
        mov rdx, 6
        mov rbx, 0x77
        mov rcx, 0x88
        lock cmpxchg16b [rdi]
        setz r8b
        mov rsi, 3
        lock xadd [rdi], rsi        ; [rdi] = 0x77 + 3, rsi = 0x77
        mov rax, 130
        bts [rdi+16], rax           ; bit 130: byte 16 + 16, bit 2
        mov rax, -1
        bt [rdi+16+8], rax          ; bit -1 of the qword at +24: bit 63 of the qword at +16
        setc r9b
        add qword [rdi+40], 1
        hlt
    """,
    )
    mem = m.mem
    assert m.gpr[8] == 1
    assert mem.read_u64(0x20000) == 0x77 + 3 and mem.read_u64(0x20008) == 0x88
    assert m.gpr[6] == 0x77
    assert mem.read_u64(0x20010 + 16) == 4
    assert m.gpr[9] == 0
    assert mem.read_u64(0x20028) == 1


def test_rep_movs_and_stos_with_both_directions() -> None:
    m = run(
        64,
        """
        mov rdi, 0x30000
        mov rcx, 10000          ; crosses pages: the fast path and the element path
        mov al, 0xAB
        rep stosb
        mov rsi, 0x30000
        mov rdi, 0x40001
        mov rcx, 2500
        rep movsd
        std
        mov rsi, 0x50007
        mov rdi, 0x50107
        mov dword [0x50000], 0x44332211
        mov dword [0x50004], 0x88776655
        mov rcx, 8
        rep movsb               ; backwards: the last byte first
        cld
        hlt
    """,
    )
    mem = m.mem
    assert mem.read(0x30000, 10000) == b"\xab" * 10000 and mem.read_u8(0x30000 + 10000) == 0
    assert mem.read(0x40001, 10000) == b"\xab" * 10000
    assert mem.read_u64(0x50100) == 0x8877665544332211
    assert m.gpr[1] == 0 and m.gpr[6] == 0x50007 - 8 and m.gpr[7] == 0x50107 - 8
    assert not m.cpu.state.rflags & DF


def test_overlapping_forward_movsb_replicates_a_pattern() -> None:
    m = run(
        64,
        """
        mov rdi, 0x30000
        mov dword [rdi], 0x00434241
        mov rsi, rdi
        add rdi, 3
        mov rcx, 9
        rep movsb
        hlt
    """,
    )
    assert m.mem.read(0x30000, 12) == b"ABC" * 4


def test_self_modifying_code_runs_the_new_bytes() -> None:
    m = run(
        64,
        """
        mov ecx, 2
    again:
        call target
        mov byte [rel target+1], 42     ; rewrite the immediate of the MOV below
        loop again
        hlt
    target:
        mov eax, 1
        ret
    """,
    )
    assert m.gpr[0] == 42
    assert m.interp._cache  # the cache was in use


def test_undefined_opcode_and_illegal_lock_fault_with_rip_restored(faults: Faults) -> None:
    m = run(64, "nop\nud2\n")
    assert faults.seen == [(Vector.UD, None, CODE + 1)]
    assert m.cpu.state.rip == CODE + 1
    faults.seen.clear()
    run(64, "db 0xF0, 0x89, 0xC0\n")  # lock mov eax, eax
    assert faults.seen == [(Vector.UD, None, CODE)]
    faults.seen.clear()
    run(64, "db 0x0F, 0x0B\n")
    assert faults.seen[0][0] == Vector.UD


def test_faults_leave_no_partial_state(faults: Faults) -> None:
    m = run(
        64,
        """
        mov rax, 5
        mov rbx, 0x7fffffffffff0000
        mov rcx, 0x8000000000000000   ; non-canonical
        add rax, [rcx]
        hlt
    """,
    )
    assert faults.seen == [(Vector.GP, 0, m.cpu.state.rip)]
    assert m.gpr[0] == 5
    faults.seen.clear()
    m = run(64, "mov rsp, 0x8000000000000000\npush rax\nhlt")
    assert faults.seen[0][0] == Vector.SS and m.gpr[4] == 0x8000000000000000
    faults.seen.clear()
    m = run(64, "xor edx, edx\nmov eax, 1\nxor ecx, ecx\ndiv rcx\nhlt")
    assert faults.seen[0][0] == Vector.DE and m.gpr[0] == 1


def test_control_registers_and_msrs(faults: Faults) -> None:
    m = run(
        64,
        """
        mov rax, cr0
        mov r8, rax
        mov ecx, 0xC0000080
        rdmsr
        mov r9, rax
        or eax, 1 << 11                 ; NXE
        wrmsr
        mov ecx, 0xC0000100             ; FS base
        mov eax, 0x1000
        xor edx, edx
        wrmsr
        mov qword [0x1000+0x20], 99
        mov r10, [fs:0x20]
        mov ecx, 0xC0000102             ; KERNEL_GS_BASE
        mov eax, 0x2000
        wrmsr
        swapgs
        rdtscp
        mov r11, rax
        mov ecx, 0x12345678
        rdmsr                           ; unknown: #GP(0)
    """,
    )
    s = m.cpu.state
    assert m.gpr[8] & CR0_PG
    assert m.gpr[9] & 0x500 == 0x500  # LME | LMA
    assert s.efer & EFER_NXE
    assert m.gpr[10] == 99
    assert s.seg[FS].base == 0x1000 and s.seg[GS].base == 0x2000
    assert faults.seen[-1][:2] == (Vector.GP, 0)


def test_cr_writes_are_checked(faults: Faults) -> None:
    run(64, "mov rax, cr4\nand eax, ~(1 << 5)\nmov cr4, rax\nhlt")  # clearing PAE in long mode
    run(64, "mov rax, 1 << 40\nmov cr0, rax\nhlt")  # reserved bits
    run(64, "mov rax, cr0\nbtr eax, 31\nmov cr0, rax\nhlt")  # leaving long mode from 64-bit code
    assert [v for v, _c, _r in faults.seen] == [Vector.GP] * 3


def test_cpuid_rdtsc_hooks_and_xgetbv(faults: Faults) -> None:
    m = Machine(64)
    m.interp.cpuid = lambda leaf, sub: (leaf + 1, sub + 2, 3, 4)
    m.interp.tsc = lambda: 0x1_0000_0005
    m.load("mov eax, 7\nmov ecx, 9\ncpuid\nmov r8, rax\nmov r9, rbx\nrdtsc\nxgetbv\nhlt")
    m.run()
    assert (m.gpr[8], m.gpr[9]) == (8, 11)
    assert (m.gpr[0], m.gpr[2]) == (5, 1)
    assert faults.seen[0][0] == Vector.UD  # XGETBV without CR4.OSXSAVE
    m.reset()
    m.cpu.state.cr4 |= CR4_OSXSAVE
    m.load("xor ecx, ecx\nxgetbv\nhlt")
    m.run()
    assert m.gpr[0] == 1


def _amd_cpuid(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
    eax, ebx, ecx, edx = default_cpuid(leaf, subleaf)
    if leaf == 0:
        ebx, edx, ecx = (int.from_bytes(b"AuthenticAMD"[i : i + 4], "little") for i in (0, 4, 8))
    return eax, ebx, ecx, edx


def test_default_cpuid_names_intel_and_the_tsc_frequency() -> None:
    leaf0 = default_cpuid(0, 0)
    assert vendor_of(leaf0) == b"GenuineIntel" and leaf0[0] >= 0x15
    eax, ebx, ecx, _ = default_cpuid(0x15, 0)
    assert ecx * ebx // eax == 1_000_000_000  # the TSC the software backend counts: 1 GHz


@pytest.mark.parametrize("amd", [False, True])
def test_the_vendor_cpuid_names_decides_where_syscall_and_sysenter_exist(faults: Faults, amd: bool) -> None:
    """Intel: SYSCALL is #UD outside 64-bit mode (SDM vol. 2B); AMD: SYSENTER is #UD in long mode (APM vol. 3)."""
    m = Machine(32)
    if amd:
        m.interp.cpuid = _amd_cpuid
    m.cpu.state.efer |= EFER_SCE
    target = m.place("hlt")
    m.cpu.state.msrs[MSR_STAR] = 0x0008_0000_0000_0000 | target
    m.load("syscall\nhlt")
    m.run()
    if amd:
        assert not faults.seen and m.cpu.state.rip == target + 1  # at STAR's EIP, past its HLT
    else:
        assert faults.seen[0][0] == Vector.UD
    faults.seen.clear()
    m = Machine(64)
    if amd:
        m.interp.cpuid = _amd_cpuid
    m.load("sysenter\nhlt")
    m.run()
    assert faults.seen[0][:2] == ((Vector.UD, None) if amd else (Vector.GP, 0))  # Intel: SYSENTER_CS is null


@pytest.mark.parametrize("amd", [False, True])
def test_the_vendors_hypercall_instruction_answers_as_kvm_does_and_the_other_is_undefined(
    faults: Faults, amd: bool
) -> None:
    m = Machine(64)
    if amd:
        m.interp.cpuid = _amd_cpuid
    m.load(("vmmcall" if amd else "vmcall") + "\nhlt")
    m.run()
    assert not faults.seen and m.gpr[0] == (-1000) & (2**64 - 1)  # -KVM_ENOSYS: popek offers no hypercall
    m.reset()
    m.load("vmcall\nhlt" if amd else "vmmcall\nhlt")
    m.run()
    assert faults.seen[0][0] == Vector.UD


def test_sse_strlen_style_sequence_and_fxsave() -> None:
    m = run(
        64,
        """
        mov rdi, 0x20000
        mov rax, 0x6f6c6c6568        ; "hello"
        mov [rdi], rax
        pxor xmm0, xmm0
        movdqu xmm1, [rdi]
        pcmpeqb xmm1, xmm0
        pmovmskb eax, xmm1
        bsf eax, eax                 ; strlen = 5
        mov rbx, 0x0102030405060708
        movq xmm2, rbx
        pshufd xmm3, xmm2, 0x44      ; duplicate the low qword
        paddb xmm3, xmm3
        movq rcx, xmm3
        psrldq xmm3, 8
        movq rdx, xmm3
        punpcklbw xmm2, xmm0
        movq rsi, xmm2
        fxsave [0x21000]
        stmxcsr [0x21400]
        hlt
    """,
    )
    assert m.gpr[0] == 5
    assert m.gpr[1] == 0x020406080A0C0E10 and m.gpr[2] == m.gpr[1]
    assert m.gpr[6] == 0x0005000600070008
    assert m.mem.read_u32(0x21000 + 24) == 0x1F80 and m.mem.read_u32(0x21400) == 0x1F80
    assert m.mem.read_u64(0x21000 + 160 + 32) == m.gpr[6]  # XMM2's low qword, after PUNPCKLBW


def test_sse_faults(faults: Faults) -> None:
    run(64, "mov rax, 0x20008\nmovdqa xmm0, [rax]\nhlt")
    m = Machine(64)
    m.cpu.state.cr0 |= CR0_TS
    m.load("pxor xmm0, xmm0\nhlt")
    m.run()
    assert [v for v, _c, _r in faults.seen] == [Vector.GP, Vector.NM]


def test_stop_requested_from_a_port_write() -> None:
    m = Machine(64)
    m.load("mov al, 1\nout 0x80, al\nmov al, 2\nout 0x80, al\nhlt")
    original = m.bus.pio_write

    def stop(port: int, size: int, value: int) -> None:
        original(port, size, value)
        m.interp.stop_requested = True

    m.bus.pio_write = stop  # type: ignore[method-assign]
    assert m.run() == 2
    assert m.bus.writes == [(0x80, 1, 1)]
    m.bus.pio_write = original  # type: ignore[method-assign]
    assert m.run() == 3 and m.cpu.state.halted
    assert m.bus.writes == [(0x80, 1, 1), (0x80, 1, 2)]


# ---------------------------------------------------------------- 32-bit protected mode


def test_protected_mode_32_pusha_enter_jecxz_and_io() -> None:
    m = Machine(32)
    m.bus.reads[0x60] = 0x1234
    m.load("""
        mov eax, 1
        mov ecx, 2
        mov edx, 3
        mov ebx, 4
        mov ebp, 6
        mov esi, 7
        mov edi, 8
        pushad
        xor eax, eax
        popad
        enter 16, 0
        mov dword [ebp-4], 0x55
        leave
        xor ecx, ecx
        jecxz skip
        mov eax, 99
    skip:
        mov dx, 0x60
        in ax, dx
        out 0x70, al
        hlt
    """)
    m.run()
    assert m.gpr[0] & 0xFFFF == 0x1234
    assert m.gpr[0] >> 16 == 0  # the 16-bit IN kept EAX's upper half (it was 1 → 0)
    assert (m.gpr[3], m.gpr[5], m.gpr[6], m.gpr[7]) == (4, 6, 7, 8)
    assert m.gpr[4] == STACK_TOP
    assert m.bus.writes == [(0x70, 1, 0x34)]


def test_io_needs_iopl_at_cpl3(faults: Faults) -> None:
    m = Machine(32)
    m.cpu.state.seg[2].dpl = 3  # CPL 3 (SS.DPL), IOPL 0
    m.load("in al, 0x60\nhlt")
    m.run()
    assert faults.seen == [(Vector.GP, 0, CODE)]


# ---------------------------------------------------------------- real mode


def test_real_mode_segment_arithmetic_and_strings() -> None:
    m = run(
        16,
        """
        mov ax, 0x2000
        mov ds, ax
        mov word [0x10], 0x1234       ; 0x20010
        mov ax, 0x2001
        mov es, ax
        mov bx, [es:0]                ; 0x20010 again
        mov si, 0x10
        mov di, 0x20
        mov cx, 3
        rep movsb                     ; DS:SI → ES:DI (0x20030)
        mov al, [0x10+0x10+0x10]      ; DS:0x30 = 0x20030
        hlt
    """,
    )
    assert m.mem.read_u16(0x20010) == 0x1234
    assert m.gpr[3] == 0x1234
    assert m.mem.read_u16(0x20030) == 0x1234
    assert m.gpr[0] & 0xFF == 0x34


def test_undefined_opcode_is_delivered_through_the_real_mode_ivt() -> None:
    m = Machine(16)
    m.mem.write_u32(6 * 4, (0x1000 << 16) | 0x100)  # #UD handler at 1000:0100 = CODE + 0x100
    m.load("mov ax, 5\nud2\ntimes 0x100 - ($ - $$) db 0x90\nhandler: mov bx, 7\nhlt")
    m.run()
    assert m.gpr[3] == 7
    assert m.mem.read_u16(0x70000 + 0xFFFE - 6) == 3  # the pushed IP: the UD2 itself (a fault)


def test_interrupts_sti_shadow_and_hlt_wakeup() -> None:
    class Pic:
        def __init__(self) -> None:
            self.pending = False
            self.acked = 0

        def interrupt_pending(self) -> bool:
            return self.pending

        def acknowledge(self) -> int:
            self.pending = False
            self.acked += 1
            return 0x20

    m = Machine(16)
    pic = Pic()
    m.cpu.irq = pic
    m.mem.write_u32(0x20 * 4, (0x1000 << 16) | 0x100)
    m.load("sti\nmov ax, 1\nhlt\nmov cx, 9\nhlt\ntimes 0x100 - ($ - $$) db 0x90\nmov bx, 5\niret")
    pic.pending = True
    m.interp.step()  # STI
    m.interp.step()  # the shadow: MOV AX runs before the interrupt
    assert m.gpr[0] == 1 and pic.acked == 0
    m.interp.step()  # the interrupt
    assert pic.acked == 1 and not m.cpu.state.rflags & IF
    assert m.cpu.state.rip == 0x100


def test_halted_cpu_waits_and_run_returns() -> None:
    m = run(64, "hlt\nmov eax, 1\nhlt")
    assert m.cpu.state.halted and m.gpr[0] == 0
    assert m.run() == 0
    m.cpu.state.halted = False
    assert m.run() == 2 and m.gpr[0] == 1


def test_flags_instructions() -> None:
    m = run(64, "stc\ncmc\nsetc al\nstc\nsetc bl\nstd\ncld\nxor ecx, ecx\nsete dl\nhlt")
    s = m.cpu.state
    assert (m.gpr[0], m.gpr[3], m.gpr[2]) == (0, 1, 1)
    assert not s.rflags & DF and s.rflags & ZF and not s.rflags & CF


def _idt_gate64(m: Machine, vector: int, handler: int, dpl: int = 0) -> None:
    low = (handler & 0xFFFF) | (0x8 << 16) | ((0x8E | dpl << 5) << 40) | ((handler >> 16) & 0xFFFF) << 48
    m.mem.write_u64(0x5000 + 16 * vector, low)
    m.mem.write_u64(0x5000 + 16 * vector + 8, handler >> 32)


def test_undefined_opcode_is_delivered_through_the_64_bit_idt() -> None:
    m = Machine(64)
    m.load("""
        mov eax, 1
        int 0x80                ; software interrupt: handler returns with IRETQ
        mov ebx, 2
        db 0x0f, 0xff           ; UD0 (needs a ModRM: decodes as UD0 with the next bytes)
        db 0xc0
        hlt
    times 0x100 - ($ - $$) db 0x90
    int80:
        mov ecx, 3
        iretq
    times 0x200 - ($ - $$) db 0x90
    ud:
        mov rdx, [rsp]          ; the pushed RIP: the faulting instruction
        hlt
    """)
    _idt_gate64(m, 0x80, CODE + 0x100)
    _idt_gate64(m, 6, CODE + 0x200)
    m.run()
    assert (m.gpr[0], m.gpr[1], m.gpr[3]) == (1, 3, 2)
    assert m.gpr[2] == CODE + 5 + 2 + 5  # mov eax (5), int 0x80 (2), mov ebx (5)
    assert m.cpu.state.halted


def test_instruction_crossing_a_page_boundary_and_its_invalidation() -> None:
    m = Machine(64)
    start = 0x10FFE  # the 10-byte MOV straddles 0x11000
    m.load("mov rax, 0x1122334455667788\nhlt", at=start)
    m.cpu.state.rip = start
    m.run()
    assert m.gpr[0] == 0x1122334455667788
    # rewrite the immediate's last byte (on the second page) through the guest and run it again
    m.reset()
    m.cpu.state.rip = m.place("mov byte [0x11007], 0x99\njmp 0x10ffe")  # `place` keeps the decode cache
    assert m.interp._cache
    m.run()
    assert m.gpr[0] == 0x9922334455667788


def test_privileged_and_iopl_sensitive_instructions_at_cpl3(faults: Faults) -> None:
    for source in ("hlt", "cli", "mov rax, cr0", "wrmsr", "lgdt [0x20000]", "invlpg [0]", "in al, 0x60",
                   "mov dr7, rax", "swapgs", "wbinvd"):  # fmt: skip
        m = Machine(64)
        m.cpu.state.seg[2].dpl = 3
        m.load(source + "\nhlt")
        m.run()
        assert faults.seen[-1] == (Vector.GP, 0, CODE), source
    # POPF at CPL 3 with IOPL 0 changes neither IF nor IOPL (no fault)
    m = Machine(64)
    m.cpu.state.seg[2].dpl = 3
    m.cpu.state.rflags |= IF
    faults.seen.clear()
    m.load("push 0x3000 | 0x1 | 0x400\npopfq\npushfq\npop rbx\nhlt")  # IOPL 3, CF, DF; IF clear
    m.run()
    assert m.gpr[3] & 0x3000 == 0 and m.gpr[3] & IF and m.gpr[3] & 0x401 == 0x401
    assert faults.seen == [(Vector.GP, 0, m.cpu.state.rip)]  # the final HLT at CPL 3


def test_descriptor_table_instructions_and_lar_lsl_verr() -> None:
    m = run(
        64,
        """
        sgdt [0x20000]
        sidt [0x20010]
        mov ax, 0x10
        lsl ebx, ax                 ; the flat data segment: limit 4 GiB - 1
        lar ecx, ax
        verw ax
        setz dl
        mov ax, 0x08
        verw ax                     ; code is not writable
        setz dh
        mov ax, 0x1000              ; beyond the GDT limit
        lsl esi, ax
        setz r8b
        lgdt [0x20000]
        str di
        hlt
    """,
    )
    mem = m.mem
    assert mem.read_u16(0x20000) == 0x3F and mem.read_u64(0x20002) == 0x4000
    assert mem.read_u16(0x20010) == 0xFFF and mem.read_u64(0x20012) == 0x5000
    assert m.gpr[3] == 0xFFFFFFFF
    assert m.gpr[1] == 0x00C09300  # bits 19:16 (limit) are undefined in LAR's result: returned as 0
    assert m.gpr[2] & 0xFFFF == 0x0001
    assert m.gpr[8] == 0


def test_xlat_enter_with_nesting_and_int3_rip() -> None:
    m = Machine(64)
    m.load("""
        mov rbx, table
        mov al, 2
        xlatb
        mov r12, rax
        mov rbp, 0x70000
        mov qword [0x70000 - 8], 0x1111
        enter 8, 2
        mov r13, rbp
        mov r14, [rsp + 16]         ; the copied frame pointer of the outer level
        mov r11, [rsp + 8]          ; then the new frame pointer itself
        int3
    table: db 10, 20, 30, 40
    times 0x100 - ($ - $$) db 0x90
    bp_handler:
        mov r15, [rsp]
        hlt
    """)
    _idt_gate64(m, 3, CODE + 0x100)
    m.run()
    assert m.gpr[12] & 0xFF == 30
    assert m.gpr[13] == STACK_TOP - 8
    assert m.gpr[14] == 0x1111 and m.gpr[11] == STACK_TOP - 8
    assert m.gpr[4] == ((STACK_TOP - 32) & ~15) - 40  # INT3's 64-bit frame below the ENTER frame
    assert m.mem.read_u64(m.gpr[4] + 24) == STACK_TOP - 32  # the RSP it saved: three pushes, 8 allocated
    assert m.mem.read_u8(m.gpr[15]) == 10  # INT3 pushed the address after itself: the table


def test_string_io_and_port_input() -> None:
    m = Machine(64)
    m.bus.reads[0x3F8] = 0x41
    m.load("""
        mov rsi, msg
        mov dx, 0x3f8
        mov rcx, 3
        rep outsb
        mov rdi, 0x20000
        mov rcx, 2
        rep insb
        hlt
    msg: db "hey"
    """)
    m.run()
    assert m.bus.writes == [(0x3F8, 1, ord("h")), (0x3F8, 1, ord("e")), (0x3F8, 1, ord("y"))]
    assert m.mem.read(0x20000, 3) == b"AA\0"


def test_debug_registers_xsetbv_and_rdpid() -> None:
    m = Machine(64)
    m.cpu.state.cr4 |= CR4_OSXSAVE
    m.load("""
        mov rax, 0x12345
        mov dr0, rax
        mov rbx, dr0
        mov rcx, dr7
        xor ecx, ecx
        mov eax, 3
        xor edx, edx
        xsetbv
        mov ecx, 0xC0000103
        mov eax, 7
        wrmsr
        rdpid r8
        hlt
    """)
    m.run()
    assert m.gpr[3] == 0x12345
    assert m.cpu.state.xcr0 == 3
    assert m.gpr[8] == 7


def test_real_mode_loops_pusha_and_16_bit_wraparound() -> None:
    m = run(
        16,
        """
        mov cx, 5
        xor ax, ax
    l:  inc ax
        loop l
        mov bx, 0xffff
        mov byte [bx], 0x5a          ; DS:FFFF
        mov si, 0xffff
        lodsb                        ; SI wraps to 0
        mov dx, si
        pusha
        mov ax, 0
        popa
        jcxz done
        mov ax, 0x99
    done:
        hlt
    """,
    )
    assert m.gpr[0] & 0xFF == 0x5A
    assert m.gpr[2] & 0xFFFF == 0
    assert m.gpr[1] & 0xFFFF == 0
    assert m.mem.read_u8(CODE + 0xFFFF) == 0x5A


def test_rep_stos_to_mmio_goes_element_by_element() -> None:
    m = run(
        32,
        """
        mov edi, 0x500000            ; beyond the 4 MiB of RAM: MMIO
        mov ecx, 4
        mov eax, 0x11223344
        rep stosd
        mov edi, 0x20000             ; RAM: the bulk path
        mov ecx, 4
        rep stosd
        hlt
    """,
    )
    assert m.bus.mmio == {0x500000 + 4 * i: 0x11223344 for i in range(4)}
    assert m.mem.read(0x20000, 16) == bytes.fromhex("44332211") * 4


def test_nmi_wakes_a_halted_cpu_and_blocks_until_iret() -> None:
    m = Machine(16)
    m.mem.write_u32(2 * 4, (0x1000 << 16) | 0x100)
    m.load("hlt\nmov ax, 1\nhlt\ntimes 0x100 - ($ - $$) db 0x90\ninc bx\niret")
    m.run()
    assert m.cpu.state.halted and m.gpr[0] == 0
    m.cpu.nmi_pending = True
    m.interp.step()  # delivery
    assert m.cpu.state.nmi_blocked and not m.cpu.state.halted
    m.cpu.nmi_pending = True  # a second NMI waits for the IRET
    m.interp.step()  # INC BX, not the NMI
    assert m.gpr[3] == 1
    m.interp.step()  # IRET unblocks
    assert not m.cpu.state.nmi_blocked
    m.interp.step()  # the second NMI
    m.run()
    assert m.gpr[3] == 2 and m.gpr[0] == 1


def test_the_decode_cache_stays_bounded_however_much_code_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(interp_module, "DECODE_CACHE_ENTRIES", 64)
    # 5000 distinct NOPs then HLT: a guest that executes more distinct code than the cache may hold
    m = run(64, "times 5000 nop\nhlt")
    assert m.interp.cpu.instructions == 5001
    assert 0 < len(m.interp._cache) <= 64
    assert sum(len(keys) for keys in m.interp._page_keys.values()) <= 64 * 2


def test_mov_to_cr4_of_a_feature_cpuid_hides_is_a_gp() -> None:
    """SDM vol. 3A §2.5: OSXSAVE is reserved without CPUID.1:ECX.XSAVE (kvm-unit-tests' xsave entry)."""
    from popek.cpu.state import CR4_OSXSAVE, CpuException

    m = Machine(64)
    base = m.interp.cpuid

    def without_xsave(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        eax, ebx, ecx, edx = base(leaf, subleaf)
        return (eax, ebx, ecx & ~(1 << 26), edx) if leaf == 1 else (eax, ebx, ecx, edx)

    def with_xsave(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        eax, ebx, ecx, edx = base(leaf, subleaf)
        return (eax, ebx, ecx | 1 << 26, edx) if leaf == 1 else (eax, ebx, ecx, edx)

    m.interp.cpuid = without_xsave
    with pytest.raises(CpuException) as e:
        m.interp._write_cr4(m.cpu.state.cr4 | CR4_OSXSAVE)
    assert e.value.vector == 13
    m.interp.cpuid = with_xsave
    m.interp._write_cr4(m.cpu.state.cr4 | CR4_OSXSAVE)
    assert m.cpu.state.cr4 & CR4_OSXSAVE


def test_tsc_adjust_and_the_tsc_move_together() -> None:
    """SDM vol. 3B "Time-Stamp Counter Adjustment": writing IA32_TSC_ADJUST moves the TSC by the same amount, and
    writing the TSC moves IA32_TSC_ADJUST (kvm-unit-tests' tsc_adjust entry)."""
    m = Machine(64)
    interp = m.interp
    clock = [1000]
    interp.tsc = lambda: clock[0]
    assert interp.read_msr(0x3B) == 0
    interp.write_msr(0x3B, 10**11)
    assert interp.read_msr(0x10) == 1000 + 10**11
    interp.write_msr(0x3B, 0)
    assert interp.read_msr(0x10) == 1000
    interp.write_msr(0x10, 5000)
    assert interp.read_msr(0x3B) == 4000
    clock[0] = 1500
    assert interp.read_msr(0x10) == 5500


def test_mmx_moves_alias_the_x87_registers_and_emms_frees_them() -> None:
    """SDM vol. 1 §9.5-9.6: MMn is the significand of Rn, whose exponent reads all ones; an MMX instruction sets
    TOP to 0 and tags every register valid, EMMS empties them (kvm-unit-tests' emulator movq tests)."""
    m = Machine(64)
    m.load("""
        fninit
        mov rax, 0x0102030405060708
        movq mm3, rax
        movq [0x20000], mm3
        movq mm1, [0x20000]
        movd ecx, mm1
        emms
        hlt
    """)
    s = m.cpu.state
    m.interp.step()
    m.interp.step()
    m.interp.step()
    assert s.st[3] == 0xFFFF << 64 | 0x0102030405060708 and s.ftw == 0xFF and not s.fsw & 7 << 11
    m.run()
    assert m.mem.read_u64(0x20000) == 0x0102030405060708
    assert m.gpr[1] == 0x05060708 and s.ftw == 0


def test_wrpkru_and_rdpkru_need_cr4_pke_and_cpuid_reports_ospke() -> None:
    from popek.cpu.state import CR4_PKE, CpuException

    m = Machine(64)
    m.cpu.state.gpr[0] = 0x30
    with pytest.raises(CpuException) as e:
        m.interp._pkru(iced_x86.Decoder(64, b"\x0f\x01\xef").decode())  # WRPKRU without CR4.PKE
    assert e.value.vector == 6
    m.cpu.state.cr4 |= CR4_PKE
    m.load("mov eax, 0x30\nxor ecx, ecx\nxor edx, edx\nwrpkru\nxor eax, eax\nrdpkru\nmov esi, eax\n"
           "mov eax, 7\nxor ecx, ecx\ncpuid\nhlt")  # fmt: skip
    m.run()
    assert m.cpu.state.pkru == 0x30 and m.gpr[6] == 0x30
    assert m.gpr[1] & 1 << 4  # CPUID.7:ECX.OSPKE follows CR4.PKE
