"""The local APIC of each vCPU and the system of them that routes interrupt messages (Intel SDM vol. 3A
chapter 11 "Advanced Programmable Interrupt Controller (APIC)" — chapter 10 in editions before 2023).

`LocalApic` is what a processor sees as its interrupt controller (`popek.cpu.core.InterruptSource`): the xAPIC
register page (its MMIO offsets, for the CPU's memory path to route 0xFEE00xxx to its own APIC), the x2APIC
MSRs 0x800-0x8FF (§11.12; used once the CPU sets `x2apic` from IA32_APIC_BASE.EXTD) and IA32_TSC_DEADLINE.

Implemented: ID, version (0x14, 6 LVT entries: no CMCI), TPR/PPR/APR (§11.8.3), EOI with the broadcast of
level-triggered vectors to the I/O APIC (§11.8.5), LDR/DFR in flat and cluster models (§11.6.2.2), SVR software
enable (a software-disabled APIC masks its LVT and refuses fixed interrupts, §11.4.7.2), 256-bit IRR/ISR/TMR
(§11.8.4), ESR with its write-to-update rule (§11.5.3), ICR IPIs (fixed, lowest priority, NMI, INIT, INIT
de-assert, STARTUP; no, self, all and all-but-self shorthands), the LVT (timer, thermal, performance, LINT0,
LINT1, error), and the timer (§11.5.4) in one-shot, periodic and TSC-deadline modes with its divide
configuration, on the `VirtualClock`.

The boot-time virtual-wire mode (MP specification §3.6.2.2): while the APIC is globally disabled, or LINT0 is
unmasked in ExtINT mode, the 8259A's INTR is passed through and the acknowledge is the PIC's INTA. At reset the
bootstrap processor's LINT0 is left in that state, as the BIOS of a PC (and KVM's in-kernel APIC) leaves it, so
that a kernel that starts with the PIC hears it.

Delivery is synchronous (an IPI is in the target's IRR when ICR's write returns, and delivery status never reads
busy). Lowest-priority messages go to the first software-enabled target in APIC order, which the SDM permits
(the choice among equal priorities is model-specific) and which keeps runs deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from popek.devices import state as st
from popek.devices.apic_bus import BROADCAST, X2APIC_BROADCAST, ApicMessage, DeliveryMode, ExtIntSource, Shorthand
from popek.devices.clock import NS_PER_SECOND, Timer, VirtualClock
from popek.snapshot import SnapshotError

LAPIC_BASE = 0xFEE00000
LAPIC_SIZE = 0x1000
VERSION = 0x14
MAX_LVT = 5  # timer, thermal, performance, LINT0, LINT1, error

MSR_APIC_BASE = 0x1B  # IA32_APIC_BASE (SDM §11.4.4): base address, BSP (bit 8), EXTD (bit 10), EN (bit 11)
APIC_BASE_BSP = 1 << 8
APIC_BASE_EXTD = 1 << 10
APIC_BASE_EN = 1 << 11
APIC_BASE_RESERVED_LOW = 0x2FF  # bits 7:0 and 9
MSR_TSC_DEADLINE = 0x6E0
MSR_X2APIC_FIRST, MSR_X2APIC_LAST = 0x800, 0x8FF

REG_ID = 0x20
REG_VERSION = 0x30
REG_TPR = 0x80
REG_APR = 0x90
REG_PPR = 0xA0
REG_EOI = 0xB0
REG_RRD = 0xC0
REG_LDR = 0xD0
REG_DFR = 0xE0
REG_SVR = 0xF0
REG_ISR = 0x100
REG_TMR = 0x180
REG_IRR = 0x200
REG_ESR = 0x280
REG_LVT_CMCI = 0x2F0
REG_ICR_LOW = 0x300
REG_ICR_HIGH = 0x310
REG_LVT_TIMER = 0x320
REG_LVT_THERMAL = 0x330
REG_LVT_PERF = 0x340
REG_LVT_LINT0 = 0x350
REG_LVT_LINT1 = 0x360
REG_LVT_ERROR = 0x370
REG_TIMER_INITIAL = 0x380
REG_TIMER_CURRENT = 0x390
REG_TIMER_DIVIDE = 0x3E0
REG_SELF_IPI = 0x3F0  # x2APIC only

LVT_REGS = (REG_LVT_TIMER, REG_LVT_THERMAL, REG_LVT_PERF, REG_LVT_LINT0, REG_LVT_LINT1, REG_LVT_ERROR)
LVT_WRITABLE = {
    REG_LVT_TIMER: 0x000700FF,
    REG_LVT_THERMAL: 0x000107FF,
    REG_LVT_PERF: 0x000107FF,
    REG_LVT_LINT0: 0x0001A7FF,
    REG_LVT_LINT1: 0x0001A7FF,
    REG_LVT_ERROR: 0x000100FF,
}
LVT_MASKED = 1 << 16
LVT_LEVEL = 1 << 15
LVT_REMOTE_IRR = 1 << 14
LVT_TIMER_MODE_SHIFT = 17
TIMER_ONE_SHOT, TIMER_PERIODIC, TIMER_TSC_DEADLINE = 0, 1, 2

SVR_ENABLE = 1 << 8
ICR_DEST_LOGICAL = 1 << 11
ICR_LEVEL_ASSERT = 1 << 14
ICR_TRIGGER_LEVEL = 1 << 15
ICR_WRITABLE = 0x000CCFFF

ESR_SEND_ILLEGAL_VECTOR = 1 << 5
ESR_RECEIVE_ILLEGAL_VECTOR = 1 << 6
ESR_ILLEGAL_REGISTER = 1 << 7

# the registers x2APIC mode lets RDMSR read (SDM §11.12.1.2, table 11-6); the rest are #GP
X2APIC_READABLE = frozenset(
    {REG_ID, REG_VERSION, REG_TPR, REG_PPR, REG_LDR, REG_SVR, REG_ESR, REG_ICR_LOW, *LVT_REGS}
    | {REG_TIMER_INITIAL, REG_TIMER_CURRENT, REG_TIMER_DIVIDE}
    | {base + 0x10 * i for base in (REG_ISR, REG_TMR, REG_IRR) for i in range(8)}
)

DIVIDERS = {0b0000: 2, 0b0001: 4, 0b0010: 8, 0b0011: 16, 0b1000: 32, 0b1001: 64, 0b1010: 128, 0b1011: 1}


class ApicAccessError(Exception):
    """An x2APIC MSR access the SDM answers with #GP (a read-only or reserved register, a non-zero EOI): the
    CPU turns it into the exception."""


def _highest(bits: int) -> int:
    """The highest set bit's number, -1 for none: the vector that IRR/ISR resolution picks."""
    return bits.bit_length() - 1


class LocalApic:
    """One vCPU's local APIC. `index` is the vCPU's position; `apic_id` its (initial) APIC ID.

    Callbacks, all optional, set by `ApicSystem` or the backend:
    - `send(msg)`: where IPIs written to ICR go (the `ApicSystem`);
    - `on_eoi(vector)`: the EOI broadcast of a level-triggered vector (the I/O APIC);
    - `on_nmi()`, `on_init()`, `on_sipi(vector)`: what the processor must do for those deliveries;
    - `on_pending()`: an interrupt may have become deliverable (wake a halted vCPU and re-check).
    `extint` is the 8259A's processor-side interface, for LINT0 in ExtINT mode and ExtINT messages.
    `now()` is the time the APIC reads (the clock's by default; the software backend points it at the running
    vCPU's own progress within its quantum, so that a timer read or armed mid-quantum sees the instruction's time).
    `x2apic_supported` says whether CPUID offers x2APIC mode: without it IA32_APIC_BASE.EXTD is reserved.
    """

    def __init__(
        self,
        index: int,
        clock: VirtualClock,
        apic_id: int | None = None,
        *,
        bsp: bool = False,
        timer_hz: int = NS_PER_SECOND,
        tsc_hz: int = NS_PER_SECOND,
        extint: ExtIntSource | None = None,
        x2apic_supported: bool = True,
    ) -> None:
        self.index = index
        self.clock = clock
        self.apic_id = index if apic_id is None else apic_id
        self.initial_apic_id = self.apic_id  # what CPUID reports; x2APIC mode and a re-enable return to it
        self.bsp = bsp
        self.timer_hz = timer_hz  # the APIC timer's input clock before the divider (KVM: 1 GHz)
        self.tsc_hz = tsc_hz
        self.tsc_offset = 0  # TSC = now * tsc_hz / 1e9 + tsc_offset: the CPU adjusts it when the guest writes the TSC
        self.extint = extint
        self.send: Callable[[ApicMessage], bool] | None = None
        self.on_eoi: Callable[[int], None] | None = None
        self.on_nmi: Callable[[], None] | None = None
        self.on_init: Callable[[], None] | None = None
        self.on_sipi: Callable[[int], None] | None = None
        self.on_pending: Callable[[], None] | None = None
        self.now: Callable[[], int] = clock.now_ns
        self.x2apic_supported = x2apic_supported
        self.base = LAPIC_BASE  # IA32_APIC_BASE's address field: where the xAPIC page answers
        self._enabled = True  # IA32_APIC_BASE.EN
        self.x2apic = False  # IA32_APIC_BASE.EXTD: the CPU sets it; the MMIO page then no longer answers
        self._timer: Timer | None = None
        self._extint_requested = False
        self.reset()

    # --- state ---

    def reset(self) -> None:
        """Power-up / INIT state (SDM §11.4.7.1): everything but the APIC ID and the global enable."""
        self.clock.cancel(self._timer)
        self._timer = None
        self.tpr = 0
        self.ldr = 0
        self.dfr = 0xFFFFFFFF
        self.svr = 0xFF
        self.esr = 0
        self._esr_pending = 0
        self.icr = 0
        self.irr = 0
        self.isr = 0
        self.tmr = 0
        self.lvt = dict.fromkeys(LVT_REGS, LVT_MASKED)
        if self.bsp:
            self.lvt[REG_LVT_LINT0] = int(DeliveryMode.EXTINT) << 8  # virtual wire, as the BIOS leaves it
        self.lint_levels = [False, False]
        self.initial_count = 0
        self.divide_config = 0
        self._tstart = 0  # the timer counts down from `_tcount` starting at `_tstart` ns
        self._tcount = 0
        self.tsc_deadline = 0
        self._extint_requested = False

    @property
    def enabled(self) -> bool:
        """IA32_APIC_BASE bit 11, the global enable. Clearing it turns the APIC off (its state back to reset,
        SDM §11.4.3), the processor then taking the PIC's INTR directly."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if self._enabled and not value:
            self.reset()
            self.x2apic = False
        self._enabled = value
        self._notify()

    @property
    def apic_base(self) -> int:
        """IA32_APIC_BASE as RDMSR reads it."""
        return (
            self.base
            | (APIC_BASE_BSP if self.bsp else 0)
            | (APIC_BASE_EXTD if self.x2apic else 0)
            | (APIC_BASE_EN if self._enabled else 0)
        )

    def write_apic_base(self, value: int) -> None:
        """WRMSR IA32_APIC_BASE. The reserved low bits, EXTD without x2APIC support, and the mode transitions the
        SDM forbids (§11.12.5, figure 11-27: EXTD without EN; disabled straight to x2APIC; x2APIC back to xAPIC
        without passing through disabled) raise `ApicAccessError` (#GP). BSP is read-only. The CPU checks the
        address against its physical-address width. Leaving the disabled state returns the xAPIC ID to the
        initial APIC ID, as KVM does; entering x2APIC mode makes the x2APIC ID the initial APIC ID (§11.12.5.1)."""
        if value & APIC_BASE_RESERVED_LOW:
            raise ApicAccessError(f"reserved bits set in IA32_APIC_BASE {value:#x}")
        en, extd = bool(value & APIC_BASE_EN), bool(value & APIC_BASE_EXTD)
        if extd and not self.x2apic_supported:
            raise ApicAccessError("IA32_APIC_BASE.EXTD set without x2APIC support")
        if extd and not en:
            raise ApicAccessError("IA32_APIC_BASE: EXTD without EN is an invalid state")
        if extd and not self._enabled:
            raise ApicAccessError("IA32_APIC_BASE: a disabled APIC cannot go straight to x2APIC mode")
        if en and not extd and self.x2apic:
            raise ApicAccessError("IA32_APIC_BASE: x2APIC mode can only be left by disabling the APIC")
        self.base = value & ~0xFFF & 0xFFFFFFFFFF000
        if not en:
            self.enabled = False
            return
        if not self._enabled:
            self.apic_id = self.initial_apic_id
            self.enabled = True
        if extd and not self.x2apic:
            self.x2apic = True
            self.apic_id = self.initial_apic_id
            self._notify()

    @property
    def software_enabled(self) -> bool:
        return bool(self.svr & SVR_ENABLE)

    def _notify(self) -> None:
        if self.on_pending is not None:
            self.on_pending()

    # --- priorities (SDM §11.8.3.1) ---

    @property
    def ppr(self) -> int:
        isrv = max(_highest(self.isr), 0)
        if self.tpr >> 4 >= isrv >> 4:
            return self.tpr
        return isrv & 0xF0

    @property
    def apr(self) -> int:
        isrv = max(_highest(self.isr), 0)
        irrv = max(_highest(self.irr), 0)
        if self.tpr >> 4 >= irrv >> 4 and self.tpr >> 4 > isrv >> 4:
            return self.tpr
        return max(self.tpr & 0xF0, isrv & 0xF0, irrv & 0xF0)

    def _extint_active(self) -> bool:
        if self.extint is None:
            return False
        lint0 = self.lvt[REG_LVT_LINT0]
        wired = not self._enabled or (not lint0 & LVT_MASKED and (lint0 >> 8) & 7 == DeliveryMode.EXTINT)
        return (wired or self._extint_requested) and self.extint.interrupt_pending()

    # --- the processor's side ---

    def interrupt_pending(self) -> bool:
        if self._extint_active():
            return True
        if not self._enabled:
            return False
        vector = _highest(self.irr)
        return vector >= 0 and vector >> 4 > self.ppr >> 4

    def acknowledge(self) -> int:
        """The INTA cycle: the PIC's vector for an ExtINT (which bypasses IRR/ISR), else the highest IRR
        vector above the processor priority moves to ISR. With nothing left to give (the priority was raised
        in between) the APIC answers with the spurious vector and sets no ISR bit (§11.9)."""
        if self._extint_active():
            assert self.extint is not None
            self._extint_requested = False
            return self.extint.acknowledge()
        vector = _highest(self.irr)
        if not self._enabled or vector < 0 or vector >> 4 <= self.ppr >> 4:
            return self.svr & 0xFF
        self.irr &= ~(1 << vector)
        self.isr |= 1 << vector
        return vector

    # --- receiving ---

    def accept(self, msg: ApicMessage) -> bool:
        """A message addressed to this APIC; returns whether it was accepted."""
        mode = msg.delivery_mode
        if not self._enabled:
            return False
        if mode in (DeliveryMode.FIXED, DeliveryMode.LOWEST):
            if not self.software_enabled:
                return False
            return self._set_irr(msg.vector, msg.level_triggered)
        if mode == DeliveryMode.NMI:
            if self.on_nmi is not None:
                self.on_nmi()
            return True
        if mode == DeliveryMode.INIT:
            if not msg.asserted and msg.level_triggered:
                return True  # INIT level de-assert: only re-synchronises arbitration IDs
            self.reset()
            if self.on_init is not None:
                self.on_init()
            return True
        if mode == DeliveryMode.STARTUP:
            if self.on_sipi is not None:
                self.on_sipi(msg.vector)
            return True
        if mode == DeliveryMode.EXTINT:
            self._extint_requested = True
            self._notify()
            return True
        return False  # SMI: there is no SMM

    def _set_irr(self, vector: int, level: bool) -> bool:
        if vector < 16:
            self._error(ESR_RECEIVE_ILLEGAL_VECTOR)
            return False
        bit = 1 << vector
        self.irr |= bit
        self.tmr = self.tmr | bit if level else self.tmr & ~bit
        self._notify()
        return True

    def _error(self, bits: int) -> None:
        self._esr_pending |= bits
        lvt = self.lvt[REG_LVT_ERROR]
        if not lvt & LVT_MASKED and lvt & 0xFF >= 16:
            self._set_irr(lvt & 0xFF, False)

    def _local(self, reg: int) -> None:
        """A local interrupt source fired (timer, error, thermal, performance): deliver through its LVT entry."""
        lvt = self.lvt[reg]
        if lvt & LVT_MASKED:
            return
        mode = (lvt >> 8) & 7 if reg != REG_LVT_TIMER else DeliveryMode.FIXED
        if mode == DeliveryMode.NMI:
            if self.on_nmi is not None:
                self.on_nmi()
        elif mode == DeliveryMode.FIXED:
            self._set_irr(lvt & 0xFF, False)

    def set_lint(self, pin: int, level: bool) -> None:
        """Drive LINT0 or LINT1. ExtINT needs nothing here (the PIC is asked at INTA); NMI and fixed entries
        are edge-triggered on the rising edge, or level-triggered fixed entries with Remote IRR."""
        reg = (REG_LVT_LINT0, REG_LVT_LINT1)[pin]
        was = self.lint_levels[pin]
        self.lint_levels[pin] = level
        lvt = self.lvt[reg]
        mode = (lvt >> 8) & 7
        if not self._enabled:
            if pin == 1 and level and not was and self.on_nmi is not None:
                self.on_nmi()  # a disabled APIC's LINT1 is the processor's NMI pin
            self._notify()
            return
        if mode == DeliveryMode.EXTINT:
            self._notify()
        elif lvt & LVT_MASKED:
            return
        elif mode == DeliveryMode.NMI and level and not was:
            if self.on_nmi is not None:
                self.on_nmi()
        elif mode == DeliveryMode.FIXED:
            if lvt & LVT_LEVEL:
                if level and not lvt & LVT_REMOTE_IRR:
                    self.lvt[reg] |= LVT_REMOTE_IRR
                    self._set_irr(lvt & 0xFF, True)
            elif level and not was:
                self._set_irr(lvt & 0xFF, False)

    def eoi(self) -> None:
        vector = _highest(self.isr)
        if vector < 0:
            return
        self.isr &= ~(1 << vector)
        if self.tmr >> vector & 1:
            # TMR keeps the trigger mode of the vector's last acceptance: only the next acceptance changes it
            # (§11.8.4), which is what the suite's "TMR for ioapic edge interrupts (expected true)" reads back
            for pin, reg in enumerate((REG_LVT_LINT0, REG_LVT_LINT1)):
                lvt = self.lvt[reg]
                if lvt & LVT_REMOTE_IRR and lvt & 0xFF == vector:
                    self.lvt[reg] &= ~LVT_REMOTE_IRR
                    self.set_lint(pin, self.lint_levels[pin])
            if self.on_eoi is not None:
                self.on_eoi(vector)
        self._notify()

    # --- timer (SDM §11.5.4) ---

    @property
    def timer_mode(self) -> int:
        return (self.lvt[REG_LVT_TIMER] >> LVT_TIMER_MODE_SHIFT) & 3

    @property
    def divider(self) -> int:
        return DIVIDERS[self.divide_config & 0b1011]

    def _ticks(self, ns: int) -> int:
        return ns * self.timer_hz // (NS_PER_SECOND * self.divider)

    def _ns(self, ticks: int) -> int:
        return -((-ticks * NS_PER_SECOND * self.divider) // self.timer_hz)

    def current_count(self) -> int:
        if self.timer_mode == TIMER_TSC_DEADLINE or not self._tcount:
            return 0
        elapsed = self._ticks(self.now() - self._tstart)
        if elapsed < self._tcount:
            return self._tcount - elapsed
        if self.timer_mode == TIMER_PERIODIC and self.initial_count:
            return self.initial_count - (elapsed - self._tcount) % self.initial_count
        return 0

    def _start_timer(self, count: int) -> None:
        self.clock.cancel(self._timer)
        self._timer = None
        self._tstart = self.now()
        self._tcount = count
        if count:
            self._timer = self.clock.add_timer(self._tstart + self._ns(count), self._timer_expired)

    def _timer_expired(self) -> None:
        self._timer = None
        if self.timer_mode == TIMER_TSC_DEADLINE:
            self.tsc_deadline = 0
            self._local(REG_LVT_TIMER)
            return
        self._local(REG_LVT_TIMER)
        if self.timer_mode == TIMER_PERIODIC and self.initial_count:
            # the next period counts from this expiry's ideal time, so periods do not drift
            elapsed = self._ticks(self.now() - self._tstart)
            periods = max(elapsed - self._tcount, 0) // self.initial_count + 1
            deadline = self._tstart + self._ns(self._tcount + periods * self.initial_count)
            self._timer = self.clock.add_timer(deadline, self._timer_expired)
        else:
            self._tcount = 0

    def _write_divide(self, value: int) -> None:
        remaining = self.current_count()
        self.divide_config = value & 0b1011
        if remaining:  # the count in progress goes on from where it is, at the new rate
            self._start_timer(remaining)

    def tsc(self) -> int:
        return self.now() * self.tsc_hz // NS_PER_SECOND + self.tsc_offset

    def _write_tsc_deadline(self, value: int) -> None:
        if self.timer_mode != TIMER_TSC_DEADLINE:
            return  # ignored outside TSC-deadline mode (§11.5.4.1)
        self.clock.cancel(self._timer)
        self._timer = None
        self.tsc_deadline = value
        if not value:
            return
        if value <= self.tsc():
            self._timer_expired()
            return
        delta = value - self.tsc_offset
        deadline_ns = -((-delta * NS_PER_SECOND) // self.tsc_hz)
        self._timer = self.clock.add_timer(deadline_ns, self._timer_expired)

    # --- registers ---

    def read_register(self, reg: int) -> int:
        """The 32-bit register at xAPIC offset `reg` (16-byte aligned)."""
        if reg == REG_ID:
            return self.apic_id if self.x2apic else (self.apic_id & 0xFF) << 24
        if reg == REG_VERSION:
            return MAX_LVT << 16 | VERSION
        if reg == REG_TPR:
            return self.tpr
        if reg == REG_APR:
            return self.apr
        if reg == REG_PPR:
            return self.ppr
        if reg == REG_LDR:
            return self._x2apic_ldr() if self.x2apic else self.ldr
        if reg == REG_DFR:
            return self.dfr
        if reg == REG_SVR:
            return self.svr
        if REG_ISR <= reg < REG_ISR + 0x80:
            return (self.isr >> ((reg - REG_ISR) // 16 * 32)) & 0xFFFFFFFF
        if REG_TMR <= reg < REG_TMR + 0x80:
            return (self.tmr >> ((reg - REG_TMR) // 16 * 32)) & 0xFFFFFFFF
        if REG_IRR <= reg < REG_IRR + 0x80:
            return (self.irr >> ((reg - REG_IRR) // 16 * 32)) & 0xFFFFFFFF
        if reg == REG_ESR:
            return self.esr
        if reg == REG_ICR_LOW:
            return self.icr & 0xFFFFFFFF
        if reg == REG_ICR_HIGH:
            return self.icr >> 32
        if reg in self.lvt:
            return self.lvt[reg]
        if reg == REG_TIMER_INITIAL:
            return self.initial_count
        if reg == REG_TIMER_CURRENT:
            return self.current_count()
        if reg == REG_TIMER_DIVIDE:
            return self.divide_config
        return 0

    def write_register(self, reg: int, value: int) -> None:
        value &= 0xFFFFFFFF
        if reg == REG_ID:
            if not self.x2apic:
                self.apic_id = value >> 24
        elif reg == REG_TPR:
            self.tpr = value & 0xFF
            self._notify()
        elif reg == REG_EOI:
            self.eoi()
        elif reg == REG_LDR:
            self.ldr = value & 0xFF000000
        elif reg == REG_DFR:
            self.dfr = value | 0x0FFFFFFF
        elif reg == REG_SVR:
            self.svr = value & 0x3FF  # no EOI-broadcast suppression (version bit 24 clear)
            if not self.software_enabled:
                for r in LVT_REGS:
                    self.lvt[r] |= LVT_MASKED
            self._notify()
        elif reg == REG_ESR:
            self.esr, self._esr_pending = self._esr_pending, 0
        elif reg == REG_ICR_LOW:
            self.icr = (self.icr & ~0xFFFFFFFF) | (value & ICR_WRITABLE)
            self._send_ipi()
        elif reg == REG_ICR_HIGH:
            self.icr = (self.icr & 0xFFFFFFFF) | (value & 0xFF000000) << 32
        elif reg in self.lvt:
            self._write_lvt(reg, value)
        elif reg == REG_TIMER_INITIAL:
            if self.timer_mode != TIMER_TSC_DEADLINE:
                self.initial_count = value
                self._start_timer(value)
        elif reg == REG_TIMER_DIVIDE:
            self._write_divide(value)
        elif reg not in (REG_VERSION, REG_APR, REG_PPR, REG_RRD, REG_TIMER_CURRENT, REG_LVT_CMCI) and not (
            REG_ISR <= reg < REG_IRR + 0x80
        ):
            self._error(ESR_ILLEGAL_REGISTER)

    def _write_lvt(self, reg: int, value: int) -> None:
        old = self.lvt[reg]
        new = (old & ~LVT_WRITABLE[reg]) | (value & LVT_WRITABLE[reg])
        if not self.software_enabled:
            new |= LVT_MASKED
        self.lvt[reg] = new
        modes = ((old >> LVT_TIMER_MODE_SHIFT) & 3, (new >> LVT_TIMER_MODE_SHIFT) & 3)
        if reg == REG_LVT_TIMER and modes[0] != modes[1] and TIMER_TSC_DEADLINE in modes:
            # changing to or from TSC-deadline mode disarms the timer (§11.5.4.1)
            self.clock.cancel(self._timer)
            self._timer = None
            self._tcount = 0
            self.initial_count = 0
            self.tsc_deadline = 0
        if reg in (REG_LVT_LINT0, REG_LVT_LINT1):
            self._notify()

    def _send_ipi(self) -> None:
        low = self.icr & 0xFFFFFFFF
        mode = DeliveryMode((low >> 8) & 7) if (low >> 8) & 7 != 3 else None
        if mode is None:
            return  # reserved delivery mode
        vector = low & 0xFF
        if mode in (DeliveryMode.FIXED, DeliveryMode.LOWEST) and vector < 16:
            self._error(ESR_SEND_ILLEGAL_VECTOR)
            return
        dest = self.icr >> 32 if self.x2apic else self.icr >> 56
        msg = ApicMessage(
            vector=vector,
            delivery_mode=mode,
            dest=dest,
            logical=bool(low & ICR_DEST_LOGICAL),
            level_triggered=bool(low & ICR_TRIGGER_LEVEL),
            asserted=bool(low & ICR_LEVEL_ASSERT) or mode != DeliveryMode.INIT,
            shorthand=Shorthand((low >> 18) & 3),
            source=self.index,
        )
        if self.send is not None:
            self.send(msg)

    # --- MMIO (xAPIC) ---

    def read(self, offset: int, size: int) -> bytes:
        value = 0 if self.x2apic else self.read_register(offset & 0xFF0)
        shift = (offset & 3) * 8
        return ((value >> shift) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        if self.x2apic or not data or offset & 0xF:
            return  # the SDM requires aligned 32-bit accesses; others are undefined and dropped
        self.write_register(offset & 0xFF0, int.from_bytes(data[:4], "little"))

    # --- MSRs (x2APIC, TSC deadline) ---

    def _x2apic_ldr(self) -> int:
        return (self.apic_id >> 4) << 16 | 1 << (self.apic_id & 0xF)

    def handles_msr(self, msr: int) -> bool:
        return msr in (MSR_APIC_BASE, MSR_TSC_DEADLINE) or MSR_X2APIC_FIRST <= msr <= MSR_X2APIC_LAST

    def msr_read(self, msr: int) -> int:
        if msr == MSR_APIC_BASE:
            return self.apic_base
        if msr == MSR_TSC_DEADLINE:
            return self.tsc_deadline
        reg = (msr - MSR_X2APIC_FIRST) << 4
        if not self.x2apic or not MSR_X2APIC_FIRST <= msr <= MSR_X2APIC_LAST:
            raise ApicAccessError(f"MSR {msr:#x} is not readable (x2APIC mode is {'on' if self.x2apic else 'off'})")
        if reg not in X2APIC_READABLE:
            raise ApicAccessError(f"x2APIC register {reg:#x} is not readable")
        if reg == REG_ICR_LOW:
            return self.icr
        return self.read_register(reg)

    def msr_write(self, msr: int, value: int) -> None:
        if msr == MSR_APIC_BASE:
            self.write_apic_base(value)
            return
        if msr == MSR_TSC_DEADLINE:
            self._write_tsc_deadline(value & 0xFFFFFFFFFFFFFFFF)
            return
        reg = (msr - MSR_X2APIC_FIRST) << 4
        if not self.x2apic or not MSR_X2APIC_FIRST <= msr <= MSR_X2APIC_LAST:
            raise ApicAccessError(f"MSR {msr:#x} is not writable (x2APIC mode is {'on' if self.x2apic else 'off'})")
        if reg == REG_ICR_LOW:
            self.icr = (value & ICR_WRITABLE) | (value >> 32 & 0xFFFFFFFF) << 32
            self._send_ipi()
        elif reg == REG_SELF_IPI:
            if value >> 8:
                raise ApicAccessError("reserved bits set in a write to the x2APIC SELF IPI register")
            self.icr = (self.icr & ~0xFFFFFFFF) | (value & 0xFF) | int(Shorthand.SELF) << 18
            self._send_ipi()
        elif reg == REG_EOI and value:
            raise ApicAccessError("a non-zero write to the x2APIC EOI register")
        elif reg == REG_ESR and value:
            raise ApicAccessError("a non-zero write to the x2APIC ESR")
        elif reg in (REG_ID, REG_VERSION, REG_LDR, REG_DFR, REG_PPR, REG_APR, REG_TIMER_CURRENT, REG_ICR_HIGH):
            raise ApicAccessError(f"x2APIC register {reg:#x} is read-only or absent")
        elif reg in (REG_TPR, REG_EOI, REG_SVR, REG_ESR, REG_TIMER_INITIAL, REG_TIMER_DIVIDE) or reg in self.lvt:
            if value >> 32:
                raise ApicAccessError(f"reserved bits set in a write to x2APIC register {reg:#x}")
            self.write_register(reg, value)
        else:
            raise ApicAccessError(f"x2APIC register {reg:#x} is not writable")

    # --- addressing (SDM §11.6.2) ---

    def matches(self, dest: int, logical: bool) -> bool:
        if self.x2apic:
            if not logical:
                return dest in (self.apic_id, X2APIC_BROADCAST)
            ldr = self._x2apic_ldr()
            return dest == X2APIC_BROADCAST or (dest >> 16 == ldr >> 16 and bool(dest & ldr & 0xFFFF))
        if not logical:
            return dest == BROADCAST or dest == self.apic_id & 0xFF
        mda = dest & 0xFF
        logical_id = self.ldr >> 24
        if self.dfr >> 28 == 0xF:  # flat model: a bit per APIC
            return bool(mda & logical_id)
        # cluster model: cluster in bits 7:4, members in bits 3:0; cluster 0xF is a broadcast to all clusters
        return (mda >> 4 == 0xF or mda >> 4 == logical_id >> 4) and bool(mda & logical_id & 0xF)

    # --- snapshots ---

    def state(self) -> dict[str, Any]:
        """Every register, the LVT in `LVT_REGS` order, the LINT levels and the timer: its count start and its
        pending expiry relative to the clock's now, and the TSC (the TSC-deadline register is a TSC value), so
        that on a clock reading another time the count goes on from where it was and the timer fires as far
        ahead as it would have. `timer_hz` and `tsc_hz` are recorded to refuse a restore at another rate."""
        now = self.clock.now_ns()
        saved = st.save(self, LAPIC_FIELDS)
        saved["lvt"] = [self.lvt[reg] for reg in LVT_REGS]
        saved["tstart_ago_ns"] = now - self._tstart
        pending = self._timer is not None and self._timer.pending
        saved["timer_in_ns"] = self._timer.deadline_ns - now if self._timer is not None and pending else None
        saved["tsc"] = self.tsc()
        saved["timer_hz"], saved["tsc_hz"] = self.timer_hz, self.tsc_hz
        return saved

    def restore(self, state: dict[str, Any]) -> None:
        what = f"lapic {self.index}"
        values = st.load(state, {**LAPIC_FIELDS, **LAPIC_TIME_FIELDS}, what)
        for name, rate in (("timer_hz", self.timer_hz), ("tsc_hz", self.tsc_hz)):
            if values[name] != rate:
                raise SnapshotError(f"{what}.{name}: the snapshot's {values[name]} Hz, this APIC runs at {rate} Hz")
        for reg, value in zip(LVT_REGS, values["lvt"], strict=True):
            allowed = LVT_WRITABLE[reg] | LVT_MASKED | LVT_REMOTE_IRR
            if value & ~allowed:
                raise SnapshotError(f"{what}.lvt: {value:#x} at {reg:#x} sets bits outside {allowed:#x}")
        if values["timer_in_ns"] is not None and values["timer_in_ns"] < 0:
            raise SnapshotError(f"{what}.timer_in_ns: a pending timer is not in the past")
        now = self.clock.now_ns()
        self.clock.cancel(self._timer)
        self._timer = None
        for name in LAPIC_FIELDS:
            setattr(self, name, values[name])
        self.lvt = dict(zip(LVT_REGS, values["lvt"], strict=True))
        self._tstart = now - values["tstart_ago_ns"]
        self.tsc_offset = values["tsc"] - now * self.tsc_hz // NS_PER_SECOND
        if values["timer_in_ns"] is not None:
            self._timer = self.clock.add_timer(now + values["timer_in_ns"], self._timer_expired)
        self._notify()


class ApicSystem:
    """All the local APICs of a VM and the bus between them and the I/O APIC: resolves destinations, shorthands
    and lowest priority, and turns INIT/STARTUP/NMI deliveries into the callbacks the backend acts on.

    `on_init(index)`, `on_sipi(index, vector)` and `on_nmi(index)` name the target by vCPU index; a
    target's local APIC state has already been reset when `on_init` runs. `on_eoi(vector)` receives the EOI
    broadcast (the platform points it at the I/O APIC).
    """

    def __init__(self, lapics: Sequence[LocalApic]) -> None:
        self.lapics = list(lapics)
        self.on_init: Callable[[int], None] | None = None
        self.on_sipi: Callable[[int, int], None] | None = None
        self.on_nmi: Callable[[int], None] | None = None
        self.on_eoi: Callable[[int], None] | None = None
        self.on_pending: Callable[[int], None] | None = None
        for lapic in self.lapics:
            i = lapic.index
            lapic.send = self.deliver
            lapic.on_eoi = self._eoi
            lapic.on_init = lambda i=i: self._init(i)
            lapic.on_sipi = lambda vector, i=i: self._sipi(i, vector)
            lapic.on_nmi = lambda i=i: self._nmi(i)
            lapic.on_pending = lambda i=i: self._pending(i)

    def _eoi(self, vector: int) -> None:
        if self.on_eoi is not None:
            self.on_eoi(vector)

    def _init(self, i: int) -> None:
        if self.on_init is not None:
            self.on_init(i)

    def _sipi(self, i: int, vector: int) -> None:
        if self.on_sipi is not None:
            self.on_sipi(i, vector)

    def _nmi(self, i: int) -> None:
        if self.on_nmi is not None:
            self.on_nmi(i)

    def _pending(self, i: int) -> None:
        if self.on_pending is not None:
            self.on_pending(i)

    def targets(self, msg: ApicMessage) -> list[LocalApic]:
        if msg.shorthand == Shorthand.SELF:
            return [a for a in self.lapics if a.index == msg.source]
        if msg.shorthand == Shorthand.ALL:
            return list(self.lapics)
        if msg.shorthand == Shorthand.ALL_BUT_SELF:
            return [a for a in self.lapics if a.index != msg.source]
        return [a for a in self.lapics if a.matches(msg.dest, msg.logical)]

    def deliver(self, msg: ApicMessage) -> bool:
        targets = self.targets(msg)
        if msg.delivery_mode == DeliveryMode.LOWEST:
            targets = [a for a in targets if a.enabled and a.software_enabled][:1]
        accepted = False
        for lapic in targets:
            accepted = lapic.accept(msg) or accepted
        return accepted

    def set_lint(self, pin: int, level: bool) -> None:
        """Drive LINT`pin` of every local APIC, as a PC wires the PIC's INTR (LINT0) and NMI (LINT1) to all of
        them (the MP table's local interrupt entries, destination 0xFF)."""
        for lapic in self.lapics:
            lapic.set_lint(pin, level)


# what `LocalApic.state` saves as it is; the LVT and the times are converted (see there)
LAPIC_FIELDS: dict[str, st.Check] = {
    "apic_id": st.uint(32),
    "tpr": st.uint(8),
    "ldr": st.masked(0xFF000000),
    "dfr": st.uint(32),
    "svr": st.masked(0x3FF),
    "esr": st.uint(8),
    "_esr_pending": st.uint(8),
    "icr": st.uint(64),
    "irr": st.uint(256),
    "isr": st.uint(256),
    "tmr": st.uint(256),
    "lint_levels": st.list_of(st.boolean, length=2),
    "initial_count": st.uint(32),
    "divide_config": st.masked(0b1011),
    "_tcount": st.uint(32),
    "tsc_deadline": st.uint(64),
    "_extint_requested": st.boolean,
    "_enabled": st.boolean,
    "x2apic": st.boolean,
}
LAPIC_TIME_FIELDS: dict[str, st.Check] = {
    "lvt": st.list_of(st.uint(32), length=len(LVT_REGS)),
    "tstart_ago_ns": st.relative_ns,
    "timer_in_ns": st.optional(st.relative_ns),
    "tsc": st.integer(-(1 << 64), 1 << 64),
    "timer_hz": st.integer(1, 1 << 40),
    "tsc_hz": st.integer(1, 1 << 40),
}
