"""The architectural state of one x86-64 logical processor, as the software CPU keeps it (Intel SDM vol. 1 ch. 3,
vol. 3A ch. 2-3), and the exceptions that leave an instruction.

Everything the interpreter, the MMU and exception delivery share lives here, in plain Python ints, so each part
can be tested alone and the lockstep checker can compare it field by field with KVM's registers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

MASK64 = (1 << 64) - 1

# general-purpose registers, in the encoding's order (ModRM.reg / REX.R)
RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)
R8, R9, R10, R11, R12, R13, R14, R15 = range(8, 16)
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", *(f"r{i}" for i in range(8, 16)))

# segment registers, in the encoding's order (Sreg field)
ES, CS, SS, DS, FS, GS = range(6)
SEGMENT_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")

# RFLAGS
CF, PF, AF, ZF, SF, TF, IF, DF, OF = 1 << 0, 1 << 2, 1 << 4, 1 << 6, 1 << 7, 1 << 8, 1 << 9, 1 << 10, 1 << 11
IOPL_SHIFT, IOPL_MASK = 12, 3 << 12
NT, RF, VM, AC, VIF, VIP, ID = 1 << 14, 1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 21
RFLAGS_FIXED = 1 << 1  # bit 1 always reads as 1
STATUS_FLAGS = CF | PF | AF | ZF | SF | OF

# control registers
CR0_PE, CR0_MP, CR0_EM, CR0_TS, CR0_ET, CR0_NE = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5
CR0_WP, CR0_AM, CR0_NW, CR0_CD, CR0_PG = 1 << 16, 1 << 18, 1 << 29, 1 << 30, 1 << 31
CR4_VME, CR4_PVI, CR4_TSD, CR4_DE, CR4_PSE, CR4_PAE = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5
CR4_MCE, CR4_PGE, CR4_PCE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 6, 1 << 7, 1 << 8, 1 << 9, 1 << 10
CR4_UMIP, CR4_LA57, CR4_FSGSBASE, CR4_PCIDE, CR4_OSXSAVE = 1 << 11, 1 << 12, 1 << 16, 1 << 17, 1 << 18
CR4_SMEP, CR4_SMAP, CR4_PKE, CR4_PKS = 1 << 20, 1 << 21, 1 << 22, 1 << 24

# EFER
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1 << 0, 1 << 8, 1 << 10, 1 << 11

# MSRs the state keeps as fields (the rest go to `msrs`)
MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_IA32_APIC_BASE = 0x1B
MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SFMASK = 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_TSC_AUX = 0xC0000100, 0xC0000101, 0xC0000102, 0xC0000103
MSR_IA32_TSC = 0x10
MSR_IA32_PKRS = 0x6E1  # protection-key rights for supervisor pages (vol. 3A §4.6.2)


class Vector(IntEnum):
    """Exception vectors (SDM vol. 3A table 6-1)."""

    DE = 0
    DB = 1
    NMI = 2
    BP = 3
    OF = 4
    BR = 5
    UD = 6
    NM = 7
    DF = 8
    TS = 10
    NP = 11
    SS = 12
    GP = 13
    PF = 14
    MF = 16
    AC = 17
    MC = 18
    XM = 19


# exceptions that push an error code
ERROR_CODE_VECTORS = frozenset({Vector.DF, Vector.TS, Vector.NP, Vector.SS, Vector.GP, Vector.PF, Vector.AC})

# #PF error code bits
PF_P, PF_W, PF_U, PF_RSVD, PF_I, PF_PK = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5


class CpuException(Exception):
    """An exception raised while executing an instruction: the instruction has no effect (faults restore RIP to
    the instruction's start) and the exception is delivered through the IDT before the next one."""

    def __init__(self, vector: int, error_code: int | None = None, cr2: int | None = None) -> None:
        name = Vector(vector).name if vector in Vector._value2member_map_ else str(vector)
        super().__init__(f"#{name}" + (f"({error_code:#x})" if error_code is not None else ""))
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2  # for #PF: the faulting linear address, loaded into CR2 at delivery


class TripleFault(Exception):
    """Exception delivery failed while delivering #DF: the processor shuts down."""


@dataclass
class Segment:
    """A segment register: the visible selector and the hidden descriptor cache (SDM vol. 3A §3.4.3).

    `type` is the descriptor's 4-bit type, `s` 1 for code/data, `db` the D/B bit, `l` the L bit, `g` granularity
    (the cached `limit` is already scaled: it is the byte limit). `unusable` marks a null-loaded data segment.
    """

    selector: int = 0
    base: int = 0
    limit: int = 0xFFFF
    type: int = 0x3
    s: int = 1
    dpl: int = 0
    present: int = 1
    db: int = 0
    l: int = 0
    g: int = 0
    avl: int = 0
    unusable: int = 0

    def copy(self) -> Segment:
        return Segment(**vars(self))


@dataclass
class TableRegister:
    base: int = 0
    limit: int = 0xFFFF


def _segments() -> list[Segment]:
    segs = [Segment() for _ in range(6)]
    segs[CS] = Segment(selector=0xF000, base=0xFFFF0000, type=0xB)
    return segs


@dataclass
class CpuState:
    """Registers of one logical processor; the reset values are those of SDM vol. 3A table 9-1."""

    gpr: list[int] = field(default_factory=lambda: [0] * 16)
    rip: int = 0xFFF0
    rflags: int = RFLAGS_FIXED
    seg: list[Segment] = field(default_factory=_segments)
    ldtr: Segment = field(default_factory=lambda: Segment(type=0x2, s=0))
    tr: Segment = field(default_factory=lambda: Segment(type=0xB, s=0))
    gdtr: TableRegister = field(default_factory=TableRegister)
    idtr: TableRegister = field(default_factory=TableRegister)
    cr0: int = CR0_ET | CR0_CD | CR0_NW
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    dr: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 0xFFFF0FF0, 0x400, 0xFFFF0FF0, 0x400])
    msrs: dict[int, int] = field(default_factory=dict)  # every MSR not kept as a field above
    # SSE: 16 XMM registers as 128-bit ints, and MXCSR
    xmm: list[int] = field(default_factory=lambda: [0] * 16)
    mxcsr: int = 0x1F80
    # x87 (vol. 1 §8.1): control and status words (TOP in FSW 13:11), the abridged tag (bit i: R{i} in use, as
    # FXSAVE stores it; the full tag is derived from the contents), the eight 80-bit data registers as ints in
    # physical order R0..R7 (ST(i) is R[(TOP + i) % 8]), and the last instruction's opcode (11 bits), FCS:FIP
    # and FDS:FDP (offsets, as FXSAVE64 stores them)
    fcw: int = 0x37F
    fsw: int = 0
    ftw: int = 0
    st: list[int] = field(default_factory=lambda: [0] * 8)
    fop: int = 0
    fip: int = 0
    fcs: int = 0
    fdp: int = 0
    fds: int = 0
    xcr0: int = 1
    pkru: int = 0  # protection-key rights for user pages (vol. 3A §4.6.2), RDPKRU/WRPKRU
    tsc_offset: int = 0
    halted: bool = False
    interrupt_shadow: bool = False  # the instruction after STI / MOV SS / POP SS: no interrupts before it
    nmi_blocked: bool = False

    # --- derived views ---

    @property
    def cpl(self) -> int:
        """Current privilege level: 0 in real mode, 3 in virtual-8086 mode, else SS.DPL, which every privilege
        change keeps equal to it (KVM reports CPL the same way, which keeps lockstep comparisons simple)."""
        if not self.cr0 & CR0_PE:
            return 0
        if self.rflags & VM:
            return 3
        return self.seg[SS].dpl

    @property
    def long_mode(self) -> bool:
        """IA-32e mode active (EFER.LMA)."""
        return bool(self.efer & EFER_LMA)

    @property
    def code_bits(self) -> int:
        """The default operand/address size of the code now running: 16, 32 or 64."""
        cs = self.seg[CS]
        if self.long_mode and cs.l:
            return 64
        if not self.cr0 & CR0_PE or self.rflags & VM:
            return 16 if not cs.db else 32
        return 32 if cs.db else 16

    @property
    def paging(self) -> bool:
        return bool(self.cr0 & CR0_PG)

    def get_msr(self, index: int) -> int:
        return self.msrs.get(index, 0)
