"""One guest instruction executed on popek's software CPU for a KVM vCPU, where the host's KVM cannot execute it.

Hosts that emulate guest ring-0 code in their own instruction emulator fail on whatever that emulator does not
know (KVM_EXIT_INTERNAL_ERROR, emulation failure): SSE at ring 0, for one. `kvm_assist` completes the families
seen most often with small dedicated routines; every other instruction comes here. The vCPU's state (KVM_GET_REGS,
SREGS, FPU, XCRS and the MSRs the software CPU's semantics read) is loaded into a `popek.cpu` processor over the
same guest memory, which executes the one instruction with its own page walk, segmentation and privilege checks
(`Interpreter.execute_one`), and what changed is written back. A fault the instruction raises is not delivered by
the software CPU but injected through KVM_SET_VCPU_EVENTS, so KVM's own event logic (nesting into #DF, its
pending-event state) stays in charge, exactly as for an exception the processor raised.

Port and MMIO accesses go to popek's buses, as KVM's exits would; the devices KVM keeps in the kernel (local APIC,
I/O APIC, PIC, PIT) cannot be reached from here, and an instruction that touches them stops the VM with a clear
error rather than reading a wrong value.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import iced_x86

from popek.accel.exits import MmioRead, MmioWrite, PioIn, PioOut, handle_exit
from popek.accel.kvm_assist import AssistError, inject_cpu_exception, xcr0_of
from popek.accel.kvm_convert import load_cpu_from_kvm, store_cpu_to_kvm
from popek.bus import Bus
from popek.cpu import segments
from popek.cpu.core import Cpu
from popek.cpu.interp import Interpreter
from popek.cpu.mmu import Access
from popek.cpu.state import (
    CS,
    EFER_LMA,
    MSR_CSTAR,
    MSR_IA32_SYSENTER_CS,
    MSR_IA32_SYSENTER_EIP,
    MSR_IA32_SYSENTER_ESP,
    MSR_IA32_TSC,
    MSR_KERNEL_GS_BASE,
    MSR_LSTAR,
    MSR_SFMASK,
    MSR_STAR,
    MSR_TSC_AUX,
    RF,
    RSP,
    CpuException,
    CpuState,
)
from popek.kvm import CpuidEntry, MpState, VcpuEventsValid, VcpuFd
from popek.kvm.structs import kvm_fpu, kvm_xcrs
from popek.memory import GuestMemory

# the MSRs that instructions read or write as part of their semantics (SYSCALL/SYSRET, SYSENTER/SYSEXIT, SWAPGS,
# RDTSCP/RDPID); FS/GS bases travel in the segment registers, EFER in sregs
SEMANTIC_MSRS = (
    MSR_STAR,
    MSR_LSTAR,
    MSR_CSTAR,
    MSR_SFMASK,
    MSR_KERNEL_GS_BASE,
    MSR_TSC_AUX,
    MSR_IA32_SYSENTER_CS,
    MSR_IA32_SYSENTER_ESP,
    MSR_IA32_SYSENTER_EIP,
)
# what KVM emulates in the kernel (KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2): never on popek's buses
IN_KERNEL_MMIO = ((0xFEE00000, 0x1000, "local APIC"), (0xFEC00000, 0x1000, "I/O APIC"))
IN_KERNEL_PORTS = ((0x20, 2, "PIC"), (0xA0, 2, "PIC"), (0x4D0, 2, "ELCR"), (0x40, 4, "PIT"), (0x61, 1, "PIT speaker"))
SHADOW_MOV_SS, SHADOW_STI = 0x1, 0x2  # KVM_X86_SHADOW_INT_*
# one instruction at a time across all vCPUs: a LOCKed read-modify-write done here (CMPXCHG16B where the host
# cannot) must not interleave with another vCPU's done here
_atomic = threading.Lock()


def _check_not_in_kernel(kind: str, addr: int, size: int) -> None:
    for base, length, name in IN_KERNEL_MMIO if kind == "mmio" else IN_KERNEL_PORTS:
        if addr < base + length and base < addr + size:
            raise AssistError(f"the instruction accesses the in-kernel {name} at {addr:#x}")


class _Buses:
    """The software CPU's view of what lies outside RAM: popek's port and MMIO buses, through `handle_exit`."""

    def __init__(self) -> None:
        self.pio: Bus | None = None
        self.mmio: Bus | None = None

    def _buses(self) -> tuple[Bus, Bus]:
        if self.pio is None or self.mmio is None:
            raise AssistError("the instruction accesses a device, and no bus is attached")
        return self.pio, self.mmio

    def pio_read(self, port: int, size: int) -> int:
        _check_not_in_kernel("port", port, size)
        data = handle_exit(PioIn(port, size), *self._buses()) or b""
        return int.from_bytes(data[:size].ljust(size, b"\xff"), "little")

    def pio_write(self, port: int, size: int, value: int) -> None:
        _check_not_in_kernel("port", port, size)
        handle_exit(PioOut(port, value.to_bytes(size, "little")), *self._buses())

    def mmio_read(self, addr: int, size: int) -> int:
        _check_not_in_kernel("mmio", addr, size)
        data = handle_exit(MmioRead(addr, size), *self._buses()) or b""
        return int.from_bytes(data[:size].ljust(size, b"\xff"), "little")

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        _check_not_in_kernel("mmio", addr, size)
        handle_exit(MmioWrite(addr, value.to_bytes(size, "little")), *self._buses())


def _load_fpu(state: CpuState, fpu: kvm_fpu) -> None:
    """kvm_fpu is an FXSAVE image: fpr[i] is ST(i), in stack order; the software CPU keeps R0..R7 (physical order,
    which the abridged tag ftwx indexes). KVM keeps FIP/FDP as 64-bit offsets and no FCS/FDS."""
    state.fcw, state.fsw, state.ftw, state.mxcsr = int(fpu.fcw), int(fpu.fsw), int(fpu.ftwx), int(fpu.mxcsr)
    top = (state.fsw >> 11) & 7
    for i in range(8):
        state.st[(top + i) & 7] = int.from_bytes(bytes(fpu.fpr[i])[:10], "little")
    state.fop, state.fip, state.fdp = int(fpu.last_opcode) & 0x7FF, int(fpu.last_ip), int(fpu.last_dp)
    state.fcs = state.fds = 0
    state.xmm = [int.from_bytes(bytes(fpu.xmm[i]), "little") for i in range(16)]


def _fpu_view(state: CpuState) -> tuple[int, ...]:
    return (state.fcw, state.fsw, state.ftw, state.mxcsr, state.fop, state.fip, state.fdp, *state.st, *state.xmm)


def _system_view(state: CpuState) -> tuple[int, ...]:
    """What KVM keeps in kvm_sregs, as the software CPU holds it."""
    view: list[int] = [state.gdtr.base, state.gdtr.limit, state.idtr.base, state.idtr.limit]
    view += (state.cr0, state.cr2, state.cr3, state.cr4, state.cr8, state.efer)
    for g in (*state.seg, state.tr, state.ldtr):
        view += (g.selector, g.base, g.limit, g.type, g.s, g.dpl, g.present, g.db, g.l, g.g, g.avl, g.unusable)
    return tuple(view)


def _store_fpu(state: CpuState, fpu: kvm_fpu) -> None:
    """The inverse of `_load_fpu`."""
    fpu.fcw, fpu.fsw, fpu.ftwx, fpu.mxcsr = state.fcw, state.fsw, state.ftw & 0xFF, state.mxcsr
    fpu.last_opcode, fpu.last_ip, fpu.last_dp = state.fop, state.fip, state.fdp
    top = (state.fsw >> 11) & 7
    for i in range(8):
        fpu.fpr[i][:] = list((state.st[(top + i) & 7] & ((1 << 80) - 1)).to_bytes(10, "little") + bytes(6))
    for i in range(16):
        fpu.xmm[i][:] = list((state.xmm[i] & ((1 << 128) - 1)).to_bytes(16, "little"))


class _LinearMemory:
    def __init__(self, cpu: Cpu) -> None:
        self.mmu = cpu.mmu

    def read(self, linear: int, size: int, for_write: bool = False) -> bytes:
        return self.mmu.read_bytes(linear, size, Access.WRITE if for_write else Access.READ)

    def write(self, linear: int, data: bytes) -> None:
        self.mmu.write_bytes(linear, data)


class SoftStep:
    """A software processor kept for one KVM vCPU, loaded from it whenever KVM hands over an instruction."""

    def __init__(self, vcpu: VcpuFd, mem: GuestMemory, cpuid: Sequence[CpuidEntry]) -> None:
        self.vcpu = vcpu
        self.buses = _Buses()
        self.cpu = Cpu(vcpu.id, mem, self.buses)
        self.interp = Interpreter(self.cpu)
        table = {(e.function, e.index): (e.eax, e.ebx, e.ecx, e.edx) for e in cpuid}
        indexed = {e.function for e in cpuid if e.flags & 1}  # KVM_CPUID_FLAG_SIGNIFCANT_INDEX

        def lookup(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
            return table.get((leaf, subleaf if leaf in indexed else 0), (0, 0, 0, 0))

        self.interp.cpuid = lookup
        self.interp.tsc = lambda: vcpu.get_msrs([MSR_IA32_TSC]).get(MSR_IA32_TSC, 0)
        for e in cpuid:
            if e.function == 0x80000008:
                self.cpu.mmu.phys_bits = e.eax & 0xFF

    def linear_memory(self, pio: Bus | None = None, mmio: Bus | None = None) -> _LinearMemory:
        """The vCPU's linear memory as its current instruction reaches it (`kvm_assist.LinearMemory`): the
        software CPU loaded with the vCPU's registers and paging state, its page walker doing the translation;
        with buses, an operand outside RAM reaches popek's devices (kvm-unit-tests' emulator moves MMX registers
        to and from MMIO), without them it stops the assist."""
        self.buses.pio, self.buses.mmio = pio, mmio
        load_cpu_from_kvm(self.cpu.state, self.vcpu.get_regs(), self.vcpu.get_sregs())
        self.cpu.mmu.flush()
        return _LinearMemory(self.cpu)

    def complete_user_int(self, pio: Bus, mmio: Bus) -> bool:
        """At the first instruction of the guest's #UD handler: if the #UD came from ring 3 and the instruction it
        names is INT n (which never raises #UD in protected or long mode, SDM vol. 2A INT n), the #UD stands for
        an INT n the host did not execute. Unwind the #UD frame (IRETQ) and execute the INT n, whose delivery
        through the IDT checks the gate's DPL against CPL 3 (SDM vol. 3A §6.12.1.1) and raises what the
        processor would. True when done; False, with the vCPU untouched, for any other #UD."""
        vcpu, s = self.vcpu, self.cpu.state
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        load_cpu_from_kvm(s, regs, sregs)
        s.msrs, s.interrupt_shadow = dict(vcpu.get_msrs(SEMANTIC_MSRS)), False
        if not s.efer & EFER_LMA or s.cpl != 0:
            return False
        self.cpu.mmu.flush()
        self.interp.flush_decode_cache()
        try:
            frame_cs = int.from_bytes(self.cpu.mmu.read_bytes(s.gpr[RSP] + 8, 8, Access.READ, user=False), "little")
            if frame_cs & 3 != 3:
                return False
            segments.iret(self.cpu, 64)
            s.rflags &= ~RF  # the #UD frame had RF set (a fault); INT n is a trap and completes
            cs = s.seg[CS]
            bits = 64 if cs.l else (32 if cs.db else 16)
            lin = s.rip if bits == 64 else (cs.base + s.rip) & 0xFFFFFFFF
            raw = self.cpu.mmu.read_bytes(lin, 2, Access.EXECUTE)
        except CpuException:
            return False  # the frame or the instruction cannot be read as the processor would: a real #UD
        ins = iced_x86.Decoder(bits, bytes(raw), ip=lin).decode()
        if ins.mnemonic != iced_x86.Mnemonic.INT:
            return False
        self.buses.pio, self.buses.mmio = pio, mmio
        try:
            with _atomic:
                self.interp.execute_one()
        except CpuException as exc:
            store_cpu_to_kvm(s, regs, sregs)  # the fault is the INT n's, at ring 3
            vcpu.set_sregs(sregs)
            vcpu.set_regs(regs)
            inject_cpu_exception(vcpu, exc)
            return True
        finally:
            self.buses.pio = self.buses.mmio = None
        store_cpu_to_kvm(s, regs, sregs)
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)
        return True

    def execute(self, pio: Bus, mmio: Bus) -> None:
        """Execute the instruction at the vCPU's RIP and write the result back to KVM, or inject its fault."""
        vcpu, s = self.vcpu, self.cpu.state
        regs, sregs, fpu = vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_fpu()
        msrs = vcpu.get_msrs(SEMANTIC_MSRS)
        xcr0 = xcr0_of(vcpu)
        load_cpu_from_kvm(s, regs, sregs)
        _load_fpu(s, fpu)
        s.msrs, s.xcr0, s.interrupt_shadow = dict(msrs), xcr0, False
        fpu_before, system_before = _fpu_view(s), _system_view(s)
        # guest memory and the vCPU's state have moved on since the last time: nothing cached may be used
        self.cpu.mmu.flush()
        self.interp.flush_decode_cache()
        self.buses.pio, self.buses.mmio = pio, mmio
        try:
            with _atomic:
                ins = self.interp.execute_one()
        except CpuException as exc:
            inject_cpu_exception(vcpu, exc)
            return
        except NotImplementedError as e:
            raise AssistError(str(e)) from None
        finally:
            self.buses.pio = self.buses.mmio = None
        store_cpu_to_kvm(s, regs, sregs)
        if _system_view(s) != system_before:  # one ioctl fewer where nothing there changed
            sregs.cr8 = s.cr8
            vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)
        if _fpu_view(s) != fpu_before:
            _store_fpu(s, fpu)
            vcpu.set_fpu(fpu)
        changed = {i: v for i, v in s.msrs.items() if i in SEMANTIC_MSRS and msrs.get(i) != v}
        if changed:
            vcpu.set_msrs(changed)
        if s.xcr0 != xcr0:
            xcrs = kvm_xcrs(nr_xcrs=1)
            xcrs.xcrs[0].xcr, xcrs.xcrs[0].value = 0, s.xcr0
            vcpu.set_xcrs(xcrs)
        if s.interrupt_shadow:  # after STI, MOV SS or POP SS no interrupt comes before the next instruction
            events = vcpu.get_vcpu_events()
            events.interrupt.shadow = SHADOW_STI if ins.mnemonic == iced_x86.Mnemonic.STI else SHADOW_MOV_SS
            events.flags = VcpuEventsValid.SHADOW
            vcpu.set_vcpu_events(events)
        if s.halted:
            vcpu.set_mp_state(MpState.HALTED)
