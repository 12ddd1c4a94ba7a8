"""DAA, DAS, AAA, AAS, AAM, AAD and ARPL against the host CPU, exhaustively over the inputs that decide them.

These instructions exist only outside 64-bit mode, so the host runs them in compatibility mode (tests/unit/cpu/
native.py's `NativeCompat32`: a far return to Linux's 32-bit user code segment and back) and popek in 32-bit
protected mode. One 32-bit loop runs a table of inputs (EAX, EFLAGS, EBX) through the instruction on both sides:
every AL with every AF/CF and several AH values (AAA/AAS carry into AH), AAM/AAD with several bases, ARPL with
every pair of RPLs. Only the flags the SDM defines for each instruction are compared.
"""

from __future__ import annotations

import random
import struct

import pytest

from popek.cpu import exceptions
from popek.cpu.core import Cpu
from popek.cpu.state import AF, CF, PF, SF, ZF, CpuException, Vector

from . import native
from .machine import Machine, nasm_available

pytestmark = pytest.mark.skipif(not (native.available() and nasm_available()), reason="needs nasm")

LOOP = """
mov esi, DATA + 16
mov ecx, [DATA]
mov edi, DATA + 16
lea edi, [edi + ecx * 4]
lea edi, [edi + ecx * 8]
.next:
push dword [esi + 4]
popfd
mov eax, [esi]
mov ebx, [esi + 8]
{body}
pushfd
pop dword [edi + 4]
mov [edi], eax
mov [edi + 8], ebx
add esi, 12
add edi, 12
dec ecx
jnz .next
"""
INTERP_DATA = 0x200000
Entry = tuple[int, int, int]


def table(entries: list[Entry]) -> bytes:
    return struct.pack("<I12x", len(entries)) + b"".join(struct.pack("<3I", *e) for e in entries)


def results(data: bytes, n: int) -> list[Entry]:
    off = 16 + 12 * n
    return [struct.unpack_from("<3I", data, off + 12 * i) for i in range(n)]


_machine: Machine | None = None


def interpret(body: str, data: bytes, n: int) -> list[Entry]:
    global _machine
    if _machine is None:
        _machine = Machine(32)
    m = _machine
    s = m.cpu.state
    m.mem.write(INTERP_DATA, data + bytes(12 * n))
    s.rip = m.place(f"DATA equ {INTERP_DATA:#x}\n" + LOOP.format(body=body) + "\nhlt\n")
    s.rflags, s.halted = 2, False
    m.run(30 * n + 100)
    assert s.halted, "the loop did not reach HLT"
    return results(bytes(m.mem.read(INTERP_DATA, len(data) + 12 * n)), n)


def compare(body: str, entries: list[Entry], flags: int) -> None:
    data = table(entries)
    host = results(native.NativeCompat32(LOOP.format(body=body))(data + bytes(12 * len(entries))), len(entries))
    popek = interpret(body, data, len(entries))
    for inp, h, p in zip(entries, host, popek, strict=True):
        expected = (hex(h[0]), hex(h[1] & flags), hex(h[2]))
        got = (hex(p[0]), hex(p[1] & flags), hex(p[2]))
        assert got == expected, f"{body} with eax={inp[0]:#x} flags={inp[1]:#x} ebx={inp[2]:#x}"


rng = random.Random(1987)
HIGH = [0, 0xDEAD0000, rng.getrandbits(32) & 0xFFFF0000]


def al_ah_flags(ahs: list[int]) -> list[Entry]:
    return [(HIGH[(al + ah) % 3] | ah << 8 | al, fl | 2, 0) for al in range(256) for ah in ahs
            for fl in (0, AF, CF, AF | CF)]  # fmt: skip


@pytest.mark.parametrize("op", ["daa", "das"])
def test_decimal_adjust_after_addition_and_subtraction(op: str) -> None:
    compare(op, al_ah_flags([0, 0x5A]), CF | AF | SF | ZF | PF)


@pytest.mark.parametrize("op", ["aaa", "aas"])
def test_ascii_adjust_after_addition_and_subtraction(op: str) -> None:
    compare(op, al_ah_flags([0, 1, 0x7F, 0xFF]), CF | AF)


@pytest.mark.parametrize("base", [10, 16, 7, 1, 255])
def test_ascii_adjust_after_multiplication(base: int) -> None:
    compare(f"aam {base}", al_ah_flags([0, 0x33]), SF | ZF | PF)


@pytest.mark.parametrize("base", [10, 16, 0, 1, 255])
def test_ascii_adjust_before_division(base: int) -> None:
    compare(f"aad {base}", al_ah_flags([0, 1, 9, 0x19, 0xFF]), SF | ZF | PF)


def test_arpl_raises_the_rpl_of_the_destination() -> None:
    entries = []
    for _ in range(64):
        for dst_rpl in range(4):
            for src_rpl in range(4):
                src = rng.getrandbits(32) & ~3 | src_rpl
                dst = rng.getrandbits(32) & ~3 | dst_rpl
                entries.append((src, rng.choice((2, 2 | ZF)), dst))
    compare("arpl bx, ax", entries, ZF)


def test_aam_0_raises_de_and_bcd_instructions_are_ud_in_64_bit_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """(AAM 0 would be SIGFPE on the host, so popek alone: #DE with AX unchanged.)"""
    seen: list[int] = []

    def record(cpu: Cpu, exc: CpuException, rip: int) -> None:
        seen.append(exc.vector)
        cpu.state.halted = True

    monkeypatch.setattr(exceptions, "handle", record)
    m = Machine(32)
    m.load("mov ax, 0x1234\naam 0\nhlt")
    m.run(100)
    assert seen == [Vector.DE] and m.gpr[0] & 0xFFFF == 0x1234
    for opcode in (0x27, 0x2F, 0x37, 0x3F, 0xD4):  # DAA, DAS, AAA, AAS, AAM: invalid in 64-bit mode
        m64 = Machine(64)
        m64.mem.write(0x10000, bytes([opcode, 0x0A, 0xF4]))
        m64.run(10)
        assert seen[-1] == Vector.UD


def test_the_comparison_can_fail() -> None:
    data = table([(0x1E, 2, 0)])
    host = results(native.NativeCompat32(LOOP.format(body="daa"))(data + bytes(12)), 1)
    assert host[0][0] == 0x24 and interpret("das", data, 1)[0][0] == 0x18
