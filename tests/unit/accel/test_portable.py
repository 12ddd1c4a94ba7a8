"""popek.accel.portable without a VM: a soft vCPU and platform state converted to KVM's structures and back keeps
every field both backends hold; the CPUID rule names what one backend offered and the other lacks; what cannot
cross (YMM state, kvm-clock, a latched PIT count, an 8259A mode KVM lacks) is a SnapshotError naming it; a
hostile state is a SnapshotError, never another exception."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from popek import cpuid
from popek.accel import portable, soft_snapshot
from popek.accel.kvm_snapshot import _pack
from popek.cpu.interp import MSR_DEFAULTS, default_cpuid
from popek.cpu.state import CpuState, Segment
from popek.devices.platform import SoftPlatform
from popek.kvm import structs as s
from popek.snapshot import SnapshotError
from tests.unit.state_fuzz import at, json_value, paths

SOFT_ROWS = [
    [leaf, 0, 0, *default_cpuid(leaf, 0)]
    for leaf in (0, 1, 7, 0x80000000, 0x80000001)
]  # fmt: skip
MSRS = [0x10, 0x1B, 0x6E0, 0x174, 0x175, 0x176, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000102,
        0xC0000103, 0x277, 0x3B, 0x1A0, 0x2FF, 0xC0000080, 0xC0000100, 0xC0000101, 0x4B564D01]  # fmt: skip


def kvm_template(rows: list[list[int]] | None = None) -> dict[str, Any]:
    """What a fresh one-vCPU KVM VM's snapshot_state() looks like, built from zeroed structures."""
    chips = {}
    for name, chip_id in (("pic_master", 0), ("pic_slave", 1), ("ioapic", 2)):
        chip = s.kvm_irqchip(chip_id=chip_id)
        if chip_id == 2:
            chip.chip.ioapic.base_address = 0xFEC00000
            chip.chip.ioapic.redirtbl[:] = [1 << 16] * 24
        else:
            chip.chip.pic.elcr_mask = 0xF8 if chip_id == 0 else 0xDE
        chips[name] = _pack(chip)
    pit = s.kvm_pit_state2()
    for ch in pit.channels:
        ch.mode, ch.count, ch.gate = 0xFF, 0x10000, 1
    page = bytearray(1024)
    page[0x30:0x34] = (0x50014).to_bytes(4, "little")
    vcpu = {
        "mp_state": 0, "regs": _pack(s.kvm_regs()), "sregs": _pack(s.kvm_sregs()), "xsave": _pack(s.kvm_xsave()),
        "xcrs": _pack(s.kvm_xcrs()), "debugregs": _pack(s.kvm_debugregs()),
        "lapic": _pack(s.kvm_lapic_state.from_buffer_copy(bytes(page))),
        "msrs": [[index, 0xFEE00900 if index == 0x1B else 0] for index in MSRS],
        "vcpu_events": _pack(s.kvm_vcpu_events()),
    }  # fmt: skip
    vm = {"irqchip": chips, "pit2": _pack(pit), "clock_ns": 0}
    return {"kvm": {"vm": vm, "vcpus": [vcpu], "cpuid": [copy.deepcopy(rows or SOFT_ROWS)]}, "time_ns": 0}


def soft_state(cpu: CpuState, platform: SoftPlatform | None = None) -> dict[str, Any]:
    platform = platform or SoftPlatform(1)
    accel = {"version": soft_snapshot.VERSION, "vcpus": [soft_snapshot.state_dict(cpu, 0, False, 0, None)],
             "waiting_for_sipi": [False], "quantum_start": [0], "stall_ns": [0], "pending_irqs": []}  # fmt: skip
    return {"machine": {"backend": "soft"}, "spec": {"accel": "soft"}, "accel": accel,
            "devices": {"platform": platform.state(), "port 0x3f8 serial COM1": {"x": 1}}}  # fmt: skip


def round_trip(state: dict[str, Any]) -> dict[str, Any]:
    kvm = portable.convert(state, "kvm", fresh={"accel": kvm_template(), "devices": {}})
    assert kvm["machine"] == {"backend": "kvm"} and "platform" not in kvm["devices"]
    return portable.convert(kvm, "soft")


u64 = hs.integers(0, (1 << 64) - 1)
segments = hs.builds(
    Segment, selector=hs.integers(0, 0xFFFF), base=hs.integers(0, 0xFFFFFFFF), limit=hs.integers(0, 0xFFFFFFFF),
    type=hs.integers(0, 15), s=hs.integers(0, 1), dpl=hs.integers(0, 3), present=hs.just(1), db=hs.integers(0, 1),
    l=hs.integers(0, 1), g=hs.integers(0, 1), avl=hs.integers(0, 1),
)  # fmt: skip


@hs.composite
def cpu_states(draw: hs.DrawFn) -> CpuState:
    cpu = CpuState()
    cpu.gpr = draw(hs.lists(u64, min_size=16, max_size=16))
    cpu.rip, cpu.rflags = draw(u64), draw(hs.integers(0, 0x3FFFFF)) | 2
    cpu.seg = draw(hs.lists(segments, min_size=6, max_size=6))
    cpu.cr0, cpu.cr2, cpu.cr3, cpu.cr4 = draw(hs.integers(0, 0xFFFFFFFF)), draw(u64), draw(u64), draw(u64)
    cpu.efer = draw(hs.sampled_from([0, 0x500, 0xD01]))
    cpu.dr = [*draw(hs.lists(u64, min_size=4, max_size=4)), 0xFFFF0FF0, 0x400, 0xFFFF0FF0, draw(u64)]
    cpu.xmm = draw(hs.lists(hs.integers(0, (1 << 128) - 1), min_size=16, max_size=16))
    cpu.st = draw(hs.lists(hs.integers(0, (1 << 80) - 1), min_size=8, max_size=8))
    u16 = hs.integers(0, 0xFFFF)
    cpu.mxcsr, cpu.fcw, cpu.fsw = draw(u16), draw(u16), draw(u16)
    cpu.ftw, cpu.fop, cpu.fip, cpu.fdp = draw(hs.integers(0, 255)), draw(hs.integers(0, 0x7FF)), draw(u64), draw(u64)
    cpu.xcr0 = draw(hs.sampled_from([1, 3]))
    cpu.tsc_offset = draw(u64)
    cpu.halted, cpu.interrupt_shadow, cpu.nmi_blocked = draw(hs.booleans()), draw(hs.booleans()), draw(hs.booleans())
    cpu.msrs = {0xC0000082: draw(hs.integers(0, 0x7FFFFFFFFFFF)), 0x174: draw(hs.integers(0, 0xFFFF)), 0x277: 0x0606}
    return cpu


KEPT_SCALARS = ("rip", "rflags", "cr0", "cr2", "cr3", "cr4", "efer", "mxcsr", "fcw", "fsw", "ftw", "fop", "fip",
                "fdp", "xcr0", "tsc_offset", "halted", "interrupt_shadow", "nmi_blocked", "gpr", "xmm", "st", "seg",
                "msrs")  # fmt: skip


def effective(msrs: list[list[int]]) -> dict[int, int]:
    return {i: v for i, v in msrs if v != MSR_DEFAULTS.get(i, 0)}


@settings(max_examples=60, deadline=None)
@given(cpu=cpu_states())
def test_a_soft_vcpu_through_kvm_and_back_keeps_every_field_both_hold(cpu: CpuState) -> None:
    before = soft_snapshot.state_dict(cpu, 0, False, 0, None)
    after = round_trip(soft_state(cpu))["accel"]["vcpus"][0]
    for name in KEPT_SCALARS:
        if name == "msrs":  # an MSR not stored reads its reset value on the soft CPU
            assert effective(after[name]) == effective(before[name])
        else:
            assert after[name] == before[name], name
    assert after["dr"][:4] == before["dr"][:4] and after["dr"][7] == before["dr"][7]
    soft_snapshot.parse_cpu(after, "converted")  # what the soft backend's restore checks


def test_the_platform_goes_through_kvm_and_back() -> None:
    platform = SoftPlatform(1)
    for port, value in ((0x20, 0x11), (0x21, 0x30), (0x21, 4), (0x21, 3), (0x21, 0xFA)):  # ICW1-4 (AEOI), OCW1
        platform.pic.master_port.write(port & 1, bytes([value]))
    platform.pit.write(3, bytes([0x34]))
    platform.pit.write(0, bytes([0x9C]))
    platform.pit.write(0, bytes([0x2E]))
    platform.ioapic.redirection[4] = 0x0100_0000_0000_0000 | 0x8031
    lapic = platform.lapics[0]
    lapic.tpr, lapic.svr, lapic.irr = 0x20, 0x1FF, 1 << 0x41
    after = round_trip(soft_state(CpuState(), platform))["devices"]["platform"]
    before = platform.state()
    master, new = before["pic"]["master"], after["pic"]["master"]
    for key in ("imr", "vector_base", "auto_eoi", "init_step", "icw4_expected", "elcr", "isr", "irr"):
        assert new[key] == master[key], key
    assert after["ioapic"]["redirection"] == before["ioapic"]["redirection"]
    for key in ("mode", "rw", "count_register", "running", "period"):
        assert after["pit"]["channels"][0][key] == before["pit"]["channels"][0][key], key
    for key in ("tpr", "svr", "irr", "isr", "lvt", "apic_id", "_enabled", "x2apic"):
        assert after["lapics"][0][key] == before["lapics"][0][key], key


def test_kvm_lapic_timer_goes_on_from_the_current_count() -> None:
    state = kvm_template()
    page = bytearray(1024)
    for offset, value in ((0x320, 0x20030), (0x380, 100_000), (0x390, 40_000), (0x3E0, 0xB), (0xF0, 0x1FF)):
        page[offset : offset + 4] = value.to_bytes(4, "little")
    state["kvm"]["vcpus"][0]["lapic"] = _pack(s.kvm_lapic_state.from_buffer_copy(bytes(page)))
    top = {"machine": {"backend": "kvm"}, "spec": {}, "accel": state, "devices": {}}
    apic = portable.convert(top, "soft")["devices"]["platform"]["lapics"][0]
    assert apic["initial_count"] == 100_000 and apic["_tcount"] == 40_000
    assert apic["timer_in_ns"] == 40_000  # divide by 1 at the 1 GHz bus the KVM and the soft APIC share


def kvm_top(mutate: Any = None) -> dict[str, Any]:
    state = kvm_template()
    if mutate is not None:
        mutate(state["kvm"])
    return {"machine": {"backend": "kvm"}, "spec": {}, "accel": state, "devices": {}}


def set_xsave(kvm: dict[str, Any], bv: int) -> None:
    image = bytearray(4096)
    image[512:520] = bv.to_bytes(8, "little")
    kvm["vcpus"][0]["xsave"] = _pack(s.kvm_xsave.from_buffer_copy(bytes(image)))


def set_msr(kvm: dict[str, Any], index: int, value: int) -> None:
    msrs = {i: v for i, v in kvm["vcpus"][0]["msrs"]}
    msrs[index] = value
    kvm["vcpus"][0]["msrs"] = [[i, v] for i, v in msrs.items()]


def latch(kvm: dict[str, Any]) -> None:
    pit = s.kvm_pit_state2()
    pit.channels[0].mode, pit.channels[0].rw_mode, pit.channels[0].count_latched = 2, 3, 3
    kvm["vm"]["pit2"] = _pack(pit)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda k: set_xsave(k, 0b111), "YMM"),
        (lambda k: set_msr(k, 0x4B564D01, 0x1001), "kvm-clock"),
        (lambda k: set_msr(k, 0xDEAD, 5), "MSR 0xdead"),
        (latch, "latched"),
        (lambda k: k["cpuid"][0].__setitem__(1, [1, 0, 0, 0, 0, 1 << 28, 0]), r"CPUID.\(0x1,0\).ECX bits 0x10000000"),
        (lambda k: k["cpuid"][0].append([0x40000001, 0, 0, 0x1FF, 0, 0, 0]), "paravirtual"),
    ],
)
def test_what_cannot_cross_to_soft_is_named(mutate: Any, match: str) -> None:
    with pytest.raises(SnapshotError, match=match):
        portable.convert(kvm_top(mutate), "soft")


def test_the_hosts_pkru_in_the_image_of_a_guest_without_pku_is_left_behind() -> None:
    """KVM's XSAVE image carries the host's PKRU component even where the guest's CPUID hides PKU and leaf 0xD
    (a host that cannot run XSAVE at ring 0); that guest cannot reach PKRU, so it does not stop the crossing."""
    no_pku = copy.deepcopy(SOFT_ROWS)
    no_pku[2][5] &= ~cpuid.L7_ECX_PKU_OSPKE
    state = kvm_top(lambda k: (set_xsave(k, 0b1000000011), k["cpuid"].__setitem__(0, no_pku)))
    soft = portable.convert(state, "soft")
    assert soft["accel"]["vcpus"][0]["pkru"] == 0
    with pytest.raises(SnapshotError, match="PKRU is in the image"):  # a guest with PKU: its PKRU is needed
        portable.convert(kvm_top(lambda k: set_xsave(k, 0b1000000011)), "soft")


def test_what_cannot_cross_to_kvm_is_named() -> None:
    cpu = CpuState()
    cpu.fcs = 0x1234
    with pytest.raises(SnapshotError, match="FCS"):
        portable.convert(soft_state(cpu), "kvm", fresh={"accel": kvm_template(), "devices": {}})
    cpu = CpuState()
    cpu.msrs[0x250] = 0x0606060606060606  # a fixed-range MTRR this KVM vCPU's list lacks
    with pytest.raises(SnapshotError, match="MSR 0x250"):
        portable.convert(soft_state(cpu), "kvm", fresh={"accel": kvm_template(), "devices": {}})
    platform = SoftPlatform(1)
    platform.pic.master_port.write(0, bytes([0x1B]))  # ICW1: LTIM, single, ICW4
    with pytest.raises(SnapshotError, match=r"LTIM|single"):
        portable.convert(soft_state(CpuState(), platform), "kvm", fresh={"accel": kvm_template(), "devices": {}})
    no_pks = copy.deepcopy(SOFT_ROWS)
    no_pks[2][5] &= ~(1 << 31)
    with pytest.raises(SnapshotError, match=r"CPUID.\(0x7,0\).ECX bits 0x80000000"):
        portable.convert(soft_state(CpuState()), "kvm", fresh={"accel": kvm_template(no_pks), "devices": {}})


def test_the_cpuid_rule_accepts_the_soft_cpus_own() -> None:
    assert portable.cpuid_problems([SOFT_ROWS], "to_soft") == []
    assert portable.cpuid_problems([SOFT_ROWS], "to_kvm") == []


KVM_STATE = kvm_top()
KVM_PATHS = paths(KVM_STATE)


@settings(max_examples=150, deadline=None)
@given(path=hs.sampled_from(KVM_PATHS), value=json_value | hs.binary(min_size=0, max_size=1100))
def test_a_hostile_kvm_state_is_one_snapshot_error(path: tuple[Any, ...], value: object) -> None:
    state = copy.deepcopy(KVM_STATE)
    if not path:
        state = value  # type: ignore[assignment]
    else:
        at(state, path[:-1])[path[-1]] = value
    try:
        portable.convert(state, "soft")  # type: ignore[arg-type]
    except SnapshotError:
        pass


SOFT_STATE = soft_state(CpuState())
SOFT_PATHS = paths(SOFT_STATE)


@settings(max_examples=150, deadline=None)
@given(path=hs.sampled_from(SOFT_PATHS), value=json_value)
def test_a_hostile_soft_state_is_one_snapshot_error(path: tuple[Any, ...], value: object) -> None:
    state = copy.deepcopy(SOFT_STATE)
    if not path:
        state = value  # type: ignore[assignment]
    else:
        at(state, path[:-1])[path[-1]] = value
    try:
        portable.convert(state, "kvm", fresh={"accel": kvm_template(), "devices": {}})  # type: ignore[arg-type]
    except SnapshotError:
        pass
