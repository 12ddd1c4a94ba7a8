"""popek's semantics of the instructions KVM assists complete, against the host CPU executing them natively."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popek.cpu import bitops

from . import native

pytestmark = pytest.mark.skipif(not native.available(), reason="needs nasm to assemble the native oracle")

FLAG_BITS = {"cf": 0, "pf": 2, "af": 4, "zf": 6, "sf": 7, "of": 11}
u64 = st.integers(0, 2**64 - 1)
interesting = st.one_of(u64, st.sampled_from([0, 1, 2**63, 2**64 - 1, 2**32 - 1, 2**32, 0x80000000]))


def host_has(flag: str) -> bool:
    return flag in open("/proc/cpuinfo").read().split()


def check_flags(defined: bitops.Flags, rflags: int) -> None:
    for name, value in defined.items():
        assert (rflags >> FLAG_BITS[name]) & 1 == value, name


UNARY: list[tuple[str, str, Callable[[int, int], tuple[int, bitops.Flags]], str]] = [
    ("popcnt rax, rbx", "popcnt", bitops.popcnt, "popcnt"),
    ("lzcnt rax, rbx", "lzcnt", bitops.lzcnt, "abm"),
    ("tzcnt rax, rbx", "tzcnt", bitops.tzcnt, "bmi1"),
    ("blsr rax, rbx", "blsr", bitops.blsr, "bmi1"),
    ("blsi rax, rbx", "blsi", bitops.blsi, "bmi1"),
    ("blsmsk rax, rbx", "blsmsk", bitops.blsmsk, "bmi1"),
]


@pytest.mark.parametrize("asm,name,fn,feature", UNARY, ids=[u[1] for u in UNARY])
@pytest.mark.parametrize("bits", [64, 32, 16])
@settings(max_examples=60, deadline=None)
@given(value=interesting)
def test_unary_bit_instructions_match_the_cpu(
    asm: str, name: str, fn: Callable[[int, int], tuple[int, bitops.Flags]], feature: str, bits: int, value: int
) -> None:
    if not host_has(feature) or (bits == 16 and name.startswith("bls")):
        pytest.skip(f"host has no {feature} (or no 16-bit form)")
    reg = {64: ("rax", "rbx"), 32: ("eax", "ebx"), 16: ("ax", "bx")}[bits]
    run = _compiled(asm.replace("rax", reg[0]).replace("rbx", reg[1]))
    rax, _rbx, rflags = run(0, value)
    result, flags = fn(value, bits)
    assert rax & ((1 << bits) - 1) == result
    check_flags(flags, rflags)


_cache: dict[str, native.Native] = {}


def _compiled(asm: str) -> native.Native:
    if asm not in _cache:
        _cache[asm] = native.Native(asm)
    return _cache[asm]


@settings(max_examples=100, deadline=None)
@given(a=interesting, b=interesting)
def test_andn_bzhi_bextr_pdep_pext_match_the_cpu(a: int, b: int) -> None:
    if not host_has("bmi2"):
        pytest.skip("host has no BMI2")
    rax, _, rflags = _compiled("andn rax, rax, rbx")(a, b)
    result, flags = bitops.andn(a, b, 64)
    assert rax == result
    check_flags(flags, rflags)
    rax, _, rflags = _compiled("bzhi rax, rax, rbx")(a, b)
    result, flags = bitops.bzhi(a, b, 64)
    assert rax == result
    check_flags(flags, rflags)
    rax, _, rflags = _compiled("bextr rax, rax, rbx")(a, b)
    result, flags = bitops.bextr(a, b, 64)
    assert rax == result
    # BEXTR defines ZF and clears CF/OF; SF, AF and PF are undefined (SDM vol. 2A) and differ between vendors
    check_flags({k: v for k, v in flags.items() if k not in ("sf", "af", "pf")}, rflags)
    assert _compiled("pdep rax, rax, rbx")(a, b)[0] == bitops.pdep(a, b, 64)
    assert _compiled("pext rax, rax, rbx")(a, b)[0] == bitops.pext(a, b, 64)
    assert _compiled("shlx rax, rax, rbx")(a, b)[0] == bitops.shlx(a, b, 64)
    assert _compiled("shrx rax, rax, rbx")(a, b)[0] == bitops.shrx(a, b, 64)
    assert _compiled("sarx rax, rax, rbx")(a, b)[0] == bitops.sarx(a, b, 64)
    assert _compiled("rorx rax, rax, 13")(a)[0] == bitops.rorx(a, 13, 64)


@settings(max_examples=100, deadline=None)
@given(a=interesting, b=interesting, carry=st.integers(0, 1))
def test_adcx_adox_and_movbe_match_the_cpu(a: int, b: int, carry: int) -> None:
    if not host_has("adx"):
        pytest.skip("host has no ADX")
    setc = "stc" if carry else "clc"
    rax, _, rflags = _compiled(f"{setc}\nadcx rax, rbx")(a, b)
    result, cf = bitops.add_with_carry(a, b, carry, 64)
    assert (rax, rflags & 1) == (result, cf)
    seto = "mov rcx, 0x7fffffffffffffff\nadd rcx, 1" if carry else "xor ecx, ecx"
    rax, _, rflags = _compiled(f"{seto}\nadox rax, rbx")(a, b)
    result, of = bitops.add_with_carry(a, b, carry, 64)
    assert (rax, (rflags >> 11) & 1) == (result, of)


def test_bswap_and_random_value() -> None:
    assert bitops.bswap(0x1122334455667788, 64) == 0x8877665544332211
    assert bitops.bswap(0x11223344, 32) == 0x44332211
    value, flags = bitops.random_value(64)
    assert flags["cf"] == 1 and 0 <= value < 2**64
