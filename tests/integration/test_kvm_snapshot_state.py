"""A KVM VM's state through a snapshot: a counting guest stopped mid-loop, its vCPU and VM state and its memory
written with `popek.snapshot`, read back into a NEW KVM VM, run on: the count goes on from where it stopped and
ends where an uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from popek import snapshot
from popek.accel.kvm import KvmAccel
from popek.accel.kvm_snapshot import VmSnapshotter, probe
from popek.boot import load_kernel
from popek.kvm import ExitReason, KvmError
from popek.kvm import consts as c
from popek.memory import GuestMemory
from popek.snapshot import SnapshotError
from tests.unit.devices.test_device_state import mutated

from .guests import KVM_MARKS, boot_sector

pytestmark = KVM_MARKS

MEM = 2 << 20
CHUNK = 0x1000  # the guest reports every CHUNK iterations on port 0x80
TOTAL = 64 * CHUNK

# real mode: PIT channel 0 programmed (mode 2, count 0x1234) and the PIC's IRQ0 masked so nothing interrupts;
# then EBX counts, ECX mixes every count in (so a restart or a skipped iteration changes the result) and the
# count goes to memory at 0x6000; every CHUNK counts an OUT to 0x80 with EBX, at the end an OUT to 0xF4
GUEST = f"""
    cli
    mov al, 0x34
    out 0x43, al
    mov al, 0x34
    out 0x40, al
    mov al, 0x12
    out 0x40, al
    mov al, 0xff
    out 0x21, al
    xor ebx, ebx
    mov ecx, 1
count:
    inc ebx
    imul ecx, ecx, 33
    add ecx, ebx
    mov [0x6000], ebx
    test ebx, {CHUNK - 1}
    jnz count
    mov eax, ebx
    out 0x80, al
    cmp ebx, {TOTAL}
    jne count
    out 0xf4, al
    hlt
"""


def new_vm(mem: GuestMemory) -> KvmAccel:
    return KvmAccel(mem, 1, eventfds=False)


def run_to_port(accel: KvmAccel, port: int) -> tuple[int, int]:
    """Run until an OUT to `port`; returns (EBX, ECX) there."""
    vcpu = accel.vcpus[0]
    for _ in range(100_000):
        reason = vcpu.run()
        assert reason == ExitReason.IO, reason
        if vcpu.run_page.exit.io.port == port:
            regs = vcpu.get_regs()
            return regs.rbx & 0xFFFFFFFF, regs.rcx & 0xFFFFFFFF
    raise AssertionError(f"no OUT to {port:#x}")


def booted(tmp_path: Path) -> tuple[GuestMemory, KvmAccel]:
    image = boot_sector(tmp_path, GUEST).read_bytes()
    mem = GuestMemory(MEM)
    accel = new_vm(mem)
    accel.set_boot_state(load_kernel(mem, image).entry)
    return mem, accel


def test_a_restored_vm_counts_on_from_where_it_stopped(tmp_path: Path) -> None:
    mem, accel = booted(tmp_path)
    try:
        expected = run_to_port(accel, 0xF4)  # the uninterrupted run
    finally:
        accel.close()
        mem.close()
    assert expected[0] == TOTAL

    mem, accel = booted(tmp_path)
    try:
        for _ in range(5):
            at = run_to_port(accel, 0x80)
        assert at[0] == 5 * CHUNK
        state = VmSnapshotter(accel.vm).capture(accel.vcpus)
        snapshot.write(tmp_path / "snap", {"kvm": state}, mem)
        pit_before = accel.vm.get_pit2().channels[0]
    finally:
        accel.close()
        mem.close()

    saved = snapshot.read(tmp_path / "snap")
    mem = saved.memory(MEM)
    accel = new_vm(mem)  # a new VM: no boot state, everything from the snapshot
    try:
        VmSnapshotter(accel.vm).restore(accel.vcpus, saved.state["kvm"])
        pit = accel.vm.get_pit2().channels[0]
        assert (pit.mode, pit.count, pit.rw_mode) == (pit_before.mode, pit_before.count, pit_before.rw_mode)
        assert (pit.mode, pit.count) == (2, 0x1234)
        assert accel.vm.get_irqchip(c.KVM_IRQCHIP_PIC_MASTER).chip.pic.imr == 0xFF
        assert mem.read(0x6000, 4) == (5 * CHUNK).to_bytes(4, "little")
        assert run_to_port(accel, 0x80)[0] == 6 * CHUNK  # on from the 5th report, not from the start
        assert run_to_port(accel, 0xF4) == expected
    finally:
        accel.close()
        mem.close()


def test_a_vcpu_state_of_another_shape_is_refused_before_any_ioctl(tmp_path: Path) -> None:
    mem, accel = booted(tmp_path)
    try:
        snap = VmSnapshotter(accel.vm)
        state = snap.capture(accel.vcpus)
        regs_before = bytes(accel.vcpus[0].get_regs())
        bad = {**state, "vcpus": [{**state["vcpus"][0], "regs": {**state["vcpus"][0]["regs"], "size": 100}}]}
        with pytest.raises(SnapshotError, match="regs"):
            snap.restore(accel.vcpus, bad)
        bad = {**state, "vcpus": [{**state["vcpus"][0], "msrs": [[0x10, -1]]}]}
        with pytest.raises(SnapshotError, match="msrs"):
            snap.restore(accel.vcpus, bad)
        with pytest.raises(SnapshotError, match="vCPUs"):
            snap.restore(accel.vcpus, {**state, "vcpus": []})
        other_cpu = [[*state["cpuid"][0][0][:3], 0, 0, 0, 0], *state["cpuid"][0][1:]]
        with pytest.raises(SnapshotError, match="CPUID"):
            snap.restore(accel.vcpus, {**state, "cpuid": [other_cpu]})
        assert bytes(accel.vcpus[0].get_regs()) == regs_before
    finally:
        accel.close()
        mem.close()


def test_the_probe_names_each_state_ioctl_and_the_basic_ones_work() -> None:
    results = probe()
    for name in ("KVM_GET/SET_REGS", "KVM_GET/SET_SREGS", "KVM_GET/SET_LAPIC", "KVM_GET/SET_MSRS"):
        assert results[name] == "ok", (name, results[name])
    assert "KVM_GET/SET_IRQCHIP" in results and "KVM_GET/SET_CLOCK" in results


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=hs.data())
def test_a_fuzzed_kvm_state_is_refused_with_a_snapshot_or_kvm_error(tmp_path: Path, data: hs.DataObject) -> None:
    """A damaged snapshot fails as a SnapshotError before any ioctl, or (a well-formed struct whose values the
    kernel refuses) as a KvmError naming the ioctl: never another exception."""
    mem, accel = booted(tmp_path)
    try:
        snap = VmSnapshotter(accel.vm)
        state = data.draw(mutated(snap.capture(accel.vcpus)))
        try:
            snap.restore(accel.vcpus, state)
        except (SnapshotError, KvmError):
            pass
    finally:
        accel.close()
        mem.close()
