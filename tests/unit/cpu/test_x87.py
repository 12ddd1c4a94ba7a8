"""popek.cpu.x87 on its own (rounding in each mode and precision, classification, FXAM, special values, hostile
bit patterns) and the interpreter's x87 state handling that the native comparison cannot see: FOP/FIP/FDP, the
16-bit and real-mode environment layouts, #NM/#MF, faults leaving no partial state, FXSAVE's tag round trip, and
the transcendentals against an exact reference (mpmath) over their whole argument ranges."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popek.cpu import exceptions, x87
from popek.cpu.core import Cpu
from popek.cpu.state import CR0_NE, CR0_TS, CpuException, CpuState, Vector
from popek.cpu.x87 import C0, C1, C2, C3, DE, IE, INDEFINITE, OE, ONE, PE, SF, UE, ZE, Kind

from .machine import CODE, Machine, nasm_available

ALL_MASKED = 0x7F


def ext(sign: int, exp: int, sig: int) -> int:
    return (sign << 79) | (exp << 64) | sig


def fcw(pc: int = 3, rc: int = 0, masks: int = 0x3F) -> int:
    return 0x40 | masks | pc << 8 | rc << 10


def from_double(v: float) -> int:
    return x87.from_format(x87.DOUBLE, int.from_bytes(struct.pack("<d", v), "little"))[0]


# --- values ---


@pytest.mark.parametrize(
    ("bits", "kind"),
    [
        (0, Kind.ZERO),
        (ext(1, 0, 0), Kind.ZERO),
        (ext(0, 0, 1), Kind.DENORMAL),
        (ext(0, 0, 1 << 63), Kind.PSEUDO_DENORMAL),
        (ONE, Kind.NORMAL),
        (ext(0, 0x7FFF, 1 << 63), Kind.INFINITY),
        (ext(0, 0x7FFF, 0xC000000000000000), Kind.QNAN),
        (ext(0, 0x7FFF, 0x8000000000000001), Kind.SNAN),
        (ext(0, 0x3FFF, 0x4000000000000000), Kind.UNSUPPORTED),  # unnormal
        (ext(0, 0x7FFF, 0), Kind.UNSUPPORTED),  # pseudo-infinity
        (ext(0, 0x7FFF, 0x4000000000000000), Kind.UNSUPPORTED),  # pseudo-NaN
    ],
)
def test_classification(bits: int, kind: Kind) -> None:
    assert x87.classify(bits) == kind


@pytest.mark.parametrize(
    ("bits", "cc"),
    [
        (None, C3 | C0),
        (0, C3),
        (ext(1, 0, 0), C3 | C1),
        (ext(0, 0, 5), C3 | C2),
        (ext(0, 0, 1 << 63), C3 | C2),
        (ONE, C2),
        (ext(1, 0x7FFF, 1 << 63), C2 | C0 | C1),
        (INDEFINITE, C0 | C1),
        (ext(0, 0x1234, 5), 0),
    ],
)
def test_fxam_classes(bits: int | None, cc: int) -> None:
    assert x87.examine(bits) == cc


@pytest.mark.parametrize(
    ("rc", "sig"),
    [(x87.RN, 0xAAAAAAAAAAAAAAAB), (x87.RD, 0xAAAAAAAAAAAAAAAA), (x87.RU, 0xAAAAAAAAAAAAAAAB),
     (x87.RZ, 0xAAAAAAAAAAAAAAAA)],
)  # fmt: skip
def test_rounding_modes_of_one_third(rc: int, sig: int) -> None:
    value, exc = x87.div(ONE, from_double(3.0), fcw(rc=rc))
    assert value == ext(0, 0x3FFD, sig)
    assert exc == PE | (C1 if sig & 1 else 0)
    negative, exc = x87.div(ONE | x87.SIGN80, from_double(3.0), fcw(rc={x87.RD: x87.RU, x87.RU: x87.RD}.get(rc, rc)))
    assert negative == ext(1, 0x3FFD, sig) and exc == PE | (C1 if sig & 1 else 0)


@pytest.mark.parametrize("pc", [0, 2, 3])
def test_precision_control_rounds_to_24_53_or_64_bits(pc: int) -> None:
    p = {0: 24, 2: 53, 3: 64}[pc]
    tie = (1 << 65) | (1 << (65 - p))  # (1 + 2**-p): exactly halfway between 1 and 1 + 2**(1-p)
    value, exc = x87.round_ext(0, tie, -65, fcw(pc=pc))
    assert value == ONE and exc == PE  # ties go to even, which is down here
    value, exc = x87.round_ext(0, tie + 1, -65, fcw(pc=pc))
    assert value == ONE + (1 << (64 - p)) and exc == PE | C1


@pytest.mark.parametrize(
    ("rc", "sign", "expected"),
    [
        (x87.RN, 0, ext(0, 0x7FFF, 1 << 63)),
        (x87.RZ, 0, ext(0, 0x7FFE, (1 << 64) - 1)),
        (x87.RD, 0, ext(0, 0x7FFE, (1 << 64) - 1)),
        (x87.RD, 1, ext(1, 0x7FFF, 1 << 63)),
        (x87.RU, 1, ext(1, 0x7FFE, (1 << 64) - 1)),
    ],
)
def test_masked_overflow_gives_infinity_or_the_largest_finite_by_rc(rc: int, sign: int, expected: int) -> None:
    big = ext(sign, 0x7FFE, 1 << 63)
    value, exc = x87.mul(big, ext(0, 0x4000, 1 << 63), fcw(rc=rc))
    assert value == expected and exc & (OE | PE) == OE | PE


def test_unmasked_overflow_and_underflow_rebias_the_exponent_by_24576() -> None:
    big = ext(0, 0x7FFE, 1 << 63)
    value, exc = x87.mul(big, ext(0, 0x4000, 1 << 63), fcw(masks=0x3F & ~OE))
    assert exc & OE and (value >> 64) == 0x7FFF - 24576  # 2**16384: biased 0x7FFF, rebiased
    tiny = ext(0, 1, 1 << 63)
    value, exc = x87.div(tiny, ext(0, 0x4000, 1 << 63), fcw(masks=0x3F & ~UE))
    assert exc & UE and (value >> 64) == 24576


def test_masked_underflow_denormalises_and_flags_only_inexact_results() -> None:
    tiny = ext(0, 1, 1 << 63)
    value, exc = x87.div(tiny, ext(0, 0x4000, 1 << 63), fcw())  # exact: a denormal, no UE
    assert value == ext(0, 0, 1 << 62) and exc == 0
    value, exc = x87.div(tiny, from_double(3.0), fcw())
    assert x87.classify(value) == Kind.DENORMAL and exc & (UE | PE) == UE | PE


def test_invalid_operations_give_the_real_indefinite() -> None:
    inf = ext(0, 0x7FFF, 1 << 63)
    assert x87.add(inf, inf ^ x87.SIGN80, fcw()) == (INDEFINITE, IE)
    assert x87.mul(inf, 0, fcw()) == (INDEFINITE, IE)
    assert x87.div(0, 0, fcw()) == (INDEFINITE, IE)
    assert x87.sqrt(ONE | x87.SIGN80, fcw()) == (INDEFINITE, IE)
    assert x87.add(ext(0, 0x3FFF, 0), ONE, fcw()) == (INDEFINITE, IE)  # unnormal operand


def test_nan_propagation_follows_the_x87_rules() -> None:
    q_small, q_big = ext(0, 0x7FFF, 0xC000000000000001), ext(1, 0x7FFF, 0xC000000000000002)
    s_big = ext(0, 0x7FFF, 0x8000000000000009)
    assert x87.add(q_small, q_big, fcw()) == (q_big, 0)  # the larger significand
    assert x87.add(s_big, q_small, fcw()) == (q_small, IE)  # a QNaN wins over an SNaN
    assert x87.add(ONE, s_big, fcw()) == (s_big | x87.QUIET_BIT, IE)  # the SNaN, quieted


def test_divide_by_zero_and_denormal_operands() -> None:
    assert x87.div(ONE, 0, fcw()) == (ext(0, 0x7FFF, 1 << 63), ZE)
    value, exc = x87.add(ext(0, 0, 1), 0, fcw())
    assert value == ext(0, 0, 1) and exc == DE


def test_integer_and_bcd_conversions() -> None:
    assert x87.to_int(from_double(2.5), 4, fcw()) == (2, PE)
    assert x87.to_int(from_double(-2.5), 4, fcw(rc=x87.RD)) == ((-3) & 0xFFFFFFFF, PE | C1)
    assert x87.to_int(from_double(-2.5), 2, fcw(), truncate=True) == ((-2) & 0xFFFF, PE)
    assert x87.to_int(from_double(40000.0), 2, fcw()) == (0x8000, IE)  # masked: the integer indefinite
    assert x87.to_int(from_double(40000.0), 2, fcw(masks=0x3E)) == (None, IE)  # unmasked: nothing stored
    assert x87.to_bcd(from_double(-1234.0), fcw()) == ((1 << 79) | 0x1234, 0)
    assert x87.from_bcd((1 << 79) | 0x987654321) == from_double(-987654321.0)
    assert x87.to_bcd(from_double(1e18), fcw()) == (x87.BCD_INDEFINITE, IE)


@pytest.mark.parametrize(
    ("name", "rc", "sig"),
    [("pi", x87.RN, 0xC90FDAA22168C235), ("pi", x87.RZ, 0xC90FDAA22168C234), ("l2e", x87.RN, 0xB8AA3B295C17F0BC),
     ("ln2", x87.RN, 0xB17217F7D1CF79AC), ("lg2", x87.RU, 0x9A209A84FBCFF799), ("l2t", x87.RD, 0xD49A784BCD1B8AFE)],
)  # fmt: skip
def test_constants_round_by_rc(name: str, rc: int, sig: int) -> None:
    assert x87.constant(name, fcw(rc=rc)) & ((1 << 64) - 1) == sig


hostile = st.integers(0, 2**80 - 1)


@settings(max_examples=300, deadline=None)
@given(a=hostile, b=hostile, control=st.integers(0, 0xFFFF))
def test_any_bit_patterns_give_an_80_bit_result(a: int, b: int, control: int) -> None:
    """Every operation on arbitrary operands and control words ends with an 80-bit value (and bounded work:
    exponent differences of 32k bits, FSCALE by 2**16384, huge remainders)."""
    f = x87.control_word(control)
    for op in (x87.add, x87.sub, x87.mul, x87.div, x87.scale, x87.atan2, x87.yl2x, x87.yl2xp1):
        value, _ = op(a, b, f)
        assert 0 <= value < 1 << 80
    for ieee in (False, True):
        assert 0 <= x87.prem(a, b, f, ieee)[0] < 1 << 80
    for unary in (x87.sqrt, x87.roundint, x87.f2xm1):
        assert 0 <= unary(a, f)[0] < 1 << 80
    sc, t = x87.sin_cos(a, f), x87.tan(a, f)
    assert sc is None or all(0 <= v < 1 << 80 for v, _ in sc)
    assert t is None or 0 <= t[0] < 1 << 80


# --- transcendentals against an exact reference ---

mpmath = pytest.importorskip("mpmath")


def _mp(x: int) -> object:
    s, m, e = x87.exact(x)
    return mpmath.mpf((-1) ** s * m) * mpmath.mpf(2) ** e


def _ulp_error(got: int, exact: object) -> object:
    """|got - exact| in units of the last place of the exact value (the denormal spacing below the normals)."""
    top = int(mpmath.floor(mpmath.log(abs(exact), 2))) if exact else x87.EMIN
    ulp = mpmath.mpf(2) ** (max(top, x87.EMIN) - 63)
    return abs(_mp(got) - exact) / ulp


any_arg = st.builds(ext, st.integers(0, 1), st.integers(16383 - 80, 16383 + 62), st.integers(2**63, 2**64 - 1))
small_arg = st.builds(ext, st.integers(0, 1), st.integers(16383 - 100, 16383 - 2), st.integers(2**63, 2**64 - 1))
positive = st.builds(ext, st.just(0), st.integers(1, 0x7FFE), st.integers(2**63, 2**64 - 1))


@settings(max_examples=60, deadline=None)
@given(x=any_arg, y=positive, small=small_arg, rc=st.integers(0, 3))
def test_transcendentals_are_within_one_ulp_of_the_exact_result(x: int, y: int, small: int, rc: int) -> None:
    """Across the whole range (|x| up to 2**63 for the trigonometric ones, where processors' rounded pi drifts
    thousands of ulps): within 1 ulp of the exact value in every rounding mode. At most 1, not less: rounded
    toward zero or infinity, a result next to an exact value a hair off a representable one (atan(r) = r - r^3/3
    for a tiny r) is off by 1 - r^2/3 ulp, which even 512 bits of mpmath see as 1."""
    f = fcw(rc=rc)
    with mpmath.workprec(512):  # mpmath floats: relative precision; it reduces large arguments exactly itself
        sc = x87.sin_cos(x, f)
        assert sc is not None
        assert _ulp_error(sc[0][0], mpmath.sin(_mp(x))) <= 1
        assert _ulp_error(sc[1][0], mpmath.cos(_mp(x))) <= 1
        t = x87.tan(x, f)
        assert t is not None and _ulp_error(t[0], mpmath.tan(_mp(x))) <= 1
        assert _ulp_error(x87.atan2(x, y, f)[0], mpmath.atan2(_mp(x), _mp(y))) <= 1
        assert _ulp_error(x87.f2xm1(small, f)[0], mpmath.power(2, _mp(small)) - 1) <= 1
        if y != ONE:
            assert _ulp_error(x87.yl2x(x, y, f)[0], _mp(x) * mpmath.log(_mp(y), 2)) <= 1
        assert _ulp_error(x87.yl2xp1(x, small, f)[0], _mp(x) * mpmath.log(1 + _mp(small), 2)) <= 1


def test_trigonometric_arguments_out_of_range_set_c2() -> None:
    huge = ext(0, 16383 + 63, 1 << 63)
    assert x87.sin_cos(huge, fcw()) is None and x87.tan(huge, fcw()) is None


# --- the interpreter's x87 state ---

pytestmark_nasm = pytest.mark.skipif(not nasm_available(), reason="needs nasm")


class Faults:
    def __init__(self) -> None:
        self.seen: list[int] = []

    def __call__(self, cpu: Cpu, exc: CpuException, return_rip: int) -> None:
        self.seen.append(exc.vector)
        cpu.state.halted = True


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Iterator[Faults]:
    rec = Faults()
    monkeypatch.setattr(exceptions, "handle", rec)
    yield rec


def run(mode: int, source: str) -> Machine:
    m = Machine(mode)
    m.load(source)
    m.run(10_000)
    return m


@pytestmark_nasm
def test_last_instruction_and_operand_pointers_and_fxsave64() -> None:
    m = run(64, """
        fninit
        mov rbx, 0x20000
        fld qword [rbx+8]
        fld1
        times 0x40 - ($ - $$) nop
        faddp st1, st0              ; at CODE + 0x40
        fnstcw [rbx]                ; a control instruction: the pointers stay
        fxsave64 [0x21000]
        hlt
    """)
    s = m.cpu.state
    assert s.fop == 0x6C1  # DE C1: the low 3 bits of DE, then the ModR/M byte
    assert s.fip == CODE + 0x40 and s.fcs == 0x8
    assert s.fdp == 0x20008  # the FLD's operand (FADDP has none)
    area = m.mem.read(0x21000, 32)
    assert int.from_bytes(area[6:8], "little") == 0x6C1
    assert int.from_bytes(area[8:16], "little") == CODE + 0x40 and int.from_bytes(area[16:24], "little") == 0x20008
    assert area[4] == 1 << 7  # the abridged tag: one register in use, R7 (TOP = 7)


@pytestmark_nasm
def test_full_tag_word_round_trips_through_fxsave_and_fnstenv() -> None:
    m = Machine(32)
    m.mem.write(0x20000, (1).to_bytes(10, "little"))  # a denormal: tag "special"
    m.load("""
        fninit
        fldz
        fld1
        fld tword [0x20000]
        fxsave [0x21000]
        fninit
        fxrstor [0x21000]
        fnstenv [0x22000]
        hlt
    """)
    m.run(100)
    tw = int.from_bytes(m.mem.read(0x22000 + 8, 2), "little")
    # TOP = 5: R5 the denormal (special, 2), R6 one (valid, 0), R7 zero (1); R0..R4 empty (3)
    assert tw == 0b01_00_10_11_11_11_11_11
    assert m.cpu.state.fsw >> 11 & 7 == 5


@pytestmark_nasm
def test_16_bit_and_real_mode_environment_layouts() -> None:
    m = run(16, """
        fninit
        fld1
        fld dword [0x100]
        o16 fnstenv [0x200]
        o32 fnstenv [0x300]
        hlt
    """)
    s = m.cpu.state
    env16 = m.mem.read(0x10000 + 0x200, 14)
    words = struct.unpack("<7H", env16)
    lin_ip = (s.fcs << 4) + s.fip
    assert words[0] == 0x37F
    assert words[3] == lin_ip & 0xFFFF and words[4] == ((lin_ip >> 16) & 0xF) << 12 | s.fop
    assert words[5] == ((s.fds << 4) + 0x100) & 0xFFFF
    env32 = struct.unpack("<7I", m.mem.read(0x10000 + 0x300, 28))
    assert env32[0] >> 16 == 0xFFFF and env32[3] == lin_ip & 0xFFFF and env32[4] >> 12 == lin_ip >> 16
    # FLDENV of either real-mode layout gives back the linear pointers (with FCS = FDS = 0) and the opcode
    for layout, at in (("o16", 0x200), ("o32", 0x300)):
        restore = Machine(16)
        restore.mem.write(0x10000 + at, m.mem.read(0x10000 + at, 28))
        restore.load(f"{layout} fldenv [{at:#x}]\nhlt")
        restore.run(10)
        r = restore.cpu.state
        assert (r.fip, r.fcs, r.fop, r.fdp, r.fds) == (lin_ip, 0, s.fop, (s.fds << 4) + 0x100, 0)
        assert r.fsw == s.fsw and r.ftw == s.ftw


@pytestmark_nasm
def test_pending_unmasked_exception_raises_mf_on_the_next_waiting_instruction(faults: Faults) -> None:
    m = Machine(64)
    m.cpu.state.cr0 |= CR0_NE
    m.load("""
        fninit
        mov word [0x20000], 0x37b   ; ZE unmasked
        fldcw [0x20000]
        fldz
        fld1
        fdiv st0, st1               ; ZE: ES set, ST(0) unchanged
        fnstsw ax                   ; no-wait: no #MF
        fadd st0, st0               ; #MF
        hlt
    """)
    m.run(1000)
    s = m.cpu.state
    assert faults.seen == [Vector.MF]
    assert s.gpr[0] & 0xFFFF == s.fsw and s.fsw & (ZE | x87.ES | x87.B) == ZE | x87.ES | x87.B
    assert x87.Stack(s).get(0) == ONE  # the unmasked ZE left the destination alone


@pytestmark_nasm
def test_em_and_ts_raise_nm(faults: Faults) -> None:
    m = Machine(64)
    m.cpu.state.cr0 |= CR0_TS
    m.load("fld1\nhlt")
    m.run(100)
    assert faults.seen == [Vector.NM]


@pytestmark_nasm
def test_a_faulting_memory_operand_leaves_no_partial_state(faults: Faults) -> None:
    m = Machine(64)
    m.load("""
        fninit
        fld1
        fstp qword [0x7ffffffff000]   ; not mapped: #PF before anything changes
        hlt
    """)
    m.run(100)
    s = m.cpu.state
    assert faults.seen == [Vector.PF]
    assert x87.Stack(s).get(0) == ONE and (s.fsw >> 11) & 7 == 7 and s.fsw & 0xFF == 0


def test_stack_overflow_and_underflow_set_sf_and_c1() -> None:
    s = CpuState()
    stack = x87.Stack(s)
    s.fcw = ALL_MASKED
    for _ in range(8):
        stack.push(ONE)
    assert not stack.empty(7)
    assert not stack.signal(IE | SF)
    assert s.fsw & (IE | SF) == IE | SF
    s.fsw &= ~0xFF
    s.fcw = 0x7E  # IE unmasked: withheld, ES and B set
    assert stack.signal(IE | SF | PE)
    assert s.fsw & 0xFF == IE | SF | x87.ES and s.fsw & x87.B
    assert not s.fsw & PE  # the operation stopped before rounding
    _ = C2
