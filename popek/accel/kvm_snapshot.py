"""Capture and restore everything KVM holds of a VM (Documentation/virt/kvm/api.rst, section 4): each vCPU's
registers, special registers, XSAVE image, XCRs, MSRs, local APIC page, pending events, MP state and debug
registers, and the VM's in-kernel PIC pair, I/O APIC, PIT and kvm-clock.

State is plain dicts: every KVM structure is saved as its raw bytes with its struct name and size, so a restore
checks that what it gives the kernel is the struct it asks for (`_raw`), and a snapshot of another ABI (another
struct size, a larger XSAVE area) is a SnapshotError before any ioctl. MSRs are a list of [index, value].

What is saved:
- MSRs: the host's KVM_GET_MSR_INDEX_LIST (api.rst 4.3: "the list of MSRs that can be passed to KVM_GET_MSRS"),
  filtered to those this vCPU reads back (KVM_GET_MSRS stops at the first it cannot read and returns how many it
  did, api.rst 4.18; the rest of the list is tried after it). This takes in the TSC (0x10), the kvm-clock and
  async-PF MSRs, EFER/STAR/LSTAR/CSTAR/FMASK, FS/GS/KERNEL_GS_BASE, SYSENTER, PAT, TSC_DEADLINE and the APIC
  base, without a list of names to keep up to date.
- Special registers: KVM_GET_SREGS2 where KVM_CAP_SREGS2 is (api.rst 4.131: it adds the PDPTRs, which a vCPU in
  PAE mode has loaded and which are not in memory any more once the guest changed its PDPT), else KVM_GET_SREGS.
- XSAVE: KVM_GET_XSAVE2 at the size KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) gives (api.rst 4.42), else KVM_GET_XSAVE.
- VM: KVM_GET_IRQCHIP for PIC master, PIC slave and I/O APIC (api.rst 4.26), KVM_GET_PIT2 (4.70), KVM_GET_CLOCK
  (4.54). popek's KVM backend creates the in-kernel irqchip and PIT (`KvmAccel.__init__`), so both are there.

Restore order (`restore_vcpu`), as Firecracker's x86 vCPU restore and QEMU's `kvm_arch_put_registers` do it,
for the dependencies the API describes: MP state first; regs; special registers before the LAPIC and MSRs,
because KVM_SET_SREGS sets the APIC base (enable, x2APIC mode), which decides how KVM_SET_LAPIC reads the page
(in x2APIC mode the ID register is the full 32-bit ID, api.rst 4.57 with KVM_CAP_X2APIC_API) and whether the APIC
MSRs are writable; XSAVE and XCRs (the XCR0 the image's XSTATE_BV is valid for); debug registers; LAPIC; then the
MSRs (TSC_DEADLINE arms the LAPIC timer, so it goes after the LAPIC that holds the timer mode); vcpu events last
(api.rst 4.31: pending exceptions, the interrupt being injected, NMI and SMI state, which a later register write
could otherwise clear). On the VM, the clock is set before the vCPUs run (api.rst 4.55: KVM_SET_CLOCK "sets the
current timestamp of kvmclock"); the guest's kvm-clock goes on from the saved value, so the paused time does not
pass for the guest (a CMOS read gives the host's time: see `popek.devices.legacy.cmos`).

The vCPUs' CPUID (KVM_GET_CPUID2) is saved too, and a restore into vCPUs with another CPUID (another host, another
`--cpu-template`) is refused: register, XSAVE and MSR values are only meaningful for the CPU they were saved on.

Every ioctl that fails raises KvmError naming it; `probe` tries each capture step once on a scratch VM and says
which this host supports, without a list of hosts.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from popek.kvm import Cap, Kvm, KvmError, MpState, VcpuFd, VmFd
from popek.kvm import consts as c
from popek.kvm import structs as s
from popek.snapshot import SnapshotError

IRQCHIPS = {
    "pic_master": c.KVM_IRQCHIP_PIC_MASTER,
    "pic_slave": c.KVM_IRQCHIP_PIC_SLAVE,
    "ioapic": c.KVM_IRQCHIP_IOAPIC,
}
MAX_MSRS = 4096
MAX_XSAVE = 1 << 20

T = TypeVar("T", bound=ctypes.Structure)


def _pack(value: ctypes.Structure) -> dict[str, Any]:
    return {"struct": type(value).__name__, "size": ctypes.sizeof(value), "data": bytes(value)}


def _raw(saved: object, kind: type[T], what: str) -> T:
    """The struct a saved {struct, size, data} holds, checked to be `kind` at this ABI's size."""
    size = ctypes.sizeof(kind)
    if not isinstance(saved, dict) or set(saved) != {"struct", "size", "data"}:
        raise SnapshotError(f"{what}: a saved KVM structure is {{struct, size, data}}")
    if saved["struct"] != kind.__name__ or saved["size"] != size:
        raise SnapshotError(f"{what}: a {saved['struct']!r} of {saved['size']!r} bytes, not {kind.__name__} of {size}")
    data = saved["data"]
    if not isinstance(data, bytes) or len(data) != size:
        raise SnapshotError(f"{what}: {kind.__name__} data of the wrong length")
    return kind.from_buffer_copy(data)


def readable_msrs(vcpu: VcpuFd, indices: Iterable[int]) -> dict[int, int]:
    """The MSRs of `indices` this vCPU reads back, with their values (KVM_GET_MSRS stops at the first failure)."""
    pending = list(indices)
    values: dict[int, int] = {}
    while pending:
        got = vcpu.get_msrs(pending)
        values.update(got)
        done = len(got)
        pending = pending[done + 1 :]  # the one at `done` did not read: skip it
    return values


def capture_vcpu(vcpu: VcpuFd, msr_indices: Iterable[int], *, sregs2: bool, xsave_size: int | None) -> dict[str, Any]:
    """One vCPU's state (the vCPU must not be in KVM_RUN: call it from its thread, or with the VM stopped)."""
    mp = vcpu.get_mp_state()
    state: dict[str, Any] = {
        "mp_state": int(mp),
        "regs": _pack(vcpu.get_regs()),
        "sregs2" if sregs2 else "sregs": _pack(vcpu.get_sregs2() if sregs2 else vcpu.get_sregs()),
        "xcrs": _pack(vcpu.get_xcrs()),
        "debugregs": _pack(vcpu.get_debugregs()),
        "lapic": _pack(vcpu.get_lapic()),
        "msrs": [[index, value] for index, value in readable_msrs(vcpu, msr_indices).items()],
        "vcpu_events": _pack(vcpu.get_vcpu_events()),
    }
    if xsave_size is not None:
        state["xsave2"] = vcpu.get_xsave2(xsave_size)
    else:
        state["xsave"] = _pack(vcpu.get_xsave())
    return state


def _msrs(saved: object, what: str) -> dict[int, int]:
    if not isinstance(saved, list) or len(saved) > MAX_MSRS:
        raise SnapshotError(f"{what}: the MSRs are a list of at most {MAX_MSRS} [index, value] pairs")
    out: dict[int, int] = {}
    for pair in saved:
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or any(type(x) is not int for x in pair)
            or not 0 <= pair[0] < 1 << 32
            or not 0 <= pair[1] < 1 << 64
        ):
            raise SnapshotError(f"{what}: {pair!r} is not an [index, value] pair of an MSR")
        out[pair[0]] = pair[1]
    return out


def restore_vcpu(vcpu: VcpuFd, state: object, *, xsave_size: int | None, apply: bool = True) -> None:
    """Put a `capture_vcpu` state into a vCPU that has not run (the module docstring gives the order and why).
    Everything is checked before the first ioctl; `apply=False` only checks."""
    what = f"vCPU {vcpu.id}"
    if not isinstance(state, dict):
        raise SnapshotError(f"{what}: the saved state is not an object")
    keys = {"mp_state", "regs", "xcrs", "debugregs", "lapic", "msrs", "vcpu_events"}
    sregs_key = "sregs2" if "sregs2" in state else "sregs"
    xsave_key = "xsave2" if "xsave2" in state else "xsave"
    if set(state) != keys | {sregs_key, xsave_key}:
        raise SnapshotError(f"{what}: the state has {', '.join(sorted(keys))}, sregs or sregs2, xsave or xsave2")
    try:
        mp_state = MpState(state["mp_state"]) if type(state["mp_state"]) is int else None
    except ValueError:
        mp_state = None
    if mp_state is None:
        raise SnapshotError(f"{what}: {state['mp_state']!r} is not an x86 MP state")
    regs = _raw(state["regs"], s.kvm_regs, f"{what}.regs")
    sregs: s.kvm_sregs | s.kvm_sregs2 = (
        _raw(state["sregs2"], s.kvm_sregs2, f"{what}.sregs2")
        if sregs_key == "sregs2"
        else _raw(state["sregs"], s.kvm_sregs, f"{what}.sregs")
    )
    xcrs = _raw(state["xcrs"], s.kvm_xcrs, f"{what}.xcrs")
    debugregs = _raw(state["debugregs"], s.kvm_debugregs, f"{what}.debugregs")
    lapic = _raw(state["lapic"], s.kvm_lapic_state, f"{what}.lapic")
    msrs = _msrs(state["msrs"], f"{what}.msrs")
    events = _raw(state["vcpu_events"], s.kvm_vcpu_events, f"{what}.vcpu_events")
    if xsave_key == "xsave2":
        image = state["xsave2"]
        if not isinstance(image, bytes) or not ctypes.sizeof(s.kvm_xsave) <= len(image) <= MAX_XSAVE:
            raise SnapshotError(f"{what}.xsave2: an XSAVE image of {ctypes.sizeof(s.kvm_xsave)} bytes or more")
        if xsave_size is None or len(image) != xsave_size:
            raise SnapshotError(f"{what}.xsave2: a {len(image)}-byte XSAVE image, this host's is {xsave_size}")
        xsave_raw: bytes | None = image
        xsave = None
    else:
        xsave_raw = None
        xsave = _raw(state["xsave"], s.kvm_xsave, f"{what}.xsave")
    if not apply:
        return

    vcpu.set_mp_state(mp_state)
    vcpu.set_regs(regs)
    if isinstance(sregs, s.kvm_sregs2):
        vcpu.set_sregs2(sregs)
    else:
        vcpu.set_sregs(sregs)
    if xsave_raw is not None:
        vcpu.set_xsave_raw(xsave_raw)
    elif xsave is not None:
        vcpu.set_xsave(xsave)
    vcpu.set_xcrs(xcrs)
    vcpu.set_debugregs(debugregs)
    vcpu.set_lapic(lapic)
    vcpu.set_msrs(msrs)
    vcpu.set_vcpu_events(events)


def capture_vm(vm: VmFd) -> dict[str, Any]:
    """The VM-wide in-kernel devices and the kvm-clock (with the vCPUs stopped)."""
    clock = vm.get_clock()
    return {
        "irqchip": {name: _pack(vm.get_irqchip(chip)) for name, chip in IRQCHIPS.items()},
        "pit2": _pack(vm.get_pit2()),
        "clock_ns": int(clock.clock),
    }


def restore_vm(vm: VmFd, state: object, *, apply: bool = True) -> None:
    """Set the kvm-clock, the three irqchips and the PIT, all checked first (`apply=False` only checks)."""
    if not isinstance(state, dict) or set(state) != {"irqchip", "pit2", "clock_ns"}:
        raise SnapshotError("KVM VM state: it has irqchip, pit2 and clock_ns")
    chips = state["irqchip"]
    if not isinstance(chips, dict) or set(chips) != set(IRQCHIPS):
        raise SnapshotError(f"KVM VM state: the irqchip has {', '.join(IRQCHIPS)}")
    loaded = {name: _raw(chips[name], s.kvm_irqchip, f"irqchip {name}") for name in IRQCHIPS}
    for name, chip in loaded.items():
        if chip.chip_id != IRQCHIPS[name]:
            raise SnapshotError(f"irqchip {name}: saved as chip {chip.chip_id}, not {IRQCHIPS[name]}")
    pit = _raw(state["pit2"], s.kvm_pit_state2, "pit2")
    clock_ns = state["clock_ns"]
    if type(clock_ns) is not int or not 0 <= clock_ns < 1 << 63:
        raise SnapshotError(f"KVM VM state: clock_ns {clock_ns!r} is not a kvm-clock time")
    if not apply:
        return
    vm.set_clock(clock_ns)
    for chip in loaded.values():
        vm.set_irqchip(chip)
    vm.set_pit2(pit)


# CPUID bits KVM rewrites while the guest runs (arch/x86/kvm/cpuid.c, kvm_update_cpuid_runtime), from state a
# snapshot restores anyway: leaf 1 EDX.APIC (IA32_APIC_BASE's enable), ECX.OSXSAVE (CR4.OSXSAVE) and ECX.MONITOR
# (IA32_MISC_ENABLE), leaf 7 ECX.OSPKE (CR4.PKE), leaf 0xD subleaves 0 and 1 EBX (the XSAVE size of the features
# XCR0 and IA32_XSS enable). (function, index, register) -> the bits a comparison ignores.
RUNTIME_CPUID_BITS = {
    (1, 0, 6): 1 << 9,
    (1, 0, 5): (1 << 27) | (1 << 3),
    (7, 0, 5): 1 << 4,
    (0xD, 0, 4): 0xFFFFFFFF,
    (0xD, 1, 4): 0xFFFFFFFF,
}


def _cpuid(vcpu: VcpuFd) -> list[list[int]]:
    """The vCPU's CPUID as KVM holds it (KVM_GET_CPUID2), sorted, as JSON lists, without the bits KVM rewrites
    from the vCPU's own state (RUNTIME_CPUID_BITS): a vCPU that enabled XSAVE has the CPU model it was created with."""
    rows = []
    for e in vcpu.get_cpuid2():
        row = [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx]
        for register in range(3, 7):
            row[register] &= ~RUNTIME_CPUID_BITS.get((e.function, e.index, register), 0)
        rows.append(row)
    return sorted(rows)


def _cpuid_difference(saved: object, here: list[list[list[int]]]) -> str:
    """The first CPUID leaf where a snapshot's vCPUs and these differ, for the error that refuses it."""
    if not isinstance(saved, list) or len(saved) != len(here):
        return "the snapshot's list is not one per vCPU"
    for number, (theirs, ours) in enumerate(zip(saved, here)):
        if theirs == ours:
            continue
        rows = theirs if isinstance(theirs, list) else []
        if not all(isinstance(row, list) and len(row) == 7 and all(type(v) is int for v in row) for row in rows):
            return f"vCPU {number}: the snapshot's leaves are not [function, index, flags, eax, ebx, ecx, edx]"
        mine = {(row[0], row[1]): row[3:] for row in ours}
        their = {(row[0], row[1]): row[3:] for row in rows}
        for leaf in sorted(set(mine) | set(their)):
            if mine.get(leaf) != their.get(leaf):
                saved_row, row_here = (
                    " ".join(f"{v:#x}" for v in r) if r else "absent" for r in (their.get(leaf), mine.get(leaf))
                )
                return f"vCPU {number} leaf {leaf[0]:#x}.{leaf[1]}: saved EAX..EDX {saved_row}, here {row_here}"
        return f"vCPU {number}: the same leaves, with other flags"
    return "the same leaves"


def xsave2_size(kvm: Kvm | VmFd) -> int | None:
    """The XSAVE buffer KVM_GET_XSAVE2 wants, or None where the host has only KVM_GET_XSAVE."""
    size = kvm.check_extension(Cap.XSAVE2)
    return size if size >= ctypes.sizeof(s.kvm_xsave) else None


class VmSnapshotter:
    """The capture and restore of a KVM VM's state as one object: the MSR list and the host's capabilities are
    looked up once."""

    def __init__(self, vm: VmFd) -> None:
        self.vm = vm
        self.sregs2 = bool(vm.check_extension(Cap.SREGS2))
        self.xsave_size = xsave2_size(vm)
        self.msr_indices = vm.kvm.msr_index_list()

    def capture(self, vcpus: list[VcpuFd]) -> dict[str, Any]:
        return {
            "vm": capture_vm(self.vm),
            "vcpus": [capture_vcpu(v, self.msr_indices, sregs2=self.sregs2, xsave_size=self.xsave_size) for v in vcpus],
            "cpuid": [_cpuid(v) for v in vcpus],
        }

    def restore(self, vcpus: list[VcpuFd], state: object) -> None:
        """VM state first (clock, irqchip, PIT), then each vCPU; all of it checked before the first ioctl, so a
        SnapshotError (a state of another VM shape, a damaged one) leaves the VM as it was."""
        if not isinstance(state, dict) or set(state) != {"vm", "vcpus", "cpuid"}:
            raise SnapshotError("KVM state: it has vm, vcpus and cpuid")
        saved = state["vcpus"]
        if not isinstance(saved, list) or len(saved) != len(vcpus):
            raise SnapshotError(f"KVM state: {len(vcpus)} vCPUs here, the snapshot has another number")
        here = [_cpuid(v) for v in vcpus]
        if state["cpuid"] != here:
            # the registers, XSAVE image and MSRs are only meaningful for the CPU model they were saved on
            raise SnapshotError(
                "KVM state: the snapshot's vCPUs had another CPUID (another host or CPU template): "
                + _cpuid_difference(state["cpuid"], here)
            )
        restore_vm(self.vm, state["vm"], apply=False)
        for vcpu, vcpu_state in zip(vcpus, saved, strict=True):
            restore_vcpu(vcpu, vcpu_state, xsave_size=self.xsave_size, apply=False)
        restore_vm(self.vm, state["vm"])
        for vcpu, vcpu_state in zip(vcpus, saved, strict=True):
            restore_vcpu(vcpu, vcpu_state, xsave_size=self.xsave_size)


def _round_trip_irqchips(vm: VmFd) -> None:
    for chip in IRQCHIPS.values():
        vm.set_irqchip(vm.get_irqchip(chip))


def probe(kvm_path: str = "/dev/kvm") -> dict[str, str]:
    """Which capture and restore steps this host's KVM supports: each step tried on a scratch VM with one vCPU,
    "ok" or the KvmError it raised (which names the ioctl)."""
    results: dict[str, str] = {}
    kvm = Kvm(kvm_path)
    try:
        vm = kvm.create_vm()
        try:
            vm.create_irqchip()
            vm.create_pit2()
            vcpu = vm.create_vcpu(0)
            try:
                size = xsave2_size(vm)
                results["KVM_CAP_SREGS2"] = "ok" if vm.check_extension(Cap.SREGS2) else "absent"
                results["KVM_CAP_XSAVE2"] = f"ok ({size} bytes)" if size is not None else "absent"
                steps: dict[str, Callable[[], object]] = {
                    "KVM_GET/SET_REGS": lambda: vcpu.set_regs(vcpu.get_regs()),
                    "KVM_GET/SET_SREGS": lambda: vcpu.set_sregs(vcpu.get_sregs()),
                    "KVM_GET/SET_SREGS2": lambda: vcpu.set_sregs2(vcpu.get_sregs2()),
                    "KVM_GET/SET_XSAVE": lambda: vcpu.set_xsave(vcpu.get_xsave()),
                    "KVM_GET_XSAVE2": lambda: vcpu.get_xsave2(size or ctypes.sizeof(s.kvm_xsave)),
                    "KVM_GET/SET_XCRS": lambda: vcpu.set_xcrs(vcpu.get_xcrs()),
                    "KVM_GET/SET_DEBUGREGS": lambda: vcpu.set_debugregs(vcpu.get_debugregs()),
                    "KVM_GET/SET_LAPIC": lambda: vcpu.set_lapic(vcpu.get_lapic()),
                    "KVM_GET/SET_VCPU_EVENTS": lambda: vcpu.set_vcpu_events(vcpu.get_vcpu_events()),
                    "KVM_GET/SET_MP_STATE": lambda: vcpu.set_mp_state(vcpu.get_mp_state()),
                    "KVM_GET/SET_MSRS": lambda: vcpu.set_msrs(readable_msrs(vcpu, kvm.msr_index_list())),
                    "KVM_GET/SET_IRQCHIP": lambda: _round_trip_irqchips(vm),
                    "KVM_GET/SET_PIT2": lambda: vm.set_pit2(vm.get_pit2()),
                    "KVM_GET/SET_CLOCK": lambda: vm.set_clock(vm.get_clock().clock),
                }
                for name, step in steps.items():
                    try:
                        step()
                        results[name] = "ok"
                    except KvmError as e:
                        results[name] = str(e)
                msrs = readable_msrs(vcpu, kvm.msr_index_list())
                results["MSRs"] = f"{len(msrs)} of {len(kvm.msr_index_list())} listed read back"
            finally:
                vcpu.close()
        finally:
            vm.close()
    finally:
        kvm.close()
    return results


__all__ = [
    "VmSnapshotter",
    "capture_vcpu",
    "capture_vm",
    "probe",
    "readable_msrs",
    "restore_vcpu",
    "restore_vm",
]
