"""The software CPU's instruction interpreter: fetch, decode (iced-x86) and execute (Intel SDM vol. 2A-2D for
instruction semantics; vol. 1 ch. 3-8 and 10-11 for the general-purpose, x87 and SSE state; vol. 3A
ch. 2 (system registers, CR0/CR4/EFER checks), ch. 4 (paging effects of CR writes), ch. 6 (interrupt/exception
ordering: NMI, maskable interrupts, STI/MOV SS shadows) and vol. 4 (MSRs)).

Structure, chosen so each instruction's semantics can later be emitted into translated basic blocks:
- `step()` takes a pending event or executes one instruction; an instruction's handler is a method
  `(self, ins)` of `Interpreter`, tagged with `@handles(Mnemonic...)` (or `@handles_code(Code...)` where one
  mnemonic covers unrelated instructions, e.g. the string MOVSD and the SSE MOVSD); the table from mnemonic to
  handler is built once per class.
- Handlers read operands, compute, and only then write results and flags, so a fault (any `CpuException`)
  leaves no partial state; `step()` restores RIP to the instruction's start and delivers it through the IDT.
  The exceptions to "no partial state" are those the architecture itself has: REP string instructions commit
  RCX/RSI/RDI per iteration, as hardware does, so a fault resumes where it stopped.
- Decoded instructions are cached by guest-physical address and bitness, with the handler already bound; the
  MMU calls `_invalidate_page` when a page holding decoded code is written (self-modifying code, reloaded
  modules), which drops every cached instruction that touches the page. The cache holds at most
  DECODE_CACHE_ENTRIES instructions and starts afresh when full (a guest decides how much code it runs).

Deviations from hardware, deliberate and documented:
- The TSS I/O permission bitmap is not consulted: with CPL > IOPL (or in virtual-8086 mode) every IN/OUT/INS/
  OUTS raises #GP(0), as if the bitmap denied every port.
- MMX, and SSE beyond SSE2's data moves, integer operations and basic floating point are #UD. CPUID
  advertises SSE2 because a 64-bit kernel requires it. SSE floating point (ADD/SUB/MUL/DIV/MIN/MAX/SQRT in
  SD/SS/PD/PS forms, CMPxx, (U)COMISx, CVT between integers, singles and doubles) is bit-exact for
  round-to-nearest; MXCSR rounding control, DAZ/FTZ and exception flags are not modelled (no #XM).
- The x87 FPU (values in `popek.cpu.x87`) is bit-exact with the reference AMD host wherever the SDM defines the
  result: every arithmetic, load/store, integer and BCD conversion, comparison, FXAM, FSCALE/FXTRACT/FPREM(1),
  FRNDINT and stack instruction, under every precision and rounding control, with masked and unmasked
  exceptions (tests/unit/cpu/test_x87_native.py). Not bit-exact: the transcendentals (FSIN, FCOS, FSINCOS,
  FPTAN, FPATAN, F2XM1, FYL2X, FYL2XP1) are within 1 ulp of the exact result, which processors are not for
  large trigonometric arguments (they reduce with a rounded pi); FPREM's partial remainder (exponents 64 or
  more apart) reduces by its own choice of 2**(32..63); values the SDM leaves undefined (C0/C2/C3 after
  arithmetic, F2XM1/FYL2XP1 outside their domains, FBLD of invalid digits). With CR0.NE clear an unmasked
  exception does not assert FERR# (no IRQ 13): the instruction that would take #MF runs. FOP/FIP/FDP are
  updated by every non-control instruction (the SDM's base behaviour; some processors update them only on
  unmasked exceptions).
- DAA/DAS/AAA/AAS/AAM/AAD set the flags the SDM leaves undefined as the AMD host does (compared exhaustively).
- Decoded instructions are cached; a write to a code page through the MMU invalidates it, but a write made
  behind the MMU's back (the VMM writing guest RAM directly) needs `flush_decode_cache()`.
- Flags the SDM leaves undefined take the values AMD processors produce (the reference host of the native
  tests and of KVM lockstep runs): e.g. AF set by shifts, MUL/IMUL keep SF/ZF/AF/PF, DIV sets AF and clears
  SF/ZF/PF, LZCNT/TZCNT clear PF/AF/SF; LAR returns the descriptor's limit bits 19:16 as 0.
- Single-step (RFLAGS.TF) delivers #DB after each instruction; hardware breakpoints (DR7) are stored, not armed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import iced_x86

from popek.cpu import alu, bitops, exceptions, segments, sse, x87
from popek.cpu.flags import COND_TABLE, MASKS, NOT_STATUS, PARITY, SIGN, add, logic, sub
from popek.cpu.mmu import Access
from popek.cpu.state import (
    AC,
    AF,
    CF,
    CR0_AM,
    CR0_CD,
    CR0_EM,
    CR0_ET,
    CR0_MP,
    CR0_NE,
    CR0_NW,
    CR0_PE,
    CR0_PG,
    CR0_TS,
    CR0_WP,
    CR4_DE,
    CR4_FSGSBASE,
    CR4_MCE,
    CR4_OSFXSR,
    CR4_OSXMMEXCPT,
    CR4_OSXSAVE,
    CR4_PAE,
    CR4_PCE,
    CR4_PGE,
    CR4_PKE,
    CR4_PKS,
    CR4_PSE,
    CR4_PVI,
    CR4_SMAP,
    CR4_SMEP,
    CR4_TSD,
    CR4_UMIP,
    CR4_VME,
    CS,
    DF,
    DS,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    EFER_SCE,
    ES,
    FS,
    GS,
    ID,
    IF,
    IOPL_MASK,
    IOPL_SHIFT,
    MASK64,
    MSR_CSTAR,
    MSR_EFER,
    MSR_FS_BASE,
    MSR_GS_BASE,
    MSR_IA32_APIC_BASE,
    MSR_IA32_PKRS,
    MSR_IA32_SYSENTER_CS,
    MSR_IA32_SYSENTER_EIP,
    MSR_IA32_SYSENTER_ESP,
    MSR_IA32_TSC,
    MSR_KERNEL_GS_BASE,
    MSR_LSTAR,
    MSR_SFMASK,
    MSR_STAR,
    MSR_TSC_AUX,
    NT,
    OF,
    PF,
    RAX,
    RBP,
    RBX,
    RCX,
    RDI,
    RDX,
    RF,
    RFLAGS_FIXED,
    RSI,
    RSP,
    SF,
    SS,
    STATUS_FLAGS,
    TF,
    VM,
    ZF,
    CpuException,
    Segment,
    Vector,
)
from popek.features import Features

if TYPE_CHECKING:
    from popek.cpu.core import Cpu

Instruction = Any  # iced_x86.Instruction (iced ships no type information)
Handler = Callable[[Instruction], None]
F = TypeVar("F", bound=Callable[..., None])

M = iced_x86.Mnemonic
C = iced_x86.Code
R = iced_x86.Register
K = iced_x86.OpKind
_MS = iced_x86.MemorySize

M32 = 0xFFFF_FFFF
KVM_ENOSYS = 1000  # KVM's hypercall error numbers (include/uapi/linux/kvm_para.h)
KVM_EPERM = 1
FSW_ES = 1 << 7  # x87 status word: exception summary
# decoded instructions kept (a Linux boot executes ~60k distinct ones); a few hundred bytes each at most
DECODE_CACHE_ENTRIES = 1 << 18
REGISTER = K.REGISTER
MEMORY = K.MEMORY
_READ, _WRITE, _EXECUTE = Access.READ, Access.WRITE, Access.EXECUTE

# --- register tables, indexed by iced Register values ---
_NREG = 256
RIDX = [0] * _NREG  # GPR index
RBITS = [0] * _NREG  # width of a GPR view
HIGH8 = frozenset({R.AH, R.CH, R.DH, R.BH})
for _i, _n in enumerate(("AL", "CL", "DL", "BL", "SPL", "BPL", "SIL", "DIL")):
    RIDX[getattr(R, _n)], RBITS[getattr(R, _n)] = _i, 8
for _i, _n in enumerate(("AH", "CH", "DH", "BH")):
    RIDX[getattr(R, _n)], RBITS[getattr(R, _n)] = _i, 8
for _i, (_w, _d, _q) in enumerate(
    zip(
        ("AX", "CX", "DX", "BX", "SP", "BP", "SI", "DI"),
        ("EAX", "ECX", "EDX", "EBX", "ESP", "EBP", "ESI", "EDI"),
        ("RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI"),
    )
):
    RIDX[getattr(R, _w)], RBITS[getattr(R, _w)] = _i, 16
    RIDX[getattr(R, _d)], RBITS[getattr(R, _d)] = _i, 32
    RIDX[getattr(R, _q)], RBITS[getattr(R, _q)] = _i, 64
for _i in range(8, 16):
    for _suffix, _bits in (("L", 8), ("W", 16), ("D", 32), ("", 64)):
        _r = getattr(R, f"R{_i}{_suffix}")
        RIDX[_r], RBITS[_r] = _i, _bits
RBITS[R.RIP], RBITS[R.EIP] = 64, 32
SREG = {R.ES: ES, R.CS: CS, R.SS: SS, R.DS: DS, R.FS: FS, R.GS: GS}
SEG_OF = [DS] * _NREG  # memory_segment register → segment index
for _r, _s in SREG.items():
    SEG_OF[_r] = _s
XMM0, XMM15 = R.XMM0, R.XMM15
CR0_REG, DR0_REG = R.CR0, R.DR0

# memory operand sizes in bytes, by iced MemorySize
_MEMSIZE_COUNT = max(v for k, v in vars(iced_x86.MemorySize).items() if k.isupper()) + 1
MEMSIZE: list[int] = [int(iced_x86.MemorySizeExt.size(i)) for i in range(_MEMSIZE_COUNT)]  # type: ignore[arg-type]

# string instruction address sizes by operand kind
_STRING_ASIZE = {
    K.MEMORY_SEG_SI: 16, K.MEMORY_SEG_ESI: 32, K.MEMORY_SEG_RSI: 64,
    K.MEMORY_SEG_DI: 16, K.MEMORY_SEG_EDI: 32, K.MEMORY_SEG_RDI: 64,
    K.MEMORY_ESDI: 16, K.MEMORY_ESEDI: 32, K.MEMORY_ESRDI: 64,
}  # fmt: skip


def _code_table() -> tuple[dict[int, int], dict[int, int]]:
    """Operand sizes of the instructions whose size is in their Code name (IRETD, RETFQ_IMM16, CALL_M1632,
    PUSHAW...), and the count-register widths of LOOPcc/JrCXZ."""
    opsize: dict[int, int] = {}
    count_bits: dict[int, int] = {}
    for name, code in vars(C).items():
        if not name.isupper():
            continue
        m = re.match(r"(IRET|RETF|ENTER|LEAVE|PUSHF|POPF|PUSHA|POPA)([WDQ])(_|$)", name)
        if m:
            opsize[code] = {"W": 16, "D": 32, "Q": 64}[m.group(2)]
        m = re.match(r"(CALL|JMP)_(M|PTR)16(16|32|64)$", name)
        if m:
            opsize[code] = int(m.group(3))
        m = re.match(r"(LOOP\w*_REL8_\d+_|J)(R?E?CX)Z?(_|$)", name)
        if m and (name.startswith("LOOP") or name.startswith(("JCXZ", "JECXZ", "JRCXZ"))):
            count_bits[code] = {"CX": 16, "ECX": 32, "RCX": 64}[m.group(2)]
    return opsize, count_bits


OPSIZE, COUNT_BITS = _code_table()

_CC_NAMES = ("O", "NO", "B", "AE", "E", "NE", "BE", "A", "S", "NS", "P", "NP", "L", "GE", "LE", "G")
_LOCKABLE_NAMES = (
    "ADD", "ADC", "AND", "BTC", "BTR", "BTS", "CMPXCHG", "CMPXCHG8B", "CMPXCHG16B", "DEC", "INC", "NEG", "NOT",
    "OR", "SBB", "SUB", "XOR", "XADD", "XCHG",
)  # fmt: skip
LOCKABLE = frozenset(getattr(M, n) for n in _LOCKABLE_NAMES)
_NO_MORE_BYTES = iced_x86.DecoderError.NO_MORE_BYTES
# The SDM leaves these flags undefined; AMD processors (the reference host) produce: (flags set, flags cleared,
# PF from the result)
_AMD_UNDEFINED: dict[int, tuple[int, int, bool]] = {
    M.LZCNT: (0, PF | AF | SF, False),
    M.TZCNT: (0, PF | AF | SF, False),
    M.ANDN: (0, AF, True),
    M.BLSR: (0, AF, True),
    M.BLSI: (0, AF, True),
    M.BLSMSK: (0, AF, True),
    M.BZHI: (0, AF, True),
    M.BEXTR: (AF, SF, True),
}
_JCC_SET = frozenset(getattr(M, "J" + cc) for cc in _CC_NAMES)
_ARITH_KIND = {M.ADD: 0, M.OR: 1, M.ADC: 2, M.SBB: 3, M.AND: 4, M.SUB: 5, M.XOR: 6, M.CMP: 7, M.TEST: 8}
_IMM_KINDS = frozenset({K.IMMEDIATE8, K.IMMEDIATE16, K.IMMEDIATE32, K.IMMEDIATE64, K.IMMEDIATE8TO16,
                        K.IMMEDIATE8TO32, K.IMMEDIATE8TO64, K.IMMEDIATE32TO64})  # fmt: skip

# RFLAGS bits POPF/IRET can write at all (bit 1 reads as 1, the rest are reserved)
POPF_BITS = STATUS_FLAGS | TF | IF | DF | IOPL_MASK | NT | AC | ID
_FLAG_BIT = {"cf": CF, "pf": PF, "af": AF, "zf": ZF, "sf": SF, "of": OF}

# CR4 bits this CPU implements (writing others is #GP(0)); SMEP/SMAP are enforced by the MMU
CR4_SUPPORTED = (
    CR4_VME | CR4_PVI | CR4_TSD | CR4_DE | CR4_PSE | CR4_PAE | CR4_MCE | CR4_PGE | CR4_PCE | CR4_OSFXSR
    | CR4_OSXMMEXCPT | CR4_UMIP | CR4_FSGSBASE | CR4_OSXSAVE | CR4_SMEP | CR4_SMAP | CR4_PKE | CR4_PKS
)  # fmt: skip
EFER_SUPPORTED = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE

# MSRs kept as plain storage in `CpuState.msrs` (vol. 4): PAT, MTRRs, MISC_ENABLE, the syscall MSRs, TSC_AUX...
MSR_PAT = 0x277
MSR_TSC_ADJUST = 0x3B  # IA32_TSC_ADJUST, offered by CPUID.7.0:EBX[1]
MSR_MTRRCAP, MSR_MTRR_DEF_TYPE, MSR_MISC_ENABLE = 0xFE, 0x2FF, 0x1A0
STORAGE_MSRS = frozenset(
    {MSR_STAR, MSR_CSTAR, MSR_SFMASK, MSR_TSC_AUX, MSR_PAT, MSR_MTRR_DEF_TYPE, MSR_MISC_ENABLE, MSR_KERNEL_GS_BASE}
    | set(range(0x200, 0x210))
    | {0x250, 0x258, 0x259}
    | set(range(0x268, 0x270))
    | {MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP, MSR_LSTAR}
)
CANONICAL_MSRS = frozenset({MSR_LSTAR, MSR_CSTAR, MSR_KERNEL_GS_BASE, MSR_FS_BASE, MSR_GS_BASE,
                            MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP})  # fmt: skip
# Machine-check architecture (vol. 3B ch. 16), which CPUID's MCE and MCA bits promise: MCG_CAP (read-only: the bank
# count, no MCG_CTL), MCG_STATUS, and per bank CTL/STATUS/ADDR/MISC at 0x400 + 4 * bank. No machine check ever
# happens on this CPU, so the banks only hold what software writes.
MSR_MCG_CAP, MSR_MCG_STATUS = 0x179, 0x17A
MCE_BANKS = 10  # as QEMU's CPU models have
MSR_MC0_CTL = 0x400
MCE_BANK_MSRS = range(MSR_MC0_CTL, MSR_MC0_CTL + 4 * MCE_BANKS)
MSR_DEFAULTS = {
    MSR_PAT: 0x0007040600070406,
    MSR_MTRRCAP: 0x508,
    MSR_IA32_APIC_BASE: 0xFEE00900,
    MSR_MISC_ENABLE: 1 | 1 << 11 | 1 << 12,  # fast strings; BTS and PEBS unavailable (read-only), as KVM sets it
    MSR_MCG_CAP: MCE_BANKS,
}


def canonical(addr: int) -> bool:
    """A 48-bit canonical address: bits 63:47 all equal."""
    top = addr >> 47
    return top == 0 or top == 0x1FFFF


def _fault(vector: int, code: int | None = None) -> CpuException:
    return CpuException(vector, code)


def _gp0() -> CpuException:
    return CpuException(Vector.GP, 0)


def _ud() -> CpuException:
    return CpuException(Vector.UD)


# --- the handler registry ---


def handles(*mnemonics: int) -> Callable[[F], F]:
    """Tag a handler with the iced mnemonics it executes (collected into the dispatch table at class creation)."""

    def tag(fn: F) -> F:
        fn._mnemonics = mnemonics  # type: ignore[attr-defined]
        return fn

    return tag


def handles_code(*codes: int) -> Callable[[F], F]:
    """Tag a handler with individual iced Codes; these take precedence over mnemonic handlers."""

    def tag(fn: F) -> F:
        fn._codes = codes  # type: ignore[attr-defined]
        return fn

    return tag


def _cc(prefix: str) -> tuple[int, ...]:
    return tuple(getattr(M, prefix + cc) for cc in _CC_NAMES)


CPUID7_EBX_SMAP = 1 << 20
CPUID7_ECX_PKU, CPUID7_ECX_OSPKE = 1 << 3, 1 << 4

# debug registers (SDM vol. 3B §18.2)
DR6_BD, DR6_BS = 1 << 13, 1 << 14
DR7_GD = 1 << 13
# `Cpu.db_pending` markers beside DR6's B0-B3: ICEBP executed, MOV SS/POP SS executed, events held by it
_DB_ICEBP, _DB_MOVSS, _DB_HELD, _DB_HELD_STEP = 1 << 32, 1 << 33, 1 << 34, 1 << 35
_DB_CLEAR_RF = 1 << 36  # the instruction ran with RF set (past an execution breakpoint): clear RF when it completes

# --- the default CPUID: only what this interpreter executes ---
# The processor presents itself as an Intel one, family 6, as QEMU's named CPU models name a vendor and model kernels
# know: Linux and the conformance suite take vendor-specific paths (Linux's "unknown vendor, using generic init"
# warning, the suite's AMD-only performance-counter set-up) by the vendor string alone. Where Intel and AMD
# processors differ architecturally, the interpreter follows the vendor its CPUID names (`Interpreter.intel`):
# SYSCALL/SYSRET exist only in 64-bit mode on Intel, SYSENTER/SYSEXIT only outside long mode on AMD.
INTEL_VENDOR = b"GenuineIntel"
AMD_VENDOR = b"AuthenticAMD"
_VENDOR = INTEL_VENDOR
MAX_BASIC_LEAF = 0x16
CRYSTAL_HZ = 1_000_000_000  # leaf 0x15's core crystal clock: the 1 GHz the TSC and APIC timer count at


def vendor_of(leaf0: tuple[int, int, int, int]) -> bytes:
    """The 12-byte vendor string of a CPUID leaf 0 result (EBX, EDX, ECX)."""
    _, ebx, ecx, edx = leaf0
    return b"".join((r & M32).to_bytes(4, "little") for r in (ebx, edx, ecx))


def default_cpuid(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
    """CPUID for a processor with exactly the features implemented here (vol. 2A CPUID)."""
    v = [int.from_bytes(_VENDOR[i : i + 4], "little") for i in (0, 4, 8)]
    if leaf == 0:
        return MAX_BASIC_LEAF, v[0], v[2], v[1]
    if leaf == 1:
        # family 6 model 0x3A stepping 9; CLFLUSH line 8 qwords; one logical processor
        eax = (6 << 8) | (0xA << 4) | (0x3 << 16) | 9
        ebx = 8 << 8 | 1 << 16
        ecx = (1 << 13) | (1 << 23) | (1 << 30) | (1 << 22)  # CX16, POPCNT, RDRAND, MOVBE
        edx = (
            1 << 0
            | 1 << 2
            | 1 << 3
            | 1 << 4
            | 1 << 5
            | 1 << 6
            | 1 << 7
            | 1 << 8
            | 1 << 9
            | 1 << 11
            | 1 << 12
            | 1 << 13
            | 1 << 14
            | 1 << 15
            | 1 << 16
            | 1 << 19
            | 1 << 24
            | 1 << 25
            | 1 << 26
        )  # fmt: skip  FPU DE PSE TSC MSR PAE MCE CX8 APIC SEP MTRR PGE MCA CMOV PAT CLFSH FXSR SSE SSE2
        return eax, ebx, ecx, edx
    if leaf == 7 and subleaf == 0:
        # FSGSBASE, TSC_ADJUST, BMI1, SMEP, BMI2, ERMS, RDSEED, ADX, SMAP; ECX: UMIP, RDPID
        ebx = 1 << 0 | 1 << 1 | 1 << 3 | 1 << 7 | 1 << 8 | 1 << 9 | 1 << 18 | 1 << 19 | 1 << 20
        # ECX: UMIP, PKU, RDPID, PKS (OSPKE, bit 4, is added from CR4.PKE when CPUID executes)
        return 0, ebx, 1 << 2 | 1 << 3 | 1 << 22 | 1 << 31, 0
    if leaf == 0x15:
        return 1, 1, CRYSTAL_HZ, 0  # TSC = crystal * EBX / EAX: Linux takes the TSC frequency from here
    if leaf == 0x16:
        return CRYSTAL_HZ // 1_000_000, CRYSTAL_HZ // 1_000_000, 100, 0  # base, maximum and bus MHz
    if leaf == 0x80000000:
        return 0x80000008, 0, 0, 0
    if leaf == 0x80000001:
        # ECX: LAHF/SAHF in 64-bit mode, LZCNT; EDX: SYSCALL, NX, 1-GiB pages (the MMU maps them), RDTSCP, LM
        return 0, 0, 1 << 0 | 1 << 5, 1 << 11 | 1 << 20 | 1 << 26 | 1 << 27 | 1 << 29
    if leaf in (0x80000002, 0x80000003, 0x80000004):
        text = b"popek software x86-64 CPU".ljust(48, b"\0")
        off = (leaf - 0x80000002) * 16
        return tuple(int.from_bytes(text[off + 4 * i : off + 4 * i + 4], "little") for i in range(4))  # type: ignore[return-value]
    if leaf == 0x80000008:
        return 0x302E, 0, 0, 0  # 46 physical, 48 linear address bits
    return 0, 0, 0, 0


class Interpreter:
    """Executes a `Cpu`'s instructions one at a time.

    Hooks the backend may replace: `cpuid(leaf, subleaf) -> (eax, ebx, ecx, edx)`; `tsc() -> int` (the TSC
    before `CpuState.tsc_offset`, by default the retired-instruction count); `stop_requested`, which a device
    callback sets to end `run()` after the current instruction.
    """

    _mnemonic_table: dict[int, str] = {}
    _code_table_: dict[int, str] = {}

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        cls._collect()

    @classmethod
    def _collect(cls) -> None:
        """Build the dispatch tables from the `@handles` tags, once per class."""
        by_mn: dict[int, str] = {}
        by_code: dict[int, str] = {}
        for klass in reversed(cls.__mro__):
            for name, fn in vars(klass).items():
                for m in getattr(fn, "_mnemonics", ()):
                    by_mn[m] = name
                for c in getattr(fn, "_codes", ()):
                    by_code[c] = name
        cls._mnemonic_table = by_mn
        cls._code_table_ = by_code

    def __init__(self, cpu: Cpu) -> None:
        self.cpu = cpu
        self.s = cpu.state
        self.mmu = cpu.mmu
        self.cpuid = default_cpuid
        self.tsc: Callable[[], int] = lambda: self.cpu.instructions
        self.stop_requested = False
        self.on_pause: Callable[[], None] = lambda: None
        self._cache: dict[int, tuple[Handler, Instruction, int, int, int]] = {}
        self._page_keys: dict[int, set[int]] = {}
        self._by_mn: dict[int, Handler] = {m: getattr(self, n) for m, n in self._mnemonic_table.items()}
        self._by_code: dict[int, Handler] = {c: getattr(self, n) for c, n in self._code_table_.items()}
        cpu.mmu.on_code_write = self._invalidate_page
        self._fetch_lpage = -1
        self._fetch_ppage = 0
        self._fetch_gen = -1
        self._fetch_user = False
        self._exec_bps: dict[int, int] = {}  # linear address -> DR6 B bits of the execution breakpoints there

    @property
    def cpuid(self) -> Callable[[int, int], tuple[int, int, int, int]]:
        return self._cpuid_fn

    @cpuid.setter
    def cpuid(self, fn: Callable[[int, int], tuple[int, int, int, int]]) -> None:
        """A new CPUID: the vendor it names decides the vendor-specific behaviours (`intel`)."""
        self._cpuid_fn = fn
        self.intel = vendor_of(fn(0, 0)) != AMD_VENDOR
        # the control bits a guest may set: what this CPU implements and its CPUID offers (popek.features)
        self.features = Features.from_cpuid(fn)
        self._cr4_allowed = CR4_SUPPORTED & self.features.cr4_allowed()
        self._efer_allowed = EFER_SUPPORTED & self.features.efer_allowed()

    # ------------------------------------------------------------------ the loop

    def run(self, max_instructions: int) -> int:
        """Execute until `max_instructions` have retired, the CPU halts with nothing to wake it, or a device
        asked to stop (`stop_requested`, consumed here). Returns the number of instructions retired.

        (An inlined copy of `step`'s instruction path measured slower than calling `step`, so the loop is plain.)
        """
        cpu = self.cpu
        start = cpu.instructions
        step = self.step
        budget = max_instructions  # events taken count too, so an interrupt storm cannot spin here forever
        while budget > 0 and cpu.instructions - start < max_instructions:
            budget -= 1
            step()
            if self.stop_requested:
                self.stop_requested = False
                break
            if self.s.halted and not self._event_pending():
                break
        return cpu.instructions - start

    def _fetch_translate(self, lin: int, user: bool) -> int:
        """A miss in the one-page fetch TLB kept in front of the MMU's: it stays valid until the MMU flushes (its
        `flushes` count moves; INVLPG here resets it too) or the privilege of the fetch changes."""
        mmu = self.mmu
        phys = mmu.translate(lin, _EXECUTE, user)
        self._fetch_lpage, self._fetch_ppage = lin >> 12, phys & ~0xFFF
        self._fetch_gen, self._fetch_user = mmu.flushes, user
        return phys

    def _event_pending(self) -> bool:
        cpu, s = self.cpu, self.s
        if cpu.nmi_pending and not s.nmi_blocked:
            return True
        return bool(s.rflags & IF and cpu.irq is not None and cpu.irq.interrupt_pending())

    def step(self) -> None:
        """Take a pending NMI or interrupt, or execute one instruction (SDM vol. 3A §6.9 priorities)."""
        cpu = self.cpu
        s = self.s = cpu.state
        if s.interrupt_shadow:
            s.interrupt_shadow = False  # blocks events before this one instruction only
        else:
            if cpu.nmi_pending and not s.nmi_blocked:
                cpu.nmi_pending = False
                s.halted = False
                exceptions.inject_nmi(cpu)
                return
            if s.rflags & IF and cpu.irq is not None and cpu.irq.interrupt_pending():
                s.halted = False
                exceptions.inject_interrupt(cpu, cpu.irq.acknowledge())
                return
        if s.halted:
            return
        rip = s.rip
        trap = s.rflags & TF
        try:
            cs = s.seg[CS]
            if s.efer & EFER_LMA and cs.l:
                bits = 64
                lin = rip
            else:
                bits = 32 if cs.db else 16
                lin = (cs.base + rip) & M32
            if (self._exec_bps or s.rflags & RF) and self._instruction_breakpoint(lin, rip):
                return
            if s.cr0 & CR0_PG:
                user = s.seg[SS].dpl == 3 or bool(s.rflags & VM)
                if lin >> 12 == self._fetch_lpage and self._fetch_gen == self.mmu.flushes and user == self._fetch_user:
                    phys = self._fetch_ppage | (lin & 0xFFF)
                else:
                    phys = self._fetch_translate(lin, user)
            else:
                phys = lin
            key = (phys << 2) | (bits >> 5)
            entry = self._cache.get(key)
            if entry is None or entry[2] != rip:
                entry = self._decode(key, lin, phys, rip, bits)
            if bits != 64 and entry[4] > cs.limit:
                raise _gp0()  # the instruction runs past the CS limit
            s.rip = entry[3]
            entry[0](entry[1])
        except CpuException as exc:
            s.rip = rip
            cpu.db_pending = 0  # a faulting instruction reports no trap-class debug event
            exceptions.handle(cpu, exc, rip)
            return
        cpu.instructions += 1
        if trap or cpu.db_pending:
            self._debug_trap(bool(trap))

    # ------------------------------------------------------------------ debug exceptions (SDM vol. 3B ch. 18)

    def _arm_breakpoints(self) -> None:
        """DR0-DR3 as DR7 enables them (L or G bit; R/W and LEN per §18.2.4): execution breakpoints are checked
        before each instruction, data breakpoints (R/W 01 writes, 11 reads or writes) by the MMU on every access.
        I/O breakpoints (R/W 10) are not implemented."""
        dr = self.s.dr
        execs: dict[int, int] = {}
        watch = []
        for n in range(4):
            if not dr[7] >> (2 * n) & 3:
                continue
            rw, length = dr[7] >> (16 + 4 * n) & 3, dr[7] >> (18 + 4 * n) & 3
            size = (1, 2, 8, 4)[length]
            if rw == 0:
                execs[dr[n]] = execs.get(dr[n], 0) | 1 << n
            elif rw in (1, 3):
                first = dr[n] & ~(size - 1)
                watch.append((first, first + size - 1, n, rw == 1))
        self._exec_bps = execs
        self.mmu.watch = tuple(watch)

    def _deliver_db(self, bits: int, return_rip: int) -> None:
        """A #DB: DR6's B0-B3 say which breakpoints matched (set or cleared each time), the other status bits are
        sticky; DR7.GD is cleared on entry (§18.2.3, §18.2.4)."""
        s = self.s
        s.dr[6] = (s.dr[6] & ~0xF) | bits
        s.dr[7] &= ~DR7_GD
        try:
            exceptions.deliver(self.cpu, Vector.DB, return_rip=return_rip)
        except CpuException as exc:
            exceptions.handle(self.cpu, exc, return_rip)

    def _instruction_breakpoint(self, lin: int, rip: int) -> bool:
        """An execution breakpoint at `lin` is a fault (RIP at the instruction) unless RFLAGS.RF says the
        instruction is being restarted after one (§18.3.1.1); RF is cleared when an instruction completes."""
        s = self.s
        if s.rflags & RF:
            self.cpu.db_pending |= _DB_CLEAR_RF
            return False
        bits = self._exec_bps.get(lin, 0)
        if not bits:
            return False
        if self.cpu.db_pending & _DB_HELD and self.intel:
            return False  # Intel: no code breakpoint on the instruction after MOV SS/POP SS (AMD reports it)
        self._deliver_db(bits, rip)
        return True

    def _debug_trap(self, single_step: bool) -> None:
        """The trap-class debug events of the instruction that just completed (§18.3.1): data breakpoints and
        single-step (DR6.BS) become one #DB with RIP at the next instruction. After MOV SS or POP SS they are held
        until the next instruction completes (§6.8.3: such blocking delays debug traps by one instruction). ICEBP
        (INT1) is its own #DB, without BS: its single-step trap is not reported."""
        cpu, s = self.cpu, self.s
        pending = cpu.db_pending
        cpu.db_pending = 0
        if pending & _DB_CLEAR_RF:
            s.rflags &= ~RF
        bits = pending & 0xF
        single_step = single_step or bool(pending & _DB_HELD_STEP)
        if pending & _DB_MOVSS and not pending & _DB_HELD:
            cpu.db_pending = _DB_HELD | bits | (_DB_HELD_STEP if single_step else 0)
            return
        if pending & _DB_ICEBP:
            self._deliver_db(bits, s.rip)
        elif bits or single_step:
            if single_step:
                s.dr[6] |= DR6_BS
            self._deliver_db(bits, s.rip)

    def execute_one(self) -> Instruction:
        """Execute the instruction at RIP and nothing else: no pending event is taken first, no single-step trap
        after, and a fault leaves the instruction as a `CpuException` (RIP at the instruction, no state changed)
        instead of being delivered here. This is how another backend borrows the software CPU for one
        instruction (`popek.accel.kvm_softcpu`), delivering what it raises its own way. Raises
        `NotImplementedError` for a valid instruction this CPU does not implement, which is no guest error."""
        s = self.s = self.cpu.state
        rip = s.rip
        cs = s.seg[CS]
        bits = 64 if s.efer & EFER_LMA and cs.l else (32 if cs.db else 16)
        lin = rip if bits == 64 else (cs.base + rip) & M32
        try:
            phys = self.mmu.translate(lin, _EXECUTE, s.cpl == 3) if s.cr0 & CR0_PG else lin
            handler, ins, _, next_rip, last = self._decode((phys << 2) | (bits >> 5), lin, phys, rip, bits)
            if handler == self._ud and ins.code != C.INVALID and not self.implements(ins):
                raise NotImplementedError(f"popek's CPU does not implement {ins}")
            if bits != 64 and last > cs.limit:
                raise _gp0()
            s.rip = next_rip
            handler(ins)
        except CpuException:
            s.rip = rip
            raise
        self.cpu.instructions += 1
        return ins

    def implements(self, ins: Instruction) -> bool:
        """Whether this CPU has semantics for `ins` (an instruction it lacks is #UD when it runs a guest)."""
        return bool(self._by_code.get(ins.code) or self._by_mn.get(ins.mnemonic))

    def _decode(self, key: int, lin: int, phys: int, rip: int, bits: int) -> tuple[Handler, Instruction, int, int, int]:
        """Decode at `lin` (a cache miss): fetch up to 15 bytes, crossing into the next page only if needed."""
        mmu, s = self.mmu, self.s
        user = s.cpl == 3
        room = 0x1000 - (lin & 0xFFF)
        data = mmu.read_bytes(lin, min(15, room), _EXECUTE, user)
        decoder = iced_x86.Decoder(bits, data, ip=rip)
        ins = decoder.decode()
        pages = [phys >> 12]
        if ins.code == C.INVALID and decoder.last_error == _NO_MORE_BYTES and room < 15:
            nxt = (lin + room) & (MASK64 if s.efer & EFER_LMA else M32)
            data = bytes(data) + mmu.read_bytes(nxt, 15 - room, _EXECUTE, user)
            ins = iced_x86.Decoder(bits, data, ip=rip).decode()
            if ins.len > room:
                pages.append((mmu.translate(nxt, _EXECUTE, user) if s.cr0 & CR0_PG else nxt) >> 12)
        handler = self._handler_for(ins)
        next_rip = ins.next_ip if bits == 64 else ins.next_ip & (M32 if bits == 32 else 0xFFFF)
        entry = (handler, ins, rip, next_rip, rip + ins.len - 1)
        if len(self._cache) >= DECODE_CACHE_ENTRIES and key not in self._cache:
            self.flush_decode_cache()  # a guest executing all of its RAM must not grow the cache without end
        self._cache[key] = entry
        for page in pages:
            mmu.mark_code(page)
            self._page_keys.setdefault(page, set()).add(key)
        return entry

    def _handler_for(self, ins: Instruction) -> Handler:
        if ins.code == C.INVALID:
            return self._ud
        handler = self._by_code.get(ins.code) or self._by_mn.get(ins.mnemonic)
        if handler is None:
            return self._ud
        if ins.has_lock_prefix and (ins.mnemonic not in LOCKABLE or ins.op0_kind != MEMORY):
            return self._ud
        return self._specialize(ins) or handler

    # ------------------------------------------------------------------ specialised handlers

    def _specialize(self, ins: Instruction) -> Handler | None:
        """A handler bound to this instruction's operands, for the commonest register forms: the operand
        decoding that the generic handler repeats on every execution (iced attribute reads, register tables) is
        done once here. Each specialised closure computes exactly what the generic handler would; this is also
        the shape translated blocks will take."""
        mn = ins.mnemonic
        if mn == M.MOV and ins.op0_kind == MEMORY and ins.op1_kind == REGISTER and RBITS[ins.op1_register] >= 32:
            return self._spec_store(ins)
        if ins.op_count == 0 or ins.op0_kind != REGISTER:
            if mn in _JCC_SET:
                return self._spec_jcc(ins)
            if mn == M.CALL and ins.op0_kind in (K.NEAR_BRANCH16, K.NEAR_BRANCH32, K.NEAR_BRANCH64):
                return self._spec_call(-ins.stack_pointer_increment, ins.near_branch_target)
            if mn == M.RET and ins.op_count == 0:
                return self._spec_ret(ins.stack_pointer_increment)
            return None
        r0 = ins.op0_register
        bits = RBITS[r0]
        if mn == M.MOV and ins.op1_kind == MEMORY and bits >= 32:
            return self._spec_load(ins)
        if mn == M.LEA and ins.op1_kind == MEMORY and bits >= 32:
            return self._spec_lea(ins)
        if bits == 64 and ins.op_count == 1 and mn in (M.PUSH, M.POP):
            return self._spec_pushpop(mn == M.PUSH, RIDX[r0])
        if bits < 32:
            return None  # 8/16-bit destinations merge into the register: the generic path handles them
        i0 = RIDX[r0]
        mask = MASKS[bits]
        k1 = ins.op1_kind if ins.op_count > 1 else -1
        if k1 == REGISTER and RBITS[ins.op1_register] == bits:
            i1, imm = RIDX[ins.op1_register], -1
        elif ins.op_count > 1 and k1 not in (REGISTER, MEMORY) and k1 in _IMM_KINDS:
            i1, imm = -1, ins.immediate(1) & mask
        else:
            i1 = imm = -2
        if mn == M.MOV and imm != -2:
            return self._spec_mov(i0, i1, imm, mask)
        kind = _ARITH_KIND.get(mn)
        if kind is not None and imm != -2:
            return self._spec_arith(kind, i0, i1, imm, bits)
        if mn in (M.INC, M.DEC) and ins.op_count == 1:
            return self._spec_incdec(mn == M.INC, i0, bits)
        return None

    def _spec_ea(self, ins: Instruction) -> Callable[[], int]:
        """The effective-address computation of `ins`'s memory operand, with its registers and constants bound."""
        base, index = ins.memory_base, ins.memory_index
        disp: int = ins.memory_displacement
        if base in (R.RIP, R.EIP):
            const = disp & MASKS[RBITS[base]]
            return lambda: const
        if not base and not index:
            const = disp & MASKS[ins.memory_displ_size * 8]
            return lambda: const
        if base and not index:
            ib, mask = RIDX[base], MASKS[RBITS[base]]
            return lambda: (self.s.gpr[ib] + disp) & mask
        scale: int = ins.memory_index_scale
        ii = RIDX[index]
        if not base:
            mask = MASKS[RBITS[index]]
            return lambda: (self.s.gpr[ii] * scale + disp) & mask
        ib, mask = RIDX[base], MASKS[RBITS[base]]

        def ea() -> int:
            gpr = self.s.gpr
            value: int = (gpr[ib] + gpr[ii] * scale + disp) & mask
            return value

        return ea

    def _spec_load(self, ins: Instruction) -> Handler:
        ea = self._spec_ea(ins)
        i0 = RIDX[ins.op0_register]
        size = RBITS[ins.op0_register] >> 3
        sreg = SEG_OF[ins.memory_segment]
        cpu, mmu, linear = self.cpu, self.mmu, segments.linear

        def load(_ins: Instruction) -> None:
            self.s.gpr[i0] = mmu.read(linear(cpu, sreg, ea(), size, _READ), size, _READ)

        return load

    def _spec_store(self, ins: Instruction) -> Handler:
        ea = self._spec_ea(ins)
        i1 = RIDX[ins.op1_register]
        size = RBITS[ins.op1_register] >> 3
        mask = MASKS[size * 8]
        sreg = SEG_OF[ins.memory_segment]
        cpu, mmu, linear = self.cpu, self.mmu, segments.linear

        def store(_ins: Instruction) -> None:
            mmu.write(linear(cpu, sreg, ea(), size, _WRITE), size, self.s.gpr[i1] & mask)

        return store

    def _spec_lea(self, ins: Instruction) -> Handler:
        ea = self._spec_ea(ins)
        i0 = RIDX[ins.op0_register]
        mask = MASKS[RBITS[ins.op0_register]]

        def lea(_ins: Instruction) -> None:
            self.s.gpr[i0] = ea() & mask

        return lea

    def _spec_call(self, size: int, target: int) -> Handler:
        cpu, push, branch = self.cpu, segments.push, self._branch

        def call(_ins: Instruction) -> None:
            s = self.s
            rsp = s.gpr[RSP]
            push(cpu, s.rip, size)
            try:
                branch(target)
            except CpuException:
                s.gpr[RSP] = rsp
                raise

        return call

    def _spec_ret(self, size: int) -> Handler:
        cpu, pop, branch = self.cpu, segments.pop, self._branch

        def ret(_ins: Instruction) -> None:
            s = self.s
            rsp = s.gpr[RSP]
            target = pop(cpu, size)
            try:
                branch(target)
            except CpuException:
                s.gpr[RSP] = rsp
                raise

        return ret

    def _spec_pushpop(self, push: bool, i0: int) -> Handler:
        cpu = self.cpu
        if push:
            seg_push = segments.push

            def push64(_ins: Instruction) -> None:
                seg_push(cpu, self.s.gpr[i0], 8)

            return push64
        seg_pop = segments.pop

        def pop64(_ins: Instruction) -> None:
            value = seg_pop(cpu, 8)
            self.s.gpr[i0] = value

        return pop64

    def _spec_mov(self, i0: int, i1: int, imm: int, mask: int) -> Handler:
        if i1 >= 0:

            def mov_rr(_ins: Instruction) -> None:
                gpr = self.s.gpr
                gpr[i0] = gpr[i1] & mask

            return mov_rr

        def mov_ri(_ins: Instruction) -> None:
            self.s.gpr[i0] = imm

        return mov_ri

    def _spec_arith(self, kind: int, i0: int, i1: int, imm: int, bits: int) -> Handler:
        mask = MASKS[bits]
        writes = kind < 7

        def arith(_ins: Instruction) -> None:
            s = self.s
            gpr = s.gpr
            a = gpr[i0] & mask
            b = gpr[i1] & mask if i1 >= 0 else imm
            if kind == 0:
                res, fl = add(a, b, bits)
            elif kind == 5 or kind == 7:
                res, fl = sub(a, b, bits)
            elif kind == 6:
                res = a ^ b
                fl = logic(res, bits)
            elif kind == 4 or kind == 8:
                res = a & b
                fl = logic(res, bits)
            elif kind == 1:
                res = a | b
                fl = logic(res, bits)
            elif kind == 2:
                res, fl = add(a, b, bits, s.rflags & CF)
            else:
                res, fl = sub(a, b, bits, s.rflags & CF)
            if writes:
                gpr[i0] = res
            s.rflags = (s.rflags & NOT_STATUS) | fl

        return arith

    def _spec_incdec(self, inc: bool, i0: int, bits: int) -> Handler:
        mask = MASKS[bits]
        keep = ~(STATUS_FLAGS & ~CF)

        def incdec(_ins: Instruction) -> None:
            s = self.s
            gpr = s.gpr
            res, fl = add(gpr[i0] & mask, 1, bits) if inc else sub(gpr[i0] & mask, 1, bits)
            gpr[i0] = res
            s.rflags = (s.rflags & keep) | (fl & ~CF)

        return incdec

    def _spec_jcc(self, ins: Instruction) -> Handler:
        row = COND_TABLE[ins.condition_code]
        target = ins.near_branch_target
        branch = self._branch

        def jcc(_ins: Instruction) -> None:
            f = self.s.rflags
            if row[(f & 1) | ((f >> 1) & 2) | ((f >> 4) & 12) | ((f >> 7) & 16)]:
                branch(target)

        return jcc

    def _invalidate_page(self, page: int) -> None:
        """The MMU saw a write to guest-physical page `page` holding decoded code: forget its instructions."""
        cache = self._cache
        for key in self._page_keys.pop(page, ()):
            cache.pop(key, None)

    def flush_decode_cache(self) -> None:
        """Forget every decoded instruction (e.g. after guest memory was rewritten behind the MMU's back)."""
        self._cache.clear()
        self._page_keys.clear()
        self.mmu.code_pages.clear()

    # ------------------------------------------------------------------ operand helpers

    def _rreg(self, r: int) -> int:
        """Read a general-purpose register view (AL..R15)."""
        bits = RBITS[r]
        v = self.s.gpr[RIDX[r]]
        if bits == 64:
            return v
        if bits == 8 and r in HIGH8:
            return (v >> 8) & 0xFF
        return v & MASKS[bits]

    def _wreg(self, r: int, value: int) -> None:
        """Write a register view: 32-bit writes zero-extend to 64 bits, 8/16-bit writes merge."""
        bits = RBITS[r]
        gpr = self.s.gpr
        i = RIDX[r]
        if bits == 64:
            gpr[i] = value & MASK64
        elif bits == 32:
            gpr[i] = value & M32
        elif bits == 16:
            gpr[i] = (gpr[i] & ~0xFFFF) | (value & 0xFFFF)
        elif r in HIGH8:
            gpr[i] = (gpr[i] & ~0xFF00) | ((value & 0xFF) << 8)
        else:
            gpr[i] = (gpr[i] & ~0xFF) | (value & 0xFF)

    def _ea(self, ins: Instruction) -> int:
        """The effective address (offset within the segment) of the memory operand, masked to the address
        size (16-bit forms via BX/BP/SI/DI bases come out of iced as base+index like the others)."""
        base = ins.memory_base
        index = ins.memory_index
        gpr = self.s.gpr
        if base:
            if base == R.RIP:
                return int(ins.memory_displacement)
            if base == R.EIP:
                return int(ins.memory_displacement) & M32
            a: int = ins.memory_displacement + gpr[RIDX[base]]
            if index:
                a += gpr[RIDX[index]] * ins.memory_index_scale
            return a & MASKS[RBITS[base]]
        if index:
            a = ins.memory_displacement + gpr[RIDX[index]] * ins.memory_index_scale
            return a & MASKS[RBITS[index]]
        a = ins.memory_displacement
        return a & MASKS[ins.memory_displ_size * 8]

    @staticmethod
    def _address_bits(ins: Instruction) -> int:
        """The address size of the memory operand: that of its base or index register, else of its absolute
        displacement (iced sizes moffs and [disp32] forms by the address size)."""
        reg = ins.memory_base or ins.memory_index
        bits: int = RBITS[reg] if reg else ins.memory_displ_size * 8
        return bits

    def _lin(self, ins: Instruction, size: int, access: Access) -> int:
        return segments.linear(self.cpu, SEG_OF[ins.memory_segment], self._ea(ins), size, access)

    def _mread(self, ins: Instruction, size: int) -> int:
        return self.mmu.read(self._lin(ins, size, _READ), size, _READ)

    def _mwrite(self, ins: Instruction, size: int, value: int) -> None:
        self.mmu.write(self._lin(ins, size, _WRITE), size, value)

    def _bits0(self, ins: Instruction) -> int:
        """The width of operand 0 (register or memory)."""
        if ins.op0_kind == REGISTER:
            bits: int = RBITS[ins.op0_register]
            return bits
        size: int = MEMSIZE[ins.memory_size]
        return size << 3

    def _read(self, ins: Instruction, i: int, bits: int) -> int:
        """Operand `i` (register, memory or immediate), as a `bits`-wide value."""
        kind = ins.op_kind(i)
        if kind == REGISTER:
            return self._rreg(ins.op_register(i))
        if kind == MEMORY:
            return self._mread(ins, bits >> 3)
        imm: int = ins.immediate(i)
        return imm & MASKS[bits]

    def _write0(self, ins: Instruction, value: int, bits: int) -> None:
        """Write operand 0."""
        if ins.op0_kind == REGISTER:
            self._wreg(ins.op0_register, value)
        else:
            self._mwrite(ins, bits >> 3, value)

    def _set_flags(self, flags: int, mask: int = STATUS_FLAGS) -> None:
        s = self.s
        s.rflags = (s.rflags & ~mask) | flags

    def _opsize(self, ins: Instruction) -> int:
        return OPSIZE.get(ins.code) or self._bits0(ins)

    def _addr_bits(self) -> int:
        return self.s.code_bits

    # ------------------------------------------------------------------ checks

    def _need_cpl0(self) -> None:
        if self.s.cpl:
            raise _gp0()

    def _need_pe(self) -> None:
        """#UD in real and virtual-8086 mode (LLDT, LTR, SLDT, STR, ARPL...)."""
        s = self.s
        if not s.cr0 & CR0_PE or s.rflags & VM:
            raise _ud()

    def _io_allowed(self) -> None:
        """IN/OUT/INS/OUTS: CPL ≤ IOPL, else the I/O bitmap would decide; it is treated as denying all."""
        s = self.s
        if s.cr0 & CR0_PE and (s.rflags & VM or s.cpl > (s.rflags & IOPL_MASK) >> IOPL_SHIFT):
            raise _gp0()

    def _sse_check(self) -> None:
        """SSE instructions: #UD with CR0.EM or without CR4.OSFXSR, #NM with CR0.TS (vol. 3A §13.1)."""
        s = self.s
        if s.cr0 & CR0_EM or not s.cr4 & CR4_OSFXSR:
            raise _ud()
        if s.cr0 & CR0_TS:
            raise _fault(Vector.NM)

    def _fpu_check(self) -> None:
        """x87 instructions: #NM with CR0.EM or CR0.TS."""
        if self.s.cr0 & (CR0_EM | CR0_TS):
            raise _fault(Vector.NM)

    def _branch(self, target: int) -> None:
        """A near branch: #GP(0) for a non-canonical target in 64-bit mode or one beyond the CS limit."""
        s = self.s
        cs = s.seg[CS]
        if s.efer & EFER_LMA and cs.l:
            if not canonical(target):
                raise _gp0()
        elif target > cs.limit:
            raise _gp0()
        s.rip = target

    def _ud(self, ins: Instruction) -> None:
        """Undefined, unsupported or illegally prefixed: #UD in the guest."""
        raise _ud()

    def _push(self, value: int, size: int) -> None:
        segments.push(self.cpu, value, size)

    def _pop(self, size: int) -> int:
        return segments.pop(self.cpu, size)

    def _stack_mask(self) -> int:
        return MASKS[segments.stack_bits(self.cpu)]

    # ------------------------------------------------------------------ data movement

    @handles(M.MOV)
    def _mov(self, ins: Instruction) -> None:
        if ins.op0_kind == REGISTER:
            r = ins.op0_register
            self._wreg(r, self._read(ins, 1, RBITS[r]))
        else:
            bits = MEMSIZE[ins.memory_size] << 3
            self._mwrite(ins, bits >> 3, self._read(ins, 1, bits))

    @handles(M.MOVZX)
    def _movzx(self, ins: Instruction) -> None:
        src_bits = RBITS[ins.op1_register] if ins.op1_kind == REGISTER else MEMSIZE[ins.memory_size] << 3
        self._wreg(ins.op0_register, self._read(ins, 1, src_bits))

    @handles(M.MOVSX, M.MOVSXD)
    def _movsx(self, ins: Instruction) -> None:
        src_bits = RBITS[ins.op1_register] if ins.op1_kind == REGISTER else MEMSIZE[ins.memory_size] << 3
        v = self._read(ins, 1, src_bits)
        if v & SIGN[src_bits]:
            v -= 1 << src_bits
        self._wreg(ins.op0_register, v)

    @handles(M.LEA)
    def _lea(self, ins: Instruction) -> None:
        if ins.op1_kind != MEMORY:
            raise _ud()
        self._wreg(ins.op0_register, self._ea(ins))

    @handles(M.XCHG)
    def _xchg(self, ins: Instruction) -> None:
        bits = self._bits0(ins)
        if ins.op0_kind == MEMORY:
            lin = self._lin(ins, bits >> 3, _WRITE)
            a = self.mmu.read(lin, bits >> 3, _WRITE)
            b = self._rreg(ins.op1_register)
            self.mmu.write(lin, bits >> 3, b)
            self._wreg(ins.op1_register, a)
        elif ins.op1_kind == MEMORY:
            lin = self._lin(ins, bits >> 3, _WRITE)
            b = self.mmu.read(lin, bits >> 3, _WRITE)
            a = self._rreg(ins.op0_register)
            self.mmu.write(lin, bits >> 3, a)
            self._wreg(ins.op0_register, b)
        else:
            r0, r1 = ins.op0_register, ins.op1_register
            a, b = self._rreg(r0), self._rreg(r1)
            self._wreg(r0, b)
            self._wreg(r1, a)

    @handles(M.BSWAP)
    def _bswap(self, ins: Instruction) -> None:
        r = ins.op0_register
        bits = RBITS[r]
        if bits == 16:
            self._wreg(r, 0)  # undefined; Intel and AMD both produce 0 in the low word
        else:
            self._wreg(r, bitops.bswap(self._rreg(r), bits))

    @handles(M.MOVBE)
    def _movbe(self, ins: Instruction) -> None:
        bits = self._bits0(ins)
        v = self._read(ins, 1, bits)
        self._write0(ins, bitops.bswap(v, bits) if bits > 16 else ((v >> 8) | (v << 8)) & 0xFFFF, bits)

    @handles(M.CBW, M.CWDE, M.CDQE)
    def _cbw(self, ins: Instruction) -> None:
        bits = {M.CBW: 16, M.CWDE: 32, M.CDQE: 64}[ins.mnemonic]
        half = bits // 2
        gpr = self.s.gpr
        v = gpr[RAX] & MASKS[half]
        if v & SIGN[half]:
            v -= 1 << half
        self._wreg({16: R.AX, 32: R.EAX, 64: R.RAX}[bits], v)

    @handles(M.CWD, M.CDQ, M.CQO)
    def _cwd(self, ins: Instruction) -> None:
        bits = {M.CWD: 16, M.CDQ: 32, M.CQO: 64}[ins.mnemonic]
        neg = self.s.gpr[RAX] & SIGN[bits]
        self._wreg({16: R.DX, 32: R.EDX, 64: R.RDX}[bits], MASKS[bits] if neg else 0)

    @handles(*_cc("CMOV"))
    def _cmov(self, ins: Instruction) -> None:
        r = ins.op0_register
        bits = RBITS[r]
        v = self._read(ins, 1, bits)  # the source is read (and may fault) whatever the condition
        s = self.s
        if COND_TABLE[ins.condition_code][
            (s.rflags & 1) | ((s.rflags >> 1) & 2) | ((s.rflags >> 4) & 12) | ((s.rflags >> 7) & 16)
        ]:
            self._wreg(r, v)
        elif bits == 32:
            self._wreg(r, self._rreg(r))  # a 32-bit CMOV zero-extends even when it does not move

    @handles(*_cc("SET"))
    def _setcc(self, ins: Instruction) -> None:
        f = self.s.rflags
        cond = COND_TABLE[ins.condition_code][(f & 1) | ((f >> 1) & 2) | ((f >> 4) & 12) | ((f >> 7) & 16)]
        self._write0(ins, 1 if cond else 0, 8)

    @handles(M.LAHF)
    def _lahf(self, ins: Instruction) -> None:
        self._wreg(R.AH, (self.s.rflags & (SF | ZF | AF | PF | CF)) | 2)

    @handles(M.SAHF)
    def _sahf(self, ins: Instruction) -> None:
        ah = (self.s.gpr[RAX] >> 8) & 0xFF
        self._set_flags(ah & (SF | ZF | AF | PF | CF), SF | ZF | AF | PF | CF)

    # ------------------------------------------------------------------ arithmetic and logic

    def _arith(self, ins: Instruction, kind: int) -> None:
        """The two-operand ALU group. kind: 0 ADD, 1 OR, 2 ADC, 3 SBB, 4 AND, 5 SUB, 6 XOR, 7 CMP, 8 TEST."""
        s = self.s
        if ins.op0_kind == REGISTER:
            r = ins.op0_register
            bits = RBITS[r]
            a = self._rreg(r)
            b = self._read(ins, 1, bits)
            lin = -1
        else:
            bits = MEMSIZE[ins.memory_size] << 3
            lin = self._lin(ins, bits >> 3, _READ if kind >= 7 else _WRITE)
            a = self.mmu.read(lin, bits >> 3, _READ if kind >= 7 else _WRITE)
            b = self._read(ins, 1, bits)
        if kind == 0:
            res, fl = add(a, b, bits)
        elif kind == 5 or kind == 7:
            res, fl = sub(a, b, bits)
        elif kind == 6:
            res = a ^ b
            fl = logic(res, bits)
        elif kind == 4 or kind == 8:
            res = a & b
            fl = logic(res, bits)
        elif kind == 1:
            res = a | b
            fl = logic(res, bits)
        elif kind == 2:
            res, fl = add(a, b, bits, s.rflags & CF)
        else:
            res, fl = sub(a, b, bits, s.rflags & CF)
        if kind < 7:
            if lin < 0:
                self._wreg(r, res)
            else:
                self.mmu.write(lin, bits >> 3, res)
        s.rflags = (s.rflags & NOT_STATUS) | fl

    @handles(M.ADD)
    def _add(self, ins: Instruction) -> None:
        self._arith(ins, 0)

    @handles(M.OR)
    def _or(self, ins: Instruction) -> None:
        self._arith(ins, 1)

    @handles(M.ADC)
    def _adc(self, ins: Instruction) -> None:
        self._arith(ins, 2)

    @handles(M.SBB)
    def _sbb(self, ins: Instruction) -> None:
        self._arith(ins, 3)

    @handles(M.AND)
    def _and(self, ins: Instruction) -> None:
        self._arith(ins, 4)

    @handles(M.SUB)
    def _sub(self, ins: Instruction) -> None:
        self._arith(ins, 5)

    @handles(M.XOR)
    def _xor(self, ins: Instruction) -> None:
        self._arith(ins, 6)

    @handles(M.CMP)
    def _cmp(self, ins: Instruction) -> None:
        self._arith(ins, 7)

    @handles(M.TEST)
    def _test(self, ins: Instruction) -> None:
        self._arith(ins, 8)

    def _rmw_unary(self, ins: Instruction) -> tuple[int, int, int]:
        """Operand 0 of a read-modify-write instruction: (value, bits, linear address or -1 for a register).
        The read translates for writing, as the processor's does: a not-present page faults with W=1 in the error
        code, a read-only one before anything is read (as in XCHG, CMPXCHG8B/16B and the ALU forms)."""
        if ins.op0_kind == REGISTER:
            r = ins.op0_register
            return self._rreg(r), RBITS[r], -1
        bits = MEMSIZE[ins.memory_size] << 3
        lin = self._lin(ins, bits >> 3, _WRITE)
        return self.mmu.read(lin, bits >> 3, _WRITE), bits, lin

    def _commit0(self, ins: Instruction, lin: int, bits: int, value: int) -> None:
        if lin < 0:
            self._wreg(ins.op0_register, value)
        else:
            self.mmu.write(lin, bits >> 3, value)

    @handles(M.INC, M.DEC)
    def _incdec(self, ins: Instruction) -> None:
        a, bits, lin = self._rmw_unary(ins)
        res, fl = add(a, 1, bits) if ins.mnemonic == M.INC else sub(a, 1, bits)
        self._commit0(ins, lin, bits, res)
        self._set_flags(fl & ~CF, STATUS_FLAGS & ~CF)

    @handles(M.NOT)
    def _not(self, ins: Instruction) -> None:
        a, bits, lin = self._rmw_unary(ins)
        self._commit0(ins, lin, bits, ~a & MASKS[bits])

    @handles(M.NEG)
    def _neg(self, ins: Instruction) -> None:
        a, bits, lin = self._rmw_unary(ins)
        res, fl = sub(0, a, bits)
        self._commit0(ins, lin, bits, res)
        self._set_flags(fl)

    @handles(M.XADD)
    def _xadd(self, ins: Instruction) -> None:
        a, bits, lin = self._rmw_unary(ins)
        src = ins.op1_register
        b = self._rreg(src)
        res, fl = add(a, b, bits)
        if lin < 0:
            self._wreg(src, a)
            self._wreg(ins.op0_register, res)
        else:
            self.mmu.write(lin, bits >> 3, res)
            self._wreg(src, a)
        self._set_flags(fl)

    @handles(M.CMPXCHG)
    def _cmpxchg(self, ins: Instruction) -> None:
        a, bits, lin = self._rmw_unary(ins)
        acc = self.s.gpr[RAX] & MASKS[bits]
        _, fl = sub(acc, a, bits)
        acc_reg = {8: R.AL, 16: R.AX, 32: R.EAX, 64: R.RAX}[bits]
        if acc == a:
            self._commit0(ins, lin, bits, self._rreg(ins.op1_register))
        else:
            if lin >= 0:
                self.mmu.write(lin, bits >> 3, a)  # the processor writes the old value back
            self._wreg(acc_reg, a)
        self._set_flags(fl)

    @handles(M.CMPXCHG8B, M.CMPXCHG16B)
    def _cmpxchg8b(self, ins: Instruction) -> None:
        if ins.op0_kind != MEMORY:
            raise _ud()
        wide = ins.mnemonic == M.CMPXCHG16B
        half = 64 if wide else 32
        size = half // 4
        lin = self._lin(ins, size, _WRITE)
        if wide and lin & 15:
            raise _gp0()
        mem = self.mmu.read(lin, size, _WRITE)
        gpr = self.s.gpr
        mask = MASKS[half]
        expected = ((gpr[RDX] & mask) << half) | (gpr[RAX] & mask)
        if mem == expected:
            self.mmu.write(lin, size, ((gpr[RCX] & mask) << half) | (gpr[RBX] & mask))
            self._set_flags(ZF, ZF)
        else:
            self.mmu.write(lin, size, mem)
            lo, hi = (R.RAX, R.RDX) if wide else (R.EAX, R.EDX)
            self._wreg(lo, mem & mask)
            self._wreg(hi, mem >> half)
            self._set_flags(0, ZF)

    # ------------------------------------------------------------------ BCD adjusts and ARPL (legacy modes)
    # (vol. 2A DAA/DAS/AAA/AAS/AAM/AAD, ARPL; all are #UD in 64-bit mode, which iced decodes as invalid.
    # The flags the SDM leaves undefined take the values the reference AMD host produces.)

    @handles(M.DAA, M.DAS)
    def _daa(self, ins: Instruction) -> None:
        s = self.s
        al = s.gpr[RAX] & 0xFF
        old_cf = s.rflags & CF
        sign = 1 if ins.mnemonic == M.DAA else -1
        cf = af = adjust = 0
        if (al & 0xF) > 9 or s.rflags & AF:
            adjust = 6
            cf = CF if old_cf or not 0 <= al + sign * 6 <= 0xFF else 0
            af = AF
        if al > 0x99 or old_cf:
            adjust += 0x60
            cf = CF
        elif sign > 0:
            cf = 0
        new = (al + sign * adjust) & 0xFF
        # OF (undefined): the signed overflow of AL plus or minus the whole adjustment, as the AMD host sets it
        b = adjust if sign > 0 else (-adjust) & 0xFF
        of = OF if ~(al ^ b) & (al ^ new) & 0x80 else 0
        s.gpr[RAX] = (s.gpr[RAX] & ~0xFF) | new
        self._set_flags(cf | af | PARITY[new] | (ZF if new == 0 else 0) | (SF if new & 0x80 else 0) | of)

    @handles(M.AAA, M.AAS)
    def _aaa(self, ins: Instruction) -> None:
        s = self.s
        ax = s.gpr[RAX] & 0xFFFF
        if (ax & 0xF) > 9 or s.rflags & AF:
            ax = ((ax + 0x106) if ins.mnemonic == M.AAA else (ax - 0x106)) & 0xFFFF
            flags = AF | CF
        else:
            flags = 0
        # SF, ZF and PF (undefined) follow the 16-bit sum before AL is masked, as the AMD host sets them
        flags |= PARITY[ax & 0xFF] | (ZF if ax == 0 else 0) | (SF if ax & 0x8000 else 0)
        s.gpr[RAX] = (s.gpr[RAX] & ~0xFFFF) | (ax & 0xFF0F)
        self._set_flags(flags)

    @handles(M.AAM)
    def _aam(self, ins: Instruction) -> None:
        s = self.s
        base = ins.immediate(0) & 0xFF
        if base == 0:
            raise _fault(Vector.DE)
        al = s.gpr[RAX] & 0xFF
        ah, al = divmod(al, base)
        s.gpr[RAX] = (s.gpr[RAX] & ~0xFFFF) | ah << 8 | al
        self._set_flags(logic(al, 8))

    @handles(M.AAD)
    def _aad(self, ins: Instruction) -> None:
        s = self.s
        base = ins.immediate(0) & 0xFF
        ax = s.gpr[RAX]
        product = ((ax >> 8) & 0xFF) * base
        total = (ax & 0xFF) + product
        al = total & 0xFF
        s.gpr[RAX] = (ax & ~0xFFFF) | al
        self._set_flags(add(ax & 0xFF, product & 0xFF, 8)[1])

    @handles(M.ARPL)
    def _arpl(self, ins: Instruction) -> None:
        self._need_pe()
        dest = self._read(ins, 0, 16)
        src = self._read(ins, 1, 16)
        if dest & 3 < src & 3:
            self._write0(ins, (dest & ~3) | (src & 3), 16)
            self._set_flags(ZF, ZF)
        else:
            self._set_flags(0, ZF)

    # ------------------------------------------------------------------ shifts and rotates

    @handles(M.SHL, M.SAL, M.SHR, M.SAR, M.ROL, M.ROR, M.RCL, M.RCR)
    def _shift(self, ins: Instruction) -> None:
        a, bits, lin = self._rmw_unary(ins)
        if ins.op_count == 1:
            count = 1
        else:
            count = self._read(ins, 1, 8)
        count &= 0x3F if bits == 64 else 0x1F
        mn = ins.mnemonic
        s = self.s
        out: alu.Result | None
        if mn == M.SHL or mn == M.SAL:
            out = alu.shl(a, count, bits)
        elif mn == M.SHR:
            out = alu.shr(a, count, bits)
        elif mn == M.SAR:
            out = alu.sar(a, count, bits)
        elif mn == M.ROL:
            out = alu.rol(a, count, bits)
        elif mn == M.ROR:
            out = alu.ror(a, count, bits)
        elif mn == M.RCL:
            out = alu.rcl(a, count, bits, s.rflags & CF)
        else:
            out = alu.rcr(a, count, bits, s.rflags & CF)
        if out is None:
            if lin < 0 and bits == 32:
                self._wreg(ins.op0_register, a)  # a 32-bit register destination is zero-extended even so
            return
        res, fl, mask = out
        self._commit0(ins, lin, bits, res)
        s.rflags = (s.rflags & ~mask) | fl

    @handles(M.SHLD, M.SHRD)
    def _shld(self, ins: Instruction) -> None:
        a, bits, lin = self._rmw_unary(ins)
        b = self._rreg(ins.op1_register)
        count = self._read(ins, 2, 8) & (0x3F if bits == 64 else 0x1F)
        out = alu.shld(a, b, count, bits) if ins.mnemonic == M.SHLD else alu.shrd(a, b, count, bits)
        if out is None:
            if lin < 0 and bits == 32:
                self._wreg(ins.op0_register, a)
            return
        res, fl, mask = out
        self._commit0(ins, lin, bits, res)
        self._set_flags(fl, mask)

    @handles(M.SHLX, M.SHRX, M.SARX)
    def _shlx(self, ins: Instruction) -> None:
        bits = RBITS[ins.op0_register]
        v = self._read(ins, 1, bits)
        count = self._rreg(ins.op2_register)
        fn = {M.SHLX: bitops.shlx, M.SHRX: bitops.shrx, M.SARX: bitops.sarx}[ins.mnemonic]
        self._wreg(ins.op0_register, fn(v, count, bits))

    @handles(M.RORX)
    def _rorx(self, ins: Instruction) -> None:
        bits = RBITS[ins.op0_register]
        self._wreg(ins.op0_register, bitops.rorx(self._read(ins, 1, bits), ins.immediate(2), bits))

    # ------------------------------------------------------------------ multiply and divide

    @handles(M.MUL)
    def _mul(self, ins: Instruction) -> None:
        bits = self._bits0(ins)
        b = self._read(ins, 0, bits)
        lo, hi, fl = alu.mul(self.s.gpr[RAX] & MASKS[bits], b, bits)
        self._store_wide(bits, lo, hi)
        self._set_flags(fl, alu.MUL_FLAGS)

    def _store_wide(self, bits: int, lo: int, hi: int) -> None:
        """The double-width result of MUL/IMUL/DIV/IDIV: AX for bytes, else rDX:rAX."""
        if bits == 8:
            self._wreg(R.AX, (hi << 8) | lo)
        else:
            regs = {16: (R.AX, R.DX), 32: (R.EAX, R.EDX), 64: (R.RAX, R.RDX)}[bits]
            self._wreg(regs[0], lo)
            self._wreg(regs[1], hi)

    @handles(M.IMUL)
    def _imul(self, ins: Instruction) -> None:
        n = ins.op_count
        if n == 1:
            bits = self._bits0(ins)
            b = self._read(ins, 0, bits)
            lo, hi, fl = alu.imul(self.s.gpr[RAX] & MASKS[bits], b, bits)
            self._store_wide(bits, lo, hi)
        else:
            r = ins.op0_register
            bits = RBITS[r]
            if n == 2:
                a, b = self._rreg(r), self._read(ins, 1, bits)
            else:
                a, b = self._read(ins, 1, bits), ins.immediate(2) & MASKS[bits]
            lo, _hi, fl = alu.imul(a, b, bits)
            self._wreg(r, lo)
        self._set_flags(fl, alu.MUL_FLAGS)

    @handles(M.MULX)
    def _mulx(self, ins: Instruction) -> None:
        bits = RBITS[ins.op0_register]
        p = (self.s.gpr[RDX] & MASKS[bits]) * self._read(ins, 2, bits)
        self._wreg(ins.op1_register, p & MASKS[bits])
        self._wreg(ins.op0_register, p >> bits)

    @handles(M.DIV, M.IDIV)
    def _div(self, ins: Instruction) -> None:
        bits = self._bits0(ins)
        divisor = self._read(ins, 0, bits)
        gpr = self.s.gpr
        if bits == 8:
            hi, lo = (gpr[RAX] >> 8) & 0xFF, gpr[RAX] & 0xFF
        else:
            hi, lo = gpr[RDX] & MASKS[bits], gpr[RAX] & MASKS[bits]
        try:
            q, r = (alu.div if ins.mnemonic == M.DIV else alu.idiv)(hi, lo, divisor, bits)
        except alu.DivideError:
            raise _fault(Vector.DE) from None
        if bits == 8:
            self._wreg(R.AX, (r << 8) | q)
        else:
            self._store_wide(bits, q, r)
        self._set_flags(alu.DIV_FLAGS, alu.DIV_FLAGS_MASK)

    # ------------------------------------------------------------------ bit operations

    @handles(M.BT, M.BTS, M.BTR, M.BTC)
    def _bt(self, ins: Instruction) -> None:
        mn = ins.mnemonic
        s = self.s
        if ins.op0_kind == REGISTER:
            r = ins.op0_register
            bits = RBITS[r]
            off = self._read(ins, 1, bits) & (bits - 1)
            v = self._rreg(r)
            lin = -1
        else:
            bits = MEMSIZE[ins.memory_size] << 3
            size = bits >> 3
            if ins.op1_kind == REGISTER:
                off = self._rreg(ins.op1_register)
                if off & SIGN[bits]:
                    off -= 1 << bits
                # a register bit offset addresses memory beyond the operand (signed, in operand-size units)
                ea = (self._ea(ins) + (off >> (bits.bit_length() - 1)) * size) & MASKS[self._address_bits(ins)]
                off &= bits - 1
            else:
                off = ins.immediate(1) & (bits - 1)
                ea = self._ea(ins)
            access = _READ if mn == M.BT else _WRITE
            lin = segments.linear(self.cpu, SEG_OF[ins.memory_segment], ea, size, access)
            v = self.mmu.read(lin, size, access)
        bit = (v >> off) & 1
        if mn != M.BT:
            if mn == M.BTS:
                v |= 1 << off
            elif mn == M.BTR:
                v &= ~(1 << off)
            else:
                v ^= 1 << off
            if lin < 0:
                self._wreg(r, v)
            else:
                self.mmu.write(lin, bits >> 3, v)
        s.rflags = (s.rflags & ~CF) | bit

    def _bitop_flags(self, flags: bitops.Flags, mnemonic: int = 0, result: int = 0) -> None:
        """Commit the flags `bitops` defines, then give the undefined ones AMD's values (see `_AMD_UNDEFINED`)."""
        value = mask = 0
        for name, bit in flags.items():
            mask |= _FLAG_BIT[name]
            if bit:
                value |= _FLAG_BIT[name]
        extra = _AMD_UNDEFINED.get(mnemonic)
        if extra is not None:
            set_bits, clear_bits, parity = extra
            value = (value & ~clear_bits) | set_bits
            mask |= set_bits | clear_bits
            if parity:
                mask |= PF
                value = (value & ~PF) | PARITY[result & 0xFF]
        self._set_flags(value, mask)

    @handles(M.BSF, M.BSR)
    def _bsf(self, ins: Instruction) -> None:
        r = ins.op0_register
        bits = RBITS[r]
        src = self._read(ins, 1, bits)
        fn = bitops.bsf if ins.mnemonic == M.BSF else bitops.bsr
        res, fl = fn(src, self._rreg(r), bits)
        if src or bits != 32:
            self._wreg(r, res)
        self._bitop_flags(fl)

    @handles(M.TZCNT, M.LZCNT, M.POPCNT)
    def _count(self, ins: Instruction) -> None:
        r = ins.op0_register
        bits = RBITS[r]
        fn = {M.TZCNT: bitops.tzcnt, M.LZCNT: bitops.lzcnt, M.POPCNT: bitops.popcnt}[ins.mnemonic]
        res, fl = fn(self._read(ins, 1, bits), bits)
        self._wreg(r, res)
        self._bitop_flags(fl, ins.mnemonic, res)

    @handles(M.ANDN, M.BEXTR, M.BZHI)
    def _bmi3(self, ins: Instruction) -> None:
        r = ins.op0_register
        bits = RBITS[r]
        mn = ins.mnemonic
        if mn == M.ANDN:
            res, fl = bitops.andn(self._rreg(ins.op1_register), self._read(ins, 2, bits), bits)
        elif mn == M.BEXTR:
            res, fl = bitops.bextr(self._read(ins, 1, bits), self._rreg(ins.op2_register), bits)
        else:
            res, fl = bitops.bzhi(self._read(ins, 1, bits), self._rreg(ins.op2_register), bits)
        self._wreg(r, res)
        self._bitop_flags(fl, ins.mnemonic, res)

    @handles(M.BLSI, M.BLSR, M.BLSMSK)
    def _bls(self, ins: Instruction) -> None:
        r = ins.op0_register
        bits = RBITS[r]
        fn = {M.BLSI: bitops.blsi, M.BLSR: bitops.blsr, M.BLSMSK: bitops.blsmsk}[ins.mnemonic]
        res, fl = fn(self._read(ins, 1, bits), bits)
        self._wreg(r, res)
        self._bitop_flags(fl, ins.mnemonic, res)

    @handles(M.PDEP, M.PEXT)
    def _pdep(self, ins: Instruction) -> None:
        r = ins.op0_register
        bits = RBITS[r]
        fn = bitops.pdep if ins.mnemonic == M.PDEP else bitops.pext
        self._wreg(r, fn(self._rreg(ins.op1_register), self._read(ins, 2, bits), bits))

    @handles(M.ADCX, M.ADOX)
    def _adcx(self, ins: Instruction) -> None:
        r = ins.op0_register
        bits = RBITS[r]
        flag = CF if ins.mnemonic == M.ADCX else OF
        res, carry = bitops.add_with_carry(self._rreg(r), self._read(ins, 1, bits), int(bool(self.s.rflags & flag)),
                                           bits)  # fmt: skip
        self._wreg(r, res)
        self._set_flags(flag if carry else 0, flag)

    @handles(M.RDRAND, M.RDSEED)
    def _rdrand(self, ins: Instruction) -> None:
        r = ins.op0_register
        value, fl = bitops.random_value(RBITS[r])
        self._wreg(r, value)
        self._bitop_flags(fl)

    # ------------------------------------------------------------------ control transfer

    @handles(*_cc("J"))
    def _jcc(self, ins: Instruction) -> None:
        f = self.s.rflags
        if COND_TABLE[ins.condition_code][(f & 1) | ((f >> 1) & 2) | ((f >> 4) & 12) | ((f >> 7) & 16)]:
            self._branch(ins.near_branch_target)

    @handles(M.JMP)
    def _jmp(self, ins: Instruction) -> None:
        kind = ins.op0_kind
        if kind in (REGISTER, MEMORY):
            if ins.code in (C.JMP_M1616, C.JMP_M1632, C.JMP_M1664):
                self._far_indirect(ins, call=False)
                return
            self._branch(self._read(ins, 0, self._bits0(ins)))
        elif kind in (K.FAR_BRANCH16, K.FAR_BRANCH32):
            if self.s.efer & EFER_LMA and self.s.seg[CS].l:
                raise _ud()
            segments.far_jump(self.cpu, ins.far_branch_selector, ins.far_branch32 if kind == K.FAR_BRANCH32
                              else ins.far_branch16)  # fmt: skip
        else:
            self._branch(ins.near_branch_target)

    def _far_indirect(self, ins: Instruction, call: bool) -> None:
        """JMP/CALL m16:16/32/64: the offset, then the selector."""
        bits = OPSIZE[ins.code]
        size = bits >> 3
        lin = self._lin(ins, size + 2, _READ)
        offset = self.mmu.read(lin, size, _READ)
        selector = self.mmu.read(lin + size, 2, _READ)
        if call:
            segments.far_call(self.cpu, selector, offset, bits, self.s.rip)
        else:
            segments.far_jump(self.cpu, selector, offset)

    @handles(M.CALL)
    def _call(self, ins: Instruction) -> None:
        kind = ins.op0_kind
        s = self.s
        if kind in (K.FAR_BRANCH16, K.FAR_BRANCH32):
            if s.efer & EFER_LMA and s.seg[CS].l:
                raise _ud()
            segments.far_call(self.cpu, ins.far_branch_selector,
                              ins.far_branch32 if kind == K.FAR_BRANCH32 else ins.far_branch16,
                              OPSIZE[ins.code], s.rip)  # fmt: skip
            return
        if ins.code in (C.CALL_M1616, C.CALL_M1632, C.CALL_M1664):
            self._far_indirect(ins, call=True)
            return
        size = -ins.stack_pointer_increment
        if kind in (REGISTER, MEMORY):
            target = self._read(ins, 0, size << 3)
        else:
            target = ins.near_branch_target
        rsp = s.gpr[RSP]
        self._push(s.rip, size)
        try:
            self._branch(target)
        except CpuException:
            s.gpr[RSP] = rsp
            raise

    @handles(M.RET)
    def _ret(self, ins: Instruction) -> None:
        s = self.s
        imm = ins.immediate(0) if ins.op_count else 0
        size = ins.stack_pointer_increment - imm
        rsp = s.gpr[RSP]
        target = self._pop(size)
        try:
            self._branch(target)
        except CpuException:
            s.gpr[RSP] = rsp
            raise
        if imm:
            self._adjust_sp(imm)

    def _adjust_sp(self, delta: int) -> None:
        bits = segments.stack_bits(self.cpu)
        gpr = self.s.gpr
        if bits == 64:
            gpr[RSP] = (gpr[RSP] + delta) & MASK64
        elif bits == 32:
            gpr[RSP] = (gpr[RSP] + delta) & M32
        else:
            gpr[RSP] = (gpr[RSP] & ~0xFFFF) | ((gpr[RSP] + delta) & 0xFFFF)

    @handles(M.RETF)
    def _retf(self, ins: Instruction) -> None:
        segments.far_return(self.cpu, OPSIZE[ins.code], ins.immediate(0) if ins.op_count else 0)

    @handles(M.LOOP, M.LOOPE, M.LOOPNE, M.JCXZ, M.JECXZ, M.JRCXZ)
    def _loop(self, ins: Instruction) -> None:
        bits = COUNT_BITS[ins.code]
        gpr = self.s.gpr
        mn = ins.mnemonic
        count = gpr[RCX] & MASKS[bits]
        if mn in (M.JCXZ, M.JECXZ, M.JRCXZ):
            if count == 0:
                self._branch(ins.near_branch_target)
            return
        count = (count - 1) & MASKS[bits]
        take = count != 0
        if mn == M.LOOPE:
            take = take and bool(self.s.rflags & ZF)
        elif mn == M.LOOPNE:
            take = take and not self.s.rflags & ZF
        if take:
            self._branch(ins.near_branch_target)
        if bits == 64:
            gpr[RCX] = count
        elif bits == 32:
            gpr[RCX] = count  # ECX written: zero-extended
        else:
            gpr[RCX] = (gpr[RCX] & ~0xFFFF) | count

    # ------------------------------------------------------------------ stack

    @handles(M.PUSH)
    def _push_h(self, ins: Instruction) -> None:
        size = -ins.stack_pointer_increment
        if ins.op0_kind == REGISTER:
            r = ins.op0_register
            value = self.s.seg[SREG[r]].selector if r in SREG else self._rreg(r)
        else:
            value = self._read(ins, 0, size << 3) if ins.op0_kind == MEMORY else ins.immediate(0) & MASKS[size << 3]
        self._push(value, size)

    @handles(M.POP)
    def _pop_h(self, ins: Instruction) -> None:
        size = ins.stack_pointer_increment
        s = self.s
        rsp = s.gpr[RSP]
        value = self._pop(size)
        try:
            if ins.op0_kind == REGISTER:
                r = ins.op0_register
                if r in SREG:
                    segments.load_segment(self.cpu, SREG[r], value & 0xFFFF)
                    if r == R.SS:
                        s.interrupt_shadow = True
                        self.cpu.db_pending |= _DB_MOVSS
                else:
                    self._wreg(r, value)
            else:
                self._mwrite(ins, size, value)
        except CpuException:
            s.gpr[RSP] = rsp
            raise

    @handles(M.PUSHA, M.PUSHAD)
    def _pusha(self, ins: Instruction) -> None:
        bits = OPSIZE[ins.code]
        gpr = self.s.gpr
        rsp = gpr[RSP]
        values = (
            [gpr[i] & MASKS[bits] for i in (RAX, RCX, RDX, RBX)]
            + [rsp & MASKS[bits]]
            + [gpr[i] & MASKS[bits] for i in (RBP, RSI, RDI)]
        )
        try:
            for v in values:
                self._push(v, bits >> 3)
        except CpuException:
            gpr[RSP] = rsp
            raise

    @handles(M.POPA, M.POPAD)
    def _popa(self, ins: Instruction) -> None:
        bits = OPSIZE[ins.code]
        gpr = self.s.gpr
        rsp = gpr[RSP]
        try:
            values = [self._pop(bits >> 3) for _ in range(8)]
        except CpuException:
            gpr[RSP] = rsp
            raise
        regs = {16: ("DI", "SI", "BP", None, "BX", "DX", "CX", "AX"), 32: ("EDI", "ESI", "EBP", None, "EBX", "EDX",
                                                                           "ECX", "EAX")}[bits]  # fmt: skip
        for name, v in zip(regs, values):
            if name:
                self._wreg(getattr(R, name), v)

    @handles(M.ENTER)
    def _enter(self, ins: Instruction) -> None:
        bits = OPSIZE[ins.code]
        size = bits >> 3
        alloc = ins.immediate(0) & 0xFFFF
        level = ins.immediate(1) & 31
        gpr = self.s.gpr
        rsp, rbp = gpr[RSP], gpr[RBP]
        smask = self._stack_mask()
        try:
            self._push(rbp & MASKS[bits], size)
            frame = gpr[RSP] & smask
            if level:
                bp = rbp
                for _ in range(1, level):
                    bp = (bp - size) & smask
                    v = self.mmu.read(segments.linear(self.cpu, SS, bp, size, _READ), size, _READ)
                    self._push(v, size)
                self._push(frame, size)
            self._adjust_sp(-alloc)
            # the new stack top must be writable (the SDM checks it before committing)
            segments.linear(self.cpu, SS, gpr[RSP] & smask, 1, _WRITE)
        except CpuException:
            gpr[RSP] = rsp
            raise
        self._wreg({16: R.BP, 32: R.EBP, 64: R.RBP}[bits], frame)

    @handles(M.LEAVE)
    def _leave(self, ins: Instruction) -> None:
        bits = OPSIZE[ins.code]
        gpr = self.s.gpr
        rsp = gpr[RSP]
        sbits = segments.stack_bits(self.cpu)
        self._wreg({16: R.SP, 32: R.ESP, 64: R.RSP}[sbits], gpr[RBP])
        try:
            value = self._pop(bits >> 3)
        except CpuException:
            gpr[RSP] = rsp
            raise
        self._wreg({16: R.BP, 32: R.EBP, 64: R.RBP}[bits], value)

    @handles(M.PUSHF, M.PUSHFD, M.PUSHFQ)
    def _pushf(self, ins: Instruction) -> None:
        s = self.s
        if s.rflags & VM and (s.rflags & IOPL_MASK) != IOPL_MASK:
            raise _gp0()
        bits = OPSIZE[ins.code]
        self._push((s.rflags & ~(VM | RF)) & MASKS[bits], bits >> 3)

    @handles(M.POPF, M.POPFD, M.POPFQ)
    def _popf(self, ins: Instruction) -> None:
        s = self.s
        if s.rflags & VM and (s.rflags & IOPL_MASK) != IOPL_MASK:
            raise _gp0()
        bits = OPSIZE[ins.code]
        value = self._pop(bits >> 3)
        writable = POPF_BITS
        if s.cr0 & CR0_PE:
            cpl = s.cpl
            iopl = (s.rflags & IOPL_MASK) >> IOPL_SHIFT
            if cpl > 0:
                writable &= ~IOPL_MASK
                if cpl > iopl:
                    writable &= ~IF
            if s.rflags & VM:
                writable &= ~IOPL_MASK
        if bits == 16:
            writable &= 0xFFFF
        s.rflags = ((s.rflags & ~writable) | (value & writable) | RFLAGS_FIXED) & ~RF

    # ------------------------------------------------------------------ flags

    @handles(M.CLC, M.STC, M.CMC, M.CLD, M.STD)
    def _flagop(self, ins: Instruction) -> None:
        s = self.s
        mn = ins.mnemonic
        if mn == M.CLC:
            s.rflags &= ~CF
        elif mn == M.STC:
            s.rflags |= CF
        elif mn == M.CMC:
            s.rflags ^= CF
        elif mn == M.CLD:
            s.rflags &= ~DF
        else:
            s.rflags |= DF

    def _if_allowed(self) -> None:
        s = self.s
        if s.cr0 & CR0_PE and s.cpl > (s.rflags & IOPL_MASK) >> IOPL_SHIFT:
            raise _gp0()

    @handles(M.CLI)
    def _cli(self, ins: Instruction) -> None:
        self._if_allowed()
        self.s.rflags &= ~IF

    @handles(M.STI)
    def _sti(self, ins: Instruction) -> None:
        self._if_allowed()
        s = self.s
        if not s.rflags & IF:
            s.interrupt_shadow = True  # interrupts are recognised only after the next instruction
        s.rflags |= IF

    @handles(M.CLAC, M.STAC)
    def _clac(self, ins: Instruction) -> None:
        """CLAC/STAC need SMAP in CPUID and CPL 0, not CR4.SMAP (SDM vol. 2A): firmware and real-mode code may
        toggle AC before the kernel enables SMAP."""
        s = self.s
        if s.cpl or not self.cpuid(7, 0)[1] & CPUID7_EBX_SMAP:
            raise _ud()
        if ins.mnemonic == M.CLAC:
            s.rflags &= ~AC
        else:
            s.rflags |= AC

    # ------------------------------------------------------------------ no-ops and hints

    @handles(M.NOP, M.LFENCE, M.MFENCE, M.SFENCE, M.PREFETCHNTA, M.PREFETCHT0, M.PREFETCHT1,
             M.PREFETCHT2, M.PREFETCHW, M.ENDBR64, M.ENDBR32, M.CLFLUSH, M.CLFLUSHOPT, M.CLWB)  # fmt: skip
    def _nop(self, ins: Instruction) -> None:
        """Hints and fences: nothing to do for an in-order interpreter (memory operands are not touched)."""

    @handles(M.PAUSE)
    def _pause(self, ins: Instruction) -> None:
        """PAUSE marks a spin-wait loop; how long it takes is the implementation's choice, so the backend may
        make it long (`on_pause`): a guest waiting for time to pass then needs far fewer instructions."""
        self.on_pause()

    @handles(M.UD0, M.UD1, M.UD2)
    def _ud2(self, ins: Instruction) -> None:
        raise _ud()

    @handles(M.VMCALL, M.VMMCALL)
    def _hypercall(self, ins: Instruction) -> None:
        """The hypercall instruction of the vendor CPUID names (Intel's VMCALL, AMD's VMMCALL; the other one is
        #UD, as on a processor outside VMX/SVM operation) calls the hypervisor, which for this CPU is popek. It
        answers with KVM's hypercall ABI (Linux Documentation/virt/kvm/x86/hypercalls.rst), so a guest written
        for KVM sees what KVM would tell it: popek implements no hypercall, so RAX = -KVM_ENOSYS, and -KVM_EPERM
        from CPL > 0; the result is truncated to 32 bits outside 64-bit mode."""
        s = self.s
        if (ins.mnemonic == M.VMCALL) != self.intel:
            raise _ud()
        result = -KVM_EPERM if s.cpl else -KVM_ENOSYS
        long64 = s.efer & EFER_LMA and s.seg[CS].l
        s.gpr[RAX] = result & (MASK64 if long64 else M32)

    # ------------------------------------------------------------------ string instructions

    def _string_setup(self, ins: Instruction) -> tuple[int, int, int]:
        """(address mask, element size, step) of a string instruction."""
        kind = ins.op0_kind if ins.op0_kind != REGISTER else ins.op1_kind
        abits = _STRING_ASIZE[kind]
        size = MEMSIZE[ins.memory_size]
        return MASKS[abits], size, -size if self.s.rflags & DF else size

    def _set_index(self, i: int, value: int, amask: int) -> None:
        gpr = self.s.gpr
        if amask == 0xFFFF:
            gpr[i] = (gpr[i] & ~0xFFFF) | (value & 0xFFFF)
        else:
            gpr[i] = value & amask

    @handles_code(C.MOVSB_M8_M8, C.MOVSW_M16_M16, C.MOVSD_M32_M32, C.MOVSQ_M64_M64)
    def _movs(self, ins: Instruction) -> None:
        amask, size, step = self._string_setup(ins)
        gpr = self.s.gpr
        rep = ins.has_rep_prefix or ins.has_repne_prefix
        count = gpr[RCX] & amask if rep else 1
        sseg = SEG_OF[ins.memory_segment]
        cpu, mmu = self.cpu, self.mmu
        while count:
            si, di = gpr[RSI] & amask, gpr[RDI] & amask
            if rep and count > 1 and step > 0:
                n = self._fast_movs(sseg, si, di, size, count, amask)
                if n:
                    count -= n
                    self._set_index(RSI, si + n * size, amask)
                    self._set_index(RDI, di + n * size, amask)
                    self._set_index(RCX, count, amask)
                    continue
            v = mmu.read(segments.linear(cpu, sseg, si, size, _READ), size, _READ)
            mmu.write(segments.linear(cpu, ES, di, size, _WRITE), size, v)
            self._set_index(RSI, si + step, amask)
            self._set_index(RDI, di + step, amask)
            count -= 1
            if rep:
                self._set_index(RCX, count, amask)

    def _fast_movs(self, sseg: int, si: int, di: int, size: int, count: int, amask: int) -> int:
        """Copy as many elements of a forward REP MOVS as stay within one page of source and destination, when
        both are RAM and do not overlap: one read and one write instead of one per element. 0: not possible."""
        n = min(count, (0x1000 - max(si & 0xFFF, di & 0xFFF)) // size, (amask - max(si, di)) // size + 1)
        if n < 2:
            return 0
        nbytes = n * size
        cpu, mmu = self.cpu, self.mmu
        src = segments.linear(cpu, sseg, si, nbytes, _READ)
        dst = segments.linear(cpu, ES, di, nbytes, _WRITE)
        if (src & 0xFFF) + nbytes > 0x1000 or (dst & 0xFFF) + nbytes > 0x1000:
            return 0  # segment bases not page aligned: the element path handles the crossing
        user = self.s.cpl == 3
        paging = self.s.cr0 & CR0_PG
        psrc = mmu.translate(src, _READ, user) if paging else src
        pdst = mmu.translate(dst, _WRITE, user) if paging else dst
        mem = cpu.mem
        if not (mem.contains(psrc, nbytes) and mem.contains(pdst, nbytes)):
            return 0
        if psrc < pdst + nbytes and pdst < psrc + nbytes:
            return 0  # overlapping: element order matters
        mmu.write_bytes(dst, mmu.read_bytes(src, nbytes, _READ, user), user)
        return n

    @handles_code(C.STOSB_M8_AL, C.STOSW_M16_AX, C.STOSD_M32_EAX, C.STOSQ_M64_RAX)
    def _stos(self, ins: Instruction) -> None:
        amask, size, step = self._string_setup(ins)
        gpr = self.s.gpr
        rep = ins.has_rep_prefix or ins.has_repne_prefix
        count = gpr[RCX] & amask if rep else 1
        value = gpr[RAX] & MASKS[size * 8]
        cpu, mmu = self.cpu, self.mmu
        while count:
            di = gpr[RDI] & amask
            if rep and count > 1 and step > 0:
                n = min(count, (0x1000 - (di & 0xFFF)) // size, (amask - di) // size + 1)
                if n >= 2:
                    dst = segments.linear(cpu, ES, di, n * size, _WRITE)
                    if (dst & 0xFFF) + n * size <= 0x1000:
                        paging = self.s.cr0 & CR0_PG
                        user = self.s.cpl == 3
                        pdst = mmu.translate(dst, _WRITE, user) if paging else dst
                        if cpu.mem.contains(pdst, n * size):
                            mmu.write_bytes(dst, value.to_bytes(size, "little") * n, user)
                            count -= n
                            self._set_index(RDI, di + n * size, amask)
                            self._set_index(RCX, count, amask)
                            continue
            mmu.write(segments.linear(cpu, ES, di, size, _WRITE), size, value)
            self._set_index(RDI, di + step, amask)
            count -= 1
            if rep:
                self._set_index(RCX, count, amask)

    @handles_code(C.LODSB_AL_M8, C.LODSW_AX_M16, C.LODSD_EAX_M32, C.LODSQ_RAX_M64)
    def _lods(self, ins: Instruction) -> None:
        amask, size, step = self._string_setup(ins)
        gpr = self.s.gpr
        rep = ins.has_rep_prefix or ins.has_repne_prefix
        count = gpr[RCX] & amask if rep else 1
        sseg = SEG_OF[ins.memory_segment]
        reg = ins.op0_register
        while count:
            si = gpr[RSI] & amask
            v = self.mmu.read(segments.linear(self.cpu, sseg, si, size, _READ), size, _READ)
            self._wreg(reg, v)
            self._set_index(RSI, si + step, amask)
            count -= 1
            if rep:
                self._set_index(RCX, count, amask)

    @handles_code(C.SCASB_AL_M8, C.SCASW_AX_M16, C.SCASD_EAX_M32, C.SCASQ_RAX_M64,
                  C.CMPSB_M8_M8, C.CMPSW_M16_M16, C.CMPSD_M32_M32, C.CMPSQ_M64_M64)  # fmt: skip
    def _scas_cmps(self, ins: Instruction) -> None:
        amask, size, step = self._string_setup(ins)
        s = self.s
        gpr = s.gpr
        repe, repne = ins.has_repe_prefix, ins.has_repne_prefix
        rep = repe or repne
        count = gpr[RCX] & amask if rep else 1
        bits = size * 8
        cmps = ins.mnemonic != M.SCASB and ins.mnemonic not in (M.SCASW, M.SCASD, M.SCASQ)
        sseg = SEG_OF[ins.memory_segment]
        cpu, mmu = self.cpu, self.mmu
        acc = gpr[RAX] & MASKS[bits]
        while count:
            di = gpr[RDI] & amask
            if cmps:
                si = gpr[RSI] & amask
                a = mmu.read(segments.linear(cpu, sseg, si, size, _READ), size, _READ)
            else:
                a = acc
            b = mmu.read(segments.linear(cpu, ES, di, size, _READ), size, _READ)
            _, fl = sub(a, b, bits)
            if cmps:
                self._set_index(RSI, si + step, amask)
            self._set_index(RDI, di + step, amask)
            s.rflags = (s.rflags & NOT_STATUS) | fl
            count -= 1
            if rep:
                self._set_index(RCX, count, amask)
                if (repe and not fl & ZF) or (repne and fl & ZF):
                    break

    @handles_code(C.INSB_M8_DX, C.INSW_M16_DX, C.INSD_M32_DX)
    def _ins(self, ins: Instruction) -> None:
        self._io_allowed()
        amask, size, step = self._string_setup(ins)
        gpr = self.s.gpr
        rep = ins.has_rep_prefix or ins.has_repne_prefix
        count = gpr[RCX] & amask if rep else 1
        port = gpr[RDX] & 0xFFFF
        while count:
            di = gpr[RDI] & amask
            lin = segments.linear(self.cpu, ES, di, size, _WRITE)
            if self.s.cr0 & CR0_PG:
                self.mmu.translate(lin, _WRITE, self.s.cpl == 3)  # fault before the device sees the read
            self.mmu.write(lin, size, self.cpu.bus.pio_read(port, size))
            self._set_index(RDI, di + step, amask)
            count -= 1
            if rep:
                self._set_index(RCX, count, amask)

    @handles_code(C.OUTSB_DX_M8, C.OUTSW_DX_M16, C.OUTSD_DX_M32)
    def _outs(self, ins: Instruction) -> None:
        self._io_allowed()
        amask, size, step = self._string_setup(ins)
        gpr = self.s.gpr
        rep = ins.has_rep_prefix or ins.has_repne_prefix
        count = gpr[RCX] & amask if rep else 1
        port = gpr[RDX] & 0xFFFF
        sseg = SEG_OF[ins.memory_segment]
        while count:
            si = gpr[RSI] & amask
            v = self.mmu.read(segments.linear(self.cpu, sseg, si, size, _READ), size, _READ)
            self.cpu.bus.pio_write(port, size, v)
            self._set_index(RSI, si + step, amask)
            count -= 1
            if rep:
                self._set_index(RCX, count, amask)

    # ------------------------------------------------------------------ I/O

    @handles(M.IN)
    def _in(self, ins: Instruction) -> None:
        self._io_allowed()
        r = ins.op0_register
        port = ins.immediate(1) & 0xFF if ins.op1_kind != REGISTER else self.s.gpr[RDX] & 0xFFFF
        size = RBITS[r] >> 3
        self._wreg(r, self.cpu.bus.pio_read(port, size) & MASKS[size * 8])

    @handles(M.OUT)
    def _out(self, ins: Instruction) -> None:
        self._io_allowed()
        r = ins.op1_register
        port = ins.immediate(0) & 0xFF if ins.op0_kind != REGISTER else self.s.gpr[RDX] & 0xFFFF
        self.cpu.bus.pio_write(port, RBITS[r] >> 3, self._rreg(r))

    # ------------------------------------------------------------------ interrupts

    @handles(M.INT, M.INT3, M.INTO, M.INT1)
    def _int(self, ins: Instruction) -> None:
        s = self.s
        mn = ins.mnemonic
        if mn == M.INTO:
            if not s.rflags & OF:
                return
            vector = Vector.OF
        elif mn == M.INT3:
            vector = Vector.BP
        elif mn == M.INT1:
            self.cpu.db_pending |= _DB_ICEBP  # a trap-like #DB when the instruction completes
            return
        else:
            vector = ins.immediate(0) & 0xFF
            if s.rflags & VM and (s.rflags & IOPL_MASK) != IOPL_MASK:
                raise _gp0()
        exceptions.deliver(self.cpu, vector, software=True, return_rip=s.rip)

    @handles(M.IRET, M.IRETD, M.IRETQ)
    def _iret(self, ins: Instruction) -> None:
        segments.iret(self.cpu, OPSIZE[ins.code])
        self.s.nmi_blocked = False

    @handles(M.HLT)
    def _hlt(self, ins: Instruction) -> None:
        self._need_cpl0()
        self.s.halted = True

    # ------------------------------------------------------------------ segment registers

    @handles_code(C.MOV_SREG_RM16, C.MOV_SREG_R32M16, C.MOV_SREG_R64M16)
    def _mov_to_sreg(self, ins: Instruction) -> None:
        sreg = SREG[ins.op0_register]
        if sreg == CS:
            raise _ud()
        selector = self._read(ins, 1, 16) if ins.op1_kind == MEMORY else self._rreg(ins.op1_register) & 0xFFFF
        segments.load_segment(self.cpu, sreg, selector)
        if sreg == SS:
            self.s.interrupt_shadow = True
            self.cpu.db_pending |= _DB_MOVSS

    @handles_code(C.MOV_RM16_SREG, C.MOV_R32M16_SREG, C.MOV_R64M16_SREG)
    def _mov_from_sreg(self, ins: Instruction) -> None:
        selector = self.s.seg[SREG[ins.op1_register]].selector
        if ins.op0_kind == MEMORY:
            self._mwrite(ins, 2, selector)
        else:
            self._wreg(ins.op0_register, selector)

    @handles(M.LDS, M.LES, M.LFS, M.LGS, M.LSS)
    def _lfp(self, ins: Instruction) -> None:
        if ins.op1_kind != MEMORY:
            raise _ud()
        r = ins.op0_register
        bits = RBITS[r]
        size = bits >> 3
        lin = self._lin(ins, size + 2, _READ)
        offset = self.mmu.read(lin, size, _READ)
        selector = self.mmu.read(lin + size, 2, _READ)
        sreg = {M.LDS: DS, M.LES: ES, M.LFS: FS, M.LGS: GS, M.LSS: SS}[ins.mnemonic]
        segments.load_segment(self.cpu, sreg, selector)
        self._wreg(r, offset)
        if sreg == SS:
            self.s.interrupt_shadow = True

    @handles(M.SWAPGS)
    def _swapgs(self, ins: Instruction) -> None:
        s = self.s
        if not (s.efer & EFER_LMA and s.seg[CS].l):
            raise _ud()
        self._need_cpl0()
        gs = s.seg[GS]
        gs.base, s.msrs[MSR_KERNEL_GS_BASE] = s.msrs.get(MSR_KERNEL_GS_BASE, 0), gs.base

    @handles(M.RDFSBASE, M.RDGSBASE, M.WRFSBASE, M.WRGSBASE)
    def _fsgsbase(self, ins: Instruction) -> None:
        s = self.s
        if not (s.efer & EFER_LMA and s.seg[CS].l) or not s.cr4 & CR4_FSGSBASE:
            raise _ud()
        mn = ins.mnemonic
        seg = s.seg[FS if mn in (M.RDFSBASE, M.WRFSBASE) else GS]
        r = ins.op0_register
        if mn in (M.RDFSBASE, M.RDGSBASE):
            self._wreg(r, seg.base)
        else:
            value = self._rreg(r)
            if not canonical(value):
                raise _gp0()
            seg.base = value

    # ------------------------------------------------------------------ system instructions

    def _umip(self) -> None:
        s = self.s
        if s.cr4 & CR4_UMIP and s.cpl:
            raise _gp0()

    @handles(M.LGDT, M.LIDT)
    def _lgdt(self, ins: Instruction) -> None:
        if ins.op0_kind != MEMORY:
            raise _ud()
        self._need_cpl0()
        s = self.s
        long64 = s.efer & EFER_LMA and s.seg[CS].l
        size = 8 if long64 else 4
        lin = self._lin(ins, 2 + size, _READ)
        limit = self.mmu.read(lin, 2, _READ)
        base = self.mmu.read(lin + 2, size, _READ)
        if long64 and not canonical(base):
            raise _gp0()
        if not long64 and ins.code in (C.LGDT_M1632_16, C.LIDT_M1632_16):
            base &= 0xFFFFFF
        table = s.gdtr if ins.mnemonic == M.LGDT else s.idtr
        table.base, table.limit = base, limit

    @handles(M.SGDT, M.SIDT)
    def _sgdt(self, ins: Instruction) -> None:
        if ins.op0_kind != MEMORY:
            raise _ud()
        self._umip()
        s = self.s
        size = 8 if s.efer & EFER_LMA and s.seg[CS].l else 4
        table = s.gdtr if ins.mnemonic == M.SGDT else s.idtr
        lin = self._lin(ins, 2 + size, _WRITE)
        self.mmu.write(lin, 2 + size, (table.base & MASKS[size * 8]) << 16 | (table.limit & 0xFFFF))

    @handles(M.LLDT, M.LTR)
    def _lldt(self, ins: Instruction) -> None:
        self._need_pe()
        self._need_cpl0()
        selector = self._read(ins, 0, 16)
        if ins.mnemonic == M.LLDT:
            segments.load_ldt(self.cpu, selector)
        else:
            segments.load_tr(self.cpu, selector)

    @handles(M.SLDT, M.STR)
    def _sldt(self, ins: Instruction) -> None:
        self._need_pe()
        self._umip()
        s = self.s
        selector = (s.ldtr if ins.mnemonic == M.SLDT else s.tr).selector
        if ins.op0_kind == MEMORY:
            self._mwrite(ins, 2, selector)
        else:
            self._wreg(ins.op0_register, selector)

    def _check_descriptor(self, selector: int, kind: str) -> tuple[int, Segment] | None:
        """LAR/LSL/VERR/VERW (vol. 2): the descriptor `selector` names if it is visible at CPL/RPL and its type
        suits `kind`, else None (the instruction clears ZF instead of faulting)."""
        if not selector & 0xFFFC:
            return None
        try:
            raw = segments.read_descriptor(self.cpu, selector)
        except CpuException as exc:
            if exc.vector == Vector.GP:
                return None
            raise
        seg = segments.descriptor_to_segment(selector, raw)
        s = self.s
        conforming_code = seg.s and seg.type & 0xC == 0xC
        if not conforming_code and (seg.dpl < s.cpl or seg.dpl < (selector & 3)):
            return None
        if seg.s:
            code = seg.type & 8
            if kind == "verr" and code and not seg.type & 2:
                return None
            if kind == "verw" and (code or not seg.type & 2):
                return None
            return raw, seg
        if kind in ("verr", "verw"):
            return None
        long_mode = s.efer & EFER_LMA
        valid = {2, 9, 11} if long_mode else {1, 2, 3, 9, 11}
        if kind == "lar":
            valid |= {12} if long_mode else {4, 5, 12}
        return (raw, seg) if seg.type in valid else None

    @handles(M.LAR, M.LSL)
    def _lar(self, ins: Instruction) -> None:
        self._need_pe()
        selector = self._read(ins, 1, 16) if ins.op1_kind == MEMORY else self._rreg(ins.op1_register) & 0xFFFF
        lar = ins.mnemonic == M.LAR
        found = self._check_descriptor(selector, "lar" if lar else "lsl")
        if found is None:
            self._set_flags(0, ZF)
            return
        raw, seg = found
        r = ins.op0_register
        if lar:
            self._wreg(r, (raw >> 32) & (0xFF00 if RBITS[r] == 16 else 0x00F0FF00))
        else:
            self._wreg(r, seg.limit & MASKS[RBITS[r]])
        self._set_flags(ZF, ZF)

    @handles(M.VERR, M.VERW)
    def _verr(self, ins: Instruction) -> None:
        self._need_pe()
        selector = self._read(ins, 0, 16)
        ok = self._check_descriptor(selector, "verr" if ins.mnemonic == M.VERR else "verw") is not None
        self._set_flags(ZF if ok else 0, ZF)

    @handles(M.XLATB)
    def _xlat(self, ins: Instruction) -> None:
        """XLAT: AL = [seg:rBX + AL] (iced gives the operand as a memory operand with base rBX, index AL)."""
        gpr = self.s.gpr
        base = ins.memory_base
        offset = (gpr[RBX] + (gpr[RAX] & 0xFF)) & MASKS[RBITS[base]]
        seg = SEG_OF[ins.memory_segment]
        v = self.mmu.read(segments.linear(self.cpu, seg, offset, 1, _READ), 1, _READ)
        self._wreg(R.AL, v)

    @handles(M.SMSW)
    def _smsw(self, ins: Instruction) -> None:
        self._umip()
        cr0 = self.s.cr0
        if ins.op0_kind == MEMORY:
            self._mwrite(ins, 2, cr0 & 0xFFFF)
        else:
            self._wreg(ins.op0_register, cr0)

    @handles(M.LMSW)
    def _lmsw(self, ins: Instruction) -> None:
        self._need_cpl0()
        s = self.s
        v = self._read(ins, 0, 16)
        # loads PE, MP, EM, TS; cannot clear PE
        new = (s.cr0 & ~(CR0_MP | CR0_EM | CR0_TS)) | (v & (CR0_PE | CR0_MP | CR0_EM | CR0_TS))
        self._write_cr0(new)

    @handles(M.CLTS)
    def _clts(self, ins: Instruction) -> None:
        self._need_cpl0()
        self.s.cr0 &= ~CR0_TS

    @handles(M.INVLPG)
    def _invlpg(self, ins: Instruction) -> None:
        if ins.op0_kind != MEMORY:
            raise _ud()
        self._need_cpl0()
        s = self.s
        seg = s.seg[SEG_OF[ins.memory_segment]]
        ea = self._ea(ins)
        if s.efer & EFER_LMA and s.seg[CS].l:
            lin = (seg.base + ea) & MASK64 if SEG_OF[ins.memory_segment] >= FS else ea
        else:
            lin = (seg.base + ea) & M32
        self.mmu.invlpg(lin)
        self._fetch_lpage = -1

    @handles(M.INVPCID)
    def _invpcid(self, ins: Instruction) -> None:
        raise _ud()  # PCID is not advertised

    @handles(M.WBINVD, M.INVD, M.WBNOINVD)
    def _wbinvd(self, ins: Instruction) -> None:
        """Caches are not modelled: a privileged no-op."""
        self._need_cpl0()

    @handles_code(C.MOV_R32_CR, C.MOV_R64_CR)
    def _mov_from_cr(self, ins: Instruction) -> None:
        self._need_cpl0()
        n = ins.op1_register - CR0_REG
        s = self.s
        value = {0: s.cr0, 2: s.cr2, 3: s.cr3, 4: s.cr4, 8: s.cr8}.get(n)
        if n == 8 and self.cpu.apic is not None:
            tpr = self.cpu.apic.read_cr8()
            value = s.cr8 if tpr is None else tpr
        if value is None:
            raise _ud()
        self._wreg(ins.op0_register, value)

    @handles_code(C.MOV_CR_R32, C.MOV_CR_R64)
    def _mov_to_cr(self, ins: Instruction) -> None:
        self._need_cpl0()
        n = ins.op0_register - CR0_REG
        value = self._rreg(ins.op1_register)
        s = self.s
        if n == 0:
            self._write_cr0(value)
        elif n == 2:
            s.cr2 = value
        elif n == 3:
            self._write_cr3(value)
        elif n == 4:
            self._write_cr4(value)
        elif n == 8:
            if value & ~0xF:
                raise _gp0()
            s.cr8 = value
            if self.cpu.apic is not None:
                self.cpu.apic.write_cr8(value)
        else:
            raise _ud()

    def _write_cr0(self, value: int) -> None:
        """MOV CR0 / LMSW (vol. 3A §2.5, §9.8.5): reserved bits, PG without PE, NW without CD → #GP(0); setting
        PG with EFER.LME activates IA-32e mode (needs CR4.PAE), clearing it leaves it."""
        s = self.s
        if value >> 32:
            raise _gp0()
        value = (value & (CR0_PE | CR0_MP | CR0_EM | CR0_TS | CR0_NE | CR0_WP | CR0_AM | CR0_NW | CR0_CD | CR0_PG)) \
            | CR0_ET  # fmt: skip
        if value & CR0_PG and not value & CR0_PE:
            raise _gp0()
        if value & CR0_NW and not value & CR0_CD:
            raise _gp0()
        old = s.cr0
        efer = s.efer
        if value & CR0_PG and not old & CR0_PG:
            if efer & EFER_LME:
                if not s.cr4 & CR4_PAE or s.seg[CS].l:
                    raise _gp0()
                efer |= EFER_LMA
            elif s.cr4 & CR4_PAE:
                s.cr0 = value
                try:
                    self.mmu.load_pdptes()
                except CpuException:
                    s.cr0 = old
                    raise
        elif not value & CR0_PG and old & CR0_PG and efer & EFER_LMA:
            if s.seg[CS].l:
                raise _gp0()  # leaving long mode from 64-bit code
            efer &= ~EFER_LMA
        s.cr0 = value
        s.efer = efer
        if (old ^ value) & (CR0_PG | CR0_WP | CR0_PE):
            self.mmu.flush()

    def _write_cr3(self, value: int) -> None:
        s = self.s
        if s.efer & EFER_LMA:
            if value >> self.mmu.phys_bits:
                raise _gp0()
        else:
            value &= M32
        old = s.cr3
        s.cr3 = value
        if s.cr0 & CR0_PG and s.cr4 & CR4_PAE and not s.efer & EFER_LMA:
            try:
                self.mmu.load_pdptes()
            except CpuException:
                s.cr3 = old
                raise
        self.mmu.flush(global_too=False)

    def _write_cr4(self, value: int) -> None:
        """MOV CR4: unsupported bits → #GP(0); PAE cannot be cleared in IA-32e mode; paging-related changes
        flush the TLB (§4.10.4.1)."""
        s = self.s
        if value & ~self._cr4_allowed:
            raise _gp0()
        if s.efer & EFER_LMA and not value & CR4_PAE:
            raise _gp0()
        old = s.cr4
        s.cr4 = value
        if (old ^ value) & (CR4_PAE | CR4_PSE | CR4_PGE | CR4_SMEP | CR4_SMAP | CR4_PKE | CR4_PKS):
            if (
                s.cr0 & CR0_PG
                and value & CR4_PAE
                and not s.efer & EFER_LMA
                and (old ^ value) & (CR4_PAE | CR4_PSE | CR4_SMEP)
            ):
                try:
                    self.mmu.load_pdptes()
                except CpuException:
                    s.cr4 = old
                    raise
            self.mmu.flush()

    @handles_code(C.MOV_R32_DR, C.MOV_R64_DR, C.MOV_DR_R32, C.MOV_DR_R64)
    def _mov_dr(self, ins: Instruction) -> None:
        self._need_cpl0()
        s = self.s
        to_dr = ins.code in (C.MOV_DR_R32, C.MOV_DR_R64)
        n = (ins.op0_register if to_dr else ins.op1_register) - DR0_REG
        if n in (4, 5):
            if s.cr4 & CR4_DE:
                raise _ud()
            n += 2
        if n > 7:
            raise _ud()
        if s.dr[7] & DR7_GD:
            # general detect (§18.2.4): a fault before the access, BD set, GD cleared for the handler
            s.dr[6] |= DR6_BD
            s.dr[7] &= ~DR7_GD
            raise CpuException(Vector.DB)
        if to_dr:
            value = self._rreg(ins.op1_register)
            if n >= 6 and value >> 32:
                raise _gp0()
            if n == 6:
                value = (value & 0xE00F) | 0xFFFF0FF0
            elif n == 7:
                value = (value & 0xFFFF2BFF) | 0x400
            s.dr[n] = value
            if n != 6:
                self._arm_breakpoints()
        else:
            self._wreg(ins.op0_register, s.dr[n])

    @handles_code(C.MOV_R32_TR, C.MOV_TR_R32)
    def _mov_tr(self, ins: Instruction) -> None:
        raise _ud()

    @handles(M.RDMSR)
    def _rdmsr(self, ins: Instruction) -> None:
        self._need_cpl0()
        s = self.s
        index = s.gpr[RCX] & M32
        value = self.read_msr(index)
        s.gpr[RAX] = value & M32
        s.gpr[RDX] = value >> 32

    @handles(M.WRMSR)
    def _wrmsr(self, ins: Instruction) -> None:
        self._need_cpl0()
        s = self.s
        index = s.gpr[RCX] & M32
        self.write_msr(index, ((s.gpr[RDX] & M32) << 32) | (s.gpr[RAX] & M32))

    def read_msr(self, index: int) -> int:
        """RDMSR semantics; unknown MSRs raise #GP(0). Also used by the backend to read MSRs."""
        s = self.s
        apic = self.cpu.apic
        if apic is not None and apic.handles_msr(index):
            return apic.msr_read(index)
        if index == MSR_EFER:
            return s.efer
        if index == MSR_FS_BASE:
            return s.seg[FS].base
        if index == MSR_GS_BASE:
            return s.seg[GS].base
        if index == MSR_IA32_TSC:
            return (self.tsc() + s.tsc_offset) & MASK64
        if index == MSR_TSC_ADJUST:
            return s.msrs.get(MSR_TSC_ADJUST, 0)
        if index == MSR_IA32_PKRS and self.features.has("pks"):
            return s.msrs.get(MSR_IA32_PKRS, 0)
        if index in STORAGE_MSRS or index in MSR_DEFAULTS or index == MSR_MCG_STATUS or index in MCE_BANK_MSRS:
            return s.msrs.get(index, MSR_DEFAULTS.get(index, 0))
        raise _gp0()

    def write_msr(self, index: int, value: int) -> None:
        """WRMSR semantics (vol. 4; EFER per vol. 3A §2.2.1 and §9.8.5)."""
        s = self.s
        apic = self.cpu.apic
        if apic is not None and apic.handles_msr(index):
            if index == MSR_IA32_APIC_BASE and value >> self.mmu.phys_bits:
                raise _gp0()  # an address beyond MAXPHYADDR (§11.4.4)
            apic.msr_write(index, value)
            return
        if index in CANONICAL_MSRS and not canonical(value):
            raise _gp0()
        if index == MSR_EFER:
            if value & ~self._efer_allowed:
                raise _gp0()
            if (value ^ s.efer) & EFER_LME and s.cr0 & CR0_PG:
                raise _gp0()
            value = (value & ~EFER_LMA) | (s.efer & EFER_LMA)  # LMA is read-only
            changed = value ^ s.efer
            s.efer = value
            if changed & EFER_NXE:
                self.mmu.flush()
        elif index == MSR_FS_BASE:
            s.seg[FS].base = value
        elif index == MSR_GS_BASE:
            s.seg[GS].base = value
        elif index == MSR_IA32_TSC:
            # a write to the TSC moves IA32_TSC_ADJUST by the same amount (SDM vol. 3B §18.17.3)
            old = (self.tsc() + s.tsc_offset) & MASK64
            s.msrs[MSR_TSC_ADJUST] = (s.msrs.get(MSR_TSC_ADJUST, 0) + value - old) & MASK64
            s.tsc_offset = (value - self.tsc()) & MASK64
        elif index == MSR_IA32_PKRS and self.features.has("pks"):
            if value >> 32:
                raise _gp0()
            s.msrs[index] = value
            self.mmu.flush()  # rights are checked when TLB entries are filled
        elif index == MSR_TSC_ADJUST:
            # the TSC moves by what the adjustment moves by (SDM vol. 3B §18.17.3)
            s.tsc_offset = (s.tsc_offset + value - s.msrs.get(MSR_TSC_ADJUST, 0)) & MASK64
            s.msrs[MSR_TSC_ADJUST] = value
        elif index in (MSR_MTRRCAP, MSR_MCG_CAP):
            raise _gp0()  # read-only
        elif index == MSR_MISC_ENABLE:
            ro = 1 << 7 | 1 << 11 | 1 << 12  # performance monitoring available, BTS and PEBS unavailable
            s.msrs[index] = (value & ~ro) | (self.read_msr(index) & ro)
        elif index == MSR_MCG_STATUS:
            s.msrs[index] = value
        elif index in MCE_BANK_MSRS:
            register = (index - MSR_MC0_CTL) % 4
            # MCi_CTL enables error reporting per bit: 0 or all ones (bit 10 aside, an AMD erratum KVM tolerates);
            # MCi_STATUS may only be cleared
            if register == 0 and value and (value | 1 << 10) != MASK64:
                raise _gp0()
            if register == 1 and value:
                raise _gp0()
            s.msrs[index] = value
        elif index == MSR_PAT:
            if any(((value >> (8 * i)) & 0xFF) not in (0, 1, 4, 5, 6, 7) for i in range(8)):
                raise _gp0()
            s.msrs[index] = value
        elif index == MSR_IA32_APIC_BASE:
            if value & 0x2FF or value >> self.mmu.phys_bits:
                raise _gp0()
            s.msrs[index] = value
        elif index in STORAGE_MSRS:
            if index == MSR_TSC_AUX and value >> 32:
                raise _gp0()
            s.msrs[index] = value
        else:
            raise _gp0()

    @handles(M.RDTSC, M.RDTSCP)
    def _rdtsc(self, ins: Instruction) -> None:
        s = self.s
        if s.cr4 & CR4_TSD and s.cpl:
            raise _gp0()
        tsc = (self.tsc() + s.tsc_offset) & MASK64
        s.gpr[RAX] = tsc & M32
        s.gpr[RDX] = tsc >> 32
        if ins.mnemonic == M.RDTSCP:
            s.gpr[RCX] = s.msrs.get(MSR_TSC_AUX, 0) & M32

    @handles(M.RDPID)
    def _rdpid(self, ins: Instruction) -> None:
        self._wreg(ins.op0_register, self.s.msrs.get(MSR_TSC_AUX, 0) & M32)

    @handles(M.RDPMC)
    def _rdpmc(self, ins: Instruction) -> None:
        raise _gp0()  # no performance counters

    @handles(M.CPUID)
    def _cpuid(self, ins: Instruction) -> None:
        gpr = self.s.gpr
        leaf = gpr[RAX] & M32
        eax, ebx, ecx, edx = self.cpuid(leaf, gpr[RCX] & M32)
        if leaf == 7 and not gpr[RCX] & M32 and ecx & CPUID7_ECX_PKU and self.s.cr4 & CR4_PKE:
            ecx |= CPUID7_ECX_OSPKE  # OSPKE reflects CR4.PKE (vol. 2A CPUID)
        gpr[RAX], gpr[RBX], gpr[RCX], gpr[RDX] = eax & M32, ebx & M32, ecx & M32, edx & M32

    @handles(M.RDPKRU, M.WRPKRU)
    def _pkru(self, ins: Instruction) -> None:
        """RDPKRU/WRPKRU (vol. 2B): #UD without CR4.PKE, #GP(0) unless ECX (and for WRPKRU EDX) is 0. PKRU's
        rights are checked when TLB entries are filled (popek.cpu.mmu), so WRPKRU flushes the TLB."""
        s = self.s
        if not s.cr4 & CR4_PKE:
            raise _ud()
        gpr = s.gpr
        if gpr[RCX] & M32 or (ins.mnemonic == M.WRPKRU and gpr[RDX] & M32):
            raise _gp0()
        if ins.mnemonic == M.RDPKRU:
            gpr[RAX], gpr[RDX] = s.pkru, 0
        else:
            s.pkru = gpr[RAX] & M32
            self.mmu.flush()

    @handles(M.XGETBV)
    def _xgetbv(self, ins: Instruction) -> None:
        s = self.s
        if not s.cr4 & CR4_OSXSAVE:
            raise _ud()
        if s.gpr[RCX] & M32 != 0:
            raise _gp0()
        s.gpr[RAX] = s.xcr0 & M32
        s.gpr[RDX] = s.xcr0 >> 32

    @handles(M.XSETBV)
    def _xsetbv(self, ins: Instruction) -> None:
        s = self.s
        if not s.cr4 & CR4_OSXSAVE:
            raise _ud()
        self._need_cpl0()
        value = ((s.gpr[RDX] & M32) << 32) | (s.gpr[RAX] & M32)
        if s.gpr[RCX] & M32 != 0 or not value & 1 or value & ~3:
            raise _gp0()  # only x87 and SSE state exist here
        s.xcr0 = value

    def _vendor_mode_check(self, fast_syscall: bool) -> None:
        """#UD where the vendor this CPU names has no such instruction: Intel's SYSCALL and SYSRET outside 64-bit
        mode (SDM vol. 2B), AMD's SYSENTER and SYSEXIT in long mode (APM vol. 3)."""
        s = self.s
        long64 = bool(s.efer & EFER_LMA) and bool(s.seg[CS].l)
        if fast_syscall and self.intel and not long64:
            raise _ud()
        if not fast_syscall and not self.intel and s.efer & EFER_LMA:
            raise _ud()

    @handles(M.SYSCALL)
    def _syscall(self, ins: Instruction) -> None:
        s = self.s
        if not s.efer & EFER_SCE:
            raise _ud()
        self._vendor_mode_check(True)
        segments.syscall(self.cpu, s.rip)

    @handles(M.SYSRET, M.SYSRETQ)  # iced-x86 names the REX.W forms apart
    def _sysret(self, ins: Instruction) -> None:
        s = self.s
        if not s.efer & EFER_SCE:
            raise _ud()
        self._vendor_mode_check(True)
        self._need_cpl0()
        segments.sysret(self.cpu, 64 if ins.code == C.SYSRETQ else 32)

    @handles(M.SYSENTER)
    def _sysenter(self, ins: Instruction) -> None:
        self._vendor_mode_check(False)
        segments.sysenter(self.cpu)

    @handles(M.SYSEXIT, M.SYSEXITQ)
    def _sysexit(self, ins: Instruction) -> None:
        self._vendor_mode_check(False)
        segments.sysexit(self.cpu, 64 if ins.code == C.SYSEXITQ else 32)

    # ------------------------------------------------------------------ MMX data moves (SDM vol. 1 ch. 9)

    def _mmx_enter(self) -> None:
        """What every MMX instruction does first (vol. 1 §9.5, §9.6; vol. 3A §13.1 table): #UD with CR0.EM,
        #NM with CR0.TS, #MF for a pending unmasked x87 exception (CR0.NE); then the x87 stack is in MMX use: TOP
        = 0 and every register tagged valid."""
        s = self.s
        if s.cr0 & CR0_EM:
            raise _ud()
        if s.cr0 & CR0_TS:
            raise _fault(Vector.NM)
        self._fwait_check()
        s.fsw &= ~(7 << 11)
        s.ftw = 0xFF

    def _mm_read(self, ins: Instruction, i: int, bits: int) -> int:
        """Operand `i` of an MMX move: MMn is the significand of physical x87 register Rn (vol. 1 §9.5)."""
        if ins.op_kind(i) == REGISTER and R.MM0 <= ins.op_register(i) <= R.MM7:
            value: int = self.s.st[ins.op_register(i) - R.MM0] & MASK64
            return value
        return self._read(ins, i, bits)

    def _mm_write0(self, ins: Instruction, value: int, bits: int) -> None:
        """Write operand 0: an MMX register takes the 64 bits with the exponent and sign field all ones."""
        if ins.op0_kind == REGISTER and R.MM0 <= ins.op0_register <= R.MM7:
            self.s.st[ins.op0_register - R.MM0] = 0xFFFF << 64 | (value & MASK64)
        else:
            self._write0(ins, value, bits)

    @handles_code(C.MOVQ_MM_MMM64, C.MOVQ_MMM64_MM, C.MOVQ_MM_RM64, C.MOVQ_RM64_MM)
    def _mmx_movq(self, ins: Instruction) -> None:
        self._mmx_enter()
        self._mm_write0(ins, self._mm_read(ins, 1, 64), 64)

    @handles_code(C.MOVD_MM_RM32, C.MOVD_RM32_MM)
    def _mmx_movd(self, ins: Instruction) -> None:
        """MOVD zero-extends into an MMX register and stores the low doubleword from one."""
        self._mmx_enter()
        self._mm_write0(ins, self._mm_read(ins, 1, 32) & M32, 32)

    @handles(M.EMMS)
    def _emms(self, ins: Instruction) -> None:
        """EMMS: the x87 registers are all empty again (vol. 1 §9.6.3)."""
        s = self.s
        if s.cr0 & CR0_EM:
            raise _ud()
        if s.cr0 & CR0_TS:
            raise _fault(Vector.NM)
        self._fwait_check()
        s.ftw = 0

    # ------------------------------------------------------------------ x87 control, FXSAVE, MXCSR

    def _fwait_check(self) -> None:
        """What FWAIT and every waiting x87 instruction check first: #NM with CR0.TS and CR0.MP (FWAIT) or
        CR0.EM/TS (the others, via `_fpu_check`), then #MF for a pending unmasked exception when CR0.NE is set
        (with CR0.NE clear, hardware signals FERR# to an external interrupt controller: not modelled)."""
        s = self.s
        if s.fsw & FSW_ES and s.cr0 & CR0_NE:
            raise _fault(Vector.MF)

    @handles(M.FNINIT, M.FINIT)
    def _fninit(self, ins: Instruction) -> None:
        self._fpu_check()
        s = self.s
        s.fcw, s.fsw, s.ftw = x87.FCW_DEFAULT, 0, 0
        s.fop = s.fip = s.fcs = s.fdp = s.fds = 0

    @handles(M.FNSTCW, M.FSTCW)
    def _fnstcw(self, ins: Instruction) -> None:
        self._fpu_check()
        self._mwrite(ins, 2, self.s.fcw)

    @handles(M.FLDCW)
    def _fldcw(self, ins: Instruction) -> None:
        self._fpu_check()
        self._fwait_check()
        self.s.fcw = x87.control_word(self._read(ins, 0, 16))
        x87.update_summary(self.s)  # unmasking a flagged exception makes it pending

    @handles(M.FNSTSW, M.FSTSW)
    def _fnstsw(self, ins: Instruction) -> None:
        self._fpu_check()
        self._write0(ins, self.s.fsw, 16)

    @handles(M.FNCLEX, M.FCLEX)
    def _fnclex(self, ins: Instruction) -> None:
        self._fpu_check()
        self.s.fsw &= 0x7F00

    @handles(M.WAIT)
    def _fwait(self, ins: Instruction) -> None:
        s = self.s
        if s.cr0 & CR0_TS and s.cr0 & CR0_MP:
            raise _fault(Vector.NM)
        self._fwait_check()

    def _x87_env_layout(self, ins: Instruction) -> tuple[bool, bool]:
        """(32-bit layout, real-mode layout) of FNSTENV/FLDENV/FNSAVE/FRSTOR (vol. 1 §8.1.10 figures 8-9..8-12):
        by operand size, and the real-mode form in real and virtual-8086 mode."""
        size = ins.memory_size
        wide = size in (_MS.FPU_ENV28, _MS.FPU_STATE108)
        s = self.s
        return wide, not s.cr0 & CR0_PE or bool(s.rflags & VM)

    def _x87_env(self, ins: Instruction) -> bytes:
        s = self.s
        wide, real = self._x87_env_layout(ins)
        tw = x87.Stack(s).full_tag()
        if real:
            fip = ((s.fcs << 4) + s.fip) & M32
            fdp = ((s.fds << 4) + s.fdp) & M32
            if wide:  # the reserved upper halves of the first three doublewords store as ones
                words = (s.fcw | 0xFFFF0000, s.fsw | 0xFFFF0000, tw | 0xFFFF0000, fip & 0xFFFF,
                         ((fip >> 16) << 12) | s.fop, fdp & 0xFFFF, (fdp >> 16) << 12)  # fmt: skip
                return b"".join((w & M32).to_bytes(4, "little") for w in words)
            words = (s.fcw, s.fsw, tw, fip & 0xFFFF, ((fip >> 16) & 0xF) << 12 | s.fop, fdp & 0xFFFF,
                     ((fdp >> 16) & 0xF) << 12)  # fmt: skip
            return b"".join((w & 0xFFFF).to_bytes(2, "little") for w in words)
        if wide:
            words = (s.fcw | 0xFFFF0000, s.fsw | 0xFFFF0000, tw | 0xFFFF0000, s.fip & M32, s.fcs | (s.fop << 16),
                     s.fdp & M32, s.fds | 0xFFFF0000)  # fmt: skip
            return b"".join((w & M32).to_bytes(4, "little") for w in words)
        words = (s.fcw, s.fsw, tw, s.fip, s.fcs, s.fdp, s.fds)
        return b"".join((w & 0xFFFF).to_bytes(2, "little") for w in words)

    def _x87_load_env(self, ins: Instruction, env: bytes) -> None:
        s = self.s
        wide, real = self._x87_env_layout(ins)
        n = 4 if wide else 2
        w = [int.from_bytes(env[i : i + n], "little") for i in range(0, 7 * n, n)]
        s.fcw, s.fsw = x87.control_word(w[0]), w[1] & 0xFFFF
        x87.Stack(s).load_tag(w[2])
        if real:
            hi = 16 if wide else 4
            s.fip = (w[3] & 0xFFFF) | ((w[4] >> 12) & ((1 << hi) - 1)) << 16
            s.fdp = (w[5] & 0xFFFF) | ((w[6] >> 12) & ((1 << hi) - 1)) << 16
            s.fop, s.fcs, s.fds = w[4] & 0x7FF, 0, 0
        elif wide:
            s.fip, s.fcs, s.fop = w[3], w[4] & 0xFFFF, (w[4] >> 16) & 0x7FF
            s.fdp, s.fds = w[5], w[6] & 0xFFFF
        else:
            s.fip, s.fcs, s.fdp, s.fds = w[3], w[4], w[5], w[6]
        x87.update_summary(s)

    @handles(M.FNSTENV, M.FSTENV)
    def _fnstenv(self, ins: Instruction) -> None:
        self._fpu_check()
        env = self._x87_env(ins)
        self.mmu.write_bytes(self._lin(ins, len(env), _WRITE), env)
        self.s.fcw |= x87.EXC  # FNSTENV masks every exception after saving
        x87.update_summary(self.s)

    @handles(M.FLDENV)
    def _fldenv(self, ins: Instruction) -> None:
        self._fpu_check()
        size = MEMSIZE[ins.memory_size]
        self._x87_load_env(ins, self.mmu.read_bytes(self._lin(ins, size, _READ), size))

    @handles(M.FNSAVE, M.FSAVE)
    def _fnsave(self, ins: Instruction) -> None:
        self._fpu_check()
        s = self.s
        stack = x87.Stack(s)
        image = self._x87_env(ins) + b"".join(stack.raw(i).to_bytes(10, "little") for i in range(8))
        self.mmu.write_bytes(self._lin(ins, len(image), _WRITE), image)
        self._fninit(ins)

    @handles(M.FRSTOR)
    def _frstor(self, ins: Instruction) -> None:
        self._fpu_check()
        size = MEMSIZE[ins.memory_size]
        image = self.mmu.read_bytes(self._lin(ins, size, _READ), size)
        env = size - 80
        self._x87_load_env(ins, image[:env])
        stack = x87.Stack(self.s)
        for i in range(8):
            self.s.st[stack.phys(i)] = int.from_bytes(image[env + 10 * i : env + 10 * i + 10], "little")

    @handles(M.FXSAVE, M.FXSAVE64)
    def _fxsave(self, ins: Instruction) -> None:
        self._fpu_check()
        lin = self._lin(ins, 512, _WRITE)
        if lin & 15:
            raise _gp0()
        s = self.s
        area = bytearray(self.mmu.read_bytes(lin, 512, _WRITE, s.cpl == 3))
        area[0:2] = s.fcw.to_bytes(2, "little")
        area[2:4] = s.fsw.to_bytes(2, "little")
        area[4] = s.ftw & 0xFF
        area[5] = 0
        area[6:8] = s.fop.to_bytes(2, "little")
        if ins.mnemonic == M.FXSAVE64:
            area[8:16] = s.fip.to_bytes(8, "little")
            area[16:24] = s.fdp.to_bytes(8, "little")
        else:
            area[8:16] = (s.fip & M32).to_bytes(4, "little") + s.fcs.to_bytes(2, "little") + bytes(2)
            area[16:24] = (s.fdp & M32).to_bytes(4, "little") + s.fds.to_bytes(2, "little") + bytes(2)
        area[24:28] = s.mxcsr.to_bytes(4, "little")
        area[28:32] = (0xFFFF).to_bytes(4, "little")  # MXCSR_MASK: DAZ supported
        stack = x87.Stack(s)
        for i in range(8):  # ST(0)..ST(7), in stack order
            area[32 + 16 * i : 48 + 16 * i] = stack.raw(i).to_bytes(10, "little") + bytes(6)
        nxmm = 16 if s.efer & EFER_LMA and s.seg[CS].l else 8
        for i in range(nxmm):
            area[160 + 16 * i : 176 + 16 * i] = s.xmm[i].to_bytes(16, "little")
        self.mmu.write_bytes(lin, bytes(area), s.cpl == 3)

    @handles(M.FXRSTOR, M.FXRSTOR64)
    def _fxrstor(self, ins: Instruction) -> None:
        self._fpu_check()
        lin = self._lin(ins, 512, _READ)
        if lin & 15:
            raise _gp0()
        s = self.s
        area = self.mmu.read_bytes(lin, 512, _READ, s.cpl == 3)
        mxcsr = int.from_bytes(area[24:28], "little")
        if mxcsr & ~0xFFFF:
            raise _gp0()
        s.fcw = x87.control_word(int.from_bytes(area[0:2], "little"))
        s.fsw = int.from_bytes(area[2:4], "little")
        s.ftw = area[4]
        s.fop = int.from_bytes(area[6:8], "little") & 0x7FF
        if ins.mnemonic == M.FXRSTOR64:
            s.fip, s.fcs = int.from_bytes(area[8:16], "little"), 0
            s.fdp, s.fds = int.from_bytes(area[16:24], "little"), 0
        else:
            s.fip, s.fcs = int.from_bytes(area[8:12], "little"), int.from_bytes(area[12:14], "little")
            s.fdp, s.fds = int.from_bytes(area[16:20], "little"), int.from_bytes(area[20:22], "little")
        s.mxcsr = mxcsr
        stack = x87.Stack(s)
        for i in range(8):
            s.st[stack.phys(i)] = int.from_bytes(area[32 + 16 * i : 42 + 16 * i], "little")
        nxmm = 16 if s.efer & EFER_LMA and s.seg[CS].l else 8
        for i in range(nxmm):
            s.xmm[i] = int.from_bytes(area[160 + 16 * i : 176 + 16 * i], "little")

    @handles(M.LDMXCSR)
    def _ldmxcsr(self, ins: Instruction) -> None:
        self._sse_check()
        v = self._read(ins, 0, 32)
        if v & ~0xFFFF:
            raise _gp0()
        self.s.mxcsr = v

    @handles(M.STMXCSR)
    def _stmxcsr(self, ins: Instruction) -> None:
        self._sse_check()
        self._mwrite(ins, 4, self.s.mxcsr)

    # ------------------------------------------------------------------ x87 arithmetic
    # Each handler: #NM and #MF checks, operands read (memory first, so a fault changes nothing), the value
    # computed by popek.cpu.x87, memory written, and only then the stack, FSW and the FOP/FIP/FDP pointers.
    # An empty source register is a stack underflow (IE+SF, C1=0), a push onto a full stack an overflow
    # (IE+SF, C1=1); masked, the destination receives the real indefinite.

    def _x87(self) -> x87.Stack:
        """The checks of a waiting x87 instruction, and the stack it works on."""
        self._fpu_check()
        self._fwait_check()
        return x87.Stack(self.s)

    def _x87_retire(self, ins: Instruction) -> None:
        """FOP, FCS:FIP and (with a memory operand) FDS:FDP of the last non-control instruction (vol. 1 §8.1.8,
        §8.1.9): the opcode is the low 3 bits of the D8-DF byte and the ModR/M byte."""
        s = self.s
        cs = s.seg[CS]
        lin = ins.ip if s.efer & EFER_LMA and cs.l else (cs.base + ins.ip) & M32
        code = self.mmu.read_bytes(lin, ins.len, _EXECUTE)
        for i, b in enumerate(code[:-1]):
            if b & 0xF8 == 0xD8:
                s.fop = ((b & 7) << 8) | code[i + 1]
                break
        s.fip, s.fcs = ins.ip, cs.selector
        if ins.op_count and ins.op0_kind == MEMORY:
            s.fdp, s.fds = self._ea(ins), s.seg[SEG_OF[ins.memory_segment]].selector

    @staticmethod
    def _st_index(ins: Instruction, i: int) -> int:
        return int(ins.op_register(i) - R.ST0)

    def _x87_operand(self, ins: Instruction) -> tuple[int, int]:
        """A memory source operand as an extended value (SNaNs kept signalling) and DE for a denormal."""
        size = ins.memory_size
        n = MEMSIZE[size]
        raw = self._mread(ins, n)
        if size == _MS.FLOAT32:
            return x87.from_format(x87.SINGLE, raw, keep_snan=True)
        if size == _MS.FLOAT64:
            return x87.from_format(x87.DOUBLE, raw, keep_snan=True)
        if size == _MS.FLOAT80:
            return raw, 0
        return x87.from_int(raw - (1 << (8 * n)) if raw >> (8 * n - 1) else raw), 0

    def _x87_result(self, ins: Instruction, stack: x87.Stack, dest: int, value: int, exc: int, pop: int) -> None:
        """Deliver an arithmetic result: flags (C1 from the rounding), then the register and pops unless an
        unmasked IE/DE/ZE withholds them."""
        withheld = stack.signal(exc)
        stack.set_cc(0 if withheld else exc & x87.C1, x87.C1)
        if not withheld:
            stack.set(dest, value)
            for _ in range(pop):
                stack.pop()
        self._x87_retire(ins)

    def _x87_underflow(self, ins: Instruction, stack: x87.Stack, dest: int | None, pop: int) -> None:
        """A source register was empty: IE+SF with C1 clear; masked, `dest` gets the indefinite."""
        if not stack.signal(x87.IE | x87.SF) and dest is not None:
            stack.set(dest, x87.INDEFINITE)
            for _ in range(pop):
                stack.pop()
        stack.set_cc(0, x87.C1)
        self._x87_retire(ins)

    def _x87_push(self, ins: Instruction, stack: x87.Stack, value: int, exc: int) -> None:
        """Push a loaded value: stack overflow when ST(7) is in use (IE+SF, C1=1)."""
        if not stack.empty(7):
            if not stack.signal(x87.IE | x87.SF):
                stack.push(x87.INDEFINITE)
            stack.set_cc(x87.C1, x87.C1)
        else:
            if not stack.signal(exc):
                stack.push(value)
            stack.set_cc(exc & x87.C1, x87.C1)
        self._x87_retire(ins)

    def _x87_binary(self, ins: Instruction, op: x87.BinaryOp, rev: bool, pop: int) -> None:
        stack = self._x87()
        s = self.s
        if ins.op_count == 1:  # ST(0) op memory
            b, conv = self._x87_operand(ins)
            dest, a_reg = 0, stack.get(0)
            if a_reg is None:
                return self._x87_underflow(ins, stack, 0, pop)
            a = a_reg
        else:
            dest, src = self._st_index(ins, 0), self._st_index(ins, 1)
            a_opt, b_opt = stack.get(dest), stack.get(src)
            if a_opt is None or b_opt is None:
                return self._x87_underflow(ins, stack, dest, pop)
            a, b, conv = a_opt, b_opt, 0
        if rev:
            a, b = b, a
        value, exc = op(a, b, s.fcw)
        if conv and not exc & (x87.IE | x87.ZE) and x87.classify(value) not in x87.NANS:
            exc |= conv  # a denormal memory operand (a NaN operand takes precedence over DE)
            if conv & ~s.fcw & x87.DE:
                exc &= ~(x87.PE | x87.UE | x87.OE | x87.C1)
        self._x87_result(ins, stack, dest, value, exc, pop)

    @handles(M.FADD, M.FADDP, M.FIADD)
    def _fadd(self, ins: Instruction) -> None:
        self._x87_binary(ins, x87.add, False, ins.mnemonic == M.FADDP)

    @handles(M.FSUB, M.FSUBP, M.FISUB)
    def _fsub(self, ins: Instruction) -> None:
        self._x87_binary(ins, x87.sub, False, ins.mnemonic == M.FSUBP)

    @handles(M.FSUBR, M.FSUBRP, M.FISUBR)
    def _fsubr(self, ins: Instruction) -> None:
        self._x87_binary(ins, x87.sub, True, ins.mnemonic == M.FSUBRP)

    @handles(M.FMUL, M.FMULP, M.FIMUL)
    def _fmul(self, ins: Instruction) -> None:
        self._x87_binary(ins, x87.mul, False, ins.mnemonic == M.FMULP)

    @handles(M.FDIV, M.FDIVP, M.FIDIV)
    def _fdiv(self, ins: Instruction) -> None:
        self._x87_binary(ins, x87.div, False, ins.mnemonic == M.FDIVP)

    @handles(M.FDIVR, M.FDIVRP, M.FIDIVR)
    def _fdivr(self, ins: Instruction) -> None:
        self._x87_binary(ins, x87.div, True, ins.mnemonic == M.FDIVRP)

    def _x87_unary(self, ins: Instruction, op: x87.UnaryOp) -> None:
        stack = self._x87()
        a = stack.get(0)
        if a is None:
            return self._x87_underflow(ins, stack, 0, 0)
        value, exc = op(a, self.s.fcw)
        self._x87_result(ins, stack, 0, value, exc, 0)

    @handles(M.FSQRT)
    def _fsqrt(self, ins: Instruction) -> None:
        self._x87_unary(ins, x87.sqrt)

    @handles(M.FRNDINT)
    def _frndint(self, ins: Instruction) -> None:
        self._x87_unary(ins, x87.roundint)

    @handles(M.F2XM1)
    def _f2xm1(self, ins: Instruction) -> None:
        self._x87_unary(ins, x87.f2xm1)

    @handles(M.FCHS, M.FABS)
    def _fchs(self, ins: Instruction) -> None:
        stack = self._x87()
        a = stack.get(0)
        if a is None:
            return self._x87_underflow(ins, stack, 0, 0)
        stack.set(0, a ^ x87.SIGN80 if ins.mnemonic == M.FCHS else a & ~x87.SIGN80)
        stack.set_cc(0, x87.C1)
        self._x87_retire(ins)

    def _x87_st0_st1(self, ins: Instruction, op: x87.BinaryOp, into: int, pop: int,
                     cc: int = x87.C1) -> None:  # fmt: skip
        """ST(into) = op(ST(0), ST(1)) (FSCALE, FPREM/FPREM1 into ST(0); FPATAN/FYL2X/FYL2XP1 into ST(1), popping)."""
        stack = self._x87()
        a, b = stack.get(0), stack.get(1)
        if a is None or b is None:
            self._x87_underflow(ins, stack, into, pop)
            return stack.set_cc(0, cc & x87.C2)  # FPREM: no reduction left to do
        value, exc = op(a, b, self.s.fcw)
        if stack.signal(exc):
            stack.set_cc(0, x87.C1 | (cc & x87.C2))
        else:
            stack.set(into, value)
            for _ in range(pop):
                stack.pop()
            stack.set_cc(exc & cc, cc)
        self._x87_retire(ins)

    @handles(M.FSCALE)
    def _fscale(self, ins: Instruction) -> None:
        self._x87_st0_st1(ins, x87.scale, 0, 0)

    @handles(M.FPREM, M.FPREM1)
    def _fprem(self, ins: Instruction) -> None:
        ieee = ins.mnemonic == M.FPREM1
        self._x87_st0_st1(ins, lambda a, b, fcw: x87.prem(a, b, fcw, ieee, not self.intel), 0, 0, x87.CC)

    @handles(M.FPATAN)
    def _fpatan(self, ins: Instruction) -> None:
        self._x87_st0_st1(ins, lambda x, y, fcw: x87.atan2(y, x, fcw), 1, 1)

    @handles(M.FYL2X)
    def _fyl2x(self, ins: Instruction) -> None:
        self._x87_st0_st1(ins, lambda x, y, fcw: x87.yl2x(y, x, fcw), 1, 1)

    @handles(M.FYL2XP1)
    def _fyl2xp1(self, ins: Instruction) -> None:
        self._x87_st0_st1(ins, lambda x, y, fcw: x87.yl2xp1(y, x, fcw), 1, 1)

    @handles(M.FSIN, M.FCOS)
    def _fsin(self, ins: Instruction) -> None:
        stack = self._x87()
        a = stack.get(0)
        if a is None:
            return self._x87_underflow(ins, stack, 0, 0)
        both = x87.sin_cos(a, self.s.fcw)
        if both is None:
            stack.set_cc(x87.C2, x87.C2 | x87.C1)
            return self._x87_retire(ins)
        value, exc = both[0] if ins.mnemonic == M.FSIN else both[1]
        self._x87_result(ins, stack, 0, value, exc, 0)
        stack.set_cc(0, x87.C2)

    def _x87_operand_for_push(self, ins: Instruction, stack: x87.Stack) -> int | None:
        """ST(0) for an instruction that replaces it and pushes a second result (FSINCOS, FPTAN, FXTRACT), or None
        once the stack fault it takes instead has been handled: ST(0) empty (underflow, C1 = 0) or ST(7) in use
        (overflow, C1 = 1); masked, both results are the real indefinite (SDM vol. 1 §8.5.1.1)."""
        a = stack.get(0)
        overflow = a is not None and not stack.empty(7)
        if a is not None and not overflow:
            return a
        if not stack.signal(x87.IE | x87.SF):
            stack.set(0, x87.INDEFINITE)
            stack.push(x87.INDEFINITE)
        stack.set_cc(x87.C1 if overflow else 0, x87.C1)
        self._x87_retire(ins)
        return None

    @handles(M.FSINCOS, M.FPTAN)
    def _fsincos(self, ins: Instruction) -> None:
        """ST(0) = sin (FSINCOS) or tan (FPTAN), then push cos or 1.0."""
        stack = self._x87()
        a = self._x87_operand_for_push(ins, stack)
        if a is None:
            return None
        fcw = self.s.fcw
        if ins.mnemonic == M.FSINCOS:
            both = x87.sin_cos(a, fcw)
            pair = None if both is None else (both[0], both[1])
        else:
            t = x87.tan(a, fcw)
            pair = None if t is None else (t, (x87.INDEFINITE if x87.classify(t[0]) in x87.NANS else x87.ONE, 0))
        if pair is None:
            stack.set_cc(x87.C2, x87.C2 | x87.C1)
            return self._x87_retire(ins)
        (first, e1), (second, e2) = pair
        if x87.classify(first) in x87.NANS:
            second, e2 = first, e1  # a NaN or invalid operand: both results are that NaN
        exc = e1 | e2
        if not stack.signal(exc):
            stack.set(0, first)
            stack.push(second)
        stack.set_cc(e2 & x87.C1, x87.C1 | x87.C2)
        self._x87_retire(ins)

    @handles(M.FXTRACT)
    def _fxtract(self, ins: Instruction) -> None:
        stack = self._x87()
        a = self._x87_operand_for_push(ins, stack)
        if a is None:
            return None
        exponent, significand, exc = x87.xtract(a, self.s.fcw)
        if not stack.signal(exc):
            stack.set(0, exponent)
            stack.push(significand)
        stack.set_cc(0, x87.C1)
        self._x87_retire(ins)

    # --- loads and stores ---

    @handles(M.FLD)
    def _fld(self, ins: Instruction) -> None:
        stack = self._x87()
        if ins.op0_kind == REGISTER:
            v = stack.get(self._st_index(ins, 0))
            if v is None:
                if not stack.signal(x87.IE | x87.SF):
                    stack.push(x87.INDEFINITE)
                stack.set_cc(0, x87.C1)
                return self._x87_retire(ins)
            return self._x87_push(ins, stack, v, 0)
        size = ins.memory_size
        raw = self._mread(ins, MEMSIZE[size])
        if size == _MS.FLOAT80:
            return self._x87_push(ins, stack, raw, 0)
        value, exc = x87.from_format(x87.SINGLE if size == _MS.FLOAT32 else x87.DOUBLE, raw)
        if exc == x87.DE and not self.s.fcw & x87.DE and stack.empty(7):
            stack.signal(exc)  # an unmasked denormal operand still loads (the reference host; the SDM is silent)
            exc = 0
        self._x87_push(ins, stack, value, exc)

    @handles(M.FILD)
    def _fild(self, ins: Instruction) -> None:
        stack = self._x87()
        value, _ = self._x87_operand(ins)
        self._x87_push(ins, stack, value, 0)

    @handles(M.FBLD)
    def _fbld(self, ins: Instruction) -> None:
        stack = self._x87()
        self._x87_push(ins, stack, x87.from_bcd(self._mread(ins, 10)), 0)

    _CONSTANTS = {M.FLD1: "one", M.FLDZ: "zero", M.FLDPI: "pi", M.FLDL2E: "l2e", M.FLDL2T: "l2t",
                  M.FLDLG2: "lg2", M.FLDLN2: "ln2"}  # fmt: skip

    @handles(M.FLD1, M.FLDZ, M.FLDPI, M.FLDL2E, M.FLDL2T, M.FLDLG2, M.FLDLN2)
    def _fldconst(self, ins: Instruction) -> None:
        stack = self._x87()
        self._x87_push(ins, stack, x87.constant(self._CONSTANTS[ins.mnemonic], self.s.fcw), 0)

    def _x87_store(self, ins: Instruction, convert: Callable[[int], tuple[int | None, int]], indefinite: int,
                   pop: bool) -> None:  # fmt: skip
        """Store ST(0) to memory through `convert` (bits, or None where an unmasked exception withholds the store
        and the pop; exceptions | C1). An empty ST(0) stores `indefinite` when IE is masked."""
        stack = self._x87()
        size = MEMSIZE[ins.memory_size]
        a = stack.get(0)
        if a is None:
            bits, exc = (indefinite if self.s.fcw & x87.IE else None), x87.IE | x87.SF
        else:
            bits, exc = convert(a)
        if bits is not None:
            self._mwrite(ins, size, bits)
        stack.signal(exc)
        if pop and bits is not None:
            stack.pop()
        stack.set_cc(exc & x87.C1, x87.C1)
        self._x87_retire(ins)

    @handles(M.FST, M.FSTP, M.FSTPNCE)  # FSTPNCE: D9 D8+i, an alias of FSTP ST(i)
    def _fst(self, ins: Instruction) -> None:
        pop = ins.mnemonic != M.FST
        if ins.mnemonic == M.FSTPNCE:  # an empty ST(0) is no stack fault: nothing is copied (as the host does)
            stack = self._x87()
            if not stack.empty(0):
                stack.set(self._st_index(ins, 0), stack.raw(0))
            stack.pop()
            stack.set_cc(0, x87.C1)
            return self._x87_retire(ins)
        if ins.op0_kind == REGISTER:
            stack = self._x87()
            a = stack.get(0)
            if a is None:
                return self._x87_underflow(ins, stack, self._st_index(ins, 0), int(pop))
            stack.set(self._st_index(ins, 0), a)
            if pop:
                stack.pop()
            stack.set_cc(0, x87.C1)
            return self._x87_retire(ins)
        size = ins.memory_size
        fcw = self.s.fcw
        if size == _MS.FLOAT80:
            self._x87_store(ins, lambda a: (a, 0), x87.INDEFINITE, pop)
        else:
            fmt = x87.SINGLE if size == _MS.FLOAT32 else x87.DOUBLE
            self._x87_store(ins, lambda a: x87.to_format(fmt, a, fcw), fmt.indefinite(), pop)

    @handles(M.FIST, M.FISTP, M.FISTTP)
    def _fist(self, ins: Instruction) -> None:
        n = MEMSIZE[ins.memory_size]
        fcw = self.s.fcw
        trunc = ins.mnemonic == M.FISTTP
        self._x87_store(ins, lambda a: x87.to_int(a, n, fcw, trunc), x87.INT_INDEFINITE[n], ins.mnemonic != M.FIST)

    @handles(M.FBSTP)
    def _fbstp(self, ins: Instruction) -> None:
        fcw = self.s.fcw
        self._x87_store(ins, lambda a: x87.to_bcd(a, fcw), x87.BCD_INDEFINITE, True)

    # --- comparisons and classification ---

    def _x87_compare(self, ins: Instruction, quiet: bool, pops: int, eflags: bool, b_mem: bool) -> None:
        stack = self._x87()
        a = stack.get(0)
        conv = 0
        if b_mem:
            b: int | None
            b, conv = self._x87_operand(ins)
        elif ins.mnemonic == M.FTST:
            b = 0
        elif ins.op_count == 2:
            b = stack.get(self._st_index(ins, 1))
        else:
            b = stack.get(1)
        if a is None or b is None:
            cc, exc = x87.C3 | x87.C2 | x87.C0, x87.IE | x87.SF
        else:
            cc, exc = x87.compare(a, b, quiet)
            if conv and not exc & x87.IE and cc != x87.C3 | x87.C2 | x87.C0:
                exc |= conv
        # the result is set even when an unmasked exception withholds the pops (as the host does); FCOMI
        # clears OF, SF and AF, and C1 (SDM; the reference AMD host leaves C1 alone)
        if eflags:
            zf = ZF if cc & x87.C3 else 0
            pf = PF if cc & x87.C2 else 0
            cf = CF if cc & x87.C0 else 0
            self._set_flags(zf | pf | cf, STATUS_FLAGS)
            stack.set_cc(0, x87.C1)
        else:
            stack.set_cc(cc, x87.CC)
        if not stack.signal(exc):
            for _ in range(pops):
                stack.pop()
        self._x87_retire(ins)

    @handles(M.FCOM, M.FCOMP, M.FUCOM, M.FUCOMP, M.FICOM, M.FICOMP)
    def _fcom(self, ins: Instruction) -> None:
        mn = ins.mnemonic
        pops = 1 if mn in (M.FCOMP, M.FUCOMP, M.FICOMP) else 0
        mem = ins.op_count == 1 and ins.op0_kind == MEMORY
        self._x87_compare(ins, mn in (M.FUCOM, M.FUCOMP), pops, False, mem)

    @handles(M.FCOMPP, M.FUCOMPP)
    def _fcompp(self, ins: Instruction) -> None:
        self._x87_compare(ins, ins.mnemonic == M.FUCOMPP, 2, False, False)

    @handles(M.FCOMI, M.FCOMIP, M.FUCOMI, M.FUCOMIP)
    def _fcomi(self, ins: Instruction) -> None:
        mn = ins.mnemonic
        self._x87_compare(ins, mn in (M.FUCOMI, M.FUCOMIP), int(mn in (M.FCOMIP, M.FUCOMIP)), True, False)

    @handles(M.FTST)
    def _ftst(self, ins: Instruction) -> None:
        self._x87_compare(ins, False, 0, False, False)

    @handles(M.FXAM)
    def _fxam(self, ins: Instruction) -> None:
        stack = self._x87()
        v = stack.get(0)
        cc = x87.examine(v)
        if v is None and x87.sign_of(stack.raw(0)):
            cc |= x87.C1
        stack.set_cc(cc, x87.CC)
        self._x87_retire(ins)

    # --- stack management ---

    @handles(M.FXCH)
    def _fxch(self, ins: Instruction) -> None:
        stack = self._x87()
        i = self._st_index(ins, 1) if ins.op_count == 2 else 1
        a, b = stack.get(0), stack.get(i)
        if a is None or b is None:
            if stack.signal(x87.IE | x87.SF):
                stack.set_cc(0, x87.C1)
                return self._x87_retire(ins)
            a = x87.INDEFINITE if a is None else a
            b = x87.INDEFINITE if b is None else b
        stack.set(0, b)
        stack.set(i, a)
        stack.set_cc(0, x87.C1)
        self._x87_retire(ins)

    @handles(M.FINCSTP, M.FDECSTP)
    def _fincstp(self, ins: Instruction) -> None:
        stack = self._x87()
        stack.set_top(stack.top + (1 if ins.mnemonic == M.FINCSTP else -1))
        stack.set_cc(0, x87.C1)
        self._x87_retire(ins)

    @handles(M.FFREE, M.FFREEP)
    def _ffree(self, ins: Instruction) -> None:
        stack = self._x87()
        stack.free(self._st_index(ins, 0))
        if ins.mnemonic == M.FFREEP:
            stack.pop()
        stack.set_cc(0, x87.C1)  # undefined by the SDM; cleared, as the reference host does
        self._x87_retire(ins)

    @handles(M.FNENI, M.FNDISI, M.FNSETPM, M.FENI, M.FDISI, M.FSETPM)
    def _fneni(self, ins: Instruction) -> None:
        """The 8087/287 control instructions (DB E0, E1, E4): no-ops since the 387, FOP/FIP untouched."""
        self._fpu_check()

    @handles(M.FNOP)
    def _fnop(self, ins: Instruction) -> None:
        self._x87()
        self._x87_retire(ins)

    _FCMOV = {M.FCMOVB: (CF, True), M.FCMOVE: (ZF, True), M.FCMOVBE: (CF | ZF, True), M.FCMOVU: (PF, True),
              M.FCMOVNB: (CF, False), M.FCMOVNE: (ZF, False), M.FCMOVNBE: (CF | ZF, False),
              M.FCMOVNU: (PF, False)}  # fmt: skip

    @handles(*_FCMOV)
    def _fcmov(self, ins: Instruction) -> None:
        stack = self._x87()
        flags, when_set = self._FCMOV[ins.mnemonic]
        src = stack.get(self._st_index(ins, 1))
        if src is None or stack.empty(0):
            return self._x87_underflow(ins, stack, 0, 0)
        if bool(self.s.rflags & flags) == when_set:
            stack.set(0, src)
        self._x87_retire(ins)  # C1 is defined only for a stack underflow

    # ------------------------------------------------------------------ SSE/SSE2

    def _xmm_index(self, r: int) -> int:
        if not XMM0 <= r <= XMM15:
            raise _ud()  # MMX registers: MMX is not implemented
        return r - XMM0

    def _xread(self, ins: Instruction, i: int, size: int = 16, aligned: bool = False) -> int:
        """An XMM register or memory operand (`size` bytes from memory; aligned forms #GP(0) when misaligned)."""
        if ins.op_kind(i) == REGISTER:
            return self.s.xmm[self._xmm_index(ins.op_register(i))]
        lin = self._lin(ins, size, _READ)
        if aligned and lin & 15:
            raise _gp0()
        return self.mmu.read(lin, size, _READ)

    def _xwrite_mem(self, ins: Instruction, value: int, size: int = 16, aligned: bool = False) -> None:
        lin = self._lin(ins, size, _WRITE)
        if aligned and lin & 15:
            raise _gp0()
        self.mmu.write(lin, size, value)

    def _sse_binop(self, ins: Instruction, fn: Callable[[int, int], int]) -> None:
        """xmm1 = fn(xmm1, xmm2/m128) for the legacy-encoded packed operations (m128 must be aligned)."""
        self._sse_check()
        d = self._xmm_index(ins.op0_register)
        b = self._xread(ins, 1, 16, aligned=True)
        xmm = self.s.xmm
        xmm[d] = fn(xmm[d], b) & sse.M128

    @handles(M.MOVAPS, M.MOVAPD, M.MOVDQA, M.MOVUPS, M.MOVUPD, M.MOVDQU, M.MOVNTDQ, M.MOVNTPS, M.MOVNTPD, M.LDDQU,
             M.MOVNTDQA)  # fmt: skip
    def _movdqa(self, ins: Instruction) -> None:
        self._sse_check()
        aligned = ins.mnemonic in (M.MOVAPS, M.MOVAPD, M.MOVDQA, M.MOVNTDQ, M.MOVNTPS, M.MOVNTPD, M.MOVNTDQA)
        v = self._xread(ins, 1, 16, aligned)
        if ins.op0_kind == REGISTER:
            self.s.xmm[self._xmm_index(ins.op0_register)] = v
        else:
            self._xwrite_mem(ins, v, 16, aligned)

    @handles(M.MOVD, M.MOVQ)
    def _movd(self, ins: Instruction) -> None:
        """MOVD/MOVQ between XMM and GPR/memory, and MOVQ xmm, xmm/m64 (zeroing the upper qword)."""
        self._sse_check()
        s = self.s
        k0, k1 = ins.op0_kind, ins.op1_kind
        r0 = ins.op0_register if k0 == REGISTER else 0
        if k0 == REGISTER and XMM0 <= r0 <= XMM15:
            if k1 == REGISTER and not RBITS[ins.op1_register]:
                v = s.xmm[self._xmm_index(ins.op1_register)] & MASK64
            elif k1 == REGISTER:
                v = self._rreg(ins.op1_register)
            else:
                v = self._mread(ins, MEMSIZE[ins.memory_size])
            s.xmm[r0 - XMM0] = v
            return
        src = self._xmm_index(ins.op1_register)
        size = 4 if ins.mnemonic == M.MOVD else 8
        v = s.xmm[src] & MASKS[size * 8]
        if k0 == REGISTER and RBITS[r0]:
            self._wreg(r0, v)
        elif k0 == REGISTER:
            s.xmm[self._xmm_index(r0)] = v
        else:
            self._mwrite(ins, size, v)

    @handles(M.MOVNTI)
    def _movnti(self, ins: Instruction) -> None:
        self._mov(ins)

    @handles_code(C.MOVSS_XMM_XMMM32, C.MOVSS_XMMM32_XMM, C.MOVSD_XMM_XMMM64, C.MOVSD_XMMM64_XMM)
    def _movss(self, ins: Instruction) -> None:
        """MOVSS/MOVSD: register-register merges the low lane; a load zeroes the rest; a store writes the lane."""
        self._sse_check()
        size = 4 if ins.code in (C.MOVSS_XMM_XMMM32, C.MOVSS_XMMM32_XMM) else 8
        mask = MASKS[size * 8]
        xmm = self.s.xmm
        if ins.op0_kind == MEMORY:
            self._mwrite(ins, size, xmm[self._xmm_index(ins.op1_register)] & mask)
            return
        d = self._xmm_index(ins.op0_register)
        if ins.op1_kind == MEMORY:
            xmm[d] = self._mread(ins, size)
        else:
            xmm[d] = (xmm[d] & ~mask) | (xmm[self._xmm_index(ins.op1_register)] & mask)

    @handles(M.MOVLPS, M.MOVLPD, M.MOVHPS, M.MOVHPD, M.MOVHLPS, M.MOVLHPS)
    def _movlps(self, ins: Instruction) -> None:
        self._sse_check()
        mn = ins.mnemonic
        xmm = self.s.xmm
        high = mn in (M.MOVHPS, M.MOVHPD)
        if ins.op0_kind == MEMORY:
            v = xmm[self._xmm_index(ins.op1_register)]
            self._mwrite(ins, 8, (v >> 64) if high else v & MASK64)
            return
        d = self._xmm_index(ins.op0_register)
        if mn == M.MOVHLPS:
            xmm[d] = (xmm[d] & ~MASK64) | (xmm[self._xmm_index(ins.op1_register)] >> 64)
        elif mn == M.MOVLHPS:
            xmm[d] = (xmm[d] & MASK64) | ((xmm[self._xmm_index(ins.op1_register)] & MASK64) << 64)
        elif high:
            xmm[d] = (xmm[d] & MASK64) | (self._mread(ins, 8) << 64)
        else:
            xmm[d] = (xmm[d] & ~MASK64) | self._mread(ins, 8)

    @handles(M.PXOR, M.XORPS, M.XORPD)
    def _pxor(self, ins: Instruction) -> None:
        self._sse_binop(ins, lambda a, b: a ^ b)

    @handles(M.POR, M.ORPS, M.ORPD)
    def _por(self, ins: Instruction) -> None:
        self._sse_binop(ins, lambda a, b: a | b)

    @handles(M.PAND, M.ANDPS, M.ANDPD)
    def _pand(self, ins: Instruction) -> None:
        self._sse_binop(ins, lambda a, b: a & b)

    @handles(M.PANDN, M.ANDNPS, M.ANDNPD)
    def _pandn(self, ins: Instruction) -> None:
        self._sse_binop(ins, lambda a, b: ~a & b)

    _LANE_OPS: dict[int, Callable[[int, int], int]] = {
        M.PADDB: lambda a, b: sse.add(a, b, 8),
        M.PADDW: lambda a, b: sse.add(a, b, 16),
        M.PADDD: lambda a, b: sse.add(a, b, 32),
        M.PADDQ: lambda a, b: sse.add(a, b, 64),
        M.PSUBB: lambda a, b: sse.sub(a, b, 8),
        M.PSUBW: lambda a, b: sse.sub(a, b, 16),
        M.PSUBD: lambda a, b: sse.sub(a, b, 32),
        M.PSUBQ: lambda a, b: sse.sub(a, b, 64),
        M.PADDUSB: lambda a, b: sse.add_saturate(a, b, 8, False),
        M.PADDUSW: lambda a, b: sse.add_saturate(a, b, 16, False),
        M.PADDSB: lambda a, b: sse.add_saturate(a, b, 8, True),
        M.PADDSW: lambda a, b: sse.add_saturate(a, b, 16, True),
        M.PSUBUSB: lambda a, b: sse.sub_saturate(a, b, 8, False),
        M.PSUBUSW: lambda a, b: sse.sub_saturate(a, b, 16, False),
        M.PSUBSB: lambda a, b: sse.sub_saturate(a, b, 8, True),
        M.PSUBSW: lambda a, b: sse.sub_saturate(a, b, 16, True),
        M.PCMPEQB: lambda a, b: sse.cmpeq(a, b, 8),
        M.PCMPEQW: lambda a, b: sse.cmpeq(a, b, 16),
        M.PCMPEQD: lambda a, b: sse.cmpeq(a, b, 32),
        M.PCMPGTB: lambda a, b: sse.cmpgt(a, b, 8),
        M.PCMPGTW: lambda a, b: sse.cmpgt(a, b, 16),
        M.PCMPGTD: lambda a, b: sse.cmpgt(a, b, 32),
        M.PMINUB: lambda a, b: sse.minu(a, b, 8),
        M.PMAXUB: lambda a, b: sse.maxu(a, b, 8),
        M.PMINSW: lambda a, b: sse.mins(a, b, 16),
        M.PMAXSW: lambda a, b: sse.maxs(a, b, 16),
        M.PAVGB: lambda a, b: sse.avg(a, b, 8),
        M.PAVGW: lambda a, b: sse.avg(a, b, 16),
        M.PMULLW: lambda a, b: sse.mullo(a, b, 16),
        M.PMULHW: lambda a, b: sse.mulhi(a, b, 16, True),
        M.PMULHUW: lambda a, b: sse.mulhi(a, b, 16, False),
        M.PMULUDQ: sse.muludq,
        M.PSADBW: sse.sad,
        M.PUNPCKLBW: lambda a, b: sse.unpack_low(a, b, 8),
        M.PUNPCKLWD: lambda a, b: sse.unpack_low(a, b, 16),
        M.PUNPCKLDQ: lambda a, b: sse.unpack_low(a, b, 32),
        M.PUNPCKLQDQ: lambda a, b: sse.unpack_low(a, b, 64),
        M.PUNPCKHBW: lambda a, b: sse.unpack_high(a, b, 8),
        M.PUNPCKHWD: lambda a, b: sse.unpack_high(a, b, 16),
        M.PUNPCKHDQ: lambda a, b: sse.unpack_high(a, b, 32),
        M.PUNPCKHQDQ: lambda a, b: sse.unpack_high(a, b, 64),
        M.UNPCKLPS: lambda a, b: sse.unpack_low(a, b, 32),
        M.UNPCKHPS: lambda a, b: sse.unpack_high(a, b, 32),
        M.UNPCKLPD: lambda a, b: sse.unpack_low(a, b, 64),
        M.UNPCKHPD: lambda a, b: sse.unpack_high(a, b, 64),
        M.PACKSSWB: lambda a, b: sse.pack_signed_saturate(a, b, 16),
        M.PACKSSDW: lambda a, b: sse.pack_signed_saturate(a, b, 32),
        M.PACKUSWB: lambda a, b: sse.pack_unsigned_saturate(a, b, 16),
    }

    @handles(*_LANE_OPS)
    def _lane_op(self, ins: Instruction) -> None:
        self._sse_binop(ins, self._LANE_OPS[ins.mnemonic])

    @handles(M.PMOVMSKB, M.MOVMSKPS, M.MOVMSKPD)
    def _pmovmskb(self, ins: Instruction) -> None:
        self._sse_check()
        v = self.s.xmm[self._xmm_index(ins.op1_register)]
        mn = ins.mnemonic
        mask = sse.movmskb(v) if mn == M.PMOVMSKB else sse.movmsk(v, 32 if mn == M.MOVMSKPS else 64)
        self._wreg(ins.op0_register, mask)

    @handles(M.PSHUFD, M.PSHUFLW, M.PSHUFHW, M.SHUFPS)
    def _pshufd(self, ins: Instruction) -> None:
        self._sse_check()
        d = self._xmm_index(ins.op0_register)
        src = self._xread(ins, 1, 16, aligned=True)
        order = ins.immediate(2) & 0xFF
        mn = ins.mnemonic
        xmm = self.s.xmm
        if mn == M.PSHUFD:
            xmm[d] = sse.shuffle32(src, order)
        elif mn == M.PSHUFLW:
            xmm[d] = sse.shuffle16_low(src, order)
        elif mn == M.PSHUFHW:
            xmm[d] = sse.shuffle16_high(src, order)
        else:
            xmm[d] = sse.shufps(xmm[d], src, order)

    _SHIFTS = {
        M.PSLLW: (16, 0), M.PSLLD: (32, 0), M.PSLLQ: (64, 0),
        M.PSRLW: (16, 1), M.PSRLD: (32, 1), M.PSRLQ: (64, 1),
        M.PSRAW: (16, 2), M.PSRAD: (32, 2),
    }  # fmt: skip

    @handles(*_SHIFTS)
    def _psll(self, ins: Instruction) -> None:
        """Packed shifts by an immediate or by the low qword of xmm/m128."""
        self._sse_check()
        d = self._xmm_index(ins.op0_register)
        if ins.op1_kind in (K.IMMEDIATE8, K.IMMEDIATE8_2ND):
            count = ins.immediate(1) & 0xFF
        else:
            count = self._xread(ins, 1, 16, aligned=True) & MASK64
        width, kind = self._SHIFTS[ins.mnemonic]
        xmm = self.s.xmm
        if kind == 0:
            xmm[d] = sse.shift_left(xmm[d], count, width)
        elif kind == 1:
            xmm[d] = sse.shift_right(xmm[d], count, width)
        else:
            xmm[d] = sse.shift_right_arith(xmm[d], count, width)

    @handles(M.PSLLDQ, M.PSRLDQ)
    def _pslldq(self, ins: Instruction) -> None:
        self._sse_check()
        d = self._xmm_index(ins.op0_register)
        count = ins.immediate(1) & 0xFF
        xmm = self.s.xmm
        if ins.mnemonic == M.PSLLDQ:
            xmm[d] = sse.byte_shift_left(xmm[d], count)
        else:
            xmm[d] = sse.byte_shift_right(xmm[d], count)

    # ------------------------------------------------------------------ SSE/SSE2 floating point

    _FLOAT_OPS: dict[int, tuple[str, int, bool]] = {}  # mnemonic → (operation, lane width, packed)
    for _op in ("add", "sub", "mul", "div", "min", "max", "sqrt"):
        for _suffix, _width, _packed in (("SD", 64, False), ("SS", 32, False), ("PD", 64, True), ("PS", 32, True)):
            _FLOAT_OPS[getattr(M, _op.upper() + _suffix)] = (_op, _width, _packed)
    del _op, _suffix, _width, _packed

    def _float_source(self, ins: Instruction, width: int, packed: bool) -> int:
        """Operand 1 of a floating-point instruction: a whole (aligned) m128 for packed forms, one lane else."""
        if packed:
            return self._xread(ins, 1, 16, aligned=True)
        return self._xread(ins, 1, width >> 3) & MASKS[width]

    @handles(*_FLOAT_OPS)
    def _float_arith(self, ins: Instruction) -> None:
        """ADD/SUB/MUL/DIV/MIN/MAX/SQRT in their SD/SS/PD/PS forms (scalar forms keep the upper lanes)."""
        self._sse_check()
        op, width, packed = self._FLOAT_OPS[ins.mnemonic]
        d = self._xmm_index(ins.op0_register)
        b = self._float_source(ins, width, packed)
        xmm = self.s.xmm
        count = 128 // width if packed else 1
        res = sse.lanes_float(op, xmm[d], b, width, count)
        keep = 0 if packed else sse.M128 & ~MASKS[width]
        xmm[d] = (xmm[d] & keep) | res

    @handles(M.UCOMISD, M.COMISD, M.UCOMISS, M.COMISS)
    def _comis(self, ins: Instruction) -> None:
        """(U)COMISS/SD: ZF, PF, CF from the comparison (all three for unordered); OF, SF, AF cleared."""
        self._sse_check()
        width = 64 if ins.mnemonic in (M.UCOMISD, M.COMISD) else 32
        a = self.s.xmm[self._xmm_index(ins.op0_register)] & MASKS[width]
        b = self._float_source(ins, width, False)
        unordered, less, equal = sse.compare_float(a, b, width)
        fl = (ZF | PF | CF) if unordered else (CF if less else 0) | (ZF if equal else 0)
        self._set_flags(fl)

    @handles_code(C.CMPSD_XMM_XMMM64_IMM8, C.CMPSS_XMM_XMMM32_IMM8, C.CMPPD_XMM_XMMM128_IMM8,
                  C.CMPPS_XMM_XMMM128_IMM8)  # fmt: skip
    def _cmpps(self, ins: Instruction) -> None:
        self._sse_check()
        code = ins.code
        width = 64 if code in (C.CMPSD_XMM_XMMM64_IMM8, C.CMPPD_XMM_XMMM128_IMM8) else 32
        packed = code in (C.CMPPD_XMM_XMMM128_IMM8, C.CMPPS_XMM_XMMM128_IMM8)
        d = self._xmm_index(ins.op0_register)
        b = self._float_source(ins, width, packed)
        predicate = ins.immediate(2)
        xmm = self.s.xmm
        a = xmm[d]
        lane = MASKS[width]
        out = 0
        for i in range(128 // width if packed else 1):
            sh = i * width
            if sse.cmp_predicate((a >> sh) & lane, (b >> sh) & lane, width, predicate):
                out |= lane << sh
        xmm[d] = out if packed else (a & ~lane) | out

    @handles(M.CVTSI2SD, M.CVTSI2SS)
    def _cvtsi2sd(self, ins: Instruction) -> None:
        self._sse_check()
        width = 64 if ins.mnemonic == M.CVTSI2SD else 32
        ibits = 64 if ins.code in (C.CVTSI2SD_XMM_RM64, C.CVTSI2SS_XMM_RM64) else 32
        v = self._read(ins, 1, ibits)
        if v & SIGN[ibits]:
            v -= 1 << ibits
        d = self._xmm_index(ins.op0_register)
        xmm = self.s.xmm
        xmm[d] = (xmm[d] & ~MASKS[width]) | sse.int_to_float(v, width)

    @handles(M.CVTTSD2SI, M.CVTSD2SI, M.CVTTSS2SI, M.CVTSS2SI)
    def _cvtsd2si(self, ins: Instruction) -> None:
        self._sse_check()
        mn = ins.mnemonic
        width = 64 if mn in (M.CVTTSD2SI, M.CVTSD2SI) else 32
        r = ins.op0_register
        src = self._float_source(ins, width, False)
        self._wreg(r, sse.float_to_int(src, width, RBITS[r], mn in (M.CVTTSD2SI, M.CVTTSS2SI)))

    @handles(M.CVTSD2SS, M.CVTSS2SD)
    def _cvtsd2ss(self, ins: Instruction) -> None:
        self._sse_check()
        to_single = ins.mnemonic == M.CVTSD2SS
        src = self._float_source(ins, 64 if to_single else 32, False)
        d = self._xmm_index(ins.op0_register)
        xmm = self.s.xmm
        if to_single:
            xmm[d] = (xmm[d] & ~MASKS[32]) | sse.bits32(sse.f64(src))
        else:
            value = sse.f32(src)
            bits = sse.bits64(value) | ((1 << 51) if value != value else 0)  # a signalling NaN is quietened
            xmm[d] = (xmm[d] & ~MASKS[64]) | bits


Interpreter._collect()
