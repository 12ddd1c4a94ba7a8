"""Finding, at run time, the instruction families this host's KVM cannot execute for a ring-0 guest.

Nested or paravirtual KVM hosts may emulate guest kernel code in software and fail on some instructions
(KVM_EXIT_INTERNAL_ERROR, emulation failure), never complete a hypercall (KVM_RUN spins in the host until a
signal), or do only half of a SYSCALL from ring 3 (`popek.accel.kvm_syscall`). Rather than knowing hosts by name,
popek runs each candidate instruction once in a scratch VM in 64-bit mode, at ring 0 (or ring 3 for SYSCALL),
hides from the guest's CPUID every family that failed (see `popek.cpuid`) and completes for the guest what CPUID
cannot hide. AVX (VEX-encoded instructions) is one such family: hosts that emulate ring 0 may know no VEX
encoding, and popek's software CPU has no AVX to complete them with, so there the guest is told it has no AVX
(and no AVX2, AVX-512, FMA, F16C, nor their XSAVE state components), and ring 3 never uses it either.
On hardware that runs guests natively every probe passes and nothing is hidden or completed.

The same hosts may also answer a guest's CPUID from their own processor for some leaves, whatever
KVM_SET_CPUID2 set (`observed_cpuid`): the features a guest can rely on, and those whose instructions popek
must refuse with #UD, are then the ones it really sees, which only running CPUID in a guest tells.
"""

from __future__ import annotations

import contextlib
import signal
import struct
import threading
from collections.abc import Iterator

from popek.accel.kvm_state import apply_entry
from popek.boot.gdt import long_mode_entry
from popek.cpuid import apply_template, for_vcpu
from popek.kvm import CpuidEntry, ExitReason, Kvm, KvmError, VcpuFd
from popek.kvm.structs import kvm_xcrs
from popek.memory import GuestMemory

CODE_ADDR = 0x1000
DATA_ADDR = 0x3000  # 64-byte aligned, as XSAVE requires
HLT = b"\xf4"
CR4_OSXSAVE = 1 << 18
XCR0_AVX = 0x7  # x87, SSE and AVX state enabled

# instruction bytes (64-bit mode), and the registers they need
PROBES: dict[str, tuple[bytes, dict[str, int]]] = {
    "xsave": (bytes.fromhex("0fae242500300000"), {"rax": 1, "rdx": 0}),  # xsave [0x3000]
    "cmpxchg16b": (bytes.fromhex("480fc70c2500300000"), {}),  # cmpxchg16b [0x3000]
    # vmovdqu ymm0, [0x3000], with XCR0 = x87 | SSE | AVX: the VEX encoding a kernel's AVX code starts with
    "avx": (bytes.fromhex("c5fe6f042500300000"), {}),
    # KVM_HC_CLOCK_PAIRING with an invalid clock type: a working host answers -KVM_EOPNOTSUPP at once
    "hypercall": (b"", {"rax": 9, "rbx": 0x3000, "rcx": 0xFFFF}),
    # from ring 3 to LSTAR (CODE_ADDR + 2), where HLT exits only if SYSCALL really switched to ring 0
    "syscall": (bytes.fromhex("0f05"), {}),
    # INT 0x20 from ring 3 through a DPL-3 gate to CODE_ADDR + 2 (HLT); a host that answers it with #UD lands on
    # the #UD gate's HLT at CODE_ADDR + 3 instead
    "int": (bytes.fromhex("cd20f4"), {}),
}
VMCALL = bytes.fromhex("0f01c1")
VMMCALL = bytes.fromhex("0f01d9")
# a hypercall that does not come back in this long hangs (some nested hosts): long enough that a loaded host's
# scheduler cannot make a working hypercall look like a hanging one, since the answer is part of the CPUID
HYPERCALL_WAIT = 0.5
USER_PAGE_TABLES = 0x10000  # PML4, PDPT, PD: the first 2 MiB, user-accessible
MSR_STAR, MSR_LSTAR, MSR_SFMASK = 0xC0000081, 0xC0000082, 0xC0000084
EFER_SCE = 1 << 0
USER_CS, USER_SS = 0x2B, 0x23
IDT_ADDR = 0x4000
TSS_RSP0 = 4  # the boot GDT's TSS is at linear 0: RSP0 at offset 4 (SDM vol. 3A §8.7)
KERNEL_STACK = 0x8000
INT_VECTOR, UD_VECTOR = 0x20, 6
KICK_SIGNAL = signal.SIGUSR1


def hypercall_instruction(kvm: Kvm) -> bytes:
    """AMD's VMMCALL or Intel's VMCALL, as the guest kernel would choose from the CPU vendor."""
    for e in kvm.supported_cpuid():
        if e.function == 0:
            return VMMCALL if e.ebx.to_bytes(4, "little") == b"Auth" else VMCALL
    return VMCALL


def _run_with_deadline(vcpu: VcpuFd, seconds: float) -> ExitReason | int | None:
    """KVM_RUN in a helper thread; None if it did not come back in time (the thread is kicked out).

    The helper keeps KICK_SIGNAL blocked except inside KVM_RUN (KVM_SET_SIGNAL_MASK, api.rst 4.13, as QEMU's
    vCPU threads do with SIG_IPI): a kick ends KVM_RUN with EINTR and stays pending, and the helper takes it with
    sigtimedwait, so it is never delivered. No handler is needed, and the probe gives the same answer whether or
    not the caller's process installed one, from any thread: a snapshot's CPUID, made from these answers, is
    then the CPUID a restore in another process makes again."""
    result: list[ExitReason | int] = []

    def run() -> None:
        before = signal.pthread_sigmask(signal.SIG_BLOCK, {KICK_SIGNAL})
        try:
            vcpu.set_signal_mask(before - {KICK_SIGNAL})
            result.append(vcpu.run())
        finally:
            signal.sigtimedwait({KICK_SIGNAL}, 0)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        vcpu.set_immediate_exit(True)
        while thread.is_alive():
            signal.pthread_kill(thread.ident or 0, KICK_SIGNAL)
            thread.join(0.01)
        return None
    return result[0] if result else None


_cache: dict[int, frozenset[str]] = {}
_observed: dict[tuple[CpuidEntry, ...], list[CpuidEntry]] = {}
_lock = threading.Lock()
CPUID_CODE, CPUID_DATA = 0x10000, 0x80000  # clear of the entry's GDT (0x500) and page tables (0x9000-0xEFFF)


@contextlib.contextmanager
def _scratch_vcpu(kvm: Kvm) -> Iterator[tuple[GuestMemory, VcpuFd]]:
    """A one-vCPU VM over 2 MiB of RAM, with the host's whole CPUID."""
    with GuestMemory(2 << 20) as mem:
        vm = kvm.create_vm()
        try:
            vm.set_tss_addr(0xFFFBD000)
            region = mem.regions[0]
            vm.set_user_memory_region(0, 0, region.size, region.host_address)
            vcpu = vm.create_vcpu(0)
            try:
                vcpu.set_cpuid2(for_vcpu(apply_template(kvm.supported_cpuid(), "host"), 0, 1))
                yield mem, vcpu
            finally:
                vcpu.close()
        finally:
            vm.close()


def _enter_user_mode(mem: GuestMemory, vcpu: VcpuFd) -> None:
    """Make the vCPU start at CPL 3 on user-accessible page tables, with SYSCALL enabled and LSTAR after the
    probe's SYSCALL (a vCPU may begin in any mode its first KVM_SET_SREGS gives it)."""
    mem.write(USER_PAGE_TABLES, struct.pack("<Q", (USER_PAGE_TABLES + 0x1000) | 0x7))
    mem.write(USER_PAGE_TABLES + 0x1000, struct.pack("<Q", (USER_PAGE_TABLES + 0x2000) | 0x7))
    mem.write(USER_PAGE_TABLES + 0x2000, struct.pack("<Q", 0x87))  # 2 MiB page, user, writable
    sregs = vcpu.get_sregs()
    sregs.cr3 = USER_PAGE_TABLES
    sregs.efer |= EFER_SCE
    sregs.cs.selector, sregs.cs.dpl = USER_CS, 3
    sregs.ss.selector, sregs.ss.dpl = USER_SS, 3
    vcpu.set_sregs(sregs)
    code, _ = PROBES["syscall"]
    vcpu.set_msrs({MSR_STAR: (0x10 << 32) | (0x1B << 48), MSR_LSTAR: CODE_ADDR + len(code), MSR_SFMASK: 0x200})


def _gate(offset: int, dpl: int) -> bytes:
    """A 64-bit interrupt gate to the boot GDT's 64-bit code segment (SDM vol. 3A §6.14.1)."""
    attributes = 0x80 | dpl << 5 | 0xE
    return struct.pack("<HHBBHII", offset & 0xFFFF, 0x10, 0, attributes, offset >> 16 & 0xFFFF, offset >> 32, 0)


def _user_int_setup(mem: GuestMemory, vcpu: VcpuFd) -> None:
    """Ring 3 (as for SYSCALL), an IDT with the INT gate and a #UD gate, and a ring-0 stack in the TSS."""
    _enter_user_mode(mem, vcpu)
    mem.write(IDT_ADDR + INT_VECTOR * 16, _gate(CODE_ADDR + 2, 3))
    mem.write(IDT_ADDR + UD_VECTOR * 16, _gate(CODE_ADDR + 3, 0))
    mem.write(TSS_RSP0, struct.pack("<Q", KERNEL_STACK))
    sregs = vcpu.get_sregs()
    sregs.idt.base, sregs.idt.limit = IDT_ADDR, 0x21 * 16 - 1
    vcpu.set_sregs(sregs)


def _runs(kvm: Kvm, family: str) -> bool:
    code, regs = PROBES[family]
    try:
        with _scratch_vcpu(kvm) as (mem, vcpu):
            if family == "hypercall":
                code = hypercall_instruction(kvm)
            mem.write(CODE_ADDR, code + HLT)
            apply_entry(vcpu, long_mode_entry(mem, CODE_ADDR, regs))
            if family in ("xsave", "avx"):
                sregs = vcpu.get_sregs()
                sregs.cr4 |= CR4_OSXSAVE
                vcpu.set_sregs(sregs)
            if family == "avx":
                xcrs = kvm_xcrs(nr_xcrs=1)
                xcrs.xcrs[0].xcr, xcrs.xcrs[0].value = 0, XCR0_AVX
                vcpu.set_xcrs(xcrs)
            elif family == "syscall":
                _enter_user_mode(mem, vcpu)
            elif family == "int":
                _user_int_setup(mem, vcpu)
            for _ in range(16):
                reason = _run_with_deadline(vcpu, HYPERCALL_WAIT) if family == "hypercall" else vcpu.run()
                if reason is None:
                    return False
                if reason == ExitReason.HLT:
                    if family == "int":
                        return bool(vcpu.get_sregs().cs.dpl == 0 and vcpu.get_regs().rip == CODE_ADDR + 3)
                    return family != "syscall" or vcpu.get_sregs().cs.dpl == 0
                if reason != ExitReason.INTR:
                    return False
            return False
    except KvmError:
        return False


def unavailable_families(kvm: Kvm) -> frozenset[str]:
    """The families (names of `PROBES`) a ring-0 guest cannot execute here; probed once per process."""
    with _lock:
        key = id(type(kvm))
        if key not in _cache:
            _cache[key] = frozenset(f for f in PROBES if not _runs(kvm, f))
        return _cache[key]


def _cpuid_program(leaves: list[tuple[int, int]]) -> bytes:
    """64-bit code that runs CPUID for each (leaf, subleaf) and stores EAX, EBX, ECX, EDX at CPUID_DATA + 16 * i,
    then halts."""
    code = b"\xbf" + struct.pack("<I", CPUID_DATA)  # mov edi, CPUID_DATA
    for leaf, subleaf in leaves:
        code += b"\xb8" + struct.pack("<I", leaf) + b"\xb9" + struct.pack("<I", subleaf)  # mov eax, ecx
        code += bytes.fromhex("0fa2 8907 895f04 894f08 89570c 4883c710")  # cpuid; mov [rdi..]; add rdi, 16
    return code + HLT


def observed_cpuid(kvm: Kvm, entries: list[CpuidEntry]) -> list[CpuidEntry]:
    """`entries` as a guest given them with KVM_SET_CPUID2 sees them when it executes CPUID at ring 0 (cached
    per process). Where the guest does not come back to HLT, `entries` are taken as they are."""
    key = tuple(entries)
    with _lock:
        if key in _observed:
            return _observed[key]
    leaves = [(e.function, e.index) for e in entries]
    seen = list(entries)
    try:
        with _scratch_vcpu(kvm) as (mem, vcpu):
            vcpu.set_cpuid2(entries)
            mem.write(CPUID_CODE, _cpuid_program(leaves))
            apply_entry(vcpu, long_mode_entry(mem, CPUID_CODE, {}))
            for _ in range(16):
                reason = vcpu.run()
                if reason == ExitReason.HLT:
                    raw = mem.read(CPUID_DATA, 16 * len(leaves))
                    seen = [
                        CpuidEntry(e.function, e.index, e.flags, *struct.unpack_from("<4I", raw, 16 * i))
                        for i, e in enumerate(entries)
                    ]
                    break
                if reason != ExitReason.INTR:
                    break
    except KvmError:
        pass
    with _lock:
        _observed[key] = seen
    return seen
