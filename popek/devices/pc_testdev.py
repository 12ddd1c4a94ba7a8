"""QEMU's `pc-testdev` (hw/misc/pc-testdev.c), the ISA test device kvm-unit-tests expects: KVM developers'
probe for emulation, interrupt routing and MMU corner cases. Attached only when asked (`--pc-testdev`).

- Ports 0xE0-0xE3 ("ioport") and 0xE8-0xEB ("ioport-byte"): one 32-bit latch. A write of n bytes at port
  base + k stores them in byte lanes k..k+n-1 (lanes past 3 are dropped, as QEMU's 32-bit `ioport_data`
  drops them), a read returns those lanes. QEMU splits accesses to the byte port into single bytes, which comes
  to the same lanes. kvm-unit-tests' emulator test runs string I/O through it (`rep outsb`, `rep insb` into
  MMIO).
- Ports 0xE4-0xE7 ("flush-page"): a 4-byte write of a guest-physical address makes the host drop its mappings
  of that page, contents kept (`GuestMemory.remap_page`, given as `flush_page`), so the guest's next access to
  it faults into KVM's MMU (kvm-unit-tests' eventinj flushes its stack page before an IRET). Other sizes are
  not valid accesses and are ignored; reads return 0.
- Ports 0x2000-0x2017 ("irq-line"): a byte write of v drives interrupt line n = port - 0x2000 to level
  `v != 0`, every write reaching the interrupt controllers (kvm-unit-tests' `set_irq_line`, used by its
  I/O APIC tests). Lines 0-15 are the ISA IRQs (PIC and I/O APIC), 16-23 the I/O APIC's other inputs; QEMU's
  `isa_get_irq` asserts on the 24 - 16 lines above 15, popek drives those GSIs. Reads return 0.
- MMIO 0xFF000000-0xFF00FFFF ("iomem", kvm-unit-tests' IORAM): 64 KiB that behave as RAM but every access of
  which is an MMIO exit. Accesses outside the window do not reach the device (the bus counts them unclaimed),
  and the device clips anything that would cross its end.

Each part is its own bus device so that `--stats` names its accesses; the builder places them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from popek.devices import state as st
from popek.devices.irq import IrqLine

IOPORT_BASE = 0xE0  # ioport at +0, flush-page at +4, ioport-byte at +8
IOPORT, FLUSH_PAGE, IOPORT_BYTE = 0x0, 0x4, 0x8
PORT_BLOCK_LEN = 4
IRQ_PORT_BASE = 0x2000
IRQ_LINES = 24
IORAM_BASE = 0xFF000000
IORAM_SIZE = 0x10000
PAGE_MASK = ~0xFFF


class PcTestdevPorts:
    """The 0xE0-0xEB block: the data latch at +0 and +8, the flush-page port at +4."""

    def __init__(self, flush_page: Callable[[int], object]) -> None:
        self.flush_page = flush_page
        self.latch = bytearray(4)
        self.flushes = 0
        self._lock = threading.Lock()

    def read(self, offset: int, size: int) -> bytes:
        if FLUSH_PAGE <= offset < FLUSH_PAGE + PORT_BLOCK_LEN:
            return bytes(size)
        lane = offset % PORT_BLOCK_LEN
        with self._lock:
            return bytes(self.latch[lane : lane + size]).ljust(size, b"\0")

    def write(self, offset: int, data: bytes) -> None:
        if FLUSH_PAGE <= offset < FLUSH_PAGE + PORT_BLOCK_LEN:
            if offset == FLUSH_PAGE and len(data) == 4:
                with self._lock:
                    self.flushes += 1
                self.flush_page(int.from_bytes(data, "little") & PAGE_MASK)
            return
        lane = offset % PORT_BLOCK_LEN
        with self._lock:
            kept = data[: PORT_BLOCK_LEN - lane]
            self.latch[lane : lane + len(kept)] = kept

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {"latch": bytes(self.latch)}

    def restore(self, state: dict[str, Any]) -> None:
        values = st.load(state, {"latch": st.raw(4)}, "pc-testdev ioport")
        with self._lock:
            self.latch = bytearray(values["latch"])


class PcTestdevIrqLines:
    """Ports 0x2000-0x2017: one byte write per interrupt line level."""

    def __init__(self, irq_line: Callable[[int], IrqLine], lines: int = IRQ_LINES) -> None:
        self.lines = [irq_line(n) for n in range(lines)]
        self._lock = threading.Lock()

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        if len(data) != 1 or not 0 <= offset < len(self.lines):
            return
        with self._lock:  # one line's writes reach the controller in the order the guest made them
            self.lines[offset].drive(data[0] != 0)

    def state(self) -> dict[str, Any]:
        """The level each line was last driven to (the interrupt controllers' own state has it too)."""
        with self._lock:
            return {"levels": [line.level for line in self.lines]}

    def restore(self, state: dict[str, Any]) -> None:
        values = st.load(state, {"levels": st.list_of(st.boolean, length=len(self.lines))}, "pc-testdev irq-line")
        with self._lock:
            for line, level in zip(self.lines, values["levels"], strict=True):
                line.restore_level(level)


class Ioram:
    """The 64 KiB RAM-like MMIO window."""

    def __init__(self, size: int = IORAM_SIZE) -> None:
        self.data = bytearray(size)
        self._lock = threading.Lock()

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            return bytes(self.data[offset : offset + size]).ljust(size, b"\0")

    def write(self, offset: int, data: bytes) -> None:
        if not 0 <= offset < len(self.data):
            return
        with self._lock:
            kept = data[: len(self.data) - offset]
            self.data[offset : offset + len(kept)] = kept

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {"data": bytes(self.data)}

    def restore(self, state: dict[str, Any]) -> None:
        values = st.load(state, {"data": st.raw(len(self.data))}, "pc-testdev ioram")
        with self._lock:
            self.data[:] = values["data"]
