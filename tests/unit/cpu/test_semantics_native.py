"""The interpreter against the host CPU: the same instruction sequence runs natively (tests/unit/cpu/native.py)
and in popek's interpreter in 64-bit mode, from hypothesis-chosen RAX/RBX/RCX, and RAX, RBX and the flags the
instructions define must agree.

Each hypothesis example draws a batch of operand sets and runs every snippet of a family on each of them:
hypothesis costs milliseconds per example, the interpreter tens of microseconds per snippet, so batching keeps
the file fast while every snippet still sees hundreds of operand sets (edge values included).

Every snippet starts with `add edx, 0` (RDX is 0), so all status flags have known values before it: an
instruction that leaves a flag alone must leave the same value on both sides. Each case lists the flags the
SDM defines for it, and only those are compared, on every host: the values processors leave in undefined flags
differ between generations of one vendor (BSF's PF differs between AMD families), so no vendor's set of values
is a reference.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popek.cpu.state import CF, OF, PF, SF, STATUS_FLAGS, ZF

from . import native
from .machine import STACK_TOP, Machine, nasm_available

pytestmark = pytest.mark.skipif(not (native.available() and nasm_available()), reason="needs nasm")

u64 = st.integers(0, 2**64 - 1)
edge = st.sampled_from([0, 1, 2, 7, 8, 15, 16, 31, 32, 33, 63, 64, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF,
                        0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 2**63 - 1, 2**63, 2**64 - 1])  # fmt: skip
value = st.one_of(u64, edge, st.integers(0, 255))
count = st.one_of(st.integers(0, 70), u64)
BATCH = 6
triples = st.lists(st.tuples(value, value, count), min_size=1, max_size=BATCH)
SZP = SF | ZF | PF

_machine: Machine | None = None
_natives: dict[str, native.Native] = {}


def machine() -> Machine:
    global _machine
    if _machine is None:
        _machine = Machine(64)
    return _machine


def interpret(body: str, a: int, b: int, c: int) -> tuple[int, int, int]:
    m = machine()
    s = m.cpu.state
    s.rip = m.place(body + "\nhlt\n")
    s.gpr[:] = [0] * 16
    s.gpr[0], s.gpr[3], s.gpr[1], s.gpr[4] = a, b, c, STACK_TOP
    s.rflags = 2
    s.halted = False
    m.run(10_000)
    assert s.halted, "the snippet did not reach HLT"
    return s.gpr[0], s.gpr[3], s.rflags


def compare(body: str, a: int, b: int, c: int = 0, mask: int = STATUS_FLAGS) -> None:
    body = "add edx, 0\n" + body
    if body not in _natives:
        _natives[body] = native.Native(body)
    n_rax, n_rbx, n_flags = _natives[body](a, b, c)
    i_rax, i_rbx, i_flags = interpret(body, a, b, c)
    operands = f"{body}\n  with rax={a:#x} rbx={b:#x} rcx={c:#x}"
    assert (hex(i_rax), hex(i_rbx)) == (hex(n_rax), hex(n_rbx)), operands
    assert hex(i_flags & mask) == hex(n_flags & mask), operands


def run_family(cases: list[tuple[str, int]], ops: list[tuple[int, int, int]]) -> None:
    for body, mask in cases:
        for a, b, c in ops:
            compare(body, a, b, c, mask)


REGS = {64: ("rax", "rbx", "rcx"), 32: ("eax", "ebx", "ecx"), 16: ("ax", "bx", "cx"), 8: ("al", "bl", "cl")}


def _alu_cases() -> list[tuple[str, int]]:
    out = []
    for a, b, _c in REGS.values():
        for op in ("add", "sub", "and", "or", "xor", "cmp", "test"):
            out.append(f"{op} {a}, {b}")
        for carry in ("stc", "clc"):
            out.append(f"{carry}\nadc {a}, {b}")
            out.append(f"{carry}\nsbb {a}, {b}")
        for op in ("inc", "dec", "neg", "not"):
            out.append(f"add {b}, {b}\n{op} {a}")  # the ADD sets CF, which INC/DEC/NOT must keep
    out += ["add ah, bl", "sub bh, ah", "xor ah, ah", "add rax, 0x7fffffff", "sub eax, -5", "cmp ax, 0x8000",
            "adc rax, -1", "and bl, 0x0f", "or ebx, 0x80000000", "sbb bx, 1", "test al, 0x81"]  # fmt: skip
    return [(body, STATUS_FLAGS) for body in out]


@settings(max_examples=30, deadline=None)
@given(ops=triples)
def test_alu(ops: list[tuple[int, int, int]]) -> None:
    run_family(_alu_cases(), ops)


def _shift_cases() -> list[tuple[str, int]]:
    out = []
    for a, _b, _c in REGS.values():
        for op in ("shl", "shr", "sar"):
            out.append((f"{op} {a}, cl", CF | SZP))
            out.append((f"{op} {a}, 1", CF | SZP | OF))
        for op in ("rol", "ror"):
            out.append((f"{op} {a}, cl", CF))
            out.append((f"{op} {a}, 1", CF | OF))
        for carry in ("stc", "clc"):
            for op in ("rcl", "rcr"):
                out.append((f"{carry}\n{op} {a}, cl", CF))
                out.append((f"{carry}\n{op} {a}, 1", CF | OF))
    for bits in (64, 32):
        a, b, _c = REGS[bits]
        out += [(f"shld {a}, {b}, cl", CF | SZP), (f"shrd {a}, {b}, cl", CF | SZP)]
        out += [(f"shld {a}, {b}, 1", CF | SZP | OF), (f"shrd {a}, {b}, 1", CF | SZP | OF)]
    out += [("shl rax, 7", CF | SZP), ("sar bl, 3", CF | SZP), ("ror ebx, 31", CF), ("shrd bx, ax, 9", CF | SZP)]
    out += [("and cl, 15\nshld ax, bx, cl", CF | SZP), ("and cl, 15\nshrd ax, bx, cl", CF | SZP)]
    return out


@settings(max_examples=30, deadline=None)
@given(ops=triples)
def test_shifts_and_rotates(ops: list[tuple[int, int, int]]) -> None:
    run_family(_shift_cases(), ops)


MUL_CASES = [
    *(f"mul {REGS[bits][1]}" for bits in REGS),
    *(f"imul {REGS[bits][1]}" for bits in REGS),
    "imul rax, rbx", "imul eax, ebx", "imul ax, bx", "imul rax, rbx, 12345", "imul ebx, eax, -7", "imul bx, ax, 300",
    "mul rbx\nmov rbx, rdx", "imul ebx\nmov ebx, edx",
]  # fmt: skip


@settings(max_examples=30, deadline=None)
@given(ops=triples)
def test_multiply(ops: list[tuple[int, int, int]]) -> None:
    run_family([(body, CF | OF) for body in MUL_CASES], ops)


def _fits_div(a: int, b: int, hi: int, bits: int) -> bool:
    mask = (1 << bits) - 1
    return bool(b & mask) and (hi & mask) < (b & mask)


@settings(max_examples=30, deadline=None)
@given(ops=triples)
def test_divide(ops: list[tuple[int, int, int]]) -> None:
    """DIV with the high half below the divisor (so the quotient fits: no #DE natively), remainder in RBX."""
    for a, b, hi in ops:
        for bits in (64, 32, 16):
            mask = (1 << bits) - 1
            if not b & mask:
                continue
            h = hi % (b & mask)
            _ax, bx, cx = REGS[bits]
            dx = {64: "rdx", 32: "edx", 16: "dx"}[bits]
            compare(f"mov {dx}, {cx}\ndiv {bx}\nmov {bx}, {dx}", a, b, h, 0)
        if b & 0xFF and ((a & 0xFFFF) >> 8) < (b & 0xFF):
            compare("div bl", a, b, 0, 0)


def _signed(v: int, bits: int) -> int:
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


@settings(max_examples=30, deadline=None)
@given(ops=triples)
def test_signed_divide(ops: list[tuple[int, int, int]]) -> None:
    for a, b, _c in ops:
        for bits, extend in ((64, "cqo"), (32, "cdq"), (16, "cwd")):
            if not _signed(b, bits) or (_signed(a, bits) == -(1 << (bits - 1)) and _signed(b, bits) == -1):
                continue
            compare(f"{extend}\nidiv {REGS[bits][1]}\nmov rbx, rdx", a, b, 0, 0)
        if _signed(b, 8) and -128 <= int(_signed(a, 16) / _signed(b, 8)) <= 127:
            compare("idiv bl", a, b, 0, 0)


BIT_CASES = [
    ("bt rax, rbx", CF), ("bts rax, rbx", CF), ("btr eax, ebx", CF), ("btc ax, bx", CF), ("bt rax, 63", CF),
    ("btc eax, 5", CF), ("bsf rax, rbx", ZF), ("bsr rax, rbx", ZF), ("bsf eax, ebx", ZF), ("bsr ax, bx", ZF),
    ("bswap rax", 0), ("bswap eax", 0), ("popcnt rax, rbx", STATUS_FLAGS), ("lzcnt ebx, eax", CF | ZF),
    ("tzcnt ax, bx", CF | ZF), ("andn rax, rbx, rax", SF | ZF | CF | OF), ("blsr ebx, eax", SF | ZF | CF | OF),
    ("bextr rax, rbx, rcx", ZF | CF | OF), ("bzhi rax, rbx, rcx", SF | ZF | CF | OF), ("blsi rax, rbx", ZF | CF),
    ("blsmsk ebx, eax", ZF | CF), ("tzcnt rax, rbx", CF | ZF), ("lzcnt ax, bx", CF | ZF),
    ("movzx eax, bl", 0), ("movsx rax, bx", 0), ("movsxd rbx, eax", 0), ("movsx ax, bl", 0), ("cdqe", 0),
    ("cbw", 0), ("cwde\nmov bx, ax", 0), ("cqo\nmov rbx, rdx", 0), ("cdq\nmov ebx, edx", 0), ("lahf", 0),
    ("sahf", STATUS_FLAGS & ~OF), ("cmc", CF), ("mov eax, ebx", 0), ("mov ah, bl", 0), ("lea eax, [rax+rbx*4+5]", 0),
    ("lea rax, [rbx+rax*8-100]", 0), ("lea ax, [rax+rbx]", 0),
]  # fmt: skip


@settings(max_examples=30, deadline=None)
@given(ops=triples)
def test_bit_operations_and_moves(ops: list[tuple[int, int, int]]) -> None:
    run_family(BIT_CASES, ops)


XCHG_CASES = [
    "cmpxchg rbx, rcx", "cmpxchg ebx, ecx", "cmpxchg bx, cx", "cmpxchg bl, cl", "xadd rax, rbx", "xadd eax, ebx",
    "xadd al, bl", "xchg rax, rbx", "xchg eax, ebx", "xchg ah, bl", "xadd rax, rax",
]  # fmt: skip


@settings(max_examples=30, deadline=None)
@given(ops=triples, same=st.booleans())
def test_exchange_and_compare(ops: list[tuple[int, int, int]], same: bool) -> None:
    for a, b, c in ops:
        for body in XCHG_CASES:
            compare(body, a, a if same else b, c)  # same: CMPXCHG's equal case


CONDITIONS = ["o", "no", "b", "ae", "e", "ne", "be", "a", "s", "ns", "p", "np", "l", "ge", "le", "g"]


@settings(max_examples=30, deadline=None)
@given(ops=triples, same=st.booleans())
def test_setcc_and_cmovcc(ops: list[tuple[int, int, int]], same: bool) -> None:
    for a, b, c in ops:
        b = a if same else b
        for cc in CONDITIONS:
            compare(f"cmp rax, rbx\nset{cc} bl\ncmov{cc} rax, rcx", a, b, c)
            compare(f"cmp eax, ebx\ncmov{cc} eax, ecx\nmov ebx, 0", a, b, c)
            compare(f"sub al, bl\nj{cc} .t\nmov rbx, 1\n.t:", a, b, c)


@settings(max_examples=30, deadline=None)
@given(a=value, b=value, n=st.integers(0, 8), differ=st.booleans())
def test_repe_cmpsb_and_repne_scasb(a: int, b: int, n: int, differ: bool) -> None:
    if differ:
        b = a ^ (0xFF << (8 * (n % 8)))
    cmps = f"""sub rsp, 32
mov [rsp], rax
mov [rsp+8], rbx
mov rsi, rsp
lea rdi, [rsp+8]
mov rcx, {n}
cmp rcx, 0
repe cmpsb
mov rax, rcx
mov rbx, rsi
sub rbx, rsp
lea rsp, [rsp+32]"""
    compare(cmps, a, b)
    for start, flag in (("[rsp+7]", "std"), ("[rsp]", "cld")):
        scas = f"""sub rsp, 16
mov [rsp], rax
mov rax, rbx
lea rdi, {start}
mov rcx, {n}
{flag}
repne scasb
mov rbx, rdi
sub rbx, rsp
lea rsi, [rsp+3]
lodsb
cld
lea rsp, [rsp+16]"""
        compare(scas, a, b & 0xFF)


def test_the_comparison_can_fail() -> None:
    """The harness itself: a different instruction in the interpreter is caught."""
    n = native.Native("add rax, rbx")(5, 7, 0)
    i = interpret("sub rax, rbx", 5, 7, 0)
    assert n[0] == 12 and i[0] != n[0]


# SSE2: xmm0 = [rax, rbx] and xmm1 = [rcx, rax ^ rbx] (low qword first), one operation, result back in rax:rbx
SSE_PROLOGUE = """movq xmm0, rax
movq xmm2, rbx
punpcklqdq xmm0, xmm2
movq xmm1, rcx
xor rax, rbx
movq xmm2, rax
punpcklqdq xmm1, xmm2
"""
SSE_EPILOGUE = """
movq rax, xmm0
pshufd xmm0, xmm0, 0xee
movq rbx, xmm0"""
SSE_OPS = [
    "pxor", "por", "pand", "pandn", "xorps", "andps", "orps", "andnps",
    "paddb", "paddw", "paddd", "paddq", "psubb", "psubw", "psubd", "psubq",
    "paddusb", "paddusw", "paddsb", "paddsw", "psubusb", "psubusw", "psubsb", "psubsw",
    "pcmpeqb", "pcmpeqw", "pcmpeqd", "pcmpgtb", "pcmpgtw", "pcmpgtd",
    "pminub", "pmaxub", "pminsw", "pmaxsw", "pavgb", "pavgw", "pmullw", "pmulhw", "pmulhuw", "pmuludq", "psadbw",
    "punpcklbw", "punpcklwd", "punpckldq", "punpcklqdq", "punpckhbw", "punpckhwd", "punpckhdq", "punpckhqdq",
    "unpcklps", "unpckhps", "packsswb", "packssdw", "packuswb",
    "psllw", "pslld", "psllq", "psrlw", "psrld", "psrlq", "psraw", "psrad",
]  # fmt: skip
SSE_IMM = ["pshufd xmm0, xmm1, 0x1b", "pshuflw xmm0, xmm1, 0x93", "pshufhw xmm0, xmm1, 0x4e", "shufps xmm0, xmm1, 0x72",
           "pslldq xmm0, 3", "psrldq xmm0, 9", "psllw xmm0, 5", "psrad xmm0, 31", "psrlq xmm0, 63", "psllq xmm0, 64",
           "pmovmskb ebx, xmm0\nmovq xmm0, rbx", "movmskps ebx, xmm1\nmovq xmm0, rbx",
           "movhlps xmm0, xmm1", "movlhps xmm0, xmm1", "movss xmm0, xmm1", "movsd xmm0, xmm1"]  # fmt: skip


@settings(max_examples=15, deadline=None)
@given(ops=triples)
def test_sse2_integer_operations(ops: list[tuple[int, int, int]]) -> None:
    cases = [f"{op} xmm0, xmm1" for op in SSE_OPS] + SSE_IMM
    for body in cases:
        for a, b, c in ops:
            if body.startswith(("psll", "psrl", "psra")) and "," in body and body.count(",") == 1:
                c &= 0x7F  # a shift count from a register: small and large ones, not only huge
            compare(SSE_PROLOGUE + body + SSE_EPILOGUE, a, b, c, 0)


def _double_bits(x: float) -> int:
    return int.from_bytes(struct.pack("<d", x), "little")


def _single_pair(x: float, y: float) -> int:
    return int.from_bytes(struct.pack("<ff", x, y), "little")


finite32 = st.floats(width=32, allow_nan=False)
fp_value = st.one_of(
    st.floats().map(_double_bits),
    st.tuples(finite32, finite32).map(lambda p: _single_pair(*p)),
    st.sampled_from([0, 1 << 63, 0x7FF0000000000000, 0xFFF0000000000000, 0x7FF8000000000001, 0x7FF4000000000000,
                     0x0000000000000001, 0x7F800001FFC00001, 0x3FF0000000000000, 0x43E0000000000000,
                     0xC3E0000000000001, 0x41DFFFFFFFC00000, 0x7F7FFFFF7F7FFFFF, 0x4F0000004F000000]),
    u64,
)  # fmt: skip
fp_triples = st.lists(st.tuples(fp_value, fp_value, fp_value), min_size=1, max_size=BATCH)
FP_KINDS = ("sd", "ss", "pd", "ps")
FP_OPS = [f"{op}{kind}" for op in ("add", "sub", "mul", "div", "min", "max", "sqrt") for kind in FP_KINDS]
FP_OTHER = ["cmpsd xmm0, xmm1, 1", "cmpss xmm0, xmm1, 4", "cmppd xmm0, xmm1, 3", "cmpps xmm0, xmm1, 6",
            "cmpsd xmm0, xmm1, 0", "cmpps xmm0, xmm1, 7", "cmppd xmm0, xmm1, 2", "cmpss xmm0, xmm1, 5",
            "cvtsd2ss xmm0, xmm1", "cvtss2sd xmm0, xmm1", "cvtsi2sd xmm0, rcx", "cvtsi2ss xmm0, rcx",
            "cvtsi2sd xmm0, ecx", "cvtsi2ss xmm0, ecx", "cvttsd2si rbx, xmm1\nmovq xmm0, rbx",
            "cvtsd2si ebx, xmm1\nmovq xmm0, rbx", "cvttss2si ebx, xmm1\nmovq xmm0, rbx",
            "cvtss2si rbx, xmm1\nmovq xmm0, rbx"]  # fmt: skip


@settings(max_examples=15, deadline=None)
@given(ops=fp_triples)
def test_sse2_floating_point(ops: list[tuple[int, int, int]]) -> None:
    """Bit-exact results (NaN payloads, signed zeros, infinities, rounding) and the COMIS flags."""
    for body in [f"{op} xmm0, xmm1" for op in FP_OPS] + FP_OTHER:
        for a, b, c in ops:
            compare(SSE_PROLOGUE + body + SSE_EPILOGUE, a, b, c, 0)
    for op in ("ucomisd", "comisd", "ucomiss", "comiss"):
        for a, b, c in ops:
            compare(SSE_PROLOGUE + f"{op} xmm0, xmm1" + SSE_EPILOGUE, a, b, c, STATUS_FLAGS)
