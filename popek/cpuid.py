"""The guest's CPUID: a named template applied to what the accelerator supports (Intel SDM vol. 2A, CPUID).

Templates, like Firecracker's CPU templates:
- `portable` (default): the host's supported set, minus any instruction family the accelerator was found unable
  to execute (probed at run time, see `popek.accel.kvm_probe`), minus VMX/SVM and performance monitoring, plus
  the hypervisor bit and KVM's paravirtual leaves so Linux uses kvm-clock.
- `host`: the supported set as reported, for hosts known to run everything.
- `soft`: `portable` cut down to what the software CPU implements (`popek.cpu.interp.default_cpuid`): the
  feature flags of leaves 1, 7.0 and 0x80000001 ANDed with the soft CPU's (so no XSAVE, AVX, AVX2, AVX-512, AMX,
  FMA, F16C, VAES, ...), no XSAVE leaf 0xD, no leaf 7.1, and no KVM paravirtual features (leaf 0x40000001 EAX
  0: no kvm-clock, async PF, PV EOI, steal time). A KVM snapshot of a guest that saw it restores on
  `--accel soft` (popek.accel.portable, whose `cpuid_problems` is the rule); on the soft backend the CPUID is
  its own whichever the template.
Per-vCPU fields (APIC IDs, topology) are filled in by `for_vcpu`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from popek.errors import ConfigError
from popek.kvm import CpuidEntry

TEMPLATES = ("portable", "host", "soft")

# leaf 1 ECX
ECX_VMX = 1 << 5
ECX_SMX = 1 << 6
ECX_FMA = 1 << 12
ECX_CX16 = 1 << 13
ECX_PDCM = 1 << 15
ECX_X2APIC = 1 << 21
ECX_TSC_DEADLINE = 1 << 24
ECX_XSAVE = 1 << 26
ECX_OSXSAVE = 1 << 27
ECX_AVX = 1 << 28
ECX_F16C = 1 << 29
ECX_HYPERVISOR = 1 << 31
# leaf 1 EDX
EDX_APIC = 1 << 9
EDX_HTT = 1 << 28
# leaf 7.0 EBX / ECX / EDX
L7_EBX_AVX2 = 1 << 5
L7_EBX_AVX512 = (1 << 16) | (1 << 17) | (1 << 21) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 30) | (1 << 31)
L7_ECX_AVX512 = (1 << 1) | (1 << 6) | (1 << 11) | (1 << 12) | (1 << 14)
L7_ECX_VAES_VPCLMUL = (1 << 9) | (1 << 10)
L7_ECX_PKU = 1 << 3
L7_ECX_PKU_OSPKE = L7_ECX_PKU | (1 << 4)
L7_EDX_AVX512 = (1 << 2) | (1 << 3) | (1 << 8) | (1 << 23)
L7_EDX_AMX = (1 << 22) | (1 << 24) | (1 << 25)
# leaf 0x80000001 ECX
EXT_ECX_SVM = 1 << 2

KVM_SIGNATURE_LEAF = 0x40000000
KVM_FEATURES_LEAF = 0x40000001

# KVM paravirtual features (leaf 0x40000001 EAX) that make the guest issue hypercalls
KVM_FEATURE_PV_UNHALT = 1 << 7
KVM_FEATURE_PV_SEND_IPI = 1 << 11
KVM_FEATURE_PV_SCHED_YIELD = 1 << 13
KVM_HYPERCALL_FEATURES = KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD

# The instruction families a host may fail to execute for a guest, and the CPUID bits that advertise them.
FAMILIES = ("xsave", "avx", "cmpxchg16b", "hypercall")
# XSAVE state components (leaf 0xD) that exist only with AVX: YMM, the AVX-512 opmask/ZMM ones, AMX tiles
XCR0_X87_SSE = 0x3
XSTATE_AVX_FAMILY = (1 << 2) | (0x7 << 5) | (0x3 << 17)
XSAVE_LEGACY_AND_HEADER = 512 + 64


def _edit(entries: list[CpuidEntry], function: int, index: int | None = None, **changes: int) -> None:
    for i, e in enumerate(entries):
        if e.function == function and (index is None or e.index == index):
            entries[i] = replace(e, **changes)


def _get(entries: Sequence[CpuidEntry], function: int, index: int = 0) -> CpuidEntry | None:
    for e in entries:
        if e.function == function and (e.index == index or not e.flags & 1):
            return e
    return None


def _without_avx_state(entries: list[CpuidEntry]) -> list[CpuidEntry]:
    """Leaf 0xD without the AVX-family state components: gone from sub-leaf 0's supported mask (whose ECX, the
    largest area, shrinks to what remains), their own sub-leaves removed, so a guest never enables them in XCR0."""
    kept = [e for e in entries if not (e.function == 0xD and e.index >= 2 and XSTATE_AVX_FAMILY >> e.index & 1)]
    leaf = _get(kept, 0xD, 0)
    if leaf is not None:
        mask = leaf.eax & ~XSTATE_AVX_FAMILY
        size = XSAVE_LEGACY_AND_HEADER
        for e in kept:
            if e.function == 0xD and e.index >= 2 and mask >> e.index & 1:
                size = max(size, e.ebx + e.eax)  # the component's offset and size
        _edit(kept, 0xD, 0, eax=mask, ecx=size)
    return kept


def apply_template(
    supported: Iterable[CpuidEntry], template: str, unavailable: frozenset[str] = frozenset()
) -> list[CpuidEntry]:
    """The VM-wide CPUID for `template`, given what the accelerator supports and cannot execute."""
    if template not in TEMPLATES:
        raise ConfigError(f"unknown CPU template {template!r}: choose one of {', '.join(TEMPLATES)}")
    entries = list(supported)
    if template == "host":
        return entries
    leaf1 = _get(entries, 1)
    if leaf1 is not None:
        ecx = leaf1.ecx & ~(ECX_VMX | ECX_SMX | ECX_PDCM | ECX_OSXSAVE)
        ecx |= ECX_HYPERVISOR
        if "cmpxchg16b" in unavailable:
            ecx &= ~ECX_CX16
        if "xsave" in unavailable:
            ecx &= ~(ECX_XSAVE | ECX_AVX | ECX_FMA | ECX_F16C)
        if "avx" in unavailable:
            ecx &= ~(ECX_AVX | ECX_FMA | ECX_F16C)
        _edit(entries, 1, ecx=ecx)
    if "avx" in unavailable and "xsave" not in unavailable:
        entries = _without_avx_state(entries)
    if "xsave" in unavailable:
        entries = [e for e in entries if e.function != 0xD]
    if "xsave" in unavailable or "avx" in unavailable:
        l7 = _get(entries, 7, 0)
        if l7 is not None:
            pku = L7_ECX_PKU_OSPKE if "xsave" in unavailable else 0  # PKRU is XSAVE state, not AVX's
            _edit(
                entries,
                7,
                0,
                ebx=l7.ebx & ~(L7_EBX_AVX2 | L7_EBX_AVX512),
                ecx=l7.ecx & ~(L7_ECX_AVX512 | L7_ECX_VAES_VPCLMUL | pku),
                edx=l7.edx & ~(L7_EDX_AVX512 | L7_EDX_AMX),
            )
        entries = [e for e in entries if not (e.function == 7 and e.index == 1)]
    if "hypercall" in unavailable:
        kvm_features = _get(entries, KVM_FEATURES_LEAF)
        if kvm_features is not None:
            _edit(entries, KVM_FEATURES_LEAF, eax=kvm_features.eax & ~KVM_HYPERCALL_FEATURES)
    ext = _get(entries, 0x80000001)
    if ext is not None:
        _edit(entries, 0x80000001, ecx=ext.ecx & ~EXT_ECX_SVM)
    # no architectural performance monitoring: its MSRs are not virtualised for the guest
    entries = [e for e in entries if e.function != 0xA]
    if template == "soft":
        entries = _soft_subset(entries)
    return entries


# the feature-flag registers the soft template cuts: (leaf, subleaf, register name)
SOFT_FEATURE_REGS = ((1, 0, "ecx"), (1, 0, "edx"), (7, 0, "ebx"), (7, 0, "ecx"), (7, 0, "edx"),
                     (0x80000001, 0, "ecx"), (0x80000001, 0, "edx"))  # fmt: skip
# what the soft backend adds per vCPU (popek.accel.soft `_cpuid_for`) or what promises nothing it lacks
SOFT_EXTRA = {(1, 0, "ecx"): ECX_X2APIC | ECX_TSC_DEADLINE | ECX_HYPERVISOR, (1, 0, "edx"): EDX_APIC | EDX_HTT}


def _soft_subset(entries: list[CpuidEntry]) -> list[CpuidEntry]:
    """The `soft` template's cut (module docstring): only what the software CPU implements."""
    from popek.cpu.interp import default_cpuid

    names = ("eax", "ebx", "ecx", "edx")
    for leaf, subleaf, register in SOFT_FEATURE_REGS:
        entry = _get(entries, leaf, subleaf)
        if entry is not None:
            soft = default_cpuid(leaf, subleaf)[names.index(register)] | SOFT_EXTRA.get((leaf, subleaf, register), 0)
            _edit(entries, leaf, subleaf, **{register: getattr(entry, register) & soft})
    entries = [e for e in entries if e.function != 0xD and not (e.function == 7 and e.index == 1)]
    if _get(entries, KVM_FEATURES_LEAF) is not None:
        _edit(entries, KVM_FEATURES_LEAF, eax=0, edx=0)
    return entries


def for_vcpu(entries: Sequence[CpuidEntry], vcpu: int, count: int) -> list[CpuidEntry]:
    """Per-vCPU identity: initial APIC ID in leaf 1 and x2APIC IDs in the topology leaves."""
    out = []
    for e in entries:
        if e.function == 1:
            ebx = (e.ebx & 0x0000FFFF) | (vcpu << 24) | (min(count, 255) << 16)
            e = replace(e, ebx=ebx, edx=e.edx | EDX_APIC | (EDX_HTT if count > 1 else 0))
        elif e.function in (0xB, 0x1F):
            e = replace(e, edx=vcpu)
        elif e.function == 4:
            # cores per package − 1 in EAX[31:26]; keep the cache description, fix the core count
            e = replace(e, eax=(e.eax & 0x03FFFFFF) | ((count - 1) << 26))
        out.append(e)
    return out
