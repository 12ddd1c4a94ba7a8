"""`popek.features`: which features and instructions a guest's CPUID offers (SDM vol. 2A CPUID; an instruction
whose feature flag is clear raises #UD)."""

from __future__ import annotations

import iced_x86
from hypothesis import given
from hypothesis import strategies as st

from popek.features import FLAGS, GuestFeatures
from popek.kvm import CpuidEntry

RDPRU = bytes.fromhex("0f01fd")
LZCNT = bytes.fromhex("f3480fbdc1")  # lzcnt rax, rcx
POPCNT = bytes.fromhex("f3480fb8c1")  # popcnt rax, rcx
ADD = bytes.fromhex("4801c8")  # add rax, rcx


def _insn(code: bytes) -> iced_x86.Instruction:
    return iced_x86.Decoder(64, code).decode()


def _cpu(ext_8_ebx: int = 0, leaf1_ecx: int = 0, max_extended: int = 0x80000008) -> GuestFeatures:
    return GuestFeatures.from_entries(
        [
            CpuidEntry(0, 0, 0, 0xD, 0, 0, 0),
            CpuidEntry(1, 0, 0, 0, 0, leaf1_ecx, 0),
            CpuidEntry(0x80000000, 0, 0, max_extended, 0, 0, 0),
            CpuidEntry(0x80000008, 0, 0, 0, ext_8_ebx, 0, 0),
        ]
    )


def test_rdpru_is_refused_where_cpuid_clears_its_flag_and_allowed_where_it_sets_it() -> None:
    assert _cpu(ext_8_ebx=0).missing_for(_insn(RDPRU)) == "rdpru"
    assert _cpu(ext_8_ebx=1 << 4).missing_for(_insn(RDPRU)) is None


def test_a_leaf_past_the_highest_extended_leaf_offers_nothing() -> None:
    cpu = _cpu(ext_8_ebx=1 << 4, max_extended=0x80000001)
    assert not cpu.has("rdpru")
    assert cpu.missing_for(_insn(RDPRU)) == "rdpru"


def test_lzcnt_is_never_refused_since_without_its_flag_it_executes_as_bsr() -> None:
    assert _cpu().missing_for(_insn(LZCNT)) is None


@given(ecx=st.integers(0, 2**32 - 1))
def test_popcnt_follows_leaf_1_ecx_bit_23_and_base_instructions_need_nothing(ecx: int) -> None:
    cpu = _cpu(leaf1_ecx=ecx)
    assert cpu.has("popcnt") == bool(ecx >> 23 & 1)
    assert (cpu.missing_for(_insn(POPCNT)) is None) == bool(ecx >> 23 & 1)
    assert cpu.missing_for(_insn(ADD)) is None


def test_every_flag_is_read_from_its_own_bit() -> None:
    for name, flag in FLAGS.items():
        regs = [0, 0, 0, 0]
        regs[flag.register] = 1 << flag.bit
        entries = [
            CpuidEntry(0, 0, 0, 0x20, 0, 0, 0),
            CpuidEntry(0x80000000, 0, 0, 0x80000008, 0, 0, 0),
            CpuidEntry(flag.leaf, flag.subleaf, 1, *regs),
        ]
        offered = {n for n in FLAGS if GuestFeatures.from_entries(entries).has(n)}
        same_bit = {n for n, f in FLAGS.items() if f == flag}
        assert offered == same_bit, name
