"""The portable CPUID template hides exactly the families the accelerator cannot execute, and keeps the rest
consistent: a hidden AVX takes its XSAVE state components (leaf 0xD) with it, so a guest never enables state it
cannot use, while XSAVE itself and the x87/SSE state stay."""

from __future__ import annotations

from popek.cpuid import ECX_AVX, ECX_FMA, ECX_XSAVE, L7_EBX_AVX2, L7_ECX_PKU_OSPKE, apply_template
from popek.kvm import CpuidEntry

SIGNIFICANT_INDEX = 1
# a host with AVX, AVX2, PKU and the x87/SSE/YMM/PKRU XSAVE components (sizes and offsets as on x86 hardware)
HOST = [
    CpuidEntry(1, 0, 0, 0x00A50F00, 0, ECX_XSAVE | ECX_AVX | ECX_FMA, 0),
    CpuidEntry(7, 0, SIGNIFICANT_INDEX, 0, L7_EBX_AVX2, L7_ECX_PKU_OSPKE, 0),
    CpuidEntry(0xD, 0, SIGNIFICANT_INDEX, 0x207, 0x340, 0x988, 0),
    CpuidEntry(0xD, 1, SIGNIFICANT_INDEX, 0xF, 0, 0, 0),
    CpuidEntry(0xD, 2, SIGNIFICANT_INDEX, 0x100, 0x240, 0, 0),  # YMM: 256 bytes at 576
    CpuidEntry(0xD, 9, SIGNIFICANT_INDEX, 0x8, 0x980, 0, 0),  # PKRU: 8 bytes at 2432
]


def leaf(entries: list[CpuidEntry], function: int, index: int = 0) -> CpuidEntry | None:
    return next((e for e in entries if e.function == function and e.index == index), None)


def test_hidden_avx_takes_its_state_components_and_keeps_xsave_and_pku() -> None:
    out = apply_template(HOST, "portable", frozenset({"avx"}))
    l1, l7, d0 = leaf(out, 1), leaf(out, 7), leaf(out, 0xD)
    assert l1 is not None and l7 is not None and d0 is not None
    assert not l1.ecx & (ECX_AVX | ECX_FMA) and l1.ecx & ECX_XSAVE
    assert not l7.ebx & L7_EBX_AVX2 and l7.ecx & L7_ECX_PKU_OSPKE
    assert d0.eax == 0x203  # x87, SSE, PKRU
    assert d0.ecx == 0x988  # PKRU still ends the largest area
    assert leaf(out, 0xD, 2) is None and leaf(out, 0xD, 9) is not None


def test_hidden_avx_without_other_components_leaves_the_legacy_area_and_header() -> None:
    host = [e for e in HOST if not (e.function == 0xD and e.index == 9)]
    d0 = leaf(apply_template(host, "portable", frozenset({"avx"})), 0xD)
    assert d0 is not None and d0.ecx == 512 + 64


def test_nothing_hidden_where_everything_runs_and_the_host_template_is_the_host() -> None:
    assert leaf(apply_template(HOST, "portable", frozenset()), 0xD) == HOST[2]
    assert apply_template(HOST, "host", frozenset({"avx", "xsave"})) == HOST


def test_the_soft_template_offers_only_what_the_software_cpu_implements() -> None:
    from popek.accel.portable import cpuid_problems
    from popek.cpuid import KVM_FEATURES_LEAF

    supported = [
        CpuidEntry(1, 0, 0, 0x00A50F00, 0, 0xFFFFFFFF, 0xFFFFFFFF),
        CpuidEntry(7, 0, SIGNIFICANT_INDEX, 0, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
        CpuidEntry(0xD, 0, SIGNIFICANT_INDEX, 0x207, 0x340, 0x988, 0),
        CpuidEntry(0x80000001, 0, 0, 0, 0, 0xFFFFFFFF, 0xFFFFFFFF),
        CpuidEntry(KVM_FEATURES_LEAF, 0, 0, 0x1FFFFFF, 0, 0, 0),
    ]
    entries = apply_template(supported, "soft")
    assert not [e for e in entries if e.function == 0xD]
    leaf1 = next(e for e in entries if e.function == 1)
    assert not leaf1.ecx & (ECX_XSAVE | ECX_AVX | ECX_FMA)
    rows = [[e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] for e in entries]
    assert cpuid_problems([rows], "to_soft") == []
    assert cpuid_problems([[[e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] for e in supported]], "to_soft")
