"""Packed-integer and bitwise SSE/SSE2 semantics on 128-bit values (Intel SDM vol. 2: PADDx/PSUBx, PCMPEQx,
PCMPGTx, PMINUB/PMAXUB, PMOVMSKB, PUNPCKx, PSHUFD, PSLLx/PSRLx/PSRAx, PSLLDQ/PSRLDQ; vol. 1 ch. 11).

An XMM register is one Python int of 128 bits (`CpuState.xmm`). The lane operations here split it into lanes
of 8/16/32/64 bits, apply one scalar rule per lane, and join the lanes back: one table-driven routine per
family instead of one function per instruction. They know nothing of registers, memory or exceptions.
"""

from __future__ import annotations

import math as _math
import struct as _struct
from collections.abc import Callable

M128 = (1 << 128) - 1


def lanes(value: int, width: int) -> list[int]:
    """Split a 128-bit value into 128/width lanes, lowest first."""
    mask = (1 << width) - 1
    return [(value >> (i * width)) & mask for i in range(128 // width)]


def join(values: list[int], width: int) -> int:
    mask = (1 << width) - 1
    out = 0
    for i, v in enumerate(values):
        out |= (v & mask) << (i * width)
    return out


def _signed(v: int, width: int) -> int:
    return v - (1 << width) if v >> (width - 1) else v


def lanewise(a: int, b: int, width: int, fn: Callable[[int, int], int]) -> int:
    """Apply `fn(lane_a, lane_b)` to every lane (the result is masked to the lane width)."""
    if width == 8:
        ab, bb = a.to_bytes(16, "little"), b.to_bytes(16, "little")
        return int.from_bytes(bytes(fn(x, y) & 0xFF for x, y in zip(ab, bb)), "little")
    return join([fn(x, y) for x, y in zip(lanes(a, width), lanes(b, width))], width)


def add(a: int, b: int, width: int) -> int:
    return lanewise(a, b, width, lambda x, y: x + y)


def sub(a: int, b: int, width: int) -> int:
    return lanewise(a, b, width, lambda x, y: x - y)


def add_saturate(a: int, b: int, width: int, signed: bool) -> int:
    lo, hi = (-(1 << (width - 1)), (1 << (width - 1)) - 1) if signed else (0, (1 << width) - 1)
    if signed:
        return lanewise(a, b, width, lambda x, y: max(lo, min(hi, _signed(x, width) + _signed(y, width))))
    return lanewise(a, b, width, lambda x, y: min(hi, x + y))


def sub_saturate(a: int, b: int, width: int, signed: bool) -> int:
    lo, hi = (-(1 << (width - 1)), (1 << (width - 1)) - 1) if signed else (0, (1 << width) - 1)
    if signed:
        return lanewise(a, b, width, lambda x, y: max(lo, min(hi, _signed(x, width) - _signed(y, width))))
    return lanewise(a, b, width, lambda x, y: max(lo, x - y))


def cmpeq(a: int, b: int, width: int) -> int:
    return lanewise(a, b, width, lambda x, y: -1 if x == y else 0)


def cmpgt(a: int, b: int, width: int) -> int:
    """Signed greater-than per lane."""
    return lanewise(a, b, width, lambda x, y: -1 if _signed(x, width) > _signed(y, width) else 0)


def minu(a: int, b: int, width: int) -> int:
    return lanewise(a, b, width, min)


def maxu(a: int, b: int, width: int) -> int:
    return lanewise(a, b, width, max)


def mins(a: int, b: int, width: int) -> int:
    return lanewise(a, b, width, lambda x, y: x if _signed(x, width) < _signed(y, width) else y)


def maxs(a: int, b: int, width: int) -> int:
    return lanewise(a, b, width, lambda x, y: x if _signed(x, width) > _signed(y, width) else y)


def avg(a: int, b: int, width: int) -> int:
    """PAVGB/PAVGW: rounded unsigned average."""
    return lanewise(a, b, width, lambda x, y: (x + y + 1) >> 1)


def mullo(a: int, b: int, width: int) -> int:
    return lanewise(a, b, width, lambda x, y: x * y)


def mulhi(a: int, b: int, width: int, signed: bool) -> int:
    if signed:
        return lanewise(a, b, width, lambda x, y: (_signed(x, width) * _signed(y, width)) >> width)
    return lanewise(a, b, width, lambda x, y: (x * y) >> width)


def muludq(a: int, b: int) -> int:
    """PMULUDQ: the low dword of each qword multiplied into a qword."""
    lo = (a & 0xFFFFFFFF) * (b & 0xFFFFFFFF)
    hi = ((a >> 64) & 0xFFFFFFFF) * ((b >> 64) & 0xFFFFFFFF)
    return lo | (hi << 64)


def sad(a: int, b: int) -> int:
    """PSADBW: sums of absolute byte differences of each qword half."""
    ab, bb = a.to_bytes(16, "little"), b.to_bytes(16, "little")
    lo = sum(abs(x - y) for x, y in zip(ab[:8], bb[:8]))
    hi = sum(abs(x - y) for x, y in zip(ab[8:], bb[8:]))
    return lo | (hi << 64)


def movmskb(a: int) -> int:
    """PMOVMSKB: the top bit of each byte."""
    out = 0
    for i, byte in enumerate(a.to_bytes(16, "little")):
        out |= (byte >> 7) << i
    return out


def movmsk(a: int, width: int) -> int:
    """MOVMSKPS (32) / MOVMSKPD (64): the sign bit of each lane."""
    return sum(((v >> (width - 1)) & 1) << i for i, v in enumerate(lanes(a, width)))


def unpack_low(a: int, b: int, width: int) -> int:
    """PUNPCKLxx: interleave the low halves, a's lane first."""
    la, lb = lanes(a, width), lanes(b, width)
    half = len(la) // 2
    return join([v for pair in zip(la[:half], lb[:half]) for v in pair], width)


def unpack_high(a: int, b: int, width: int) -> int:
    la, lb = lanes(a, width), lanes(b, width)
    half = len(la) // 2
    return join([v for pair in zip(la[half:], lb[half:]) for v in pair], width)


def shuffle32(src: int, order: int) -> int:
    """PSHUFD: dword i of the result is dword (order >> 2i) & 3 of the source."""
    ls = lanes(src, 32)
    return join([ls[(order >> (2 * i)) & 3] for i in range(4)], 32)


def shufps(a: int, b: int, order: int) -> int:
    """SHUFPS: two dwords of a, then two of b."""
    la, lb = lanes(a, 32), lanes(b, 32)
    return join([la[order & 3], la[(order >> 2) & 3], lb[(order >> 4) & 3], lb[(order >> 6) & 3]], 32)


def shuffle16_low(src: int, order: int) -> int:
    """PSHUFLW: the low four words shuffled, the high qword copied."""
    ls = lanes(src, 16)
    return join([ls[(order >> (2 * i)) & 3] for i in range(4)] + ls[4:], 16)


def shuffle16_high(src: int, order: int) -> int:
    ls = lanes(src, 16)
    return join(ls[:4] + [ls[4 + ((order >> (2 * i)) & 3)] for i in range(4)], 16)


def shift_left(a: int, count: int, width: int) -> int:
    """PSLLx: a count at or above the lane width clears every lane."""
    if count >= width:
        return 0
    return join([v << count for v in lanes(a, width)], width)


def shift_right(a: int, count: int, width: int) -> int:
    if count >= width:
        return 0
    return join([v >> count for v in lanes(a, width)], width)


def shift_right_arith(a: int, count: int, width: int) -> int:
    """PSRAx: counts above the width act as width-1 (every bit becomes the sign)."""
    count = min(count, width - 1)
    return join([_signed(v, width) >> count for v in lanes(a, width)], width)


def byte_shift_left(a: int, count: int) -> int:
    """PSLLDQ: whole-register shift by bytes; 16 or more clears it."""
    return (a << (8 * count)) & M128 if count < 16 else 0


def byte_shift_right(a: int, count: int) -> int:
    return a >> (8 * count) if count < 16 else 0


def pack_signed_saturate(a: int, b: int, width: int) -> int:
    """PACKSSWB (16→8) / PACKSSDW (32→16): signed saturation of a's lanes then b's."""
    half = width // 2
    lo, hi = -(1 << (half - 1)), (1 << (half - 1)) - 1
    vals = [max(lo, min(hi, _signed(v, width))) for v in lanes(a, width) + lanes(b, width)]
    return join(vals, half)


def pack_unsigned_saturate(a: int, b: int, width: int) -> int:
    """PACKUSWB: signed words saturated to unsigned bytes."""
    half = width // 2
    hi = (1 << half) - 1
    vals = [max(0, min(hi, _signed(v, width))) for v in lanes(a, width) + lanes(b, width)]
    return join(vals, half)


# --- scalar and packed floating point (SSE/SSE2 arithmetic; SDM vol. 1 §4.8 and §11.5, vol. 2 ADDSD etc.) ---
#
# Values are kept as raw IEEE bit patterns and converted to Python floats (binary64, computed with the host's own
# round-to-nearest-even arithmetic) only to operate. Single precision is computed in double and rounded once to
# single, which is exact for +, -, *, / and square root (binary64 has more than 2p+2 bits for p = 24). NaN
# results follow the SSE rules: a NaN source is returned quieted (the first source if both are NaNs), an
# invalid operation yields the default NaN (negative quiet NaN). MXCSR rounding control, DAZ/FTZ and the
# exception flags are not modelled: round-to-nearest, denormals honoured, no #XM.

F64_QNAN = 0xFFF8_0000_0000_0000
F32_QNAN = 0xFFC0_0000


def f64(bits: int) -> float:
    return float(_struct.unpack("<d", bits.to_bytes(8, "little"))[0])


def bits64(x: float) -> int:
    return int.from_bytes(_struct.pack("<d", x), "little")


def f32(bits: int) -> float:
    """A single-precision pattern as a double (exact; a signalling NaN is kept signalling via the payload)."""
    sign, exp, frac = bits >> 31, (bits >> 23) & 0xFF, bits & 0x7FFFFF
    if exp == 0xFF and frac:  # NaN: widen the payload ourselves, keeping it bit-exact
        return f64((sign << 63) | (0x7FF << 52) | (frac << 29))
    return float(_struct.unpack("<f", bits.to_bytes(4, "little"))[0])


def bits32(x: float) -> int:
    """Round a double to single precision (nearest-even), overflowing to infinity."""
    if x != x:
        b = bits64(x)
        return ((b >> 63) << 31) | (0xFF << 23) | ((b >> 29) & 0x7FFFFF) | 0x400000
    try:
        return int.from_bytes(_struct.pack("<f", x), "little")
    except OverflowError:
        return 0xFF800000 if x < 0 else 0x7F800000


def _is_nan64(b: int) -> bool:
    return (b >> 52) & 0x7FF == 0x7FF and bool(b & 0xF_FFFF_FFFF_FFFF)


def _is_nan32(b: int) -> bool:
    return (b >> 23) & 0xFF == 0xFF and bool(b & 0x7FFFFF)


def float_op(op: str, a: int, b: int, width: int) -> int:
    """One lane of ADD/SUB/MUL/DIV/MIN/MAX/SQRT (sqrt of b) on `width`-bit patterns."""
    is_nan, qbit, default = (_is_nan64, 1 << 51, F64_QNAN) if width == 64 else (_is_nan32, 1 << 22, F32_QNAN)
    to_f, to_b = (f64, bits64) if width == 64 else (f32, bits32)
    if op in ("min", "max"):
        x, y = to_f(a), to_f(b)
        return a if (x < y if op == "min" else x > y) else b  # NaN or equal (±0): the second operand
    if op == "sqrt":
        if is_nan(b):
            return b | qbit
        y = to_f(b)
        if y < 0:
            return default
        return to_b(_math.sqrt(y))
    if is_nan(a):
        return a | qbit
    if is_nan(b):
        return b | qbit
    x, y = to_f(a), to_f(b)
    if op == "add":
        r = x + y
    elif op == "sub":
        r = x - y
    elif op == "mul":
        r = x * y
    else:
        if y == 0.0:
            if x == 0.0:
                return default
            negative = (_math.copysign(1.0, x) < 0) != (_math.copysign(1.0, y) < 0)
            return to_b(-_math.inf if negative else _math.inf)
        r = x / y
    if r != r:
        return default  # inf - inf, 0 * inf: invalid
    return to_b(r)


def compare_float(a: int, b: int, width: int) -> tuple[bool, bool, bool]:
    """(unordered, less, equal) of two patterns, for COMIS*/UCOMIS* and CMP*."""
    to_f = f64 if width == 64 else f32
    x, y = to_f(a), to_f(b)
    if x != x or y != y:
        return True, False, False
    return False, x < y, x == y


def cmp_predicate(a: int, b: int, width: int, predicate: int) -> bool:
    """CMPPS/CMPSD predicates 0-7: EQ, LT, LE, UNORD, NEQ, NLT, NLE, ORD."""
    unordered, less, equal = compare_float(a, b, width)
    p = predicate & 7
    if p == 3:
        return unordered
    if p == 7:
        return not unordered
    result = (equal, less, less or equal)[p & 3]
    return (not result) if p >= 4 else result


def int_to_float(value: int, width: int) -> int:
    """CVTSI2SD/CVTSI2SS of a signed integer, rounded to nearest-even directly to the target precision."""
    if width == 64:
        return bits64(float(value))
    # round |value| to 24 significant bits first: int → double → float could round twice
    mag = abs(value)
    extra = mag.bit_length() - 24
    if extra > 0:
        half = 1 << (extra - 1)
        low = mag & ((1 << extra) - 1)
        mag >>= extra
        if low > half or (low == half and mag & 1):
            mag += 1
        mag <<= extra
    return bits32(float(-mag if value < 0 else mag))


def float_to_int(bits: int, width: int, int_bits: int, truncate: bool) -> int:
    """CVT(T)SD2SI/CVT(T)SS2SI: NaN or out of range gives the integer indefinite value (only the sign bit)."""
    x = (f64 if width == 64 else f32)(bits)
    indefinite = 1 << (int_bits - 1)
    if x != x or x in (_math.inf, -_math.inf):
        return indefinite
    n = int(x) if truncate else round(x)
    if not -indefinite <= n < indefinite:
        return indefinite
    return n & ((1 << int_bits) - 1)


def lanes_float(op: str, a: int, b: int, width: int, count: int) -> int:
    """`float_op` over the low `count` lanes (the packed forms use all 128 bits)."""
    mask = (1 << width) - 1
    out = 0
    for i in range(count):
        sh = i * width
        out |= float_op(op, (a >> sh) & mask, (b >> sh) & mask, width) << sh
    return out
