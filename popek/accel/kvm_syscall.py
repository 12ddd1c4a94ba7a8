"""Completing SYSCALL from guest user mode on hosts whose KVM does only half of it.

Some paravirtual KVM hosts (page-table based ones, which run guest ring 3 natively and emulate ring 0) handle a
SYSCALL from guest ring 3 by loading RIP from LSTAR, RCX and R11, and masking RFLAGS with SFMASK, but leave the
vCPU at CPL 3 with the user CS and SS (Intel SDM vol. 2B, SYSCALL, lists what the instruction must do). The
guest kernel's entry point then runs in user mode and faults at once: a #PF on the instruction fetch where the
kernel's text is supervisor-only (Linux), a #GP on its first privileged instruction where it is not. Linux
kills the process, so no Linux userspace runs on such a host without help.

popek cannot see the SYSCALL itself (ring 3 runs natively, no exit), but it can see the fault that follows: ring
0 is emulated, so hardware instruction breakpoints (KVM_SET_GUEST_DEBUG) on the guest's #GP and #PF handlers
exit to popek before a handler's first instruction. If the exception frame says "a fault at LSTAR from CPL 3"
(for #PF, with CR2 = LSTAR; for #GP, with error code 0) with the flags a SYSCALL leaves (every SFMASK bit clear,
the others equal to R11), popek finishes the instruction: it discards the frame (RSP back to the user stack, as
SYSCALL leaves it), puts the vCPU at LSTAR with the flags SYSCALL produced, and loads CS and SS from STAR at
CPL 0. The guest kernel then
runs its syscall entry as on hardware; its SYSRET is emulated by the host correctly. Any other fault is handed
back to the guest untouched: popek single-steps the handler's first instruction and re-arms the breakpoints
after it (hosts that emulate ring 0 may ignore RFLAGS.RF, so resuming with RF set would hit the breakpoint
forever). That costs two exits per guest page fault, on the hosts that need the assist only.

Why the flags and not the instruction bytes: user code that jumps to LSTAR itself faults the same way, with RCX
and R11 of its choosing, and a forged R11 would reach the guest kernel's SYSRET (IOPL included). It cannot forge
the flags: user code runs with IF set and cannot clear it without IOPL 3, while SYSCALL clears it through SFMASK
(Linux's includes IF). Reading the bytes before RCX would also prove little and is not always possible (with SMAP
on, KVM_TRANSLATE cannot read user pages).

The breakpoints follow the guest's IDT: `arm` re-reads the two gates and moves the breakpoints when the guest
moves its IDT or changes a gate. The backend calls it before every entry until the guest has handlers, then
whenever it has the vCPU out anyway (`force`). Before every entry it must be cheap, as it sits on the exit path
of guests that never enter long mode: where the host mirrors the special registers in kvm_run
(KVM_CAP_SYNC_REGS) it reads the gates only when EFER.LMA or the IDT register changed since it last looked.

The same hosts may answer INT n from guest ring 3 with #UD at the INT instruction, without delivering it
(family "int"). INT n never raises #UD in protected or long mode (SDM vol. 2A, INT n), so a #UD from CPL 3 at an
INT n is that: a third breakpoint (DR2) on the guest's #UD handler exits to popek, which unwinds the #UD frame and
executes the INT n in its software CPU, through the guest's IDT with the gate's DPL checked against CPL 3
(`SoftStep.complete_user_int`); any other #UD proceeds to the guest's handler as above.

The guest's own debug registers are overridden while the assist is armed (a guest debugger's hardware
breakpoints do not work on such hosts).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from popek.accel.kvm_assist import AssistError, read_linear
from popek.errors import GuestMemoryError
from popek.kvm import GuestDebug, KvmError, VcpuFd
from popek.kvm.structs import kvm_segment, kvm_sregs
from popek.memory import GuestMemory

UD_VECTOR, GP_VECTOR, PF_VECTOR = 6, 13, 14
WATCHED = (GP_VECTOR, PF_VECTOR)  # DR0 and DR1 for SYSCALL; DR2 watches #UD for INT n
GATE_SIZE = 16
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_SFMASK = 0xC0000084
EFER_LMA = 1 << 10
RFLAGS_RF = 1 << 16
DR7_LOCAL_ENABLE = (1 << 0, 1 << 2, 1 << 4)  # L0, L1, L2; R/W and LEN 00: instruction breakpoints
DR6_BS = 1 << 14
RFLAGS_FIXED = 1 << 1
INTERRUPT_GATE, TRAP_GATE = 0xE, 0xF


@dataclass(frozen=True)
class ExceptionFrame:
    """What 64-bit exception delivery pushed for a vector with an error code (SDM vol. 3A §6.14.2)."""

    error_code: int
    rip: int
    cs: int
    rflags: int
    rsp: int
    ss: int

    SIZE = 48

    @classmethod
    def unpack(cls, raw: bytes) -> ExceptionFrame:
        return cls(*struct.unpack("<6Q", raw))


def handler(vcpu: VcpuFd, mem: GuestMemory, vector: int, sregs: kvm_sregs | None = None) -> int | None:
    """The linear address of the guest's 64-bit handler for `vector`, or None where there is none to watch."""
    if sregs is None:
        sregs = vcpu.get_sregs()
    if not sregs.efer & EFER_LMA or sregs.idt.limit < vector * GATE_SIZE + GATE_SIZE - 1:
        return None
    try:
        gate = read_linear(vcpu, mem, sregs.idt.base + vector * GATE_SIZE, GATE_SIZE)
    except (AssistError, GuestMemoryError, KvmError):
        return None
    low, _selector, _ist, attributes, middle, high, _ = struct.unpack("<HHBBHII", gate)
    if not attributes & 0x80 or attributes & 0xF not in (INTERRUPT_GATE, TRAP_GATE):
        return None
    return int(low | (middle << 16) | (high << 32))


def _kernel_segments(star: int, cs: kvm_segment, ss: kvm_segment) -> None:
    """CS and SS as SYSCALL loads them: flat, CPL 0, selectors from STAR[47:32]."""
    selector = (star >> 32) & 0xFFFC
    cs.selector, cs.base, cs.limit, cs.type, cs.s, cs.dpl, cs.present = selector, 0, 0xFFFFFFFF, 0xB, 1, 0, 1
    cs.db, cs.l, cs.g, cs.avl, cs.unusable = 0, 1, 1, 0, 0
    ss.selector, ss.base, ss.limit, ss.type, ss.s, ss.dpl, ss.present = selector + 8, 0, 0xFFFFFFFF, 0x3, 1, 0, 1
    ss.db, ss.l, ss.g, ss.avl, ss.unusable = 1, 0, 1, 0, 0


class UserSyscallAssist:
    """One vCPU's breakpoints on the #GP and #PF handlers (`syscall`) and on the #UD handler (`user_int`, which
    completes an INT n and says whether it did), and the completions they trigger."""

    def __init__(
        self, vcpu: VcpuFd, mem: GuestMemory, syscall: bool = True, user_int: Callable[[], bool] | None = None
    ) -> None:
        self.vcpu = vcpu
        self.mem = mem
        self.user_int = user_int
        self.watched = (WATCHED if syscall else ()) + ((UD_VECTOR,) if user_int is not None else ())
        self.handlers: tuple[int | None, ...] = (None,) * len(self.watched)
        self.stepping = False  # past a handler's first instruction, breakpoints off until the step's exit
        # views into kvm_run, kept: building them costs more than reading their fields
        self._synced = vcpu.synced_sregs if vcpu.sync_sregs() else None
        self._synced_idt = self._synced.idt if self._synced is not None else None
        self._looked_at: tuple[int, int, int] | None = None  # (EFER.LMA, IDT base, IDT limit) when last read

    @property
    def armed(self) -> bool:
        return any(h is not None for h in self.handlers)

    def arm(self, force: bool = False) -> None:
        """Point the breakpoints at the guest's current handlers (or remove them where there are none).

        Without `force`, and where kvm_run mirrors the special registers, nothing is read unless the mode or the
        IDT register changed since the last look."""
        if self.stepping:
            return
        sregs, idt = self._synced, self._synced_idt
        if sregs is not None and idt is not None:
            seen = (sregs.efer & EFER_LMA, idt.base, idt.limit)
            if not force and seen == self._looked_at:
                return
            self._looked_at = seen
        handlers = tuple(handler(self.vcpu, self.mem, vector, sregs) for vector in self.watched)
        if handlers != self.handlers:
            self.handlers = handlers
            self._set_breakpoints()

    def _set_breakpoints(self) -> None:
        if not self.armed:
            self.vcpu.set_guest_debug(GuestDebug(0))
            return
        dr7 = sum(enable for h, enable in zip(self.handlers, DR7_LOCAL_ENABLE) if h is not None)
        addresses = [h or 0 for h in self.handlers]
        addresses += [0] * (4 - len(addresses))  # DR0-DR3
        self.vcpu.set_guest_debug(GuestDebug.ENABLE | GuestDebug.USE_HW_BP, [*addresses, 0, 0, 0, dr7])

    def on_debug_exit(self, pc: int, dr6: int) -> str | None:
        """Handle a KVM_EXIT_DEBUG; what it completed ("syscall", "int"), None if the guest's handler proceeds.

        Raises AssistError for a debug exit popek did not ask for (the caller stops the VM).
        """
        if self.stepping and dr6 & DR6_BS:
            self.stepping = False
            self._set_breakpoints()
            return None
        if pc not in self.handlers:
            raise AssistError(f"unexpected debug exit at {pc:#x} (dr6 {dr6:#x})")
        # one handler may serve several watched vectors: each completion checks the frame is its own
        vectors = [v for v, h in zip(self.watched, self.handlers) if h == pc]
        for vector in vectors:
            if vector == UD_VECTOR and self.user_int is not None:
                if self.user_int():
                    return "int"
            elif self._complete_syscall(vector):
                return "syscall"
        self.stepping = True
        self.vcpu.set_guest_debug(GuestDebug.ENABLE | GuestDebug.SINGLESTEP)
        return None

    def _complete_syscall(self, vector: int) -> bool:
        """If the fault being delivered is a half-done SYSCALL's, finish the SYSCALL instead."""
        vcpu = self.vcpu
        regs = vcpu.get_regs()
        msrs = vcpu.get_msrs([MSR_STAR, MSR_LSTAR, MSR_SFMASK])
        lstar, sfmask = msrs[MSR_LSTAR], msrs[MSR_SFMASK]
        try:
            frame = ExceptionFrame.unpack(read_linear(vcpu, self.mem, regs.rsp, ExceptionFrame.SIZE))
            if frame.cs & 3 != 3 or frame.rip != lstar:
                return False
            sregs = vcpu.get_sregs()
            if (vector == GP_VECTOR and frame.error_code != 0) or (vector == PF_VECTOR and sregs.cr2 != lstar):
                return False
            flags = frame.rflags & ~(RFLAGS_RF | RFLAGS_FIXED)
            if flags & sfmask or (flags ^ regs.r11) & ~(sfmask | RFLAGS_RF | RFLAGS_FIXED):
                return False
        except (AssistError, GuestMemoryError):
            return False
        # RCX (return address) and R11 (the user's RFLAGS) were loaded by the host's half of SYSCALL
        regs.rsp, regs.rip, regs.rflags = frame.rsp, lstar, frame.rflags & ~RFLAGS_RF
        _kernel_segments(msrs[MSR_STAR], sregs.cs, sregs.ss)
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)
        return True
