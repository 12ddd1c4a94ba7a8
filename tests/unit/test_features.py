"""popek.features: what a CPUID offers, and so which CR4 and EFER bits a guest may set (SDM vol. 3A §2.5, §2.2.1),
for a software CPU's CPUID function and for the entries a KVM guest is given."""

from __future__ import annotations

import iced_x86
import pytest
from hypothesis import given
from hypothesis import strategies as st

from popek.cpu.interp import default_cpuid
from popek.cpu.state import CR4_OSXSAVE, CR4_PAE, CR4_PCE, CR4_PKE, CR4_SMEP, EFER_LME, EFER_NXE
from popek.features import FEATURES, INSTRUCTION_FEATURES, Features, cpuid_function
from popek.kvm import CpuidEntry


def cpuid_with(**bits: bool) -> Features:
    """A CPUID whose feature leaves hold exactly the named features."""
    regs: dict[tuple[int, int], list[int]] = {}
    for name, on in bits.items():
        b = FEATURES[name]
        r = regs.setdefault((b.leaf, b.subleaf), [0, 0, 0, 0])
        r[b.reg] |= int(on) << b.bit

    def fn(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        if leaf == 0:
            return (7, 0, 0, 0)
        if leaf == 0x80000000:
            return (0x80000021, 0, 0, 0)
        r = regs.get((leaf, subleaf), [0, 0, 0, 0])
        return (r[0], r[1], r[2], r[3])

    return Features.from_cpuid(fn)


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_each_feature_is_read_from_its_own_bit(name: str) -> None:
    assert cpuid_with(**{name: True}).has(name)
    others = [n for n in FEATURES if FEATURES[n] != FEATURES[name]]
    assert not any(cpuid_with(**{name: True}).has(n) for n in others)


def test_cr4_bits_of_absent_features_are_not_allowed() -> None:
    f = cpuid_with(pae=True, smep=True)
    allowed = f.cr4_allowed()
    assert allowed & CR4_PAE and allowed & CR4_SMEP and allowed & CR4_PCE  # PCE needs no feature
    assert not allowed & CR4_OSXSAVE and not allowed & CR4_PKE
    assert not allowed & 1 << 15 and not allowed & 1 << 63  # architecturally reserved


def test_efer_bits_follow_the_extended_leaf() -> None:
    assert cpuid_with(lm=True).efer_allowed() & EFER_LME
    assert not cpuid_with(lm=True).efer_allowed() & EFER_NXE
    assert cpuid_with(nx=True).efer_allowed() & EFER_NXE


def test_leaves_past_the_maximum_read_as_zero() -> None:
    def fn(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        if leaf in (0, 0x80000000):
            return (leaf | 1, 0, 0, 0) if leaf == 0 else (leaf, 0, 0, 0)  # no extended feature leaf
        return (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)

    f = Features.from_cpuid(fn)
    assert f.has("pae") and not f.has("smep") and not f.has("nx")


def test_kvm_cpuid_entries_answer_like_the_cpu_function() -> None:
    entries = [
        CpuidEntry(0, 0, 0, 7, 0, 0, 0),
        CpuidEntry(1, 0, 0, 0, 0, 1 << 26, 0),
        CpuidEntry(7, 0, 1, 0, 1 << 7, 0, 0),
        CpuidEntry(7, 1, 1, 0, 0, 0, 0),
    ]
    f = Features.from_cpuid(cpuid_function(entries))
    assert f.has("xsave") and f.has("smep") and not f.has("pku")


def test_the_software_cpu_offers_the_cr4_bits_its_kernels_need() -> None:
    f = Features.from_cpuid(default_cpuid)
    assert f.cr4_allowed() & CR4_PAE and f.cr4_allowed() & CR4_SMEP
    assert f.efer_allowed() & EFER_LME and f.efer_allowed() & EFER_NXE


# --- instructions: a clear feature flag is #UD ---

RDPRU = bytes.fromhex("0f01fd")
LZCNT = bytes.fromhex("f3480fbdc1")  # lzcnt rax, rcx
POPCNT = bytes.fromhex("f3480fb8c1")  # popcnt rax, rcx
ADD = bytes.fromhex("4801c8")  # add rax, rcx


def _insn(code: bytes) -> iced_x86.Instruction:
    return iced_x86.Decoder(64, code).decode()


def _kvm_cpu(ext_8_ebx: int = 0, leaf1_ecx: int = 0, max_extended: int = 0x80000008) -> Features:
    return Features.from_cpuid(
        cpuid_function(
            [
                CpuidEntry(0, 0, 0, 0xD, 0, 0, 0),
                CpuidEntry(1, 0, 0, 0, 0, leaf1_ecx, 0),
                CpuidEntry(0x80000000, 0, 0, max_extended, 0, 0, 0),
                CpuidEntry(0x80000008, 0, 0, 0, ext_8_ebx, 0, 0),
            ]
        )
    )


def test_rdpru_is_refused_where_cpuid_clears_its_flag_and_allowed_where_it_sets_it() -> None:
    assert _kvm_cpu(ext_8_ebx=0).missing_for(_insn(RDPRU)) == "rdpru"
    assert _kvm_cpu(ext_8_ebx=1 << 4).missing_for(_insn(RDPRU)) is None


def test_an_instruction_whose_leaf_is_past_the_highest_extended_leaf_is_refused() -> None:
    cpu = _kvm_cpu(ext_8_ebx=1 << 4, max_extended=0x80000001)
    assert not cpu.has("rdpru")
    assert cpu.missing_for(_insn(RDPRU)) == "rdpru"


def test_lzcnt_is_never_refused_since_without_its_flag_it_executes_as_bsr() -> None:
    assert _kvm_cpu().missing_for(_insn(LZCNT)) is None


@given(ecx=st.integers(0, 2**32 - 1))
def test_popcnt_follows_leaf_1_ecx_bit_23_and_base_instructions_need_nothing(ecx: int) -> None:
    cpu = _kvm_cpu(leaf1_ecx=ecx)
    assert cpu.has("popcnt") == bool(ecx >> 23 & 1)
    assert (cpu.missing_for(_insn(POPCNT)) is None) == bool(ecx >> 23 & 1)
    assert cpu.missing_for(_insn(ADD)) is None


def test_every_instruction_feature_names_a_known_flag() -> None:
    assert set(INSTRUCTION_FEATURES.values()) <= set(FEATURES)


def test_speculation_control_msrs_are_absent_without_any_of_their_flags() -> None:
    assert sorted(cpuid_with(pae=True).absent_msrs()) == [0x48, 0x49, 0x10B]
    assert cpuid_with(amd_ibpb=True).absent_msrs() == [0x48, 0x10B]  # IBPB alone: IA32_PRED_CMD only
    assert cpuid_with(spec_ctrl=True, flush_l1d=True).absent_msrs() == []
