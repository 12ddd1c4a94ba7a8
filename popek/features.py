"""Which features a guest's CPUID offers: one place for both backends (Intel SDM vol. 2A, CPUID, tables 3-8 to 3-11;
AMD APM vol. 3 appendix E).

A processor raises #UD for an instruction whose CPUID feature flag is clear (each instruction's "Exceptions"
section: "#UD If CPUID.(EAX=..):...[bit n] = 0"), and #GP for a write of a CR4 or EFER bit whose feature it does
not have (vol. 3A §2.5, §2.2.1). popek's guests see the CPUID a template builds (`popek.cpuid`), which hides what a
host cannot run; `GuestFeatures` answers, from that same CPUID, whether a feature or an instruction (by the
feature flags iced-x86 lists for it) is offered, so the KVM backend's completions (`popek.accel.kvm_assist`) and
the software CPU refuse the same things.

Only features whose absence makes the instruction fault are listed: LZCNT and TZCNT without their flags execute
as BSR and BSF, PREFETCHW as a NOP on older processors, so those are not gated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import iced_x86

from popek.kvm import CpuidEntry

EAX, EBX, ECX, EDX = range(4)


@dataclass(frozen=True)
class Flag:
    """A CPUID feature bit: CPUID.(EAX=leaf, ECX=subleaf):register[bit]."""

    leaf: int
    subleaf: int
    register: int
    bit: int


FLAGS: dict[str, Flag] = {
    # leaf 1
    "sse3": Flag(1, 0, ECX, 0),
    "pclmulqdq": Flag(1, 0, ECX, 1),
    "monitor": Flag(1, 0, ECX, 3),
    "ssse3": Flag(1, 0, ECX, 9),
    "cx16": Flag(1, 0, ECX, 13),
    "pcid": Flag(1, 0, ECX, 17),
    "sse4_1": Flag(1, 0, ECX, 19),
    "sse4_2": Flag(1, 0, ECX, 20),
    "x2apic": Flag(1, 0, ECX, 21),
    "movbe": Flag(1, 0, ECX, 22),
    "popcnt": Flag(1, 0, ECX, 23),
    "tsc_deadline": Flag(1, 0, ECX, 24),
    "aes": Flag(1, 0, ECX, 25),
    "xsave": Flag(1, 0, ECX, 26),
    "avx": Flag(1, 0, ECX, 28),
    "rdrand": Flag(1, 0, ECX, 30),
    "vme": Flag(1, 0, EDX, 1),
    "de": Flag(1, 0, EDX, 2),
    "pse": Flag(1, 0, EDX, 3),
    "tsc": Flag(1, 0, EDX, 4),
    "msr": Flag(1, 0, EDX, 5),
    "pae": Flag(1, 0, EDX, 6),
    "mce": Flag(1, 0, EDX, 7),
    "cx8": Flag(1, 0, EDX, 8),
    "apic": Flag(1, 0, EDX, 9),
    "pge": Flag(1, 0, EDX, 13),
    "clflush": Flag(1, 0, EDX, 19),
    "fxsr": Flag(1, 0, EDX, 24),
    "sse": Flag(1, 0, EDX, 25),
    "sse2": Flag(1, 0, EDX, 26),
    # leaf 7, subleaf 0
    "fsgsbase": Flag(7, 0, EBX, 0),
    "tsc_adjust": Flag(7, 0, EBX, 1),
    "bmi1": Flag(7, 0, EBX, 3),
    "avx2": Flag(7, 0, EBX, 5),
    "smep": Flag(7, 0, EBX, 7),
    "bmi2": Flag(7, 0, EBX, 8),
    "invpcid": Flag(7, 0, EBX, 10),
    "rdseed": Flag(7, 0, EBX, 18),
    "adx": Flag(7, 0, EBX, 19),
    "smap": Flag(7, 0, EBX, 20),
    "clflushopt": Flag(7, 0, EBX, 23),
    "clwb": Flag(7, 0, EBX, 24),
    "sha": Flag(7, 0, EBX, 29),
    "umip": Flag(7, 0, ECX, 2),
    "pku": Flag(7, 0, ECX, 3),
    "la57": Flag(7, 0, ECX, 16),
    "rdpid": Flag(7, 0, ECX, 22),
    "pks": Flag(7, 0, ECX, 31),
    "serialize": Flag(7, 0, EDX, 14),
    "spec_ctrl": Flag(7, 0, EDX, 26),  # IA32_SPEC_CTRL (IBRS) and IA32_PRED_CMD (IBPB)
    "stibp": Flag(7, 0, EDX, 27),
    "flush_l1d": Flag(7, 0, EDX, 28),  # IA32_FLUSH_CMD
    "arch_capabilities": Flag(7, 0, EDX, 29),
    "ssbd": Flag(7, 0, EDX, 31),
    # extended leaves
    "lahf_lm": Flag(0x80000001, 0, ECX, 0),
    "sse4a": Flag(0x80000001, 0, ECX, 6),
    "monitorx": Flag(0x80000001, 0, ECX, 29),
    "syscall": Flag(0x80000001, 0, EDX, 11),
    "nx": Flag(0x80000001, 0, EDX, 20),
    "pdpe1gb": Flag(0x80000001, 0, EDX, 26),
    "rdtscp": Flag(0x80000001, 0, EDX, 27),
    "lm": Flag(0x80000001, 0, EDX, 29),
    "clzero": Flag(0x80000008, 0, EBX, 0),
    "rdpru": Flag(0x80000008, 0, EBX, 4),
    "wbnoinvd": Flag(0x80000008, 0, EBX, 9),
    "amd_ibpb": Flag(0x80000008, 0, EBX, 12),  # IA32_PRED_CMD on AMD
    "amd_ibrs": Flag(0x80000008, 0, EBX, 14),  # IA32_SPEC_CTRL on AMD
    "amd_stibp": Flag(0x80000008, 0, EBX, 15),
    "amd_ssbd": Flag(0x80000008, 0, EBX, 24),
}

_F = iced_x86.CpuidFeature
# iced-x86's feature of an instruction -> the flag that must be set for it not to #UD
INSTRUCTION_FLAGS: dict[int, str] = {
    _F.SSE3: "sse3",
    _F.PCLMULQDQ: "pclmulqdq",
    _F.MONITOR: "monitor",
    _F.SSSE3: "ssse3",
    _F.CMPXCHG16B: "cx16",
    _F.SSE4_1: "sse4_1",
    _F.SSE4_2: "sse4_2",
    _F.MOVBE: "movbe",
    _F.POPCNT: "popcnt",
    _F.AES: "aes",
    _F.AVX: "avx",
    _F.AVX2: "avx2",
    _F.RDRAND: "rdrand",
    _F.FSGSBASE: "fsgsbase",
    _F.BMI1: "bmi1",
    _F.BMI2: "bmi2",
    _F.INVPCID: "invpcid",
    _F.RDSEED: "rdseed",
    _F.ADX: "adx",
    _F.SMAP: "smap",
    _F.CLFLUSHOPT: "clflushopt",
    _F.CLWB: "clwb",
    _F.SHA: "sha",
    _F.PKU: "pku",
    _F.RDPID: "rdpid",
    _F.SERIALIZE: "serialize",
    _F.SSE4A: "sse4a",
    _F.MONITORX: "monitorx",
    _F.RDTSCP: "rdtscp",
    _F.CLZERO: "clzero",
    _F.RDPRU: "rdpru",
    _F.WBNOINVD: "wbnoinvd",
}
# executed as older instructions where their flag is clear (LZCNT as BSR, TZCNT as BSF): never #UD
_NOT_GATED = {iced_x86.Mnemonic.LZCNT, iced_x86.Mnemonic.TZCNT}

Lookup = Callable[[int, int], tuple[int, int, int, int]]


def lookup_from_entries(entries: Sequence[CpuidEntry]) -> Lookup:
    """CPUID as KVM_SET_CPUID2's entries answer it: a leaf without KVM_CPUID_FLAG_SIGNIFCANT_INDEX ignores ECX,
    a leaf that is not there reads as zeros."""
    table = {(e.function, e.index): (e.eax, e.ebx, e.ecx, e.edx) for e in entries}
    indexed = {e.function for e in entries if e.flags & 1}

    def lookup(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        return table.get((leaf, subleaf if leaf in indexed else 0), (0, 0, 0, 0))

    return lookup


class GuestFeatures:
    """The features one guest CPU's CPUID offers."""

    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup
        max_basic = lookup(0, 0)[0]
        max_extended = lookup(0x80000000, 0)[0]
        self._offered = {
            name
            for name, f in FLAGS.items()
            if (f.leaf <= max_basic if f.leaf < 0x80000000 else f.leaf <= max_extended)
            and lookup(f.leaf, f.subleaf)[f.register] >> f.bit & 1
        }

    @classmethod
    def from_entries(cls, entries: Sequence[CpuidEntry]) -> GuestFeatures:
        return cls(lookup_from_entries(entries))

    def has(self, name: str) -> bool:
        """Is feature `name` (a key of FLAGS) offered?"""
        if name not in FLAGS:
            raise KeyError(name)
        return name in self._offered

    def missing_for(self, instruction: iced_x86.Instruction) -> str | None:
        """The name of a feature `instruction` needs that this CPUID does not offer (it would #UD), or None."""
        if instruction.mnemonic in _NOT_GATED:
            return None
        for feature in instruction.cpuid_features():
            name = INSTRUCTION_FLAGS.get(feature)
            if name is not None and name not in self._offered:
                return name
        return None
