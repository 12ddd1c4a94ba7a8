"""The two cascaded 8259A programmable interrupt controllers of a PC (Intel 8259A datasheet, order 231468) with
the PIIX edge/level control registers (ELCR, Intel 82371AB PIIX4 datasheet §12.2.6).

Master at ports 0x20-0x21, slave at 0xA0-0xA1 on the master's IR2, ELCR at 0x4D0-0x4D1. `Pic` is the pair; the
buses get one small adapter per port range (`Pic.master_port`, `Pic.slave_port`, `Pic.elcr_port`), each of
which sees its own offsets 0 and 1, because the three ranges are not contiguous.

Implemented from the datasheet: the ICW1-ICW4 initialisation sequence (single or cascade, ICW4 optional, auto-EOI,
special fully nested mode), OCW1 (IMR), OCW2 (non-specific/specific EOI, rotation on EOI and in auto-EOI mode,
set priority), OCW3 (IRR/ISR read selection, poll, special mask mode), fully nested priority resolution with
rotation, edge and level triggering, and the default IR7 that the datasheet specifies when a request is no longer
there at INTA (the spurious IRQ7, or IRQ15 from the slave, that Linux counts: a request masked, or a level input
lowered, between INTR and INTA).

An edge-triggered IRR bit is set by a rising edge and stays set until the acknowledge, even if the line falls
first; a level-triggered IRR bit simply follows the line. The datasheet's edge-sense circuit would drop a request
whose line fell before INTA, but popek's devices send edges as pulses (virtio-mmio's interrupt; a KVM irqfd is
one), and the PIC of popek's other backend, KVM's in-kernel i8259 (arch/x86/kvm/i8259.c `pic_set_irq1`), like
QEMU's hw/intc/i8259.c, latches the edge: a guest sees one PIC on both backends. MCS-80/85 mode (ICW4 µPM=0) and
buffered mode are accepted but behave as 8086 mode: there is no 8080 on the other end.

The cascade input (master IR2) is wired to the slave's INT output and treated as level-sensitive whatever ELCR
says: the slave's INT stays high while it has a request the master has not yet been able to take, and the
master must see it again after the EOIs, which an edge detector would miss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from popek.devices import state as st
from popek.snapshot import SnapshotError

CASCADE_IRQ = 2
ELCR_MASKS = (0xF8, 0xDE)  # IRQ0-2, 8 and 13 are edge-triggered by design (PIIX4 §12.2.6)

ICW1_IC4 = 0x01
ICW1_SNGL = 0x02
ICW1_LTIM = 0x08
ICW1_INIT = 0x10
ICW4_8086 = 0x01
ICW4_AEOI = 0x02
ICW4_SFNM = 0x10
OCW3_RIS = 0x01
OCW3_RR = 0x02
OCW3_POLL = 0x04
OCW3_SMM = 0x20
OCW3_ESMM = 0x40


CHIP_FIELDS: dict[str, st.Check] = {
    "elcr": st.uint(8),
    "lines": st.uint(8),
    "irr": st.uint(8),
    "isr": st.uint(8),
    "imr": st.uint(8),
    "vector_base": st.masked(0xF8),
    "lowest": st.uint(3),
    "init_step": st.one_of(0, 2, 3, 4),
    "icw4_expected": st.boolean,
    "single": st.boolean,
    "ltim": st.boolean,
    "icw3": st.uint(8),
    "icw4": st.uint(8),
    "auto_eoi": st.boolean,
    "rotate_on_aeoi": st.boolean,
    "sfnm": st.boolean,
    "special_mask": st.boolean,
    "read_isr": st.boolean,
    "poll": st.boolean,
}


class Pic8259:
    """One 8259A. `master` selects the cascade behaviour (special fully nested mode, the IR2 input)."""

    def __init__(self, master: bool) -> None:
        self.master = master
        self.elcr = 0
        self.elcr_mask = ELCR_MASKS[0 if master else 1]
        self.lines = 0  # the level each IR input is driven at
        self.reset()

    def reset(self) -> None:
        self.irr = 0
        self.isr = 0
        self.imr = 0
        self.vector_base = 0x08 if self.master else 0x70  # what a BIOS would have left; guests re-initialise
        self.lowest = 7  # the IR with the lowest priority; rotation moves it
        self.init_step = 0  # 0: operational; 2, 3, 4: the next ICW expected
        self.icw4_expected = False
        self.single = False
        self.ltim = False
        self.icw3 = 0
        self.icw4 = ICW4_8086
        self.auto_eoi = False
        self.rotate_on_aeoi = False
        self.sfnm = False
        self.special_mask = False
        self.read_isr = False
        self.poll = False

    # --- priority ---

    def _priority(self, irq: int) -> int:
        """0 is the highest priority; IR `lowest` is 7."""
        return (irq - self.lowest - 1) & 7

    def _highest(self, bits: int) -> int | None:
        best: int | None = None
        for irq in range(8):
            if bits >> irq & 1 and (best is None or self._priority(irq) < self._priority(best)):
                best = irq
        return best

    def _level_triggered(self, irq: int) -> bool:
        if self.master and irq == CASCADE_IRQ:
            return True
        return self.ltim or bool(self.elcr >> irq & 1)

    def pending_irq(self) -> int | None:
        """The IR the chip would name at INTA now: the highest-priority unmasked request above everything in
        service (in special mask mode, masked in-service levels do not block; in special fully nested mode, a
        slave request may nest inside an in-service slave request)."""
        request = self._highest(self.irr & ~self.imr)
        if request is None:
            return None
        # in special mask mode a masked in-service level stops blocking: lower levels are enabled too
        in_service = self.isr & ~self.imr if self.special_mask else self.isr
        current = self._highest(in_service)
        if current is None:
            return request
        if self._priority(request) < self._priority(current):
            return request
        if self.sfnm and self.master and request == current == CASCADE_IRQ:
            return request
        return None

    @property
    def int_output(self) -> bool:
        return self.init_step == 0 and self.pending_irq() is not None

    # --- inputs ---

    def set_line(self, irq: int, level: bool) -> None:
        mask = 1 << irq
        was = bool(self.lines & mask)
        if level:
            self.lines |= mask
        else:
            self.lines &= ~mask
        if self._level_triggered(irq):
            self.irr = self.irr | mask if level else self.irr & ~mask
        elif level and not was:
            self.irr |= mask  # latched until INTA: a falling edge before it does not withdraw it (module docstring)

    def _resync_level_irr(self) -> None:
        """A change of trigger mode re-derives IRR for level inputs from the line as it is now."""
        for irq in range(8):
            if self._level_triggered(irq):
                mask = 1 << irq
                self.irr = (self.irr & ~mask) | (self.lines & mask)

    # --- the acknowledge ---

    def acknowledge(self) -> int | None:
        """INTA for this chip alone: the IR taken, with IRR/ISR updated, or None when no request is left, for
        which the chip answers with IR7 without setting ISR (datasheet, "Interrupt Sequence" note). The caller
        (`Pic`) turns it into a vector and handles the cascade."""
        irq = self.pending_irq()
        if irq is None:
            return None
        mask = 1 << irq
        if not self._level_triggered(irq):
            self.irr &= ~mask
        if self.auto_eoi:
            if self.rotate_on_aeoi:
                self.lowest = irq
        else:
            self.isr |= mask
        return irq

    # --- the guest's side ---

    def read(self, port: int) -> int:
        if self.poll:
            self.poll = False
            irq = self.acknowledge()
            return 0 if irq is None else 0x80 | irq
        if port == 0:
            return self.isr if self.read_isr else self.irr
        return self.imr

    def write(self, port: int, value: int) -> None:
        if port == 0:
            if value & ICW1_INIT:
                self._icw1(value)
            elif value & 0x08:
                self._ocw3(value)
            else:
                self._ocw2(value)
            return
        if self.init_step == 2:
            self.vector_base = value & 0xF8
            self.init_step = 3 if not self.single else (4 if self.icw4_expected else 0)
        elif self.init_step == 3:
            self.icw3 = value
            self.init_step = 4 if self.icw4_expected else 0
        elif self.init_step == 4:
            self._icw4(value)
            self.init_step = 0
        else:
            self.imr = value  # OCW1

    def _icw1(self, value: int) -> None:
        lines, elcr = self.lines, self.elcr
        self.reset()
        self.lines, self.elcr = lines, elcr
        self.icw4_expected = bool(value & ICW1_IC4)
        self.single = bool(value & ICW1_SNGL)
        self.ltim = bool(value & ICW1_LTIM)
        self.icw4 = 0
        self.init_step = 2
        # the edge-sense circuit is reset: an edge input must go low and high again; a level input still requests
        self._resync_level_irr()

    def _icw4(self, value: int) -> None:
        self.icw4 = value
        self.auto_eoi = bool(value & ICW4_AEOI)
        self.sfnm = bool(value & ICW4_SFNM)

    def _ocw2(self, value: int) -> None:
        command = value >> 5
        level = value & 7
        if command == 0b000:
            self.rotate_on_aeoi = False
        elif command == 0b100:
            self.rotate_on_aeoi = True
        elif command == 0b110:
            self.lowest = level
        elif command in (0b001, 0b101):  # non-specific EOI, optionally rotating
            in_service = self.isr & ~self.imr if self.special_mask else self.isr
            irq = self._highest(in_service)
            if irq is not None:
                self.isr &= ~(1 << irq)
                if command == 0b101:
                    self.lowest = irq
        elif command in (0b011, 0b111):  # specific EOI, optionally rotating
            self.isr &= ~(1 << level)
            if command == 0b111:
                self.lowest = level
        # 0b010 is a no-op

    def state(self) -> dict[str, Any]:
        """IRR, ISR, IMR, the input levels, ELCR and where the ICW sequence and the OCW modes are."""
        return st.save(self, CHIP_FIELDS)

    def restore(self, state: dict[str, Any]) -> None:
        name = "pic master" if self.master else "pic slave"
        values = st.load(state, CHIP_FIELDS, name)
        if values["elcr"] & ~self.elcr_mask:
            raise SnapshotError(f"{name}.elcr: {values['elcr']:#x} sets bits outside {self.elcr_mask:#x}")
        for key, value in values.items():
            setattr(self, key, value)

    def _ocw3(self, value: int) -> None:
        if value & OCW3_ESMM:
            self.special_mask = bool(value & OCW3_SMM)
        if value & OCW3_POLL:
            self.poll = True
        if value & OCW3_RR:
            self.read_isr = bool(value & OCW3_RIS)


class _Ports:
    """The two ports of one chip, as a bus device."""

    def __init__(self, pic: Pic, chip: Pic8259) -> None:
        self._pic = pic
        self._chip = chip

    def read(self, offset: int, size: int) -> bytes:
        value = self._chip.read(offset & 1)
        self._pic._update()  # a poll is an acknowledge
        return bytes([value]) * size

    def write(self, offset: int, data: bytes) -> None:
        if data:
            self._chip.write(offset & 1, data[0])
            self._pic._update()


class _Elcr:
    """ELCR1 (0x4D0, master) and ELCR2 (0x4D1, slave)."""

    def __init__(self, pic: Pic) -> None:
        self._pic = pic

    def read(self, offset: int, size: int) -> bytes:
        return bytes([self._pic.chips[offset & 1].elcr]) * size

    def write(self, offset: int, data: bytes) -> None:
        if data:
            chip = self._pic.chips[offset & 1]
            chip.elcr = data[0] & chip.elcr_mask
            chip._resync_level_irr()
            self._pic._update()


class Pic:
    """The master/slave pair as the rest of the platform sees it: 16 IRQ inputs and one INTR output.

    `on_intr_change(level)` is called whenever INTR changes, for whoever watches the line (the BSP's LAPIC on
    LINT0, or a CPU without an APIC); `interrupt_pending`/`acknowledge` are the processor-side protocol of
    `popek.cpu.core.InterruptSource`, so a backend without an APIC can hand the `Pic` to the CPU directly.
    """

    def __init__(self) -> None:
        self.master = Pic8259(master=True)
        self.slave = Pic8259(master=False)
        self.chips = (self.master, self.slave)
        self.master_port = _Ports(self, self.master)
        self.slave_port = _Ports(self, self.slave)
        self.elcr_port = _Elcr(self)
        self.on_intr_change: Callable[[bool], None] | None = None
        self.intr = False
        self.spurious = 0

    def set_irq(self, irq: int, level: bool) -> None:
        if not 0 <= irq < 16:
            raise ValueError(f"the 8259A pair has IRQs 0-15, not {irq}")
        if irq < 8:
            self.master.set_line(irq, level)
        else:
            self.slave.set_line(irq - 8, level)
        self._update()

    def _update(self) -> None:
        if not self.master.single:
            self.master.set_line(CASCADE_IRQ, self.slave.int_output)
        intr = self.master.int_output
        if intr != self.intr:
            self.intr = intr
            if self.on_intr_change is not None:
                self.on_intr_change(intr)

    def interrupt_pending(self) -> bool:
        return self.intr

    def state(self) -> dict[str, Any]:
        """Both chips and the INTR level last reported (the LAPIC's LINT0 or the CPU holds it too)."""
        return {"master": self.master.state(), "slave": self.slave.state(), "intr": self.intr}

    def restore(self, state: dict[str, Any]) -> None:
        """Both chips, validated before either changes, then INTR re-derived from them: a snapshot whose INTR
        disagrees with its chips reports the chips' level to `on_intr_change`."""
        intr = st.sub(state, "intr", "pic")
        if type(intr) is not bool:
            raise SnapshotError("pic.intr: true or false is expected")
        if not isinstance(state, dict) or set(state) != {"master", "slave", "intr"}:
            raise SnapshotError("pic: the state has master, slave and intr, nothing else")
        scratch = (Pic8259(master=True), Pic8259(master=False))
        for chip, key in zip(scratch, ("master", "slave"), strict=True):
            chip.restore(state[key])
        for chip, saved in zip(self.chips, scratch, strict=True):
            for key in CHIP_FIELDS:
                setattr(chip, key, getattr(saved, key))
        self.intr = intr
        self._update()

    def acknowledge(self) -> int:
        """The two INTA cycles: the master names an IR (or its default IR7); on IR2 the slave supplies the
        vector (or its own default IR7: IRQ15), the master's ISR bit for the cascade being set either way."""
        irq = self.master.acknowledge()
        chip = self.master
        if irq == CASCADE_IRQ and not self.master.single:
            chip = self.slave
            irq = self.slave.acknowledge()
        if irq is None:
            self.spurious += 1
            irq = 7
        self._update()
        return chip.vector_base + irq
