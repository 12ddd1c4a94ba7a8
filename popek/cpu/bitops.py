"""Semantics of the bit-manipulation instructions (Intel SDM vol. 2): bit counting (POPCNT, LZCNT, TZCNT),
BMI1/BMI2, MOVBE, ADCX/ADOX and RDRAND/RDSEED. The interpreter runs them for the software backend and, where the
host's KVM cannot, for the KVM backend too (`popek.accel.kvm_softcpu`).

Each function takes operand values and the operand size in bits and returns the result and the flags it
defines, as a dict of flag name → bit; flags the SDM leaves undefined are left out, so callers keep their old
values. The interpreter knows registers and memory; this module knows neither.
"""

from __future__ import annotations

import os

Flags = dict[str, int]
ARITH_FLAGS = ("cf", "pf", "af", "zf", "sf", "of")


def _mask(bits: int) -> int:
    return (1 << bits) - 1


def _sign(value: int, bits: int) -> int:
    return (value >> (bits - 1)) & 1


def popcnt(src: int, bits: int) -> tuple[int, Flags]:
    count = bin(src & _mask(bits)).count("1")
    return count, {"cf": 0, "pf": 0, "af": 0, "zf": int(src & _mask(bits) == 0), "sf": 0, "of": 0}


def lzcnt(src: int, bits: int) -> tuple[int, Flags]:
    src &= _mask(bits)
    count = bits - src.bit_length()
    return count, {"cf": int(src == 0), "zf": int(count == 0)}


def tzcnt(src: int, bits: int) -> tuple[int, Flags]:
    src &= _mask(bits)
    count = bits if src == 0 else (src & -src).bit_length() - 1
    return count, {"cf": int(src == 0), "zf": int(count == 0)}


def bsf(src: int, dst: int, bits: int) -> tuple[int, Flags]:
    src &= _mask(bits)
    if src == 0:
        return dst, {"zf": 1}
    return (src & -src).bit_length() - 1, {"zf": 0}


def bsr(src: int, dst: int, bits: int) -> tuple[int, Flags]:
    src &= _mask(bits)
    if src == 0:
        return dst, {"zf": 1}
    return src.bit_length() - 1, {"zf": 0}


def _logic_flags(result: int, bits: int, cf: int = 0) -> Flags:
    return {"zf": int(result == 0), "sf": _sign(result, bits), "of": 0, "cf": cf}


def andn(src1: int, src2: int, bits: int) -> tuple[int, Flags]:
    result = ~src1 & src2 & _mask(bits)
    return result, _logic_flags(result, bits)


def blsr(src: int, bits: int) -> tuple[int, Flags]:
    src &= _mask(bits)
    result = src & (src - 1) & _mask(bits)
    return result, _logic_flags(result, bits, int(src == 0))


def blsi(src: int, bits: int) -> tuple[int, Flags]:
    src &= _mask(bits)
    result = src & -src & _mask(bits)
    return result, _logic_flags(result, bits, int(src != 0))


def blsmsk(src: int, bits: int) -> tuple[int, Flags]:
    src &= _mask(bits)
    result = (src ^ (src - 1)) & _mask(bits)
    flags = _logic_flags(result, bits, int(src == 0))
    flags["zf"] = 0
    return result, flags


def bzhi(src: int, index: int, bits: int) -> tuple[int, Flags]:
    n = index & 0xFF
    result = src & _mask(bits)
    if n < bits:
        result &= _mask(n)
    return result, _logic_flags(result, bits, int(n > bits - 1))


def bextr(src: int, control: int, bits: int) -> tuple[int, Flags]:
    start, length = control & 0xFF, (control >> 8) & 0xFF
    result = ((src & _mask(bits)) >> start) & _mask(length) if start < bits else 0
    return result, _logic_flags(result, bits)


def shlx(src: int, count: int, bits: int) -> int:
    return (src << (count & (bits - 1))) & _mask(bits)


def shrx(src: int, count: int, bits: int) -> int:
    return (src & _mask(bits)) >> (count & (bits - 1))


def sarx(src: int, count: int, bits: int) -> int:
    src &= _mask(bits)
    signed = src - (1 << bits) if _sign(src, bits) else src
    return (signed >> (count & (bits - 1))) & _mask(bits)


def rorx(src: int, count: int, bits: int) -> int:
    count &= bits - 1
    src &= _mask(bits)
    return ((src >> count) | (src << (bits - count))) & _mask(bits)


def pdep(src: int, mask: int, bits: int) -> int:
    result, k = 0, 0
    for i in range(bits):
        if mask >> i & 1:
            result |= ((src >> k) & 1) << i
            k += 1
    return result


def pext(src: int, mask: int, bits: int) -> int:
    result, k = 0, 0
    for i in range(bits):
        if mask >> i & 1:
            result |= ((src >> i) & 1) << k
            k += 1
    return result


def bswap(value: int, bits: int) -> int:
    return int.from_bytes((value & _mask(bits)).to_bytes(bits // 8, "little"), "big")


def add_with_carry(a: int, b: int, carry: int, bits: int) -> tuple[int, int]:
    total = (a & _mask(bits)) + (b & _mask(bits)) + carry
    return total & _mask(bits), total >> bits


def random_value(bits: int) -> tuple[int, Flags]:
    """RDRAND/RDSEED: a value from the host's entropy source; CF=1 says it is valid."""
    return int.from_bytes(os.urandom(bits // 8), "little"), {"cf": 1, "pf": 0, "af": 0, "zf": 0, "sf": 0, "of": 0}
