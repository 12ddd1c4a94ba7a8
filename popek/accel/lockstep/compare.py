"""What lockstep compares and replays (see the package docstring): the flags the SDM leaves undefined,
the results taken from the host, the device accesses of one step (`ReplayBus`), and how a divergence is
reported."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import iced_x86

from popek.accel.kvm_convert import (
    NOT_COMPARED,
    ArchState,
    describe_attributes,
)
from popek.cpu.interp import MEMSIZE, RBITS
from popek.cpu.state import (
    AF,
    CF,
    DF,
    IF,
    OF,
    PF,
    RF,
    SF,
    TF,
    ZF,
)

M = iced_x86.Mnemonic
R = iced_x86.Register
K = iced_x86.OpKind

STATUS = CF | PF | AF | ZF | SF | OF
IGNORED_FLAGS = TF | RF  # single-stepping sets and clears them behind the guest's back
_FLAG_NAMES = ((CF, "CF"), (PF, "PF"), (AF, "AF"), (ZF, "ZF"), (SF, "SF"), (TF, "TF"), (IF, "IF"), (DF, "DF"),
               (OF, "OF"), (RF, "RF"))  # fmt: skip

# Flags the SDM (vol. 2, each instruction's "Flags Affected") leaves undefined. Shifts, rotates and double
# shifts depend on the count and are computed in `undefined_flags`.
UNDEFINED_FLAGS: dict[int, int] = {
    M.MUL: SF | ZF | AF | PF,
    M.IMUL: SF | ZF | AF | PF,
    M.DIV: STATUS,
    M.IDIV: STATUS,
    M.AND: AF,
    M.OR: AF,
    M.XOR: AF,
    M.TEST: AF,
    M.BSF: CF | OF | SF | AF | PF,
    M.BSR: CF | OF | SF | AF | PF,
    M.BT: OF | SF | AF | PF,
    M.BTS: OF | SF | AF | PF,
    M.BTR: OF | SF | AF | PF,
    M.BTC: OF | SF | AF | PF,
    M.LZCNT: OF | SF | AF | PF,
    M.TZCNT: OF | SF | AF | PF,
    M.ANDN: AF | PF,
    M.BLSI: AF | PF,
    M.BLSMSK: AF | PF,
    M.BLSR: AF | PF,
    M.BZHI: AF | PF,
    M.BEXTR: AF | SF | PF,
    M.AAA: OF | SF | ZF | PF,
    M.AAS: OF | SF | ZF | PF,
    M.AAM: OF | AF | CF,
    M.AAD: OF | AF | CF,
    M.DAA: OF,
    M.DAS: OF,
}
SHIFTS = frozenset({M.SHL, M.SAL, M.SHR, M.SAR})  # AF undefined (count != 0), OF undefined (count > 1)
ROTATES = frozenset({M.ROL, M.ROR, M.RCL, M.RCR})  # OF undefined (count > 1)
DOUBLE_SHIFTS = frozenset({M.SHLD, M.SHRD})  # as shifts; everything undefined when count > operand size
# instructions whose results are the host's, not the architecture's: KVM's are copied to the software CPU
NONDETERMINISTIC: dict[int, tuple[str, ...]] = {
    M.CPUID: ("rax", "rbx", "rcx", "rdx"),
    M.RDTSC: ("rax", "rdx"),
    M.RDTSCP: ("rax", "rdx", "rcx"),
    M.RDPMC: ("rax", "rdx"),
    M.RDRAND: (),  # the destination register, and the flags
    M.RDSEED: (),
}
# devices KVM emulates in the kernel (KvmAccel creates the irqchip and PIT): their accesses never exit
IN_KERNEL_PORTS = frozenset({0x20, 0x21, 0xA0, 0xA1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x4D0, 0x4D1})
IN_KERNEL_MMIO = ((0xFEE00000, 0x1000), (0xFEC00000, 0x1000))

Instruction = Any  # iced_x86.Instruction (iced ships no type information)


def flag_names(mask: int) -> str:
    return " ".join(name for bit, name in _FLAG_NAMES if mask & bit) or "-"


def _operand_bits(ins: Instruction) -> int:
    if ins.op0_kind == K.REGISTER:
        return RBITS[ins.op0_register] or 64
    return MEMSIZE[ins.memory_size] * 8 or 64


def undefined_flags(ins: Instruction, pre: ArchState) -> int:
    """The status flags the SDM leaves undefined after `ins` executed from state `pre`."""
    mn = ins.mnemonic
    if mn == M.MOV and any(
        ins.op_kind(i) == K.REGISTER
        and (R.CR0 <= ins.op_register(i) <= R.CR15 or R.DR0 <= ins.op_register(i) <= R.DR15)
        for i in range(ins.op_count)
    ):
        return STATUS  # MOV to or from a control or debug register
    if mn not in SHIFTS and mn not in ROTATES and mn not in DOUBLE_SHIFTS:
        return UNDEFINED_FLAGS.get(mn, 0)
    count_op = 2 if mn in DOUBLE_SHIFTS else 1
    if ins.op_count <= count_op:
        count = 1
    elif ins.op_kind(count_op) == K.REGISTER:
        count = pre["rcx"] & 0xFF
    else:
        count = ins.immediate(count_op) & 0xFF
    bits = _operand_bits(ins)
    count &= 0x3F if bits == 64 else 0x1F
    if count == 0:
        return 0
    if mn in ROTATES:
        return OF if count > 1 else 0
    undefined = AF | (OF if count > 1 else 0)
    if mn in DOUBLE_SHIFTS and count > bits:
        undefined = STATUS
    return undefined


class Access_(NamedTuple):
    """One device access of an instruction: kind "in", "out", "read" (MMIO) or "write" (MMIO)."""

    kind: str
    addr: int
    size: int
    data: bytes

    def __str__(self) -> str:
        where = f"port {self.addr:#x}" if self.kind in ("in", "out") else f"MMIO {self.addr:#x}"
        return f"{self.kind} {where} size {self.size} data {self.data.hex() or '-'}"


def _in_kernel(kind: str, addr: int) -> bool:
    if kind in ("in", "out"):
        return addr in IN_KERNEL_PORTS
    return any(base <= addr < base + size for base, size in IN_KERNEL_MMIO)


class NeedKvm(Exception):
    """The software CPU's speculative attempt read a device: KVM's side must execute the instruction first."""


class IoDivergence(Exception):
    """The software CPU's device accesses differ from KVM's."""


class ReplayBus:
    """The software CPU's `SystemBus` in lockstep: it never reaches a device. Reads are answered from KVM's recorded
    accesses, writes are compared with them (or, during the speculative attempt, kept for comparison)."""

    def __init__(self) -> None:
        self.records: list[Access_] = []
        self.cursor = 0
        self.replaying = False
        self.soft_writes: list[Access_] = []
        self.fallback: Callable[[int], int | None] = lambda size: None

    def speculate(self) -> None:
        self.replaying, self.soft_writes, self.records, self.cursor = False, [], [], 0

    def replay(self, records: list[Access_], fallback: Callable[[int], int | None]) -> None:
        self.replaying, self.soft_writes, self.records, self.cursor = True, [], records, 0
        self.fallback = fallback

    def check_speculated(self, records: list[Access_]) -> None:
        """After a speculative step that read nothing: KVM's accesses must be exactly the software CPU's writes."""
        writes = self.soft_writes
        self.replaying, self.records, self.cursor = True, records, 0
        for w in writes:
            self._write(w.kind, w.addr, w.size, w.data)
        self.finish()

    def finish(self) -> None:
        if self.cursor < len(self.records):
            extra = "; ".join(str(r) for r in self.records[self.cursor :])
            raise IoDivergence(f"KVM made device accesses the software CPU did not: {extra}")

    def _next(self) -> Access_ | None:
        return self.records[self.cursor] if self.cursor < len(self.records) else None

    def _read(self, kind: str, addr: int, size: int) -> int:
        if not self.replaying:
            raise NeedKvm
        rec = self._next()
        if rec is not None and (rec.kind, rec.addr, rec.size) == (kind, addr, size):
            self.cursor += 1
            return int.from_bytes(rec.data, "little")
        mine = Access_(kind, addr, size, b"")
        if _in_kernel(kind, addr):
            value = self.fallback(size)
            if value is not None:
                return value
            raise IoDivergence(f"the software CPU did {mine}, which KVM's in-kernel devices answered, in an "
                                "instruction form lockstep cannot replay")  # fmt: skip
        raise IoDivergence(f"the software CPU did {mine}; KVM's next access was {rec or 'none'}")

    def _write(self, kind: str, addr: int, size: int, data: bytes) -> None:
        mine = Access_(kind, addr, size, data)
        if not self.replaying:
            self.soft_writes.append(mine)
            return
        rec = self._next()
        if rec == mine:
            self.cursor += 1
            return
        if _in_kernel(kind, addr):
            return  # KVM's in-kernel device took it: nothing to compare
        raise IoDivergence(f"the software CPU did {mine}; KVM's next access was {rec or 'none'}")

    # --- popek.cpu.core.SystemBus ---

    def pio_read(self, port: int, size: int) -> int:
        return self._read("in", port, size)

    def pio_write(self, port: int, size: int, value: int) -> None:
        self._write("out", port, size, value.to_bytes(size, "little"))

    def mmio_read(self, addr: int, size: int) -> int:
        return self._read("read", addr, size)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        self._write("write", addr, size, value.to_bytes(size, "little"))


@dataclass
class Divergence:
    """The first difference between the two sides. `step` counts lockstep steps before this one (instructions and
    exception deliveries), `instructions` the instructions the software CPU retired before it."""

    kind: str  # "state", "memory", "io", "external event", "triple fault", "soft cpu"
    step: int
    instructions: int
    rip: int
    raw: bytes
    disassembly: str
    detail: str
    pre: ArchState
    kvm: ArchState | None
    soft: ArchState
    fields: tuple[str, ...] = ()

    @property
    def mnemonic(self) -> str:
        return self.disassembly.split(" ", 1)[0] if self.disassembly else ""

    def report(self) -> str:
        lines = [
            f"lockstep divergence ({self.kind}) at step {self.step} (instruction {self.instructions}):",
            f"  {self.rip:#x}: {self.raw.hex(' ') or '??'}  {self.disassembly or '(not decodable)'}",
        ]
        lines += [f"  {line}" for line in self.detail.splitlines()]
        lines.append(f"  {'':2}{'field':<10} {'before':>18} {'kvm after':>18} {'soft after':>18}")
        for name, before in self.pre.items():
            k = self.kvm.get(name, NOT_COMPARED) if self.kvm is not None else NOT_COMPARED
            s = self.soft.get(name, NOT_COMPARED)
            mark = "*" if name in self.fields else " "
            lines.append(f"  {mark} {name:<10} {_fmt(before):>18} {_fmt(k):>18} {_fmt(s):>18}")
            if mark == "*" and name.endswith(".attr"):
                lines.append(f"      kvm: {describe_attributes(k)}; soft: {describe_attributes(s)}")
        return "\n".join(lines)

    __str__ = report


def _fmt(value: int) -> str:
    return "-" if value == NOT_COMPARED else f"{value:#x}"


@dataclass
class Outcome:
    """How a lockstep run ended: "divergence", "halted", "shutdown" (both sides triple-faulted), "stopped" (from
    outside), "limit" (max_steps reached) or "error" (KVM failed in a way that is not a guest divergence)."""

    reason: str
    steps: int
    instructions: int
    divergence: Divergence | None = None
    detail: str = ""



def differences(kvm: ArchState, soft: ArchState, undefined: int) -> tuple[str, ...]:
    out = []
    for name, value in kvm.items():
        other = soft.get(name, NOT_COMPARED)
        if name == "rflags":
            mask = ~(IGNORED_FLAGS | undefined)
            if (value ^ other) & mask:
                out.append(name)
        elif value != other:
            out.append(name)
    return tuple(out)
