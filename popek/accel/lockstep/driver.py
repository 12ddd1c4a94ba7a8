"""The single-step driver (see the package docstring): `Lockstep` runs one step on the software CPU and
on KVM, single-stepped to a breakpoint, and compares them; `run_lockstep` runs it to the first divergence."""

from __future__ import annotations

import ctypes
import functools
import signal
import threading
from typing import Any, NamedTuple

import iced_x86

from popek.accel import kvm_assist
from popek.accel.exits import MmioRead, MmioWrite, PioIn, PioOut, handle_exit
from popek.accel.kvm import KICK_SIGNAL
from popek.accel.kvm_convert import (
    ArchState,
    arch_from_cpu,
    arch_from_kvm,
    load_cpu_from_kvm,
    store_cpu_to_kvm,
)
from popek.accel.kvm_convert import store_segment as _store_segment
from popek.accel.kvm_softcpu import SoftStep
from popek.accel.kvm_state import register_dump
from popek.accel.lockstep.compare import (
    IGNORED_FLAGS,
    NONDETERMINISTIC,
    STATUS,
    Access_,
    Divergence,
    Instruction,
    IoDivergence,
    NeedKvm,
    Outcome,
    ReplayBus,
    differences,
    flag_names,
    undefined_flags,
)
from popek.bus import BoundedCounter, Bus
from popek.cpu import xsave
from popek.cpu.core import Cpu
from popek.cpu.interp import MEMSIZE, RIDX, Interpreter
from popek.cpu.mmu import Access
from popek.cpu.state import (
    CS,
    GPR_NAMES,
    RF,
    SEGMENT_NAMES,
    TF,
    CpuException,
    Segment,
    TripleFault,
)
from popek.errors import GuestMemoryError
from popek.kvm import ExitReason, GuestDebug, InternalError, KvmError, VcpuFd
from popek.kvm.consts import KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
from popek.memory import PAGE_SIZE, GuestMemory

M = iced_x86.Mnemonic
R = iced_x86.Register
K = iced_x86.OpKind

DR7_L0 = 1 << 0
DR7_RESERVED = 1 << 10
MAX_EXITS_PER_STEP = 100_000  # a REP string instruction may trap after every iteration
# returns from ring 0 to ring 3 that the software CPU executes alone, KVM taking its result (see the docstring)
RETURNS_TO_USER = frozenset({M.IRET, M.IRETD, M.IRETQ, M.SYSRET, M.SYSRETQ, M.SYSEXIT, M.SYSEXITQ})
_STRING_MNEMONICS = frozenset({
    M.MOVSB, M.MOVSW, M.MOVSD, M.MOVSQ, M.STOSB, M.STOSW, M.STOSD, M.STOSQ, M.LODSB, M.LODSW, M.LODSD, M.LODSQ,
    M.SCASB, M.SCASW, M.SCASD, M.SCASQ, M.CMPSB, M.CMPSW, M.CMPSD, M.CMPSQ, M.INSB, M.INSW, M.INSD, M.OUTSB,
    M.OUTSW, M.OUTSD,
})  # fmt: skip
_WRITE_ACCESSES = frozenset({iced_x86.OpAccess.WRITE, iced_x86.OpAccess.READ_WRITE})
_MNEMONIC_NAMES = {v: k.lower() for k, v in vars(M).items() if k.isupper()}
_formatter = iced_x86.Formatter(iced_x86.FormatterSyntax.INTEL)
_info_factory = iced_x86.InstructionInfoFactory()


class _KvmStep(NamedTuple):
    end: str | None  # None: stepped; "halted", "shutdown", "stopped", or "error"
    records: list[Access_]
    detail: str = ""


def copy_guest_memory(src: GuestMemory, dst: GuestMemory, chunk: int = 1 << 20) -> None:
    """Copy every non-zero chunk of `src` into a fresh (zero) `dst` of the same layout; untouched RAM stays
    unallocated on both sides."""
    zero = bytes(chunk)
    for a, b in zip(src.regions, dst.regions, strict=True):
        if (a.gpa, a.size) != (b.gpa, b.size):
            raise ValueError("guest memories of different layouts")
        for off in range(0, a.size, chunk):
            piece = a.mapping[off : off + chunk]
            if piece != zero[: len(piece)]:
                b.mapping[off : off + len(piece)] = piece


class Lockstep:
    """Runs the guest on `vcpu` (KVM, over `kvm_mem`) and on a software CPU (over `soft_mem`, a separate copy of
    guest memory) in lockstep. The software CPU starts from the KVM vCPU's current registers; the caller makes
    both memories equal first (`copy_guest_memory`). `interpreter` lets tests substitute a modified CPU."""

    def __init__(
        self,
        vcpu: VcpuFd,
        kvm_mem: GuestMemory,
        soft_mem: GuestMemory,
        *,
        xsave_layout: dict[int, xsave.Component] | None = None,
        interpreter: type[Interpreter] = Interpreter,
        check_memory: bool = True,
        transplant_returns: bool = True,
        assist: SoftStep | None = None,
    ) -> None:
        self.vcpu = vcpu
        self.assist = assist  # completes on KVM's side what its emulator cannot (see KvmAccel)
        self.kvm_mem = kvm_mem
        self.soft_mem = soft_mem
        self.xsave_layout = xsave_layout or {}
        self.check_memory = check_memory
        self.transplant_returns = transplant_returns
        self.transplants = 0  # returns to ring 3 executed by the software CPU alone
        self._pre_cs_ss = (Segment(), Segment())
        self.trap_undos = 0  # single-step traps of native ring 3 taken back from the guest's #DB handler
        self.bus = ReplayBus()
        self.cpu = Cpu(0, soft_mem, self.bus)
        self.interp = interpreter(self.cpu)
        load_cpu_from_kvm(self.cpu.state, vcpu.get_regs(), vcpu.get_sregs())
        self.pre: ArchState = arch_from_kvm(vcpu.get_regs(), vcpu.get_sregs())
        self.steps = 0
        self.exit_counts: BoundedCounter[str] = BoundedCounter()
        self.assists: BoundedCounter[str] = BoundedCounter()
        self.stop_requested = False
        self._run_thread: int | None = None

    @property
    def instructions(self) -> int:
        return self.cpu.instructions

    # --- the loop ---

    def run(
        self, pio: Bus, mmio: Bus, *, max_steps: int | None = None, stopping: threading.Event | None = None
    ) -> Outcome:
        """Step until a divergence, the guest halts or triple-faults, `stopping` is set, or `max_steps`."""
        self._run_thread = threading.get_ident()
        try:
            while max_steps is None or self.steps < max_steps:
                if (stopping is not None and stopping.is_set()) or self.stop_requested:
                    return self._outcome("stopped")
                outcome = self.step(pio, mmio)
                if outcome is not None:
                    return outcome
                if stopping is not None and stopping.is_set():
                    return self._outcome("stopped")
            return self._outcome("limit")
        finally:
            self._run_thread = None

    def kick(self) -> None:
        """Make `run` return soon, from another thread: the current KVM_RUN is interrupted if it is long."""
        self.stop_requested = True
        self.vcpu.set_immediate_exit(True)
        ident = self._run_thread
        if ident is not None:
            try:
                if signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, signal.SIG_IGN, None):
                    signal.pthread_kill(ident, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def _outcome(self, reason: str, divergence: Divergence | None = None, detail: str = "") -> Outcome:
        return Outcome(reason, self.steps, self.cpu.instructions, divergence, detail)

    def step(self, pio: Bus, mmio: Bus) -> Outcome | None:
        """One instruction (or exception delivery) on both sides; an `Outcome` if the run ends here."""
        s = self.cpu.state
        pre = self.pre
        pre_rip = s.rip
        instructions_before = self.cpu.instructions
        raw, ins = self._decode()
        bus = self.bus

        self._pre_cs_ss = (s.seg[CS].copy(), s.seg[SEGMENT_NAMES.index("ss")].copy())
        # 1. the software CPU first, unless it must read a device
        bus.speculate()
        speculated, soft_triple, soft_error = True, False, ""
        try:
            self.interp.step()
        except NeedKvm:
            speculated = False
            s.rip = pre_rip
        except TripleFault as e:
            soft_triple, soft_error = True, f"the software CPU triple-faulted: {e}"
        except Exception as e:  # a software CPU failure is a finding of the run, reported like a divergence
            soft_error = f"the software CPU failed: {type(e).__name__}: {e}"
        if soft_error and not soft_triple:
            return self._diverge("soft cpu", raw, ins, soft_error, None)

        # 2. KVM, stopped where the software CPU went (or after the instruction, if it could not go yet)
        if speculated and not soft_triple:
            target: int | None = s.rip
            cs = s.seg[CS]
        else:
            target = ins.next_ip if ins is not None and not soft_triple else None
            cs = s.seg[CS]
        linear = None
        if target is not None and target != pre_rip:
            linear = target if s.long_mode and cs.l else (cs.base + target) & 0xFFFFFFFF
        rep = ins is not None and ins.mnemonic in _STRING_MNEMONICS and (ins.has_rep_prefix or ins.has_repne_prefix)
        if (
            self.transplant_returns and speculated and not soft_triple and ins is not None
            and ins.mnemonic in RETURNS_TO_USER and pre["cs.attr"] >> 5 & 3 == 0 and s.cpl == 3
        ):  # fmt: skip
            try:
                bus.check_speculated([])
                self._transplant()
            except IoDivergence as e:
                return self._diverge("io", raw, ins, str(e), None)
            except KvmError as e:
                return self._outcome("error", detail=f"{e}\n" + register_dump(self.vcpu))
            self.pre = arch_from_kvm(self.vcpu.get_regs(), self.vcpu.get_sregs())
            self.steps += 1
            self.transplants += 1
            return None
        kvm = self._kvm_step(pio, mmio, pre_rip, linear, rep, pre["cs.attr"] >> 5 & 3 == 3, target)
        if kvm.end in ("stopped", "error"):
            return self._outcome(kvm.end, detail=kvm.detail)
        regs, sregs = self.vcpu.get_regs(), self.vcpu.get_sregs()
        kvm_post = arch_from_kvm(regs, sregs)
        if soft_triple or kvm.end == "shutdown":
            if soft_triple and kvm.end == "shutdown":
                self.steps += 1
                return self._outcome("shutdown", detail="both sides triple-faulted")
            side = "the software CPU" if soft_triple else "KVM"
            return self._diverge("triple fault", raw, ins, f"only {side} triple-faulted. {soft_error}", kvm_post)

        # 3. the software CPU again, its device reads answered from KVM's accesses
        try:
            if speculated:
                bus.check_speculated(kvm.records)
            else:
                bus.replay(kvm.records, lambda size: self._value_from_kvm(ins, kvm_post, size))
                self.interp.step()
                bus.finish()
        except IoDivergence as e:
            return self._diverge("io", raw, ins, str(e), kvm_post)
        except TripleFault as e:
            return self._diverge("triple fault", raw, ins, f"only the software CPU triple-faulted: {e}", kvm_post)
        except Exception as e:
            return self._diverge("soft cpu", raw, ins, f"the software CPU failed: {type(e).__name__}: {e}", kvm_post)

        # 4. compare
        if ins is not None and ins.mnemonic in NONDETERMINISTIC and s.rip == kvm_post["rip"] == ins.next_ip:
            self._take_results(ins, kvm_post)
        soft_post = arch_from_cpu(s)
        undefined = undefined_flags(ins, pre) if ins is not None and self.cpu.instructions > instructions_before else 0
        differing = differences(kvm_post, soft_post, undefined)
        if differing:
            return self._diverge("state", raw, ins, "", kvm_post, soft_post, differing)
        if undefined:
            s.rflags = (s.rflags & ~undefined) | (kvm_post["rflags"] & undefined)
        if self.check_memory and ins is not None:
            problem = self._compare_written_memory(ins, pre)
            if problem:
                return self._diverge("memory", raw, ins, problem, kvm_post, arch_from_cpu(s))
        self.pre = kvm_post
        self.steps += 1
        if s.halted:  # KVM does not wait in HLT while single-stepping; the software CPU says when the guest halts
            return self._outcome("halted", detail="the guest halted (lockstep does not deliver interrupts)")
        return None

    # --- KVM's side ---

    def _kvm_step(
        self, pio: Bus, mmio: Bus, pre_rip: int, bp_linear: int | None, rep: bool, user: bool, target: int | None
    ) -> _KvmStep:
        vcpu = self.vcpu
        control = GuestDebug.ENABLE | GuestDebug.SINGLESTEP
        breakpoints = [bp_linear] if bp_linear is not None else []
        db_handler = self._db_handler() if user else None
        if db_handler is not None and db_handler != target:
            breakpoints.append(db_handler)  # where this host delivers the single-step trap of native ring 3
        else:
            db_handler = None
        debugregs: tuple[int, ...] = ()
        if breakpoints:
            control |= GuestDebug.USE_HW_BP
            dr7 = DR7_RESERVED | sum(1 << (2 * i) for i in range(len(breakpoints)))
            debugregs = (*breakpoints, *[0] * (4 - len(breakpoints)), 0, 0, 0, dr7)
        try:
            vcpu.set_guest_debug(control, debugregs)
            run = vcpu.run_page
            records: list[Access_] = []
            for _ in range(MAX_EXITS_PER_STEP):
                reason = vcpu.run()
                self.exit_counts[reason.name if isinstance(reason, ExitReason) else str(reason)] += 1
                if reason == ExitReason.DEBUG:
                    rip = int(vcpu.get_regs().rip)
                    if db_handler is not None and rip == db_handler:
                        rip = self._undo_debug_trap()
                        self.trap_undos += 1
                    if rep and rip == pre_rip:
                        vcpu.set_guest_debug(control, debugregs)  # single-stepping again from here
                        continue  # a REP string instruction between iterations
                    return _KvmStep(None, records)
                if reason == ExitReason.IO:
                    io = run.exit.io
                    size, count, port = io.size, io.count, io.port
                    buf = vcpu.io_data()
                    for i in range(count):
                        if io.direction:
                            data = bytes(buf[i * size : (i + 1) * size])
                            handle_exit(PioOut(port, data), pio, mmio)
                            records.append(Access_("out", port, size, data))
                        else:
                            data = (handle_exit(PioIn(port, size), pio, mmio) or b"\xff" * size)[:size]
                            data = data.ljust(size, b"\xff")
                            buf[i * size : (i + 1) * size] = data
                            records.append(Access_("in", port, size, data))
                    continue
                if reason == ExitReason.MMIO:
                    m = run.exit.mmio
                    if m.is_write:
                        data = bytes(m.data)[: m.len]
                        handle_exit(MmioWrite(m.phys_addr, data), pio, mmio)
                        records.append(Access_("write", m.phys_addr, m.len, data))
                    else:
                        data = (handle_exit(MmioRead(m.phys_addr, m.len), pio, mmio) or b"")[: m.len]
                        data = data.ljust(m.len, b"\xff")
                        ctypes.memmove(m.data, data, len(data))
                        records.append(Access_("read", m.phys_addr, m.len, data))
                    continue
                if reason == ExitReason.INTERNAL_ERROR and run.exit.internal.suberror == InternalError.EMULATION:
                    ef = run.exit.emulation_failure
                    insn = None
                    if ef.ndata >= 2 and ef.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
                        insn = bytes(ef.insn_bytes)[: ef.insn_size]
                    fallback = None if self.assist is None else functools.partial(self.assist.execute, pio, mmio)
                    memory = None if self.assist is None else self.assist.linear_memory
                    mnemonic = kvm_assist.complete(vcpu, self.kvm_mem, insn, self.xsave_layout, fallback, memory)
                    self.assists[mnemonic] += 1
                    continue  # the breakpoint (or the single step) ends the step where the instruction went
                if reason == ExitReason.INTR:
                    vcpu.set_immediate_exit(False)
                    if self.stop_requested:
                        return _KvmStep("stopped", records)
                    continue
                if reason == ExitReason.HLT:
                    return _KvmStep("halted", records)
                if reason == ExitReason.SHUTDOWN:
                    return _KvmStep("shutdown", records)
                return _KvmStep("error", records, f"unexpected KVM exit {reason}\n" + register_dump(vcpu))
            return _KvmStep("error", records, "KVM did not finish the instruction\n" + register_dump(vcpu))
        except (KvmError, kvm_assist.AssistError, GuestMemoryError) as e:
            return _KvmStep("error", [], f"{e}\n" + register_dump(vcpu))

    def _db_handler(self) -> int | None:
        """The linear address of the guest's #DB handler (64-bit IDT), None without a present gate."""
        s = self.cpu.state
        if not s.long_mode or s.idtr.limit < 31:
            return None
        try:
            gate = self.cpu.mmu.read_bytes(s.idtr.base + 16, 16, Access.READ, False, implicit=True)
        except (CpuException, GuestMemoryError, NeedKvm):
            return None
        if not gate[5] & 0x80:
            return None
        return (
            int.from_bytes(gate[0:2], "little")
            | int.from_bytes(gate[6:8], "little") << 16
            | int.from_bytes(gate[8:12], "little") << 32
        )

    def _undo_debug_trap(self) -> int:
        """KVM stopped at the guest's #DB handler: the single-step trap of a native ring-3 instruction was
        delivered to the guest (hosts that run ring 3 natively do that instead of exiting to popek). Put the vCPU
        back where the trap was taken, from the exception frame, and KVM's copy of the frame's stack bytes back
        as the software CPU's memory has them. Returns the restored RIP."""
        vcpu = self.vcpu
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        frame_at = int(regs.rsp)
        s = self.cpu.state
        phys = self.cpu.mmu.translate(frame_at, Access.READ, False, implicit=True) if s.paging else frame_at
        if phys % PAGE_SIZE + 40 > PAGE_SIZE:
            raise kvm_assist.AssistError(f"the #DB frame at {frame_at:#x} crosses a page: cannot undo the trap")
        frame = self.kvm_mem.read(phys, 40)
        rip, cs, rflags, rsp, ss = (int.from_bytes(frame[i : i + 8], "little") for i in range(0, 40, 8))
        pre_cs, pre_ss = self._pre_cs_ss
        if (cs, ss) != (pre_cs.selector, pre_ss.selector):
            raise kvm_assist.AssistError(f"a #DB frame with CS {cs:#x} SS {ss:#x}: not a trap lockstep set")
        regs.rip, regs.rsp, regs.rflags = rip, rsp, rflags & ~(TF | RF)
        _store_segment(sregs.cs, pre_cs)
        _store_segment(sregs.ss, pre_ss)
        self.kvm_mem.write(phys, self.soft_mem.read(phys, 40))
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)
        return rip

    def _transplant(self) -> None:
        """Load the software CPU's registers into KVM's vCPU: how a return to ring 3 is executed on KVM's side."""
        regs, sregs = self.vcpu.get_regs(), self.vcpu.get_sregs()
        store_cpu_to_kvm(self.cpu.state, regs, sregs)
        self.vcpu.set_sregs(sregs)
        self.vcpu.set_regs(regs)

    @staticmethod
    def _value_from_kvm(ins: Instruction | None, kvm_post: ArchState, size: int) -> int | None:
        """What an in-kernel device answered, read back from the instruction's destination register (IN, or a
        MOV load): such reads never reach popek."""
        if ins is None or ins.op_count < 1 or ins.op0_kind != K.REGISTER:
            return None
        if ins.mnemonic != M.IN and not (ins.mnemonic == M.MOV and ins.op1_kind == K.MEMORY):
            return None
        reg = ins.op0_register
        value = kvm_post[GPR_NAMES[RIDX[reg]]]
        if reg in (R.AH, R.CH, R.DH, R.BH):
            value >>= 8
        return value & ((1 << (8 * size)) - 1)

    # --- the software CPU's side ---

    def _decode(self) -> tuple[bytes, Instruction | None]:
        """The bytes and iced-x86 decoding of the instruction at the software CPU's RIP (for the report, the
        flags table and the breakpoint); (b"", None) if they cannot be fetched."""
        s = self.cpu.state
        cs = s.seg[CS]
        if s.long_mode and cs.l:
            bits, lin = 64, s.rip
        else:
            bits, lin = (32 if cs.db else 16), (cs.base + s.rip) & 0xFFFFFFFF
        user = s.cpl == 3
        raw = b""
        for n in (15, PAGE_SIZE - lin % PAGE_SIZE):
            try:
                raw = self.cpu.mmu.read_bytes(lin, min(n, 15), Access.EXECUTE, user)
                break
            except (CpuException, NeedKvm, GuestMemoryError):
                continue
        if not raw:
            return b"", None
        ins = iced_x86.Decoder(bits, raw, ip=s.rip).decode()
        if ins.code == iced_x86.Code.INVALID:
            return raw[:1], ins
        return raw[: ins.len], ins

    def _take_results(self, ins: Instruction, kvm_post: ArchState) -> None:
        s = self.cpu.state
        names = NONDETERMINISTIC[ins.mnemonic]
        if not names and ins.op0_kind == K.REGISTER:
            names = (GPR_NAMES[RIDX[ins.op0_register]],)
            s.rflags = (s.rflags & ~STATUS) | (kvm_post["rflags"] & STATUS)
        for name in names:
            s.gpr[GPR_NAMES.index(name)] = kvm_post[name]

    def _compare_written_memory(self, ins: Instruction, pre: ArchState) -> str:
        """Compare the bytes the instruction wrote, at the addresses iced-x86 says it writes (from `pre`)."""
        s = self.cpu.state
        for used in _info_factory.info(ins).used_memory():
            if used.access not in _WRITE_ACCESSES:
                continue
            size = MEMSIZE[used.memory_size]
            if not 0 < size <= 64:
                continue
            addr = used.displacement
            if used.base != R.NONE:
                addr += pre[GPR_NAMES[RIDX[used.base]]] if used.base not in (R.RIP, R.EIP) else 0
            if used.index != R.NONE:
                addr += pre[GPR_NAMES[RIDX[used.index]]] * used.scale
            addr &= _ADDRESS_MASKS.get(used.address_size, (1 << 64) - 1)
            seg = SEGMENT_NAMES.index(_SEG_NAME.get(used.segment, "ds"))
            if not (s.long_mode and s.seg[CS].l) or seg >= 4:  # FS and GS keep their base in 64-bit mode
                addr += s.seg[seg].base
            try:
                phys = self.cpu.mmu.translate(addr, Access.READ, False) if s.paging else addr
            except CpuException:
                continue
            if phys % PAGE_SIZE + size > PAGE_SIZE or not self.soft_mem.contains(phys, size):
                continue
            mine, theirs = self.soft_mem.read(phys, size), self.kvm_mem.read(phys, size)
            if mine != theirs:
                return (
                    f"memory written at {addr:#x} (physical {phys:#x}, {size} bytes) differs: "
                    f"kvm {theirs.hex(' ')}, soft {mine.hex(' ')}"
                )
        return ""

    # --- reporting ---

    def _diverge(
        self,
        kind: str,
        raw: bytes,
        ins: Instruction | None,
        detail: str,
        kvm_post: ArchState | None,
        soft_post: ArchState | None = None,
        differing: tuple[str, ...] = (),
    ) -> Outcome:
        soft_post = soft_post if soft_post is not None else arch_from_cpu(self.cpu.state)
        if kvm_post is not None and not differing:
            differing = differences(kvm_post, soft_post, 0)
        text = _formatter.format(ins) if ins is not None and ins.code != iced_x86.Code.INVALID else ""
        notes = [detail] if detail else []
        if kind == "state" and kvm_post is not None:
            if "rflags" in differing:
                diff = (kvm_post["rflags"] ^ soft_post["rflags"]) & ~IGNORED_FLAGS
                notes.append(f"rflags differ in {flag_names(diff)} (kvm {flag_names(kvm_post['rflags'] & diff)} set)")
            vector = self._interrupt_vector(kvm_post["rip"]) if kvm_post["rip"] != soft_post["rip"] else None
            if vector is not None:
                kind = "external event"
                notes.append(f"KVM went to the handler of vector {vector}: an interrupt lockstep does not replay")
            if ins is not None and ins.mnemonic == M.SYSCALL and self.pre["cs.attr"] >> 5 & 3 == 3:
                notes.append("SYSCALL from ring 3: some hosts do only half of it (see popek.accel.kvm_syscall); "
                             "lockstep reports it rather than completing it")  # fmt: skip
        divergence = Divergence(
            kind, self.steps, self.cpu.instructions if kind != "state" else self._instructions_before(),
            self.pre["rip"], raw, text, "\n".join(notes), self.pre, kvm_post, soft_post, differing,
        )  # fmt: skip
        return self._outcome("divergence", divergence, divergence.report())

    def _instructions_before(self) -> int:
        """Instructions retired before the diverging one (the software CPU has retired it, unless it faulted)."""
        return self.cpu.instructions - 1 if self.cpu.state.rip != self.pre["rip"] else self.cpu.instructions

    def _length_at(self, linear: int) -> int:
        """The length of the 64-bit instruction at `linear` in the software CPU's memory (0 if unreadable)."""
        try:
            raw = self.cpu.mmu.read_bytes(linear, 15, Access.READ, False, implicit=True)
        except (CpuException, GuestMemoryError, NeedKvm):
            return 0
        return int(iced_x86.Decoder(64, raw, ip=linear).decode().len)

    def _interrupt_vector(self, rip: int) -> int | None:
        """The vector (2 or >= 32) whose IDT gate points at `rip` or up to 15 bytes before it, if any."""
        base, limit = self.pre["idt.base"], self.pre["idt.limit"]
        long_mode = bool(self.pre["efer"] & (1 << 10))
        size = 16 if long_mode else 8
        for vector in [2, *range(32, 256)]:
            if vector * size + size - 1 > limit:
                break
            try:
                gate = self.cpu.mmu.read_bytes(base + vector * size, size, Access.READ, False, implicit=True)
            except (CpuException, GuestMemoryError, NeedKvm):
                return None
            offset = int.from_bytes(gate[0:2], "little") | int.from_bytes(gate[6:8], "little") << 16
            if long_mode:
                offset |= int.from_bytes(gate[8:12], "little") << 32
            if gate[5] & 0x80 and rip in (offset, offset + self._length_at(offset)):
                return int(vector)
        return None


_SEG_NAME = {R.ES: "es", R.CS: "cs", R.SS: "ss", R.DS: "ds", R.FS: "fs", R.GS: "gs"}
_ADDRESS_MASKS = {iced_x86.CodeSize.CODE16: 0xFFFF, iced_x86.CodeSize.CODE32: 0xFFFFFFFF}




def run_lockstep(
    vcpu: VcpuFd,
    kvm_mem: GuestMemory,
    soft_mem: GuestMemory,
    pio: Bus,
    mmio: Bus,
    max_steps: int | None = None,
    **options: Any,
) -> Divergence | None:
    """Run `vcpu` and a software CPU in lockstep until they diverge (returned), or the run ends another way
    (None; `Lockstep.run` tells which)."""
    return Lockstep(vcpu, kvm_mem, soft_mem, **options).run(pio, mmio, max_steps=max_steps).divergence
