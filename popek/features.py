"""Which architectural features a guest's CPUID offers, asked in one place by both backends.

A processor enumerates its features in CPUID (Intel SDM vol. 2A, CPUID, tables 3-8 to 3-11; AMD APM vol. 3
appendix E), and control bits that enable a feature the processor lacks are reserved: MOV to CR4 with such a bit
set raises #GP(0) (SDM vol. 3A §2.5, the CR4 bit descriptions; §2.6.2.1 for XCR0), as does WRMSR of IA32_EFER
with a bit of an absent feature (SDM vol. 3A §2.2.1, AMD APM vol. 2 §3.1.7). A guest is entitled to the CPUID it
is shown, so which CR4/EFER bits it may set follows from that CPUID, not from what the host or popek's software
CPU could do otherwise.

`Features.from_cpuid(cpuid)` reads the leaves once from any CPUID function (the software CPU's, or the entries a
KVM guest is given, through `cpuid_function`), and answers `has(name)`, `cr4_allowed()` and `efer_allowed()`.

An instruction whose feature flag is clear raises #UD (each instruction's "Exceptions" section: "#UD If
CPUID.(EAX=..):...[bit n] = 0"): `missing_for(instruction)` names the flag an instruction lacks, by the features
iced-x86 lists for it (`INSTRUCTION_FEATURES`). Only features whose absence makes the instruction fault are
listed: LZCNT and TZCNT without their flags execute as BSR and BSF, PREFETCHW as a NOP on older processors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import iced_x86

if TYPE_CHECKING:
    from popek.kvm import CpuidEntry

CpuidFunction = Callable[[int, int], tuple[int, int, int, int]]

EAX, EBX, ECX, EDX = range(4)


class Bit(NamedTuple):
    """Where CPUID reports a feature: leaf, sub-leaf, register (EAX..EDX as 0..3) and bit."""

    leaf: int
    subleaf: int
    reg: int
    bit: int


FEATURES: dict[str, Bit] = {
    "vme": Bit(1, 0, EDX, 1),
    "de": Bit(1, 0, EDX, 2),
    "pse": Bit(1, 0, EDX, 3),
    "tsc": Bit(1, 0, EDX, 4),
    "pae": Bit(1, 0, EDX, 6),
    "mce": Bit(1, 0, EDX, 7),
    "apic": Bit(1, 0, EDX, 9),
    "pge": Bit(1, 0, EDX, 13),
    "mmx": Bit(1, 0, EDX, 23),
    "fxsr": Bit(1, 0, EDX, 24),
    "sse": Bit(1, 0, EDX, 25),
    "vmx": Bit(1, 0, ECX, 5),
    "smx": Bit(1, 0, ECX, 6),
    "pcid": Bit(1, 0, ECX, 17),
    "x2apic": Bit(1, 0, ECX, 21),
    "tsc_deadline": Bit(1, 0, ECX, 24),
    "xsave": Bit(1, 0, ECX, 26),
    "fsgsbase": Bit(7, 0, EBX, 0),
    "tsc_adjust": Bit(7, 0, EBX, 1),
    "smep": Bit(7, 0, EBX, 7),
    "smap": Bit(7, 0, EBX, 20),
    "umip": Bit(7, 0, ECX, 2),
    "pku": Bit(7, 0, ECX, 3),
    "cet_ss": Bit(7, 0, ECX, 7),
    "la57": Bit(7, 0, ECX, 16),
    "pks": Bit(7, 0, ECX, 31),
    "cet_ibt": Bit(7, 0, EDX, 20),
    "fred": Bit(7, 1, EAX, 17),
    "lam": Bit(7, 1, EAX, 26),
    "svm": Bit(0x80000001, 0, ECX, 2),
    "syscall": Bit(0x80000001, 0, EDX, 11),
    "nx": Bit(0x80000001, 0, EDX, 20),
    "ffxsr": Bit(0x80000001, 0, EDX, 25),
    "lm": Bit(0x80000001, 0, EDX, 29),
    # instruction families (see INSTRUCTION_FEATURES) and MSRs
    "sse3": Bit(1, 0, ECX, 0),
    "pclmulqdq": Bit(1, 0, ECX, 1),
    "monitor": Bit(1, 0, ECX, 3),
    "ssse3": Bit(1, 0, ECX, 9),
    "cx16": Bit(1, 0, ECX, 13),
    "sse4_1": Bit(1, 0, ECX, 19),
    "sse4_2": Bit(1, 0, ECX, 20),
    "movbe": Bit(1, 0, ECX, 22),
    "popcnt": Bit(1, 0, ECX, 23),
    "aes": Bit(1, 0, ECX, 25),
    "avx": Bit(1, 0, ECX, 28),
    "rdrand": Bit(1, 0, ECX, 30),
    "msr": Bit(1, 0, EDX, 5),
    "cx8": Bit(1, 0, EDX, 8),
    "clflush": Bit(1, 0, EDX, 19),
    "sse2": Bit(1, 0, EDX, 26),
    "bmi1": Bit(7, 0, EBX, 3),
    "avx2": Bit(7, 0, EBX, 5),
    "bmi2": Bit(7, 0, EBX, 8),
    "invpcid": Bit(7, 0, EBX, 10),
    "rdseed": Bit(7, 0, EBX, 18),
    "adx": Bit(7, 0, EBX, 19),
    "clflushopt": Bit(7, 0, EBX, 23),
    "clwb": Bit(7, 0, EBX, 24),
    "sha": Bit(7, 0, EBX, 29),
    "rdpid": Bit(7, 0, ECX, 22),
    "serialize": Bit(7, 0, EDX, 14),
    "spec_ctrl": Bit(7, 0, EDX, 26),  # IA32_SPEC_CTRL (IBRS) and IA32_PRED_CMD (IBPB), Intel's enumeration
    "stibp": Bit(7, 0, EDX, 27),
    "flush_l1d": Bit(7, 0, EDX, 28),  # IA32_FLUSH_CMD
    "arch_capabilities": Bit(7, 0, EDX, 29),
    "ssbd": Bit(7, 0, EDX, 31),
    "lahf_lm": Bit(0x80000001, 0, ECX, 0),
    "sse4a": Bit(0x80000001, 0, ECX, 6),
    "monitorx": Bit(0x80000001, 0, ECX, 29),
    "pdpe1gb": Bit(0x80000001, 0, EDX, 26),
    "rdtscp": Bit(0x80000001, 0, EDX, 27),
    "clzero": Bit(0x80000008, 0, EBX, 0),
    "rdpru": Bit(0x80000008, 0, EBX, 4),
    "wbnoinvd": Bit(0x80000008, 0, EBX, 9),
    "amd_ibpb": Bit(0x80000008, 0, EBX, 12),  # IA32_PRED_CMD, AMD's enumeration
    "amd_ibrs": Bit(0x80000008, 0, EBX, 14),  # IA32_SPEC_CTRL, AMD's enumeration
    "amd_stibp": Bit(0x80000008, 0, EBX, 15),
    "amd_ssbd": Bit(0x80000008, 0, EBX, 24),
    "sbpb": Bit(0x80000021, 0, EAX, 27),  # IA32_PRED_CMD's SBPB command, AMD
}

# MSRs that exist only with one of their features (Intel SDM vol. 4 table 2-2; AMD APM vol. 2 appendix A): without
# any of them RDMSR and WRMSR of the MSR raise #GP(0)
MSR_FEATURES: dict[int, tuple[str, ...]] = {
    0x48: ("spec_ctrl", "stibp", "ssbd", "amd_ibrs", "amd_stibp", "amd_ssbd"),  # IA32_SPEC_CTRL
    0x49: ("spec_ctrl", "amd_ibpb", "sbpb"),  # IA32_PRED_CMD
    0x10B: ("flush_l1d",),  # IA32_FLUSH_CMD
}

_F = iced_x86.CpuidFeature
# iced-x86's feature of an instruction -> the FEATURES name that must be set for it not to #UD
INSTRUCTION_FEATURES: dict[int, str] = {
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
_NOT_GATED = frozenset({iced_x86.Mnemonic.LZCNT, iced_x86.Mnemonic.TZCNT})

# CR4 bits (SDM vol. 3A §2.5) and the feature each needs; PCE (bit 8) needs none. Bits not listed are reserved.
CR4_FEATURES: dict[int, tuple[str, ...]] = {
    0: ("vme",),  # VME
    1: ("vme",),  # PVI
    2: ("tsc",),  # TSD
    3: ("de",),  # DE
    4: ("pse",),  # PSE
    5: ("pae",),  # PAE
    6: ("mce",),  # MCE
    7: ("pge",),  # PGE
    8: (),  # PCE
    9: ("fxsr",),  # OSFXSR
    10: ("sse",),  # OSXMMEXCPT
    11: ("umip",),  # UMIP
    12: ("la57",),  # LA57
    13: ("vmx",),  # VMXE
    14: ("smx",),  # SMXE
    16: ("fsgsbase",),  # FSGSBASE
    17: ("pcid",),  # PCIDE
    18: ("xsave",),  # OSXSAVE
    20: ("smep",),  # SMEP
    21: ("smap",),  # SMAP
    22: ("pku",),  # PKE
    23: ("cet_ss", "cet_ibt"),  # CET: either shadow stacks or indirect-branch tracking
    24: ("pks",),  # PKS
    28: ("lam",),  # LAM_SUP
    32: ("fred",),  # FRED
}

# IA32_EFER bits (SDM vol. 3A §2.2.1; AMD APM vol. 2 §3.1.7) and their features; LMA is set by the processor
EFER_FEATURES: dict[int, tuple[str, ...]] = {
    0: ("syscall",),  # SCE
    8: ("lm",),  # LME
    10: ("lm",),  # LMA
    11: ("nx",),  # NXE
    12: ("svm",),  # SVME
    14: ("ffxsr",),  # FFXSR
}

_LEAVES = sorted({(b.leaf, b.subleaf) for b in FEATURES.values()})


def cpuid_function(entries: Iterable[CpuidEntry]) -> CpuidFunction:
    """A CPUID function over a list of KVM CPUID entries (what a KVM guest is given): a leaf without the
    significant-index flag answers every sub-leaf; an absent leaf reads as zeros."""
    indexed = {(e.function, e.index): (e.eax, e.ebx, e.ecx, e.edx) for e in entries if e.flags & 1}
    plain = {e.function: (e.eax, e.ebx, e.ecx, e.edx) for e in entries if not e.flags & 1}

    def cpuid(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        return indexed.get((leaf, subleaf)) or plain.get(leaf) or (0, 0, 0, 0)

    return cpuid


@dataclass(frozen=True)
class Features:
    """The feature leaves of one CPUID, read once (leaves past the maximum leaf of their range read as 0)."""

    leaves: dict[tuple[int, int], tuple[int, int, int, int]]

    @classmethod
    def from_cpuid(cls, cpuid: CpuidFunction) -> Features:
        max_basic = cpuid(0, 0)[0]
        max_ext = cpuid(0x80000000, 0)[0]
        leaves = {}
        for leaf, subleaf in _LEAVES:
            top = max_ext if leaf >= 0x80000000 else max_basic
            leaves[(leaf, subleaf)] = cpuid(leaf, subleaf) if leaf <= top else (0, 0, 0, 0)
        return cls(leaves)

    def has(self, name: str) -> bool:
        b = FEATURES[name]
        return bool(self.leaves[(b.leaf, b.subleaf)][b.reg] >> b.bit & 1)

    def absent_msrs(self) -> list[int]:
        """The MSRs of MSR_FEATURES this CPUID does not offer: a guest's access to them is #GP(0)."""
        return [msr for msr, needs in MSR_FEATURES.items() if not any(self.has(n) for n in needs)]

    def missing_for(self, instruction: iced_x86.Instruction) -> str | None:
        """The feature `instruction` needs that this CPUID does not offer (so it raises #UD), or None."""
        if instruction.mnemonic in _NOT_GATED:
            return None
        for feature in instruction.cpuid_features():
            name = INSTRUCTION_FEATURES.get(feature)
            if name is not None and not self.has(name):
                return name
        return None

    def _allowed(self, table: dict[int, tuple[str, ...]]) -> int:
        mask = 0
        for bit, needs in table.items():
            if not needs or any(self.has(n) for n in needs):
                mask |= 1 << bit
        return mask

    def cr4_allowed(self) -> int:
        """The CR4 bits this CPUID lets software set; any other bit set by MOV to CR4 is #GP(0)."""
        return self._allowed(CR4_FEATURES)

    def efer_allowed(self) -> int:
        """The IA32_EFER bits this CPUID lets software set (LMA included: WRMSR may write it back unchanged)."""
        return self._allowed(EFER_FEATURES)
