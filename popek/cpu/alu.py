"""Integer shift, rotate, multiply and divide semantics (Intel SDM vol. 2B: SAL/SAR/SHL/SHR, RCL/RCR/ROL/ROR,
SHLD, SHRD, MUL, IMUL, DIV, IDIV; flags per vol. 1 appendix A).

Pure functions of operand values: each returns the result and the status flags it defines, packed at their
RFLAGS positions, together with the mask of the flags it writes (flags outside the mask keep their old value).
A count that leaves the destination and the flags unchanged returns None, so the caller commits nothing.

Flags the SDM calls undefined are given the values this project's reference host (an AMD EPYC, whose results
the native tests compare against) produces wherever the rule is simple; see each function and the tests for
the exceptions, which the native comparison leaves out.
"""

from __future__ import annotations

from popek.cpu.flags import MASKS, SIGN, szp
from popek.cpu.state import AF, CF, OF, PF, SF, STATUS_FLAGS, ZF

Result = tuple[int, int, int]  # (value, flags, mask of flags written)

CF_OF = CF | OF


def shl(a: int, count: int, bits: int) -> Result | None:
    """SHL/SAL. `count` is already masked to 5 (6 for 64-bit) bits. OF = MSB(result) XOR CF for every count
    (defined only for 1); AF (undefined) is set, as AMD does for every shift with a non-zero count. For 8/16-bit
    operands a count beyond the width shifts everything out (CF = 0)."""
    if count == 0:
        return None
    r = a << count
    res = r & MASKS[bits]
    cf = (r >> bits) & 1
    of = OF if bool(res & SIGN[bits]) != bool(cf) else 0
    return res, szp(res, bits) | cf | of | AF, STATUS_FLAGS


def shr(a: int, count: int, bits: int) -> Result | None:
    """SHR. OF is the original MSB for a count of 1; for larger counts (undefined) it is cleared; AF set."""
    if count == 0:
        return None
    res = a >> count
    cf = (a >> (count - 1)) & 1
    of = OF if a & SIGN[bits] and count == 1 else 0
    return res, szp(res, bits) | cf | of | AF, STATUS_FLAGS


def sar(a: int, count: int, bits: int) -> Result | None:
    """SAR: OF = 0; AF set."""
    if count == 0:
        return None
    signed = a - (1 << bits) if a & SIGN[bits] else a
    res = (signed >> count) & MASKS[bits]
    cf = (signed >> (count - 1)) & 1
    return res, szp(res, bits) | cf | AF, STATUS_FLAGS


def rol(a: int, count: int, bits: int) -> Result | None:
    """ROL: CF = LSB(result), OF = MSB(result) XOR CF; other flags unchanged."""
    if count == 0:
        return None
    c = count % bits
    res = ((a << c) | (a >> (bits - c))) & MASKS[bits] if c else a
    cf = res & 1
    of = OF if bool(res & SIGN[bits]) != bool(cf) else 0
    return res, cf | of, CF_OF


def ror(a: int, count: int, bits: int) -> Result | None:
    """ROR: CF = MSB(result), OF = MSB(result) XOR the bit below it."""
    if count == 0:
        return None
    c = count % bits
    res = ((a >> c) | (a << (bits - c))) & MASKS[bits] if c else a
    msb = 1 if res & SIGN[bits] else 0
    of = OF if msb != (res >> (bits - 2)) & 1 else 0
    return res, msb | of, CF_OF


def rcl(a: int, count: int, bits: int, carry: int) -> Result | None:
    """RCL: rotate the (bits+1)-bit value CF:a left. OF = MSB(result) XOR new CF."""
    if count == 0:
        return None
    c = count % (bits + 1)
    x = (carry << bits) | a
    width = bits + 1
    x = ((x << c) | (x >> (width - c))) & ((1 << width) - 1) if c else x
    res = x & MASKS[bits]
    cf = x >> bits
    of = OF if bool(res & SIGN[bits]) != bool(cf) else 0
    return res, cf | of, CF_OF


def rcr(a: int, count: int, bits: int, carry: int) -> Result | None:
    """RCR: rotate CF:a right. OF = MSB(result) XOR the bit below it (for count 1 this is the SDM's
    MSB(dest) XOR CF)."""
    if count == 0:
        return None
    c = count % (bits + 1)
    x = (carry << bits) | a
    width = bits + 1
    x = ((x >> c) | (x << (width - c))) & ((1 << width) - 1) if c else x
    res = x & MASKS[bits]
    cf = x >> bits
    of = OF if bool(res & SIGN[bits]) != bool((res >> (bits - 2)) & 1) else 0
    return res, cf | of, CF_OF


def shld(dst: int, src: int, count: int, bits: int) -> Result | None:
    """SHLD. For 16-bit operands and counts above 16 (undefined) the bits come from dst:src:dst, as on Intel."""
    if count == 0:
        return None
    val = (dst << (2 * bits)) | (src << bits) | dst
    res = (val << count >> (2 * bits)) & MASKS[bits]
    cf = (val >> (3 * bits - count)) & 1
    of = OF if bool(res & SIGN[bits]) != bool(cf) else 0  # for count 1: the sign changed
    return res, szp(res, bits) | cf | of | AF, STATUS_FLAGS


def shrd(dst: int, src: int, count: int, bits: int) -> Result | None:
    """SHRD, the mirror of `shld` (src:dst shifted right)."""
    if count == 0:
        return None
    val = (dst << (2 * bits)) | (src << bits) | dst
    res = (val >> count) & MASKS[bits]
    cf = (val >> (count - 1)) & 1
    of = OF if bool(res & SIGN[bits]) != bool((res >> (bits - 2)) & 1) else 0  # for count 1: the sign changed
    return res, szp(res, bits) | cf | of | AF, STATUS_FLAGS


def mul(a: int, b: int, bits: int) -> tuple[int, int, int]:
    """MUL: (low, high, flags). CF = OF = high half non-zero; SF, ZF, AF, PF are undefined (see `mul_flags`)."""
    p = a * b
    lo, hi = p & MASKS[bits], p >> bits
    return lo, hi, mul_flags(lo, bits, hi != 0)


def imul(a: int, b: int, bits: int) -> tuple[int, int, int]:
    """IMUL (all forms) on unsigned-encoded operands: (low, high, flags); CF = OF = the product does not fit in
    the low half as a signed value."""
    sa = a - (1 << bits) if a & SIGN[bits] else a
    sb = b - (1 << bits) if b & SIGN[bits] else b
    p = sa * sb
    lo = p & MASKS[bits]
    hi = (p >> bits) & MASKS[bits]
    slo = lo - (1 << bits) if lo & SIGN[bits] else lo
    return lo, hi, mul_flags(lo, bits, slo != p)


MUL_FLAGS = CF | OF  # the flags MUL/IMUL write: SF, ZF, AF, PF (undefined) keep their values, as on AMD


def mul_flags(lo: int, bits: int, overflow: bool) -> int:
    """MUL/IMUL: CF = OF = overflow. Commit with the mask `MUL_FLAGS`."""
    return CF | OF if overflow else 0


# DIV/IDIV leave every flag undefined; AMD processors clear SF, ZF and PF, set AF, and keep CF and OF
DIV_FLAGS, DIV_FLAGS_MASK = AF, SF | ZF | AF | PF


class DivideError(Exception):
    """#DE: division by zero or a quotient too large for the destination."""


def div(hi: int, lo: int, divisor: int, bits: int) -> tuple[int, int]:
    """DIV of hi:lo by divisor: (quotient, remainder)."""
    if divisor == 0:
        raise DivideError
    q, r = divmod((hi << bits) | lo, divisor)
    if q > MASKS[bits]:
        raise DivideError
    return q, r


def idiv(hi: int, lo: int, divisor: int, bits: int) -> tuple[int, int]:
    """IDIV: signed division truncating toward zero; the remainder has the dividend's sign."""
    if divisor == 0:
        raise DivideError
    dividend = (hi << bits) | lo
    if dividend >> (2 * bits - 1):
        dividend -= 1 << (2 * bits)
    d = divisor - (1 << bits) if divisor & SIGN[bits] else divisor
    q = abs(dividend) // abs(d)
    if (dividend < 0) != (d < 0):
        q = -q
    r = dividend - q * d
    if not -(1 << (bits - 1)) <= q < (1 << (bits - 1)):
        raise DivideError
    return q & MASKS[bits], r & MASKS[bits]
