"""The software CPU's vCPU state in a snapshot: every architectural register the soft CPU keeps (`CpuState`, SDM
vol. 1 ch. 3, vol. 3A ch. 2-3), its pending events, its retired-instruction count, and the soft backend's run
state (which vCPUs wait for a STARTUP IPI, the round's accounting, interrupt-line changes still queued).

What is saved, and why it is enough to continue exactly where the guest stopped:
- `CpuState` field by field: GPRs, RIP, RFLAGS, the six segment registers with their hidden descriptor caches
  (vol. 3A §3.4.3), LDTR, TR, GDTR, IDTR, CR0/2/3/4/8, EFER, DR0-DR7, the MSRs kept as fields and the `msrs`
  dict (STAR/LSTAR/..., PAT, TSC_ADJUST, kernel GS base, ...), SSE (XMM0-15, MXCSR), x87 (FCW, FSW, abridged
  FTW, R0-R7, FOP, FCS:FIP, FDS:FDP), XCR0, PKRU, and the halted / interrupt-shadow / NMI-blocked states.
  The soft CPU implements no AVX, so there are no YMM upper halves to save (XCR0 can only hold x87|SSE).
- The TSC is `virtual clock + tsc_offset` (`SoftAccel._tsc_for`), so saving `tsc_offset` keeps it relative to
  the virtual clock, which `popek.devices.machine_state` saves with the platform (local APICs included:
  IA32_APIC_BASE and CR8/TPR belong to the APIC, vol. 3A §11.4.4).
- `Cpu.instructions`, `nmi_pending` and `db_pending` (the debug events of an instruction in progress, turned into
  a #DB trap before the next one: vol. 3B §17.3.1.2), and the PAE PDPTE registers (vol. 3A §4.4.1), which are
  architectural: the CPU loads them on MOV CR3, not on every walk, so memory may no longer hold them.

Restore treats the state as hostile input: every field's type and range is checked, and a bad one is a
`SnapshotError` naming it, before anything is changed. Caches are then dropped (TLB, the decode cache and the
one-page fetch TLB): they are not state, and they might describe memory that a restore replaced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from popek.cpu.state import CpuState, Segment, TableRegister
from popek.snapshot import SnapshotError

if TYPE_CHECKING:
    from popek.accel.soft import SoftAccel
    from popek.cpu.core import Cpu
    from popek.cpu.interp import Interpreter

VERSION = 1
MAX_MSRS = 1024  # the soft CPU keeps a few dozen
MAX_PENDING_IRQS = 4096

_INT_FIELDS: dict[str, int] = {  # CpuState scalar -> bit width
    "rip": 64,
    "rflags": 64,
    "cr0": 64,
    "cr2": 64,
    "cr3": 64,
    "cr4": 64,
    "cr8": 4,
    "efer": 64,
    "mxcsr": 32,
    "fcw": 16,
    "fsw": 16,
    "ftw": 8,
    "fop": 11,
    "fip": 64,
    "fcs": 16,
    "fdp": 64,
    "fds": 16,
    "xcr0": 64,
    "pkru": 32,
    "tsc_offset": 64,
}
_BOOL_FIELDS = ("halted", "interrupt_shadow", "nmi_blocked")
_SEGMENT_FIELDS: dict[str, int] = {
    "selector": 16,
    "base": 64,
    "limit": 32,
    "type": 4,
    "s": 1,
    "dpl": 2,
    "present": 1,
    "db": 1,
    "l": 1,
    "g": 1,
    "avl": 1,
    "unusable": 1,
}
_LISTS: dict[str, tuple[int, int]] = {"gpr": (16, 64), "dr": (8, 64), "xmm": (16, 128), "st": (8, 80)}
_CPU_KEYS = frozenset(
    {*_INT_FIELDS, *_BOOL_FIELDS, *_LISTS, "seg", "ldtr", "tr", "gdtr", "idtr", "msrs"}
    | {"instructions", "nmi_pending", "db_pending", "pdptes"}
)


# --- capture ---


def _segment(seg: Segment) -> dict[str, int]:
    return {name: getattr(seg, name) for name in _SEGMENT_FIELDS}


def capture_cpu(cpu: Cpu) -> dict[str, Any]:
    """One vCPU's complete state as JSON-able values (MSRs as [index, value] pairs, JSON keys being strings)."""
    pdptes = None if cpu.mmu.pdptes is None else list(cpu.mmu.pdptes)
    return state_dict(cpu.state, cpu.instructions, cpu.nmi_pending, cpu.db_pending, pdptes)


def state_dict(
    s: CpuState, instructions: int, nmi_pending: bool, db_pending: int, pdptes: list[int] | None
) -> dict[str, Any]:
    """`capture_cpu` of a vCPU with this state (also what `popek.accel.portable` builds from another backend's)."""
    out: dict[str, Any] = {name: getattr(s, name) for name in _INT_FIELDS}
    out.update({name: bool(getattr(s, name)) for name in _BOOL_FIELDS})
    out.update({name: list(getattr(s, name)) for name in _LISTS})
    out["seg"] = [_segment(seg) for seg in s.seg]
    out["ldtr"] = _segment(s.ldtr)
    out["tr"] = _segment(s.tr)
    out["gdtr"] = {"base": s.gdtr.base, "limit": s.gdtr.limit}
    out["idtr"] = {"base": s.idtr.base, "limit": s.idtr.limit}
    out["msrs"] = [[index, value] for index, value in sorted(s.msrs.items())]
    out["instructions"] = instructions
    out["nmi_pending"] = nmi_pending
    out["db_pending"] = db_pending
    out["pdptes"] = pdptes
    return out


def capture(accel: SoftAccel) -> dict[str, Any]:
    """Every vCPU and the backend's run state (the platform devices are `machine_state`'s)."""
    return {
        "version": VERSION,
        "vcpus": [capture_cpu(cpu) for cpu in accel.cpus],
        "waiting_for_sipi": list(accel.waiting_for_sipi),
        "quantum_start": list(accel._quantum_start),
        "stall_ns": list(accel._stall_ns),
        "pending_irqs": [[number, level] for number, level in accel._pending_irqs],
    }


# --- validation ---


def _int(value: object, bits: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        raise SnapshotError(f"{what}: {value!r} is not a {bits}-bit unsigned integer")
    return value


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise SnapshotError(f"{what}: {value!r} is not true or false")
    return value


def _dict(value: object, keys: frozenset[str] | set[str], what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != set(keys):
        raise SnapshotError(f"{what}: an object with exactly {', '.join(sorted(keys))}")
    return value


def _list(value: object, length: int, what: str) -> list[Any]:
    if not isinstance(value, list) or len(value) != length:
        raise SnapshotError(f"{what}: a list of {length} entries")
    return value


def _parse_segment(value: object, what: str) -> Segment:
    data = _dict(value, set(_SEGMENT_FIELDS), what)
    return Segment(**{name: _int(data[name], bits, f"{what}.{name}") for name, bits in _SEGMENT_FIELDS.items()})


def _parse_table(value: object, what: str) -> TableRegister:
    data = _dict(value, {"base", "limit"}, what)
    return TableRegister(_int(data["base"], 64, f"{what}.base"), _int(data["limit"], 16, f"{what}.limit"))


def parse_cpu(value: object, what: str) -> tuple[CpuState, int, bool, int, list[int] | None]:
    """(state, instructions, nmi_pending, db_pending, pdptes), every field checked."""
    data = _dict(value, _CPU_KEYS, what)
    s = CpuState()
    for name, bits in _INT_FIELDS.items():
        setattr(s, name, _int(data[name], bits, f"{what}.{name}"))
    for name in _BOOL_FIELDS:
        setattr(s, name, _bool(data[name], f"{what}.{name}"))
    for name, (length, bits) in _LISTS.items():
        items = _list(data[name], length, f"{what}.{name}")
        setattr(s, name, [_int(v, bits, f"{what}.{name}[{i}]") for i, v in enumerate(items)])
    s.seg = [_parse_segment(v, f"{what}.seg[{i}]") for i, v in enumerate(_list(data["seg"], 6, f"{what}.seg"))]
    s.ldtr = _parse_segment(data["ldtr"], f"{what}.ldtr")
    s.tr = _parse_segment(data["tr"], f"{what}.tr")
    s.gdtr = _parse_table(data["gdtr"], f"{what}.gdtr")
    s.idtr = _parse_table(data["idtr"], f"{what}.idtr")
    msrs = data["msrs"]
    if not isinstance(msrs, list) or len(msrs) > MAX_MSRS:
        raise SnapshotError(f"{what}.msrs: a list of at most {MAX_MSRS} [index, value] pairs")
    for pair in msrs:
        if not isinstance(pair, list) or len(pair) != 2:
            raise SnapshotError(f"{what}.msrs: {pair!r} is not an [index, value] pair")
        index = _int(pair[0], 32, f"{what}.msrs index")
        if index in s.msrs:
            raise SnapshotError(f"{what}.msrs: MSR {index:#x} appears twice")
        s.msrs[index] = _int(pair[1], 64, f"{what}.msrs[{index:#x}]")
    if not s.rflags & 2:
        raise SnapshotError(f"{what}.rflags: bit 1 is always set (SDM vol. 1 §3.4.3)")
    if s.xcr0 & ~0b11 or not s.xcr0 & 1:
        raise SnapshotError(f"{what}.xcr0: {s.xcr0:#x}: the software CPU has x87 (always set) and SSE only")
    instructions = _int(data["instructions"], 64, f"{what}.instructions")
    nmi_pending = _bool(data["nmi_pending"], f"{what}.nmi_pending")
    db_pending = _int(data["db_pending"], 32, f"{what}.db_pending")
    pdptes: list[int] | None = None
    if data["pdptes"] is not None:
        items = _list(data["pdptes"], 4, f"{what}.pdptes")
        pdptes = [_int(v, 64, f"{what}.pdptes[{i}]") for i, v in enumerate(items)]
    return s, instructions, nmi_pending, db_pending, pdptes


def _counts(value: object, n: int, bits: int, what: str) -> list[int]:
    return [_int(v, bits, f"{what}[{i}]") for i, v in enumerate(_list(value, n, what))]


# --- restore ---


def _install(cpu: Cpu, interp: Interpreter, parsed: tuple[CpuState, int, bool, int, list[int] | None]) -> None:
    state, instructions, nmi_pending, db_pending, pdptes = parsed
    cpu.state = state
    interp.s = state
    cpu.instructions = instructions
    cpu.nmi_pending = nmi_pending
    cpu.db_pending = db_pending
    cpu.mmu.flush(global_too=True)
    cpu.mmu.pdptes = pdptes
    interp.flush_decode_cache()
    interp._fetch_lpage = -1  # the one-page fetch TLB in front of the MMU's


def restore(accel: SoftAccel, state: object) -> None:
    """Put a `capture` of a machine with the same vCPU count into `accel`; everything is checked before any vCPU
    changes, so a SnapshotError leaves `accel` as it was."""
    data = _dict(state, {"version", "vcpus", "waiting_for_sipi", "quantum_start", "stall_ns", "pending_irqs"}, "soft")
    if data["version"] != VERSION:
        raise SnapshotError(f"soft.version: {data['version']!r}, this popek reads version {VERSION}")
    n = len(accel.cpus)
    if not isinstance(data["vcpus"], list) or len(data["vcpus"]) != n:
        raise SnapshotError(f"soft.vcpus: {n} vCPUs here, the snapshot has another number")
    parsed = [parse_cpu(v, f"soft.vcpus[{i}]") for i, v in enumerate(data["vcpus"])]
    sipi = _list(data["waiting_for_sipi"], n, "soft.waiting_for_sipi")
    waiting = [_bool(v, f"soft.waiting_for_sipi[{i}]") for i, v in enumerate(sipi)]
    if waiting[0]:
        raise SnapshotError("soft.waiting_for_sipi[0]: the bootstrap processor never waits for a SIPI")
    quantum_start = _counts(data["quantum_start"], n, 64, "soft.quantum_start")
    stall_ns = _counts(data["stall_ns"], n, 64, "soft.stall_ns")
    for i, (start, p) in enumerate(zip(quantum_start, parsed)):
        if start > p[1]:
            raise SnapshotError(f"soft.quantum_start[{i}]: {start} is past the vCPU's {p[1]} retired instructions")
    irqs = data["pending_irqs"]
    if not isinstance(irqs, list) or len(irqs) > MAX_PENDING_IRQS:
        raise SnapshotError(f"soft.pending_irqs: a list of at most {MAX_PENDING_IRQS} [line, level] pairs")
    pending: list[tuple[int, bool]] = []
    for pair in irqs:
        if not isinstance(pair, list) or len(pair) != 2:
            raise SnapshotError(f"soft.pending_irqs: {pair!r} is not a [line, level] pair")
        pending.append((_int(pair[0], 8, "soft.pending_irqs line"), _bool(pair[1], "soft.pending_irqs level")))
    for cpu, interp, p in zip(accel.cpus, accel.interps, parsed):
        _install(cpu, interp, p)
    accel.waiting_for_sipi[:] = waiting
    accel._quantum_start[:] = quantum_start
    accel._stall_ns[:] = stall_ns
    accel._pending_irqs.clear()
    accel._pending_irqs.extend(pending)
