"""The lockstep checker (`popek.accel.lockstep`): the software CPU and KVM single-stepping side by side.

On hosts that run guest ring 3 natively, KVM is the hardware oracle for the user-mode half of these guests: every
user-mode instruction's registers and flags (all but the SDM's undefined ones) are checked against the processor.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from popek.accel.lockstep import Lockstep, LockstepAccel, Outcome
from popek.accel.soft import apply_entry
from popek.boot import load_kernel
from popek.bus import Bus
from popek.cpu.core import Cpu
from popek.cpu.interp import Interpreter
from popek.cpu.state import CF
from popek.devices.irq import IrqLine
from popek.devices.legacy.cmos import Cmos
from popek.devices.legacy.misc import DebugExit
from popek.devices.legacy.serial import Serial
from popek.memory import GuestMemory
from tests.integration.test_user_mode import wrap_bzimage

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs a usable /dev/kvm"),
    pytest.mark.skipif(shutil.which("nasm") is None, reason="needs nasm to build the guests"),
]

MEM = 64 << 20
ITERATIONS = 12  # of the workload, in each ring: about 1300 instructions per ring

# A 64-bit kernel (entered by popek's bzImage loader at 0x100200) that runs an ALU/shift/multiply/bit/string
# workload in ring 0, then the same code in ring 3 (user-accessible pages, IOPL 0), and comes back with UD2,
# whose #UD handler sees the user CS and ends the VM through the debug-exit port (status = low byte of the
# checksum). Flags enter the checksum through LAHF/SETO after instructions that define them all; PUSHF is avoided
# in ring 3, where single-stepping KVM's TF would show. The gate for #DB is what lets lockstep single-step ring 3
# on hosts that deliver native single-step traps to the guest.
WORKLOAD_GUEST = r"""bits 64
org 0x100000
times 0x200 db 0
start:
    cli
    lgdt [gdtr]
    mov rdi, pml4
    lea rax, [pdpt + 7]
    mov [rdi], rax
    mov rdi, pdpt
    lea rax, [pd + 7]
    mov [rdi], rax
    mov rdi, pd
    mov rax, 0x87
    mov rcx, 8
.fill: mov [rdi], rax
    add rax, 0x200000
    add rdi, 8
    loop .fill
    mov rax, pml4
    mov cr3, rax
    push 0x08
    lea rax, [.cs]
    push rax
    retfq
.cs:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov rsp, kstack_top
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
    mov edi, 1
    mov rsi, db_handler
    call setgate
    mov edi, 6
    mov rsi, ud_handler
    call setgate
    lidt [idtr]
    mov r8, 0x123456789abcdef
    xor r9, r9
    mov r12, ITERATIONS
    call work
    push 0x23
    push ustack_top
    push 0x202
    push 0x2B
    push user
    iretq

user:
    mov r12, ITERATIONS
    call work
    ud2

; the workload: r8 is a 64-bit LCG, r9 the checksum, r12 the iteration count
work:
    mov rax, 6364136223846793005
    imul r8, rax
    mov rax, 1442695040888963407
    add r8, rax
    mov rax, r8
    mov rbx, r8
    ror rbx, 23
    add rax, rbx
    adc eax, ebx
    sbb bx, ax
    add al, bl
    add [scratch], rax
    sub rbx, rax
    lahf
    seto dl
    movzx edx, dl
    add r9, rdx
    movzx edx, ah
    xor r9, rdx
    cmp eax, ebx
    setb dl
    add r9, rdx
    and ebx, 0xF0F0F0F
    or rax, rbx
    xor rax, r9
    test al, 0x55
    neg rbx
    not rax
    dec rbx
    inc rax
    mov rcx, r8
    shr rcx, 58
    shl rax, cl
    shr rbx, 1
    sar rax, 3
    rol rbx, cl
    rcr rax, 1
    rcl rbx, 5
    shld rax, rbx, 7
    shrd rbx, rax, cl
    add r9, rax
    add r9, rbx
    mul rbx
    add r9, rdx
    imul eax, ebx, 0x1234567
    imul bx
    add r9, rax
    mov rcx, r8
    or rcx, 1
    xor edx, edx
    mov rax, r9
    div rcx
    add r9, rdx
    mov rax, r8
    xor edx, edx
    shr rax, 2
    mov ecx, 7
    idiv rcx
    add r9, rax
    bt r8, 13
    setc dl
    add r9, rdx
    bts rax, 7
    btr rbx, 3
    btc rax, rcx
    bsf rdx, r8
    bsr rcx, r8
    add r9, rcx
    add r9, rdx
    bswap eax
    xadd rbx, rax
    cmpxchg rcx, rbx
    add r9, rax
    ; string operations on the scratch buffer
    lea rdi, [buf]
    mov rax, r9
    mov ecx, 4
    rep stosq
    lea rsi, [buf]
    lea rdi, [buf + 40]
    mov ecx, 13
    rep movsb
    lea rsi, [buf + 40]
    lodsw
    add r9, rax
    lea rdi, [buf]
    mov ecx, 16
    repne scasb
    add r9, rcx
    lea rsi, [buf]
    lea rdi, [buf + 40]
    mov ecx, 8
    repe cmpsb
    add r9, rcx
    lahf
    movzx edx, ah
    add r9, rdx
    dec r12
    jnz work
    ret

ud_handler:
    cmp qword [rsp + 8], 0x2B      ; from user mode: the end
    jne .fatal
    mov rax, r9
    out 0xf4, al
.fatal:
    mov al, 0xEE
    out 0xf4, al
db_handler:
    iretq

setgate:                            ; rdi vector, rsi handler: a present 64-bit interrupt gate, DPL 0
    shl rdi, 4
    add rdi, idt
    mov rax, rsi
    mov [rdi], ax
    mov word [rdi + 2], 0x08
    mov word [rdi + 4], 0x8E00
    shr rax, 16
    mov [rdi + 6], ax
    shr rax, 16
    mov [rdi + 8], eax
    mov dword [rdi + 12], 0
    ret

align 16
gdt: dq 0
     dq 0x00af9b000000ffff          ; 0x08 kernel code 64
     dq 0x00cf93000000ffff          ; 0x10 kernel data
     dq 0x00cffb000000ffff          ; 0x18 user code 32
     dq 0x00cff3000000ffff          ; 0x20 user data
     dq 0x00affb000000ffff          ; 0x28 user code 64
     dq 0x0000890000000067, 0       ; 0x30 TSS
gdt_end:
gdtr: dw gdt_end - gdt - 1
      dq gdt
idtr: dw 4095
      dq idt
align 16
scratch: dq 0
buf: times 64 db 0
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

# Ring 0, devices: reads the CMOS seconds register until it has seen it change CHANGES times (with a CMOS clock
# that moves at every read, each read of the real device differs), polls the UART's line status before each
# byte it prints, and exits with the last seconds value. The software CPU sees none of the devices: if it did
# not get KVM's values, its branches would go elsewhere.
IO_GUEST = r"""bits 64
org 0x100000
times 0x200 db 0
start:
    cli
    mov r12, CHANGES
    mov al, 0x00
    out 0x70, al
    in al, 0x71
    mov bl, al
.poll:
    mov al, 0x00
    out 0x70, al
    in al, 0x71
    cmp al, bl
    je .poll
    mov bl, al
.lsr:
    mov dx, 0x3fd
    in al, dx
    test al, 0x20
    jz .lsr
    mov dx, 0x3f8
    mov al, '.'
    out dx, al
    dec r12
    jnz .poll
    mov al, bl
    out 0xf4, al
    hlt
"""


def build(tmp: Path, source: str, **defines: int) -> bytes:
    src = tmp / "guest.asm"
    src.write_text(source)
    flags = [f"-D{k}={v}" for k, v in defines.items()]
    subprocess.run(["nasm", "-f", "bin", *flags, "-o", str(tmp / "guest.bin"), str(src)], check=True)
    return wrap_bzimage((tmp / "guest.bin").read_bytes())


class Machine:
    """The devices of a lockstep run, on buses only KVM's side reaches."""

    def __init__(self, cmos_clock: list[float] | None = None) -> None:
        self.pio, self.mmio = Bus("port", 1), Bus("mmio", 4096)
        self.stopping = threading.Event()
        self.status: int | None = None
        self.serial_out = bytearray()
        self.pio.insert(0xF4, 1, DebugExit(self._exit), "debug exit")
        self.pio.insert(0x3F8, 8, Serial(IrqLine(4, lambda n, level: None), self.serial_out.extend), "serial")
        if cmos_clock is not None:
            self.pio.insert(0x70, 2, Cmos(clock=lambda: _tick(cmos_clock)), "cmos")

    def _exit(self, status: int) -> None:
        self.status = status >> 1
        self.stopping.set()


def _tick(clock: list[float]) -> float:
    clock[0] += 1.0
    return clock[0]


def run_in_lockstep(
    image: bytes, machine: Machine, interpreter: type[Interpreter] = Interpreter, max_steps: int = 60_000
) -> tuple[Outcome, Lockstep]:
    with GuestMemory(MEM) as mem:
        accel = LockstepAccel(mem, 1, interpreter=interpreter)
        try:
            accel.set_boot_state(load_kernel(mem, image).entry)
            assert accel.lockstep is not None
            outcome = accel.lockstep.run(machine.pio, machine.mmio, max_steps=max_steps, stopping=machine.stopping)
            return outcome, accel.lockstep
        finally:
            accel.close()


class _CountingBus:
    """The software CPU alone, for the reference instruction count: only the debug-exit port matters."""

    def __init__(self) -> None:
        self.exited = False

    def pio_read(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def pio_write(self, port: int, size: int, value: int) -> None:
        self.exited = self.exited or port == 0xF4

    def mmio_read(self, addr: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        pass


def soft_instruction_count(image: bytes) -> int:
    """Instructions the software CPU alone retires from the entry to the debug-exit write, inclusive."""
    with GuestMemory(MEM) as mem:
        bus = _CountingBus()
        cpu = Cpu(0, mem, bus)
        interp = Interpreter(cpu)
        apply_entry(cpu.state, load_kernel(mem, image).entry)
        while not bus.exited and cpu.instructions < 100_000:
            interp.step()
        return cpu.instructions


def test_alu_workload_in_ring_0_and_ring_3_runs_in_lockstep_without_divergence(tmp_path: Path) -> None:
    image = build(tmp_path, WORKLOAD_GUEST, ITERATIONS=ITERATIONS)
    machine = Machine()
    outcome, lockstep = run_in_lockstep(image, machine)
    assert outcome.divergence is None, outcome.detail
    assert outcome.reason == "stopped" and machine.status is not None, outcome
    expected = soft_instruction_count(image)
    assert expected > 2_000
    assert outcome.instructions == expected, (outcome.instructions, expected)
    # every instruction was a compared step, plus the deliveries of #UD (UD2 ends the run from ring 3)
    assert outcome.steps == expected + 1
    assert lockstep.transplants == 1  # the IRETQ to ring 3
    assert lockstep.trap_undos == 0 or lockstep.trap_undos > ITERATIONS * 50  # ring 3 was single-stepped
    assert machine.status != 0xEE


def test_a_wrong_carry_flag_from_add_is_reported_with_the_instruction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_add(self: Interpreter, ins: object) -> None:
        Interpreter._arith(self, ins, 0)
        self.s.rflags ^= CF  # the bug: ADD's carry inverted

    class BrokenInterpreter(Interpreter):
        pass

    monkeypatch.setattr(BrokenInterpreter, "_add", broken_add)
    BrokenInterpreter._collect()
    image = build(tmp_path, WORKLOAD_GUEST, ITERATIONS=ITERATIONS)
    outcome, _ = run_in_lockstep(image, Machine(), interpreter=BrokenInterpreter)
    d = outcome.divergence
    assert outcome.reason == "divergence" and d is not None, outcome
    assert d.kind == "state"
    assert d.disassembly.startswith("add "), d.report()
    assert d.fields == ("rflags",), d.report()
    assert d.kvm is not None and (d.kvm["rflags"] ^ d.soft["rflags"]) == CF
    report = d.report()
    assert "rflags differ in CF" in report
    assert "* rflags" in report
    assert d.raw and d.raw.hex(" ") in report


def test_port_reads_are_replayed_to_the_software_cpu(tmp_path: Path) -> None:
    image = build(tmp_path, IO_GUEST, CHANGES=5)
    machine = Machine(cmos_clock=[0.0])
    outcome, lockstep = run_in_lockstep(image, machine)
    assert outcome.divergence is None, outcome.detail
    assert outcome.reason == "stopped", outcome
    assert machine.serial_out == b"....."
    assert machine.status is not None and machine.status == lockstep.cpu.state.gpr[0] & 0xFF
    assert lockstep.exit_counts["IO"] >= 5 * 4


def test_a_device_read_the_software_cpu_makes_differently_is_an_io_divergence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def wrong_port_in(self: Interpreter, ins: object) -> None:
        self.s.gpr[0] = (self.s.gpr[0] & ~0xFF) | self.cpu.bus.pio_read(0x72, 1)

    class BrokenInterpreter(Interpreter):
        pass

    monkeypatch.setattr(BrokenInterpreter, "_in", wrong_port_in)
    BrokenInterpreter._collect()
    image = build(tmp_path, IO_GUEST, CHANGES=2)
    outcome, _ = run_in_lockstep(image, Machine(cmos_clock=[0.0]), interpreter=BrokenInterpreter)
    d = outcome.divergence
    assert d is not None and d.kind == "io", outcome
    assert d.disassembly.startswith("in al,71h"), d.report()
    assert "port 0x72" in d.detail and "port 0x71" in d.detail


def test_popek_run_accel_lockstep_runs_the_guest_and_reports_the_steps_it_compared(tmp_path: Path) -> None:
    from .guests import PRINT, boot_sector, popek

    image = boot_sector(
        tmp_path,
        """
    xor ax, ax
    mov ds, ax
    mov si, msg
    call print
    mov al, 4
    out 0xf4, al
msg: db "in lockstep", 10, 0
"""
        + PRINT,
    )
    r = popek(image, "lockstep", "--stats")
    assert r.stdout == "in lockstep\n", r.stderr
    assert r.returncode == 9, r.stderr  # (4 << 1) | 1: the guest's own ending, no divergence
    assert "lockstep: " in r.stderr and "steps compared" in r.stderr, r.stderr
