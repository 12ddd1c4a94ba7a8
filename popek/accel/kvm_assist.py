"""Completing, in popek, an instruction the host's KVM failed to emulate (KVM_EXIT_INTERNAL_ERROR, suberror
KVM_INTERNAL_ERROR_EMULATION), so that the guest continues as if the CPU had executed it.

Each assist does what the architecture (Intel SDM vol. 2) specifies for the instruction, using the vCPU's
registers, guest page tables (through KVM_TRANSLATE) and guest memory:
- INT3: the trap delivers #BP with the return address after the instruction.
- XSAVE family: executed here on the vCPU's XSAVE state (KVM_GET/SET_XSAVE, XCRS) by `popek.cpu.xsave`;
  #UD when CR4.OSXSAVE is clear, #GP(0) for a bad area, as the hardware would raise.
- CMPXCHG16B: executed here, under a lock shared by all assists.
- FWAIT: #NM when CR0.MP and CR0.TS are set, #MF when the x87 status word has an unmasked exception pending
  (FSW.ES), otherwise nothing.
- The bit-manipulation and data-movement instructions of `popek.cpu.bitops` (POPCNT, LZCNT/TZCNT, BMI1/2,
  MOVBE, ADCX/ADOX, RDRAND/RDSEED): a host's instruction emulator often lacks them, and the guest learns of
  them from CPUID leaves some hosts do not let the VMM change.
Anything else stops the VM with the instruction's bytes and disassembly.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import iced_x86

from popek.cpu import bitops, xsave
from popek.errors import GuestMemoryError
from popek.kvm import KvmError, VcpuFd
from popek.kvm.structs import kvm_regs, kvm_xcrs
from popek.memory import PAGE_SIZE, GuestMemory

BP_VECTOR = 3
UD_VECTOR = 6
GP_VECTOR = 13
CR4_OSXSAVE = 1 << 18
RFLAGS_ZF = 1 << 6

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
    raw = insn_bytes
    if not raw:
        raw = b""
        for size in (15, PAGE_SIZE - rip % PAGE_SIZE):  # the second try stops at the page end
            try:
                raw = read_linear(vcpu, mem, rip, min(size, 15))
                break
            except (AssistError, GuestMemoryError, KvmError):
                continue
    instruction = iced_x86.Decoder(bitness, raw, ip=rip).decode() if raw else iced_x86.Instruction()
    return Decoded(rip, bitness, raw[: instruction.len] if instruction.len else raw, instruction)


def _inject_exception(vcpu: VcpuFd, vector: int, error_code: int | None = None) -> None:
    events = vcpu.get_vcpu_events()
    events.exception.injected = 1
    events.exception.nr = vector
    events.exception.has_error_code = 1 if error_code is not None else 0
    events.exception.error_code = error_code or 0
    events.flags = 0
    vcpu.set_vcpu_events(events)


def _advance(vcpu: VcpuFd, regs: kvm_regs, length: int) -> None:
    regs.rip += length
    vcpu.set_regs(regs)


def _effective_address(vcpu: VcpuFd, regs: kvm_regs, d: Decoded) -> int:
    ins = d.instruction
    if ins.is_ip_rel_memory_operand:
        return int(ins.ip_rel_memory_address)
    addr = ins.memory_displacement
    addr = int(addr)
    if ins.memory_base != iced_x86.Register.NONE:
        addr += getattr(regs, _REGISTER_NAMES[ins.memory_base])
    if ins.memory_index != iced_x86.Register.NONE:
        addr += getattr(regs, _REGISTER_NAMES[ins.memory_index]) * ins.memory_index_scale
    seg = ins.memory_segment
    sregs = vcpu.get_sregs()
    if seg == iced_x86.Register.FS:
        addr += sregs.fs.base
    elif seg == iced_x86.Register.GS:
        addr += sregs.gs.base
    return int(addr & 0xFFFFFFFFFFFFFFFF)


def _cmpxchg16b(vcpu: VcpuFd, mem: GuestMemory, d: Decoded) -> None:
    regs = vcpu.get_regs()
    try:
        addr = _effective_address(vcpu, regs, d)
    except KeyError:
        raise AssistError(f"unsupported addressing in {d.describe()}") from None
    if addr % 16:
        _inject_exception(vcpu, GP_VECTOR, 0)
        return
    with _lock:
        current = int.from_bytes(read_linear(vcpu, mem, addr, 16), "little")
        expected = regs.rax | (regs.rdx << 64)
        if current == expected:
            write_linear(vcpu, mem, addr, (regs.rbx | (regs.rcx << 64)).to_bytes(16, "little"))
            regs.rflags |= RFLAGS_ZF
        else:
            regs.rax, regs.rdx = current & (2**64 - 1), current >> 64
            regs.rflags &= ~RFLAGS_ZF
    _advance(vcpu, regs, d.instruction.len)


def _xcr0(vcpu: VcpuFd) -> int:
    xcrs = vcpu.get_xcrs()
    for x in list(xcrs.xcrs)[: xcrs.nr_xcrs]:
        if x.xcr == 0:
            return int(x.value)
    return 1


def _xsave_family(vcpu: VcpuFd, mem: GuestMemory, d: Decoded, layout: dict[int, xsave.Component]) -> None:
    m = d.instruction.mnemonic
    regs = vcpu.get_regs()
    xcr0 = _xcr0(vcpu)
    mask = (regs.rax & 0xFFFFFFFF) | ((regs.rdx & 0xFFFFFFFF) << 32)
    if m == _M.XGETBV:
        if regs.rcx & 0xFFFFFFFF not in (0, 1):
            _inject_exception(vcpu, GP_VECTOR, 0)
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
            _inject_exception(vcpu, GP_VECTOR, 0)  # an invalid XCR or value
            return
        _advance(vcpu, regs, d.instruction.len)
        return
    addr = _effective_address(vcpu, regs, d)
    if addr % 64:
        _inject_exception(vcpu, GP_VECTOR, 0)
        return
    kvm_state = vcpu.get_xsave()
    state = bytes(memoryview(kvm_state).cast("B"))
    with _lock:
        try:
            if m in _XRSTOR:
                header = read_linear(vcpu, mem, addr, xsave.EXTENDED_START)
                compacted = bool(xsave._header(header)[1] & xsave.COMPACTED)
                size = xsave.area_size(
                    layout, xsave._header(header)[1] & ~xsave.COMPACTED if compacted else xcr0, compacted
                )
                area = read_linear(vcpu, mem, addr, size)
                new_state = xsave.restore(state, area, xcr0, mask, layout)
                memoryview(kvm_state).cast("B")[: len(new_state)] = new_state
                vcpu.set_xsave(kvm_state)
            else:
                compacted = m in _XSAVE_COMPACTED
                size = xsave.area_size(layout, xcr0 & mask, compacted)
                old = read_linear(vcpu, mem, addr, size)
                write_linear(vcpu, mem, addr, xsave.save(state, old, xcr0, mask, layout, compacted))
        except xsave.XsaveFault:
            _inject_exception(vcpu, GP_VECTOR, 0)
            return
    _advance(vcpu, regs, d.instruction.len)


FLAG_BITS = {"cf": 0, "pf": 2, "af": 4, "zf": 6, "sf": 7, "of": 11}
_HIGH_BYTE = {
    iced_x86.Register.AH: "rax",
    iced_x86.Register.CH: "rcx",
    iced_x86.Register.DH: "rdx",
    iced_x86.Register.BH: "rbx",
}
_RE = iced_x86.RegisterExt


class _Operands:
    """Reads and writes an instruction's operands: general registers (in `regs`) and guest memory."""

    def __init__(self, vcpu: VcpuFd, mem: GuestMemory, regs: kvm_regs, d: Decoded) -> None:
        self.vcpu, self.mem, self.regs, self.d = vcpu, mem, regs, d
        self.ins = d.instruction

    def bits(self, i: int) -> int:
        ins = self.ins
        if ins.op_kind(i) == iced_x86.OpKind.REGISTER:
            return int(_RE.size(ins.op_register(i))) * 8
        return int(iced_x86.MemorySizeExt.size(ins.memory_size)) * 8

    def _reg(self, reg: Any) -> tuple[str, int, int]:
        if reg in _HIGH_BYTE:
            return _HIGH_BYTE[reg], 8, 8
        full = _RE.full_register(reg)
        if full not in _REGISTER_NAMES:
            raise AssistError(f"operand register {reg} of {self.d.describe()} is not a general register")
        return _REGISTER_NAMES[full], 0, int(_RE.size(reg)) * 8

    def read(self, i: int) -> int:
        ins = self.ins
        kind = ins.op_kind(i)
        if kind == iced_x86.OpKind.REGISTER:
            name, shift, bits = self._reg(ins.op_register(i))
            return int(getattr(self.regs, name) >> shift) & ((1 << bits) - 1)
        if kind == iced_x86.OpKind.MEMORY:
            addr = _effective_address(self.vcpu, self.regs, self.d)
            return int.from_bytes(read_linear(self.vcpu, self.mem, addr, self.bits(i) // 8), "little")
        return int(ins.immediate(i))

    def write(self, i: int, value: int) -> None:
        ins = self.ins
        if ins.op_kind(i) == iced_x86.OpKind.REGISTER:
            name, shift, bits = self._reg(ins.op_register(i))
            mask = ((1 << bits) - 1) << shift
            if bits == 32:  # a 32-bit destination zero-extends into the whole register
                setattr(self.regs, name, value & 0xFFFFFFFF)
            else:
                setattr(self.regs, name, (getattr(self.regs, name) & ~mask) | ((value << shift) & mask))
            return
        addr = _effective_address(self.vcpu, self.regs, self.d)
        write_linear(
            self.vcpu, self.mem, addr, (value & ((1 << self.bits(i)) - 1)).to_bytes(self.bits(i) // 8, "little")
        )

    def set_flags(self, flags: bitops.Flags) -> None:
        for name, value in flags.items():
            bit = 1 << FLAG_BITS[name]
            self.regs.rflags = (self.regs.rflags | bit) if value else (self.regs.rflags & ~bit)

    def flag(self, name: str) -> int:
        return int(self.regs.rflags >> FLAG_BITS[name]) & 1


_UNARY_FLAGS = {
    _M.POPCNT: bitops.popcnt,
    _M.LZCNT: bitops.lzcnt,
    _M.TZCNT: bitops.tzcnt,
    _M.BLSR: bitops.blsr,
    _M.BLSI: bitops.blsi,
    _M.BLSMSK: bitops.blsmsk,
}
_SHIFTS = {
    _M.SHLX: bitops.shlx,
    _M.SHRX: bitops.shrx,
    _M.SARX: bitops.sarx,
    _M.RORX: bitops.rorx,
    _M.PDEP: bitops.pdep,
    _M.PEXT: bitops.pext,
}
RFLAGS_AC = 1 << 18
MSR_TSC_AUX = 0xC0000103
NM_VECTOR, MF_VECTOR = 7, 16
CR0_MP, CR0_TS = 1 << 1, 1 << 3
FSW_ES = 1 << 7
_SEGMENT_BASE = {_M.RDFSBASE: "fs", _M.RDGSBASE: "gs", _M.WRFSBASE: "fs", _M.WRGSBASE: "gs"}
SYSTEM = {_M.CLAC, _M.STAC, _M.RDPID, _M.WAIT} | set(_SEGMENT_BASE)
SIMPLE = (
    set(_UNARY_FLAGS)
    | set(_SHIFTS)
    | {_M.ANDN, _M.BZHI, _M.BEXTR, _M.BSF, _M.BSR, _M.MOVBE, _M.ADCX, _M.ADOX, _M.RDRAND, _M.RDSEED}
)


def _execute_simple(vcpu: VcpuFd, mem: GuestMemory, d: Decoded) -> None:
    """Run one instruction of `SIMPLE` on the vCPU's registers and guest memory, then step past it."""
    regs = vcpu.get_regs()
    ops = _Operands(vcpu, mem, regs, d)
    m = d.instruction.mnemonic
    bits = ops.bits(0)
    if m in _UNARY_FLAGS:
        result, flags = _UNARY_FLAGS[m](ops.read(1), bits)
        ops.write(0, result)
        ops.set_flags(flags)
    elif m in (_M.BSF, _M.BSR):
        result, flags = (bitops.bsf if m == _M.BSF else bitops.bsr)(ops.read(1), ops.read(0), bits)
        ops.write(0, result)
        ops.set_flags(flags)
    elif m in _SHIFTS:
        ops.write(0, _SHIFTS[m](ops.read(1), ops.read(2), bits))
    elif m == _M.ANDN:
        result, flags = bitops.andn(ops.read(1), ops.read(2), bits)
        ops.write(0, result)
        ops.set_flags(flags)
    elif m == _M.BZHI:
        result, flags = bitops.bzhi(ops.read(1), ops.read(2), bits)
        ops.write(0, result)
        ops.set_flags(flags)
    elif m == _M.BEXTR:
        result, flags = bitops.bextr(ops.read(1), ops.read(2), bits)
        ops.write(0, result)
        ops.set_flags(flags)
    elif m == _M.MOVBE:
        ops.write(0, bitops.bswap(ops.read(1), bits))
    elif m in (_M.ADCX, _M.ADOX):
        flag = "cf" if m == _M.ADCX else "of"
        result, carry = bitops.add_with_carry(ops.read(0), ops.read(1), ops.flag(flag), bits)
        ops.write(0, result)
        ops.set_flags({flag: carry})
    elif m in (_M.RDRAND, _M.RDSEED):
        result, flags = bitops.random_value(bits)
        ops.write(0, result)
        ops.set_flags(flags)
    _advance(vcpu, regs, d.instruction.len)


def _execute_system(vcpu: VcpuFd, mem: GuestMemory, d: Decoded) -> None:
    """SMAP's CLAC/STAC, the FSGSBASE instructions, RDPID and FWAIT, on the vCPU's flags, segments, MSRs and
    x87 status."""
    regs = vcpu.get_regs()
    ops = _Operands(vcpu, mem, regs, d)
    m = d.instruction.mnemonic
    if m == _M.WAIT:
        if vcpu.get_sregs().cr0 & (CR0_MP | CR0_TS) == CR0_MP | CR0_TS:
            _inject_exception(vcpu, NM_VECTOR)
            return
        if vcpu.get_fpu().fsw & FSW_ES:
            _inject_exception(vcpu, MF_VECTOR)
            return
    elif m == _M.CLAC:
        regs.rflags &= ~RFLAGS_AC
    elif m == _M.STAC:
        regs.rflags |= RFLAGS_AC
    elif m == _M.RDPID:
        ops.write(0, vcpu.get_msrs([MSR_TSC_AUX]).get(MSR_TSC_AUX, 0))
    else:
        sregs = vcpu.get_sregs()
        seg = getattr(sregs, _SEGMENT_BASE[m])
        if m in (_M.RDFSBASE, _M.RDGSBASE):
            ops.write(0, seg.base)
        else:
            seg.base = ops.read(0)
            vcpu.set_sregs(sregs)
    _advance(vcpu, regs, d.instruction.len)


def complete(vcpu: VcpuFd, mem: GuestMemory, insn_bytes: bytes | None, xsave_layout: dict[int, xsave.Component]) -> str:
    """Finish the instruction at RIP; returns its mnemonic for the assist counters."""
    d = decode(vcpu, mem, insn_bytes)
    m = d.instruction.mnemonic
    if d.instruction.code == iced_x86.Code.INVALID:
        _inject_exception(vcpu, UD_VECTOR)  # what the CPU does with bytes it cannot decode
        return "(invalid)"
    if m == iced_x86.Mnemonic.INT3:
        _advance(vcpu, vcpu.get_regs(), d.instruction.len)
        _inject_exception(vcpu, BP_VECTOR)
        return d.mnemonic
    if m in _XSAVE_FAMILY:
        if not vcpu.get_sregs().cr4 & CR4_OSXSAVE:
            _inject_exception(vcpu, UD_VECTOR)
            return d.mnemonic
        try:
            _xsave_family(vcpu, mem, d, xsave_layout)
        except GuestMemoryError as e:
            raise AssistError(f"{d.describe()}: {e}") from None
        return d.mnemonic
    if m == iced_x86.Mnemonic.CMPXCHG16B:
        try:
            _cmpxchg16b(vcpu, mem, d)
        except GuestMemoryError as e:
            raise AssistError(f"{d.describe()}: {e}") from None
        return d.mnemonic
    if m in SIMPLE or m in SYSTEM:
        try:
            (_execute_simple if m in SIMPLE else _execute_system)(vcpu, mem, d)
        except GuestMemoryError as e:
            raise AssistError(f"{d.describe()}: {e}") from None
        return d.mnemonic
    raise AssistError(f"KVM could not emulate {d.describe()}")
