"""RFLAGS arithmetic status flags and condition codes (Intel SDM vol. 1 §3.4.3 and appendix A "EFLAGS
cross-reference", vol. 1 appendix B "EFLAGS condition codes").

The interpreter computes flags eagerly: every flag-writing instruction produces the six status bits (CF, PF, AF,
ZF, SF, OF) already packed at their RFLAGS positions, so committing them is one mask-and-or and reading them is
free. Eager computation costs a few integer operations per ALU instruction; lazy flags would save them only
when no later instruction reads the flags, and make fault restarts and translated blocks harder to get right.
"""

from __future__ import annotations

from popek.cpu.state import AF, CF, OF, PF, SF, STATUS_FLAGS, ZF

MASKS = {8: 0xFF, 16: 0xFFFF, 32: 0xFFFF_FFFF, 64: 0xFFFF_FFFF_FFFF_FFFF, 128: (1 << 128) - 1}
SIGN = {8: 0x80, 16: 0x8000, 32: 0x8000_0000, 64: 0x8000_0000_0000_0000}
NOT_STATUS = ~STATUS_FLAGS

# PF is set when the low byte of the result has an even number of 1 bits
PARITY = tuple(PF if bin(i).count("1") % 2 == 0 else 0 for i in range(256))


def szp(result: int, bits: int) -> int:
    """SF, ZF and PF of a result already masked to `bits`."""
    return PARITY[result & 0xFF] | (ZF if result == 0 else 0) | (SF if result & SIGN[bits] else 0)


def add(a: int, b: int, bits: int, carry: int = 0) -> tuple[int, int]:
    """ADD/ADC: (result, status flags). Operands are already masked to `bits`."""
    total = a + b + carry
    res = total & MASKS[bits]
    flags = (
        (CF if total > res else 0)
        | PARITY[res & 0xFF]
        | ((a ^ b ^ res) & AF)
        | (ZF if res == 0 else 0)
        | (SF if res & SIGN[bits] else 0)
        | (OF if (a ^ res) & (b ^ res) & SIGN[bits] else 0)
    )
    return res, flags


def sub(a: int, b: int, bits: int, borrow: int = 0) -> tuple[int, int]:
    """SUB/SBB/CMP/NEG: (result, status flags)."""
    total = a - b - borrow
    res = total & MASKS[bits]
    flags = (
        (CF if total < 0 else 0)
        | PARITY[res & 0xFF]
        | ((a ^ b ^ res) & AF)
        | (ZF if res == 0 else 0)
        | (SF if res & SIGN[bits] else 0)
        | (OF if (a ^ b) & (a ^ res) & SIGN[bits] else 0)
    )
    return res, flags


def logic(res: int, bits: int) -> int:
    """AND/OR/XOR/TEST: CF = OF = 0, SF/ZF/PF from the result. AF is undefined; both Intel and AMD clear it."""
    return PARITY[res & 0xFF] | (ZF if res == 0 else 0) | (SF if res & SIGN[bits] else 0)


# Condition codes, indexed by iced_x86.ConditionCode (NONE=0, O, NO, B, AE, E, NE, BE, A, S, NS, P, NP, L, GE,
# LE, G). Each entry maps RFLAGS to the truth of the condition (SDM vol. 1 table B-1).
def _o(f: int) -> bool:
    return bool(f & OF)


def _b(f: int) -> bool:
    return bool(f & CF)


def _e(f: int) -> bool:
    return bool(f & ZF)


def _be(f: int) -> bool:
    return bool(f & (CF | ZF))


def _s(f: int) -> bool:
    return bool(f & SF)


def _p(f: int) -> bool:
    return bool(f & PF)


def _l(f: int) -> bool:
    return bool(f & SF) != bool(f & OF)


def _le(f: int) -> bool:
    return bool(f & ZF) or bool(f & SF) != bool(f & OF)


def _always(f: int) -> bool:
    return True


def _negate(fn: object) -> object:
    test = fn

    def negated(f: int) -> bool:
        return not test(f)  # type: ignore[operator]

    return negated


CONDITIONS = (
    _always,
    _o,
    _negate(_o),
    _b,
    _negate(_b),
    _e,
    _negate(_e),
    _be,
    _negate(_be),
    _s,
    _negate(_s),
    _p,
    _negate(_p),
    _l,
    _negate(_l),
    _le,
    _negate(_le),
)
# precomputed truth tables keyed by the bits the conditions read, so the hot path is one index
_COND_BITS = CF | PF | ZF | SF | OF


def _compress(f: int) -> int:
    """RFLAGS status bits CF, PF, ZF, SF, OF → a 5-bit index."""
    return (f & 1) | ((f >> 1) & 2) | ((f >> 4) & 4) | ((f >> 4) & 8) | ((f >> 7) & 16)


def _expand(i: int) -> int:
    low = (CF if i & 1 else 0) | (PF if i & 2 else 0) | (ZF if i & 4 else 0)
    return low | (SF if i & 8 else 0) | (OF if i & 16 else 0)


COND_TABLE: tuple[tuple[bool, ...], ...] = tuple(
    tuple(bool(cond(_expand(i))) for i in range(32))  # type: ignore[operator]
    for cond in CONDITIONS
)


def condition(cc: int, rflags: int) -> bool:
    """The truth of iced condition code `cc` under `rflags`."""
    return COND_TABLE[cc][_compress(rflags)]
