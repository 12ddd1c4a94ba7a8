"""Debug exceptions on the software CPU (SDM vol. 3B ch. 18): execution breakpoints are faults that RF lets the
restarted instruction past, data breakpoints and single-step are traps reported in DR6 (B0-B3 rewritten, BS
sticky), MOV SS holds them for one instruction, ICEBP is a #DB without BS, DR7.GD makes MOV DR fault."""

from __future__ import annotations

import pytest

from .machine import CODE, Machine, nasm_available
from .test_interp import _idt_gate64

pytestmark = pytest.mark.skipif(not nasm_available(), reason="needs nasm")

# the #DB handler at CODE + 0x200 records (pushed RIP, DR6) at 0x20000 + 16 * n, n counted in r15; it sets RF in
# the pushed RFLAGS when DR6 says an execution breakpoint (B0) fired, so the instruction runs when it returns
HANDLER = """
    times 0x200 - ($ - $$) db 0x90
    db_handler:
        mov rax, [rsp]
        mov rbx, r15
        shl rbx, 4
        mov [0x20000 + rbx], rax
        mov rax, dr6
        mov [0x20008 + rbx], rax
        inc r15
        test al, 1
        jz .done
        or qword [rsp + 16], 1 << 16
    .done:
        iretq
"""


def run_db(body: str) -> tuple[Machine, list[tuple[int, int]]]:
    m = Machine(64)
    m.load(body + "\nhlt\n" + HANDLER)
    _idt_gate64(m, 1, CODE + 0x200)
    m.run()
    assert m.cpu.state.halted
    return m, [(m.mem.read_u64(0x20000 + 16 * i), m.mem.read_u64(0x20008 + 16 * i) & 0xFFFF) for i in range(m.gpr[15])]


def test_an_execution_breakpoint_faults_once_and_rf_lets_the_instruction_run() -> None:
    m, dbs = run_db("""
        lea rax, [rel target]
        mov dr0, rax
        mov rax, 0x401          ; L0, execute, 1 byte
        mov dr7, rax
    target:
        mov ecx, 7
    """)
    target = CODE + 7 + 3 + 5 + 3  # lea, mov dr0, mov eax imm32, mov dr7
    assert dbs == [(target, dbs[0][1])] and dbs[0][1] & 0xF == 1  # a fault: RIP at the instruction
    assert m.gpr[1] == 7
    assert not m.cpu.state.rflags & (1 << 16)  # RF cleared once the instruction completed


def test_a_data_breakpoint_traps_after_the_write_and_rewrites_b0_b3_but_not_bs() -> None:
    _, dbs = run_db("""
        mov rax, 0x30000
        mov dr1, rax
        mov rax, 0x4000
        mov dr6, rax            ; BS set by software: stays
        mov rax, 0xd00408       ; G1, write-only, 4 bytes
        mov dr7, rax
        mov dword [0x30000], 1
    after:
        mov eax, [0x30000]      ; a read: not matched by a write breakpoint
    """)
    assert len(dbs) == 1
    rip, dr6 = dbs[0]
    assert rip == CODE + 5 + 3 + 5 + 3 + 5 + 3 + 11  # a trap: RIP after the store
    assert dr6 & 0xF == 0b10 and dr6 & 0x4000


def test_mov_ss_holds_the_single_step_trap_for_one_instruction() -> None:
    _, dbs = run_db("""
        mov ax, ss
        pushfq
        or qword [rsp], 0x100
        popfq                   ; TF: traps start after the next instruction
        mov ss, ax              ; its single-step trap is held...
        nop                     ; ...and reported once, after this one
        pushfq
        and qword [rsp], ~0x100
        popfq
    """)
    rips = [rip for rip, _ in dbs]
    assert all(dr6 & 0x4000 for _, dr6 in dbs)
    assert len(rips) == 4  # after nop, pushfq, and, popfq: none after mov ss
    assert rips[1] - rips[0] == 1  # pushfq is 1 byte after nop's trap point


def test_icebp_is_a_trap_like_db_without_bs() -> None:
    _, dbs = run_db("""
        db 0xf1
    after:
        nop
    """)
    assert len(dbs) == 1
    assert dbs[0][0] == CODE + 1 and dbs[0][1] & 0x4000 == 0


def test_general_detect_faults_the_mov_dr_and_clears_gd() -> None:
    m = Machine(64)
    m.load("""
        mov rax, 0x2400
        mov dr7, rax            ; GD
        mov rax, dr0            ; #DB fault: RIP at this instruction, BD set, GD cleared
        hlt
    times 0x200 - ($ - $$) db 0x90
        mov rbx, [rsp]
        mov rcx, dr6
        mov rdx, dr7
        hlt
    """)
    _idt_gate64(m, 1, CODE + 0x200)
    m.run()
    assert m.gpr[3] == CODE + 5 + 3  # mov eax, imm32 (nasm shortens it) + mov dr7
    assert m.gpr[1] & 1 << 13
    assert not m.gpr[2] & 1 << 13


def test_no_code_breakpoint_on_the_instruction_after_mov_ss_on_intel() -> None:
    m, dbs = run_db("""
        lea rax, [rel target]
        mov dr0, rax
        mov eax, 0x401
        mov dr7, rax
        mov ax, ss
        mov ss, ax
    target:
        xor ecx, ecx
    """)
    assert m.interp.intel and dbs == []
