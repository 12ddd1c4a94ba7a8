"""Completing, in popek, an instruction the host's KVM failed to emulate (KVM_EXIT_INTERNAL_ERROR, suberror
KVM_INTERNAL_ERROR_EMULATION), so that the guest continues as if the CPU had executed it.

A few families have routines of their own here, on the vCPU's registers, guest page tables (through
KVM_TRANSLATE) and guest memory, as the architecture (Intel SDM vol. 2) specifies:
- INT3: the trap delivers #BP with the return address after the instruction.
- XSAVE family: executed on the vCPU's XSAVE state (KVM_GET/SET_XSAVE, XCRS) by `popek.cpu.xsave`, in the
  host's own XSAVE layout (popek's software CPU has no XSAVE); #UD when CR4.OSXSAVE is clear, #GP(0) for a bad
  area, as the hardware would raise. The save area is reached through the caller's `memory` (the software
  CPU's page walker over the vCPU's paging state, `SoftStep.linear_memory`), so an area on a page that is not
  present, or not writable, is the guest's #PF with the right error code and CR2, and the walk sets the
  accessed and dirty bits as the processor's would. Linux's signal delivery XSAVEs at ring 0 straight into the
  user's signal frame and relies on that #PF to fault the page in (SDM vol. 1 §13.7; vol. 3A §4.7).
- MMX data moves (MOVD/MOVQ with an MMX register): on the vCPU's x87 state, `popek.accel.kvm_mmx` (the
  software CPU has no MMX); the memory operand, which may be MMIO, through the caller's `memory`.
- AVX moves of YMM registers (VMOVDQA, VMOVNTDQA, VMOVNTDQ, VZEROALL): on the vCPU's XSAVE state,
  `popek.accel.kvm_avx`, for hosts whose guests see AVX in CPUID that the host itself cannot emulate at ring 0.
- CLAC/STAC: Linux brackets every user access with them, so they are the commonest failures by far.
- Bytes that do not decode: #UD, as the processor raises; so does an instruction whose CPUID feature flag the
  guest does not see set (`popek.features`, from the CPUID the guest observes, `kvm_probe.observed_cpuid`).
Every other instruction goes to the caller's `fallback`: the software CPU (`popek.accel.kvm_softcpu`), which has
the semantics, privilege checks and page-fault behaviour of the whole ISA it implements (POPCNT, LZCNT/TZCNT,
BMI1/2, MOVBE, ADCX/ADOX, RDRAND/RDSEED, CMPXCHG16B, FSGSBASE, RDPID, FWAIT, SSE...). What neither can execute
stops the VM with the instruction's bytes and disassembly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import iced_x86

if TYPE_CHECKING:
    from iced_x86._iced_x86_py import Register as RegisterT

from popek.accel import kvm_avx, kvm_mmx
from popek.cpu import xsave
from popek.cpu.state import CpuException, Vector
from popek.errors import GuestMemoryError
from popek.features import Features
from popek.kvm import KvmError, VcpuFd
from popek.kvm.structs import kvm_regs, kvm_xcrs
from popek.memory import PAGE_SIZE, GuestMemory

BP_VECTOR = 3
UD_VECTOR = 6
GP_VECTOR = 13
CR4_OSXSAVE = 1 << 18
RFLAGS_AC = 1 << 18

_REGISTER_NAMES = {
    getattr(iced_x86.Register, n.upper()): n
    for n in (
        "rax",
        "rbx",
        "rcx",
        "rdx",
        "rsi",
        "rdi",
        "rsp",
        "rbp",
        "r8",
        "r9",
        "r10",
        "r11",
        "r12",
        "r13",
        "r14",
        "r15",
    )
}
_MNEMONICS = {v: k.lower() for k, v in vars(iced_x86.Mnemonic).items() if k.isupper() or k[0].isupper()}
_M = iced_x86.Mnemonic
_XSAVE_STANDARD = {_M.XSAVE, _M.XSAVE64, _M.XSAVEOPT, _M.XSAVEOPT64}
_XSAVE_COMPACTED = {_M.XSAVEC, _M.XSAVEC64, _M.XSAVES, _M.XSAVES64}  # no supervisor state is enabled (IA32_XSS = 0)
_XRSTOR = {_M.XRSTOR, _M.XRSTOR64, _M.XRSTORS, _M.XRSTORS64}
_XSAVE_FAMILY = _XSAVE_STANDARD | _XSAVE_COMPACTED | _XRSTOR | {_M.XGETBV, _M.XSETBV}
_lock = threading.Lock()
_formatter = iced_x86.Formatter(iced_x86.FormatterSyntax.INTEL)


class AssistError(Exception):
    """The instruction cannot be completed by popek; the message shows it."""


class LinearMemory(Protocol):
    """Guest linear memory as the vCPU's current instruction reaches it: translated by its page tables with its
    privilege (CPL, CR0.WP, SMAP and RFLAGS.AC); an access the architecture refuses raises the `CpuException`
    (#PF with its error code and CR2, #GP for a non-canonical address) for the caller to inject."""

    def read(self, linear: int, size: int, for_write: bool = False) -> bytes:
        """`for_write`: the bytes are read to be written back (XSAVE merging into its area), so the access is
        checked, and faults, as a write."""
        ...

    def write(self, linear: int, data: bytes) -> None: ...


class _TranslatedMemory:
    """Linear memory through KVM_TRANSLATE, for callers without a software CPU: a page that does not translate
    stops the assist (AssistError), since KVM_TRANSLATE does not say why it failed."""

    def __init__(self, vcpu: VcpuFd, mem: GuestMemory) -> None:
        self.vcpu, self.mem = vcpu, mem

    def read(self, linear: int, size: int, for_write: bool = False) -> bytes:
        return read_linear(self.vcpu, self.mem, linear, size)

    def write(self, linear: int, data: bytes) -> None:
        write_linear(self.vcpu, self.mem, linear, data)


@dataclass(frozen=True)
class Decoded:
    rip: int
    bitness: int
    raw: bytes
    instruction: iced_x86.Instruction

    @property
    def mnemonic(self) -> str:
        return _MNEMONICS.get(self.instruction.mnemonic, str(self.instruction.mnemonic))

    def describe(self) -> str:
        text = (
            _formatter.format(self.instruction) if self.instruction.code != iced_x86.Code.INVALID else "(undecodable)"
        )
        return f"{self.rip:#x}: {self.raw.hex(' ')}  {text}"


def _linear_to_physical(vcpu: VcpuFd, linear: int) -> int:
    t = vcpu.translate(linear)
    if not t.valid:
        raise AssistError(f"guest address {linear:#x} is not mapped")
    return int(t.physical_address)


def read_linear(vcpu: VcpuFd, mem: GuestMemory, linear: int, size: int) -> bytes:
    out = b""
    while size > 0:
        chunk = min(size, PAGE_SIZE - (linear % PAGE_SIZE))
        out += mem.read(_linear_to_physical(vcpu, linear), chunk)
        linear, size = linear + chunk, size - chunk
    return out


def write_linear(vcpu: VcpuFd, mem: GuestMemory, linear: int, data: bytes) -> None:
    while data:
        chunk = min(len(data), PAGE_SIZE - (linear % PAGE_SIZE))
        mem.write(_linear_to_physical(vcpu, linear), data[:chunk])
        linear, data = linear + chunk, data[chunk:]


def decode(vcpu: VcpuFd, mem: GuestMemory, insn_bytes: bytes | None) -> Decoded:
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    if sregs.efer & (1 << 10) and sregs.cs.l:
        bitness, rip = 64, regs.rip
    else:
        bitness = 32 if sregs.cs.db else 16
        rip = (sregs.cs.base + regs.rip) & 0xFFFFFFFF
    raw = insn_bytes or b""
    instruction = iced_x86.Decoder(bitness, raw, ip=rip).decode() if raw else iced_x86.Instruction()
    if instruction.code == iced_x86.Code.INVALID:
        # no bytes from KVM, or too few: a host may stop its fetch at a page end the instruction crosses
        for size in (15, PAGE_SIZE - rip % PAGE_SIZE):  # the second try stops at the page end
            try:
                raw = read_linear(vcpu, mem, rip, min(size, 15))
                break
            except (AssistError, GuestMemoryError, KvmError):
                continue
        instruction = iced_x86.Decoder(bitness, raw, ip=rip).decode() if raw else iced_x86.Instruction()
    return Decoded(rip, bitness, raw[: instruction.len] if instruction.len else raw, instruction)


def inject_exception(vcpu: VcpuFd, vector: int, error_code: int | None = None) -> None:
    events = vcpu.get_vcpu_events()
    events.exception.injected = 1
    events.exception.nr = vector
    events.exception.has_error_code = 1 if error_code is not None else 0
    events.exception.error_code = error_code or 0
    events.flags = 0
    vcpu.set_vcpu_events(events)


def inject_cpu_exception(vcpu: VcpuFd, exc: CpuException) -> None:
    """Deliver through KVM a fault the software CPU's semantics raised, loading CR2 first for a #PF as the
    processor does before delivering it (SDM vol. 3A §4.7)."""
    if exc.vector == Vector.PF and exc.cr2 is not None:
        sregs = vcpu.get_sregs()
        sregs.cr2 = exc.cr2
        vcpu.set_sregs(sregs)
    inject_exception(vcpu, exc.vector, exc.error_code)


def _advance(vcpu: VcpuFd, regs: kvm_regs, length: int) -> None:
    regs.rip += length
    vcpu.set_regs(regs)


_SEGMENT_OF = {
    iced_x86.Register.ES: "es",
    iced_x86.Register.CS: "cs",
    iced_x86.Register.SS: "ss",
    iced_x86.Register.DS: "ds",
    iced_x86.Register.FS: "fs",
    iced_x86.Register.GS: "gs",
}


def _register_value(regs: kvm_regs, reg: RegisterT, d: Decoded) -> int:
    """A general register as the address computation reads it: RAX, or EAX/AX of it (32/16-bit addressing)."""
    name = _REGISTER_NAMES.get(iced_x86.RegisterExt.full_register(reg))
    if name is None:
        raise AssistError(f"unsupported addressing in {d.describe()}")
    return int(getattr(regs, name)) & ((1 << (8 * iced_x86.RegisterExt.size(reg))) - 1)


def _effective_address(vcpu: VcpuFd, regs: kvm_regs, d: Decoded) -> int:
    """The linear address of the memory operand (SDM vol. 1 §3.7.5): base + index * scale + displacement, wrapped
    to the address size, plus the segment base (in 64-bit mode only FS and GS have one)."""
    ins = d.instruction
    if ins.is_ip_rel_memory_operand:
        return int(ins.ip_rel_memory_address)
    addr = int(ins.memory_displacement)
    address_bits = 64 if d.bitness == 64 else 32
    if ins.memory_base != iced_x86.Register.NONE:
        address_bits = 8 * iced_x86.RegisterExt.size(ins.memory_base)
        addr += _register_value(regs, ins.memory_base, d)
    if ins.memory_index != iced_x86.Register.NONE:
        address_bits = 8 * iced_x86.RegisterExt.size(ins.memory_index)
        addr += _register_value(regs, ins.memory_index, d) * ins.memory_index_scale
    addr &= (1 << address_bits) - 1
    segment = _SEGMENT_OF.get(ins.memory_segment)
    if segment is not None and (d.bitness != 64 or segment in ("fs", "gs")):
        addr += getattr(vcpu.get_sregs(), segment).base
    return addr & (0xFFFFFFFFFFFFFFFF if d.bitness == 64 else 0xFFFFFFFF)


def xcr0_of(vcpu: VcpuFd) -> int:
    xcrs = vcpu.get_xcrs()
    for x in list(xcrs.xcrs)[: xcrs.nr_xcrs]:
        if x.xcr == 0:
            return int(x.value)
    return 1


def _xsave_family(vcpu: VcpuFd, mem: LinearMemory, d: Decoded, layout: dict[int, xsave.Component]) -> None:
    m = d.instruction.mnemonic
    regs = vcpu.get_regs()
    xcr0 = xcr0_of(vcpu)
    mask = (regs.rax & 0xFFFFFFFF) | ((regs.rdx & 0xFFFFFFFF) << 32)
    if m == _M.XGETBV:
        if regs.rcx & 0xFFFFFFFF not in (0, 1):
            inject_exception(vcpu, GP_VECTOR, 0)
            return
        state = bytes(memoryview(vcpu.get_xsave()).cast("B"))
        value = xcr0 if regs.rcx & 0xFFFFFFFF == 0 else xcr0 & xsave._header(state)[0]
        regs.rax, regs.rdx = value & 0xFFFFFFFF, value >> 32
        _advance(vcpu, regs, d.instruction.len)
        return
    if m == _M.XSETBV:
        xcrs = kvm_xcrs(nr_xcrs=1)
        xcrs.xcrs[0].xcr, xcrs.xcrs[0].value = regs.rcx & 0xFFFFFFFF, mask
        try:
            vcpu.set_xcrs(xcrs)
        except KvmError:
            inject_exception(vcpu, GP_VECTOR, 0)  # an invalid XCR or value
            return
        _advance(vcpu, regs, d.instruction.len)
        return
    addr = _effective_address(vcpu, regs, d)
    if addr % 64:
        inject_exception(vcpu, GP_VECTOR, 0)
        return
    kvm_state = vcpu.get_xsave()
    state = bytes(memoryview(kvm_state).cast("B"))
    with _lock:
        try:
            if m in _XRSTOR:
                header = mem.read(addr, xsave.EXTENDED_START)
                compacted = bool(xsave._header(header)[1] & xsave.COMPACTED)
                size = xsave.area_size(
                    layout, xsave._header(header)[1] & ~xsave.COMPACTED if compacted else xcr0, compacted
                )
                area = mem.read(addr, size)
                new_state = xsave.restore(state, area, xcr0, mask, layout)
                memoryview(kvm_state).cast("B")[: len(new_state)] = new_state
                vcpu.set_xsave(kvm_state)
            else:
                compacted = m in _XSAVE_COMPACTED
                size = xsave.area_size(layout, xcr0 & mask, compacted)
                old = mem.read(addr, size, for_write=True)
                mem.write(addr, xsave.save(state, old, xcr0, mask, layout, compacted))
        except xsave.XsaveFault:
            inject_exception(vcpu, GP_VECTOR, 0)
            return
    _advance(vcpu, regs, d.instruction.len)


def _mmx_move(vcpu: VcpuFd, mem: LinearMemory, d: Decoded) -> None:
    """MOVD/MOVQ between an MMX register and a general register, memory or another MMX register (SDM vol. 2B
    MOVD/MOVQ); the x87 state changes only once every operand has been read and written without a fault."""
    ins = d.instruction
    size, to_mm = kvm_mmx.MOVES[ins.code]
    fpu, regs = vcpu.get_fpu(), vcpu.get_regs()
    kvm_mmx.check_usable(vcpu.get_sregs().cr0, fpu.fsw)
    mask = (1 << (8 * size)) - 1
    # the operand that is not the MMX register named by the opcode: the source of a load, the destination of a store
    other = ins.op1_kind if to_mm else ins.op0_kind
    other_reg = ins.op1_register if to_mm else ins.op0_register
    is_mm = other == iced_x86.OpKind.REGISTER and iced_x86.Register.MM0 <= other_reg <= iced_x86.Register.MM7
    if to_mm:
        if is_mm:
            value = kvm_mmx.read_mm(fpu, kvm_mmx.mm_index(other_reg))
        elif other == iced_x86.OpKind.REGISTER:
            value = _register_value(regs, other_reg, d)
        else:
            value = int.from_bytes(mem.read(_effective_address(vcpu, regs, d), size), "little")
        kvm_mmx.enter_mmx(fpu)
        kvm_mmx.write_mm(fpu, kvm_mmx.mm_index(ins.op0_register), value & mask)
    else:
        value = kvm_mmx.read_mm(fpu, kvm_mmx.mm_index(ins.op1_register)) & mask
        if is_mm:
            kvm_mmx.enter_mmx(fpu)
            kvm_mmx.write_mm(fpu, kvm_mmx.mm_index(other_reg), value)
        elif other == iced_x86.OpKind.REGISTER:
            name = _REGISTER_NAMES.get(iced_x86.RegisterExt.full_register(other_reg))
            if name is None:
                raise AssistError(f"unsupported operand in {d.describe()}")
            setattr(regs, name, value)  # a 32-bit destination is zero-extended to 64 bits
            kvm_mmx.enter_mmx(fpu)
        else:
            mem.write(_effective_address(vcpu, regs, d), value.to_bytes(size, "little"))
            kvm_mmx.enter_mmx(fpu)
    vcpu.set_fpu(fpu)
    _advance(vcpu, regs, ins.len)


def _avx_move(vcpu: VcpuFd, mem: LinearMemory, d: Decoded, layout: dict[int, xsave.Component]) -> None:
    """The YMM moves of `kvm_avx.MOVES` (SDM vol. 2C VMOVDQA, VMOVNTDQA, VMOVNTDQ, VZEROALL)."""
    ins = d.instruction
    kind = kvm_avx.MOVES[ins.code]
    sregs, regs = vcpu.get_sregs(), vcpu.get_regs()
    kvm_avx.check_usable(sregs.cr0, sregs.cr4, xcr0_of(vcpu))
    if kvm_avx.YMM_COMPONENT not in layout:
        raise AssistError(f"{d.describe()}: the host reports no YMM state component")
    state = vcpu.get_xsave()
    area = bytearray(memoryview(state).cast("B"))
    if kind == kvm_avx.ZERO:
        kvm_avx.zero_all(area, layout)
    else:
        memory_operand = (ins.op1_kind if kind == kvm_avx.LOAD else ins.op0_kind) == iced_x86.OpKind.MEMORY
        addr = _effective_address(vcpu, regs, d) if memory_operand else 0
        if memory_operand and addr % 32:
            raise CpuException(Vector.GP, 0)
        if kind == kvm_avx.LOAD:
            if memory_operand:
                value = int.from_bytes(mem.read(addr, 32), "little")
            else:
                value = kvm_avx.read_ymm(area, layout, kvm_avx.ymm_index(ins.op1_register))
            kvm_avx.write_ymm(area, layout, kvm_avx.ymm_index(ins.op0_register), value)
        else:
            value = kvm_avx.read_ymm(area, layout, kvm_avx.ymm_index(ins.op1_register))
            if memory_operand:
                mem.write(addr, value.to_bytes(32, "little"))
                _advance(vcpu, regs, ins.len)
                return
            kvm_avx.write_ymm(area, layout, kvm_avx.ymm_index(ins.op0_register), value)
    memoryview(state).cast("B")[:] = area
    vcpu.set_xsave(state)
    _advance(vcpu, regs, ins.len)


def complete(
    vcpu: VcpuFd,
    mem: GuestMemory,
    insn_bytes: bytes | None,
    xsave_layout: dict[int, xsave.Component],
    fallback: Callable[[], None] | None = None,
    memory: Callable[[], LinearMemory] | None = None,
    features: Features | None = None,
) -> str:
    """Finish the instruction at RIP; returns its mnemonic for the assist counters. The families below have
    routines of their own; `fallback` (the software CPU, `popek.accel.kvm_softcpu`) takes every other one, and
    `memory` gives the routines the vCPU's view of linear memory (KVM_TRANSLATE without it). With `features`,
    an instruction whose feature the guest's CPUID does not offer raises #UD (its "Exceptions" section)."""
    d = decode(vcpu, mem, insn_bytes)
    m = d.instruction.mnemonic
    if d.instruction.code == iced_x86.Code.INVALID:
        inject_exception(vcpu, UD_VECTOR)  # what the CPU does with bytes it cannot decode
        return "(invalid)"
    missing = features.missing_for(d.instruction) if features is not None else None
    if missing is not None:
        inject_exception(vcpu, UD_VECTOR)
        return f"(no {missing})"
    if m == iced_x86.Mnemonic.INT3:
        _advance(vcpu, vcpu.get_regs(), d.instruction.len)
        inject_exception(vcpu, BP_VECTOR)
        return d.mnemonic
    if m in _XSAVE_FAMILY:
        if not vcpu.get_sregs().cr4 & CR4_OSXSAVE:
            inject_exception(vcpu, UD_VECTOR)
            return d.mnemonic
        try:
            _xsave_family(vcpu, memory() if memory is not None else _TranslatedMemory(vcpu, mem), d, xsave_layout)
        except CpuException as exc:
            inject_cpu_exception(vcpu, exc)
        except GuestMemoryError as e:
            raise AssistError(f"{d.describe()}: {e}") from None
        return d.mnemonic
    if d.instruction.code in kvm_avx.MOVES:
        try:
            _avx_move(vcpu, memory() if memory is not None else _TranslatedMemory(vcpu, mem), d, xsave_layout)
        except CpuException as exc:
            inject_cpu_exception(vcpu, exc)
        except GuestMemoryError as e:
            raise AssistError(f"{d.describe()}: {e}") from None
        return d.mnemonic
    if d.instruction.code in kvm_mmx.MOVES:
        try:
            _mmx_move(vcpu, memory() if memory is not None else _TranslatedMemory(vcpu, mem), d)
        except CpuException as exc:
            inject_cpu_exception(vcpu, exc)
        except GuestMemoryError as e:
            raise AssistError(f"{d.describe()}: {e}") from None
        return d.mnemonic
    if m in (_M.CLAC, _M.STAC):  # SMAP's brackets around every user access: frequent, and trivial
        regs = vcpu.get_regs()
        regs.rflags = regs.rflags & ~RFLAGS_AC if m == _M.CLAC else regs.rflags | RFLAGS_AC
        _advance(vcpu, regs, d.instruction.len)
        return d.mnemonic
    if fallback is not None:
        try:
            fallback()
        except AssistError as e:
            raise AssistError(f"KVM could not emulate {d.describe()}, nor popek: {e}") from None
        except GuestMemoryError as e:
            raise AssistError(f"{d.describe()}: {e}") from None
        return d.mnemonic
    raise AssistError(f"KVM could not emulate {d.describe()}")
