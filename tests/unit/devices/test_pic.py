from __future__ import annotations

from popek.devices.legacy.pic import Pic


def init(pic: Pic, master_icw4: int = 0x01, slave_icw4: int = 0x01) -> None:
    """What Linux's init_8259A writes: ICW1 (edge, cascade, ICW4), ICW2 (vector base), ICW3, ICW4."""
    m, s = pic.master_port, pic.slave_port
    m.write(1, b"\xff")
    s.write(1, b"\xff")
    m.write(0, b"\x11")
    m.write(1, b"\x20")
    m.write(1, b"\x04")
    m.write(1, bytes([master_icw4]))
    s.write(0, b"\x11")
    s.write(1, b"\x28")
    s.write(1, b"\x02")
    s.write(1, bytes([slave_icw4]))
    m.write(1, b"\x00")
    s.write(1, b"\x00")


def make(**kw: int) -> tuple[Pic, list[bool]]:
    pic = Pic()
    changes: list[bool] = []
    pic.on_intr_change = changes.append
    init(pic, **kw)
    return pic, changes


def eoi(pic: Pic, slave: bool = False) -> None:
    if slave:
        pic.slave_port.write(0, b"\x20")
    pic.master_port.write(0, b"\x20")


def read_isr(pic: Pic, slave: bool = False) -> int:
    port = pic.slave_port if slave else pic.master_port
    port.write(0, b"\x0b")
    value = port.read(0, 1)[0]
    port.write(0, b"\x0a")
    return value


def test_init_sequence_sets_vector_base_and_clears_mask() -> None:
    pic, changes = make()
    assert pic.master_port.read(1, 1) == b"\x00"
    assert not pic.interrupt_pending()
    pic.set_irq(4, True)
    assert changes == [True]
    assert pic.acknowledge() == 0x24
    assert changes == [True, False]
    assert read_isr(pic) == 0x10
    eoi(pic)
    assert read_isr(pic) == 0


def test_no_interrupt_during_initialisation() -> None:
    pic = Pic()
    pic.master_port.write(0, b"\x11")  # ICW1: waiting for ICW2
    pic.set_irq(1, True)
    assert not pic.interrupt_pending()
    pic.master_port.write(1, b"\x40")
    pic.master_port.write(1, b"\x04")
    pic.master_port.write(1, b"\x01")
    assert pic.interrupt_pending()  # level still high: a request once the chip is operational
    pic.set_irq(1, False)
    pic.set_irq(1, True)
    assert pic.acknowledge() == 0x41


def test_icw1_without_icw4_in_single_mode() -> None:
    pic = Pic()
    pic.master_port.write(0, b"\x13")  # single, ICW4 needed
    pic.master_port.write(1, b"\x50")
    pic.master_port.write(1, b"\x01")  # ICW4 (no ICW3 in single mode)
    pic.master_port.write(1, b"\x00")  # OCW1
    pic.set_irq(2, True)  # in single mode IR2 is an ordinary input
    assert pic.acknowledge() == 0x52


def test_fully_nested_priority_and_masking() -> None:
    pic, _ = make()
    pic.set_irq(3, True)
    pic.set_irq(1, True)
    assert pic.acknowledge() == 0x21
    assert not pic.interrupt_pending()  # IR3 waits for IR1's EOI
    pic.set_irq(0, True)
    assert pic.acknowledge() == 0x20  # a higher priority nests
    eoi(pic)  # non-specific: clears IR0, the highest in service
    assert read_isr(pic) == 0x02
    assert not pic.interrupt_pending()
    eoi(pic)
    pic.master_port.write(1, b"\x08")  # mask IR3
    assert not pic.interrupt_pending()
    assert pic.master_port.read(0, 1) == b"\x08"  # IRR still shows the request
    pic.master_port.write(1, b"\x00")
    assert pic.acknowledge() == 0x23


def test_specific_eoi_and_rotation() -> None:
    pic, _ = make()
    pic.set_irq(5, True)
    assert pic.acknowledge() == 0x25
    pic.master_port.write(0, b"\x63")  # specific EOI for IR3: IR5 stays in service
    assert read_isr(pic) == 0x20
    pic.master_port.write(0, b"\x65")
    assert read_isr(pic) == 0
    # rotate on non-specific EOI: IR5 becomes lowest, so IR6 now beats IR0
    pic.set_irq(5, False)
    pic.set_irq(5, True)
    assert pic.acknowledge() == 0x25
    pic.master_port.write(0, b"\xa0")
    pic.set_irq(0, True)
    pic.set_irq(6, True)
    assert pic.acknowledge() == 0x26
    eoi(pic)
    assert pic.acknowledge() == 0x20
    eoi(pic)
    # set priority: IR0 lowest, so IR1 is highest
    pic.master_port.write(0, b"\xc0")
    pic.set_irq(0, False)
    pic.set_irq(0, True)
    pic.set_irq(7, True)
    pic.set_irq(1, True)
    assert pic.acknowledge() == 0x21
    eoi(pic)
    assert pic.acknowledge() == 0x27
    eoi(pic)
    assert pic.acknowledge() == 0x20


def test_auto_eoi_leaves_isr_clear() -> None:
    pic, _ = make(master_icw4=0x03)
    pic.set_irq(6, True)
    assert pic.acknowledge() == 0x26
    assert read_isr(pic) == 0
    pic.set_irq(7, True)
    assert pic.acknowledge() == 0x27  # nothing in service blocks it
    assert pic.spurious == 0


def test_edge_needs_a_new_edge_and_level_follows_the_line() -> None:
    pic, _ = make()
    pic.set_irq(3, True)
    assert pic.acknowledge() == 0x23
    eoi(pic)
    assert not pic.interrupt_pending()  # the line is still high, but no new edge
    pic.elcr_port.write(0, b"\x08")  # IRQ3 level-triggered
    assert pic.elcr_port.read(0, 1) == b"\x08"
    assert pic.interrupt_pending()
    assert pic.acknowledge() == 0x23
    eoi(pic)
    assert pic.acknowledge() == 0x23  # still asserted: requested again after the EOI
    eoi(pic)
    pic.set_irq(3, False)
    assert not pic.interrupt_pending()


def test_elcr_cannot_make_timer_and_cascade_level_triggered() -> None:
    pic, _ = make()
    pic.elcr_port.write(0, b"\xff")
    pic.elcr_port.write(1, b"\xff")
    assert pic.elcr_port.read(0, 1) == b"\xf8"
    assert pic.elcr_port.read(1, 1) == b"\xde"


def test_an_edge_request_stays_latched_when_its_line_falls_before_inta() -> None:
    pic, changes = make()
    pic.set_irq(1, True)
    pic.set_irq(1, False)  # a pulse: as KVM's in-kernel PIC and QEMU's keep it, so does popek's
    assert pic.interrupt_pending() and changes == [True]
    assert pic.acknowledge() == 0x21
    assert read_isr(pic) == 0x02 and pic.spurious == 0
    pic.set_irq(1, True)  # the next edge is a request of its own
    eoi(pic)
    assert pic.acknowledge() == 0x21


def test_a_request_gone_before_inta_gives_spurious_irq7() -> None:
    pic, _ = make()
    pic.elcr_port.write(0, b"\x20")  # IRQ5 level-triggered
    pic.set_irq(5, True)
    assert pic.interrupt_pending()
    pic.set_irq(5, False)  # the device withdrew its request before INTA
    assert not pic.interrupt_pending()
    pic.set_irq(1, True)
    pic.master.imr = 0x02  # as if masked between INTR and INTA (the port write would update INTR at once)
    assert pic.acknowledge() == 0x27
    assert read_isr(pic) == 0  # the default IR7 sets no ISR bit
    assert pic.spurious == 1
    # a genuine IRQ7 does set ISR
    pic.set_irq(7, True)
    assert pic.acknowledge() == 0x27
    assert read_isr(pic) == 0x80
    assert pic.spurious == 1


def test_cascade_delivers_slave_vectors_and_needs_both_eois() -> None:
    pic, _ = make()
    pic.set_irq(10, True)
    assert pic.interrupt_pending()
    assert pic.acknowledge() == 0x2A
    assert read_isr(pic) == 0x04
    assert read_isr(pic, slave=True) == 0x04
    pic.set_irq(9, True)  # higher on the slave, but the master's IR2 is in service
    assert not pic.interrupt_pending()
    pic.set_irq(0, True)
    assert pic.acknowledge() == 0x20  # the master's IR0 still nests
    eoi(pic)
    eoi(pic, slave=True)
    assert pic.acknowledge() == 0x29  # the slave INT stayed high: the master sees it again after its EOI
    eoi(pic, slave=True)
    assert read_isr(pic, slave=True) == 0


def test_special_fully_nested_mode_lets_slave_requests_nest() -> None:
    pic, _ = make(master_icw4=0x11)
    pic.set_irq(12, True)
    assert pic.acknowledge() == 0x2C
    pic.set_irq(9, True)
    assert pic.acknowledge() == 0x29  # nested through the in-service cascade
    assert read_isr(pic, slave=True) == 0x12


def test_slave_request_gone_gives_spurious_irq15_with_master_cascade_in_service() -> None:
    pic, _ = make()
    pic.set_irq(11, True)
    assert pic.interrupt_pending()
    pic.slave.imr = 0x08  # as if masked between INTR and INTA (the port write would update INTR at once)
    assert pic.acknowledge() == 0x2F
    assert read_isr(pic, slave=True) == 0
    assert read_isr(pic) == 0x04  # Linux's spurious-IRQ15 handler EOIs the master for this
    assert pic.spurious == 1


def test_masking_through_ocw1_drops_intr() -> None:
    pic, changes = make()
    pic.set_irq(5, True)
    pic.master_port.write(1, b"\x20")
    assert changes == [True, False]
    pic.master_port.write(1, b"\x00")
    assert changes == [True, False, True]


def test_special_mask_mode_enables_lower_levels() -> None:
    pic, _ = make()
    pic.set_irq(3, True)
    assert pic.acknowledge() == 0x23
    pic.set_irq(5, True)
    assert not pic.interrupt_pending()
    pic.master_port.write(1, b"\x08")  # mask the level in service
    pic.master_port.write(0, b"\x68")  # OCW3: set special mask mode
    assert pic.acknowledge() == 0x25
    pic.master_port.write(0, b"\x48")  # reset special mask mode
    pic.master_port.write(0, b"\x65")
    pic.master_port.write(0, b"\x63")
    assert read_isr(pic) == 0


def test_poll_command_acknowledges() -> None:
    pic, _ = make()
    pic.set_irq(6, True)
    pic.master_port.write(0, b"\x0c")  # OCW3 poll
    assert pic.master_port.read(0, 1) == b"\x86"
    assert read_isr(pic) == 0x40
    assert not pic.interrupt_pending()
    pic.master_port.write(0, b"\x0c")
    assert pic.master_port.read(0, 1) == b"\x00"


def test_same_inputs_same_vectors() -> None:
    def run() -> list[int]:
        pic, _ = make()
        out = []
        for irq in (3, 12, 1, 8, 6):
            pic.set_irq(irq, True)
        while pic.interrupt_pending():
            v = pic.acknowledge()
            out.append(v)
            if v >= 0x28:
                eoi(pic, slave=True)
            else:
                eoi(pic)
        return out

    assert run() == run() == [0x21, 0x28, 0x2C, 0x23, 0x26]
