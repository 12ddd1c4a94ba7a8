"""The KVM wrapper against the real /dev/kvm: ioeventfd, dirty logging, vCPU state round trips, errors."""

from __future__ import annotations

import errno
import os

import pytest

from popek.accel.kvm_state import apply_entry
from popek.boot import load_kernel
from popek.kvm import Cap, ExitReason, Kvm, KvmError, MemFlag
from popek.memory import GuestMemory

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs a usable /dev/kvm"),
]


def boot_sector(code: bytes) -> bytes:
    return code.ljust(510, b"\0") + b"\x55\xaa"


# mov cx, 5 ; mov dx, 0x600 ; l: out dx, al ; loop l ; mov byte [0x5000], 1 ; mov byte [0x9000], 1 ; out 0xf4, al
GUEST = bytes.fromhex("b90500ba0006eee2fdc606005001c606009001e6f4f4")


@pytest.fixture
def machine():  # type: ignore[no-untyped-def]
    kvm = Kvm()
    mem = GuestMemory(1 << 20)
    vm = kvm.create_vm()
    vm.set_tss_addr(0xFFFBD000)
    region = mem.regions[0]
    vm.set_user_memory_region(0, 0, region.size, region.host_address, MemFlag.LOG_DIRTY_PAGES)
    vcpu = vm.create_vcpu(0)
    apply_entry(vcpu, load_kernel(mem, boot_sector(GUEST)).entry)
    yield kvm, vm, vcpu, mem
    vcpu.close()
    vm.close()
    kvm.close()
    mem.close()


def run_to_debug_port(vcpu) -> int:  # type: ignore[no-untyped-def]
    exits = 0
    while True:
        reason = vcpu.run()
        exits += 1
        if reason == ExitReason.IO and vcpu.run_page.exit.io.port == 0xF4:
            return exits


def test_ioeventfd_takes_port_writes_without_exits(machine) -> None:  # type: ignore[no-untyped-def]
    _kvm, vm, vcpu, _mem = machine
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        vm.ioeventfd(fd, 0x600, 1, pio=True)
        exits = run_to_debug_port(vcpu)
        assert os.eventfd_read(fd) == 5
        assert exits == 1
    finally:
        os.close(fd)


def test_dirty_log_reports_pages_the_guest_wrote(machine) -> None:  # type: ignore[no-untyped-def]
    _kvm, vm, vcpu, mem = machine
    vm.dirty_log(0, 256)  # clear what loading the boot sector dirtied
    run_to_debug_port(vcpu)
    mem.mark_dirty_bitmap(0, vm.dirty_log(0, 256))
    dirty = mem.dirty_pages()
    assert 0x5000 in dirty and 0x9000 in dirty
    assert 0x6000 not in dirty


def test_register_state_round_trips(machine) -> None:  # type: ignore[no-untyped-def]
    _kvm, _vm, vcpu, _mem = machine
    regs = vcpu.get_regs()
    regs.r15 = 0x1122334455667788
    vcpu.set_regs(regs)
    assert vcpu.get_regs().r15 == 0x1122334455667788
    msrs = vcpu.get_msrs([0x174])  # IA32_SYSENTER_CS
    vcpu.set_msrs({0x174: 0x10})
    assert vcpu.get_msrs([0x174]) == {0x174: 0x10} and 0x174 in msrs
    events = vcpu.get_vcpu_events()
    vcpu.set_vcpu_events(events)


def test_errors_name_the_ioctl_and_keep_errno(machine) -> None:  # type: ignore[no-untyped-def]
    _kvm, vm, _vcpu, _mem = machine
    with pytest.raises(KvmError) as e:
        vm.create_vcpu(0)  # already exists
    assert e.value.op == "KVM_CREATE_VCPU" and e.value.errno == errno.EEXIST


def test_missing_device_is_a_clear_error() -> None:
    with pytest.raises(KvmError, match="no KVM on this host"):
        Kvm("/nonexistent/kvm")


# xor ax, ax; mov ds, ax; IVT[13] = handler; rdmsr 0x174 (allowed); rdmsr 0x10 (denied: #GP); out 0xf4, 0;
# handler: out 0xf4, 0x13
MSR_GUEST = bytes.fromhex(
    "31c08ed8c7063400247cc70636000000"  # IVT[13] = 0x0000:0x7c24
    "66b9740100000f32"  # rdmsr 0x174
    "66b9100000000f32"  # rdmsr 0x10
    "b000e6f4"  # out 0xf4, 0
    "b013e6f4f4"  # 0x7c24: out 0xf4, 0x13; hlt
)


def test_a_denied_msr_is_the_guests_general_protection_fault() -> None:
    with Kvm() as kvm, GuestMemory(1 << 20) as mem:
        vm = kvm.create_vm()
        try:
            if not vm.check_extension(Cap.X86_MSR_FILTER):
                pytest.skip("the host has no KVM_X86_SET_MSR_FILTER")
            vm.set_tss_addr(0xFFFBD000)
            region = mem.regions[0]
            vm.set_user_memory_region(0, 0, region.size, region.host_address)
            vm.deny_msrs([0x10])  # IA32_TSC
            vcpu = vm.create_vcpu(0)
            try:
                apply_entry(vcpu, load_kernel(mem, boot_sector(MSR_GUEST)).entry)
                run_to_debug_port(vcpu)
                assert vcpu.io_data()[0] == 0x13  # the #GP handler's status, not the fall-through's 0
            finally:
                vcpu.close()
        finally:
            vm.close()


def test_the_observed_cpuid_is_what_the_guests_cpuid_instruction_returns() -> None:
    from popek.accel.kvm_probe import observed_cpuid
    from popek.cpuid import apply_template, for_vcpu

    with Kvm() as kvm:
        entries = for_vcpu(apply_template(kvm.supported_cpuid(), "host"), 0, 1)
        seen = observed_cpuid(kvm, entries)
    assert [(e.function, e.index) for e in seen] == [(e.function, e.index) for e in entries]
    leaf0 = next(e for e in seen if e.function == 0)
    vendor = leaf0.ebx.to_bytes(4, "little") + leaf0.edx.to_bytes(4, "little") + leaf0.ecx.to_bytes(4, "little")
    assert vendor in (b"GenuineIntel", b"AuthenticAMD", b"HygonGenuine"), vendor  # EBX, EDX, ECX, in that order
    ext = next(e for e in seen if e.function == 0x80000000)
    assert ext.eax >= 0x80000001  # the highest extended leaf, as the guest reads it


def test_a_vcpu_in_a_loop_is_kicked_out_of_kvm_run_without_a_signal_handler() -> None:
    """KVM_SET_SIGNAL_MASK: the kick signal ends KVM_RUN and is never delivered, so a process without a
    handler for it (SIGUSR1's default action ends the process) survives the kick."""
    import signal
    import threading

    from popek.accel import kvm_probe
    from popek.boot.gdt import long_mode_entry

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are set from the main thread")
    previous = signal.signal(kvm_probe.KICK_SIGNAL, signal.SIG_DFL)
    try:
        with Kvm() as kvm, kvm_probe._scratch_vcpu(kvm) as (mem, vcpu):
            mem.write(0x10000, bytes.fromhex("ebfe"))  # jmp $
            apply_entry(vcpu, long_mode_entry(mem, 0x10000, {}))
            assert kvm_probe._run_with_deadline(vcpu, 0.2) is None
            assert signal.sigpending() == set()
    finally:
        signal.signal(kvm_probe.KICK_SIGNAL, previous)


def test_the_probes_answer_the_same_with_or_without_a_handler_and_from_any_thread() -> None:
    """The CPUID a snapshot saves is made from these answers: a restore in another process makes it again."""
    import signal
    import threading

    from popek.accel import kvm_probe
    from popek.accel.kvm import install_kick_handler

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are set from the main thread")
    previous = signal.signal(kvm_probe.KICK_SIGNAL, signal.SIG_DFL)
    try:
        with Kvm() as kvm:
            def answers() -> dict[str, bool]:
                return {family: kvm_probe._runs(kvm, family) for family in kvm_probe.PROBES}

            without = answers()
            in_thread: list[dict[str, bool]] = []
            helper = threading.Thread(target=lambda: in_thread.append(answers()))
            helper.start()
            helper.join(60)
            install_kick_handler()
            assert in_thread == [without]
            assert answers() == without
    finally:
        signal.signal(kvm_probe.KICK_SIGNAL, previous)
