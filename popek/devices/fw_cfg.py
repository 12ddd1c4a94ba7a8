"""QEMU's firmware configuration device (fw_cfg), its traditional x86 I/O-port interface (QEMU's
docs/specs/fw_cfg.rst, "Selector (Control) Register" and "Data Register"; hw/nvram/fw_cfg.c).

A 16-bit write to the selector port 0x510 picks an item and rewinds its read offset to 0; each byte read from
the data port 0x511 returns the item's next byte, and 0 past its end, for unknown items and for the "invalid"
selector, as QEMU's `fw_cfg_data_read` does. QEMU's x86 ports are one combined region: a 16-bit write selects
and a byte read reads data at either port, a byte write (the data write interface, ignored since QEMU 2.4) does
nothing; other sizes are not valid accesses and get the open bus (reads all ones, writes dropped). The DMA
interface (port 0x514) is not provided: FW_CFG_ID says so (bit 0 only: the traditional interface).

Items, in QEMU's encodings: FW_CFG_SIGNATURE "QEMU", FW_CFG_ID, FW_CFG_RAM_SIZE (64-bit little-endian),
FW_CFG_NB_CPUS and FW_CFG_MAX_CPUS (16-bit: popek's CPUs are all present at boot), and the file directory
FW_CFG_FILE_DIR (big-endian count, then 64-byte entries of size, selector and NUL-terminated name) listing the
named items given to the constructor, at selectors from FW_CFG_FILE_FIRST. Bit 15 of a selector (arch-local)
picks a second item table, bit 14 (the old write channel) is ignored. FW_CFG_IRQ0_OVERRIDE (0x8002), which QEMU
sets to 1 for its IRQ0 -> pin 2 wiring, reads 0 here: popek routes IRQ0 to pin 0 (see `popek.boot.mptable`).
kvm-unit-tests reads FW_CFG_NB_CPUS to know how many APs to wait for and FW_CFG_RAM_SIZE for its memory size.
"""

from __future__ import annotations

import struct
import threading
from typing import Any

from popek.devices import state as st
from popek.errors import ConfigError

SELECTOR = 0  # port 0x510
DATA = 1  # port 0x511
PORT_COUNT = 2

FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NB_CPUS = 0x05
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_FILE_SLOTS = 0x20
FW_CFG_WRITE_CHANNEL = 0x4000
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_ENTRY_MASK = ~(FW_CFG_WRITE_CHANNEL | FW_CFG_ARCH_LOCAL) & 0xFFFF
FW_CFG_INVALID = 0xFFFF

FW_CFG_VERSION = 1 << 0  # FW_CFG_ID: the traditional interface (no DMA, bit 1)
SIGNATURE = b"QEMU"
FILE_NAME_MAX = 56


def _key(selector: int) -> int:
    """Which item a selector names: its entry number in the generic or the arch-local table."""
    return selector & (FW_CFG_ARCH_LOCAL | FW_CFG_ENTRY_MASK)


class FwCfg:
    def __init__(self, ram_size: int, cpus: int, files: dict[str, bytes] | None = None) -> None:
        files = files or {}
        if len(files) > FW_CFG_FILE_SLOTS:
            raise ConfigError(f"fw_cfg has {FW_CFG_FILE_SLOTS} file slots, not {len(files)}")
        self.items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: SIGNATURE,
            FW_CFG_ID: struct.pack("<I", FW_CFG_VERSION),
            FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
            FW_CFG_NB_CPUS: struct.pack("<H", cpus),
            FW_CFG_MAX_CPUS: struct.pack("<H", cpus),
        }
        directory = struct.pack(">I", len(files))
        for i, (name, data) in enumerate(sorted(files.items())):
            raw = name.encode("ascii")
            if not raw or len(raw) >= FILE_NAME_MAX:
                raise ConfigError(f"fw_cfg file name {name!r} must have 1 to {FILE_NAME_MAX - 1} characters")
            select = FW_CFG_FILE_FIRST + i
            directory += struct.pack(">IHH56s", len(data), select, 0, raw)
            self.items[select] = bytes(data)
        self.items[FW_CFG_FILE_DIR] = directory
        self.selector = FW_CFG_SIGNATURE
        self.offset = 0
        self._lock = threading.Lock()

    def select(self, selector: int) -> None:
        with self._lock:
            self.selector = selector & 0xFFFF
            self.offset = 0

    def next_byte(self) -> int:
        with self._lock:
            item = None if self.selector == FW_CFG_INVALID else self.items.get(_key(self.selector))
            if item is None or self.offset >= len(item):
                return 0
            self.offset += 1
            return item[self.offset - 1]

    def read(self, offset: int, size: int) -> bytes:
        if size != 1:
            return b"\xff" * size
        return bytes([self.next_byte()])

    def write(self, offset: int, data: bytes) -> None:
        if len(data) == 2:
            self.select(int.from_bytes(data, "little"))

    # --- snapshots ---

    def state(self) -> dict[str, Any]:
        """The selector and the read offset into its item; the items are the VM's configuration (memory size,
        CPUs, files), rebuilt from its spec, not state."""
        with self._lock:
            return {"selector": self.selector, "offset": self.offset}

    def restore(self, state: dict[str, Any]) -> None:
        values = st.load(state, {"selector": st.uint(16), "offset": st.integer(0, 1 << 32)}, "fw_cfg")
        with self._lock:
            self.selector, self.offset = values["selector"], values["offset"]
