"""A minimal machine for interpreter tests: guest RAM, a recording bus, a `Cpu` put directly into real mode,
32-bit flat protected mode or 64-bit long mode (identity-mapped with 2-MiB pages), and nasm-assembled code."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from popek.cpu.core import Cpu
from popek.cpu.interp import Interpreter
from popek.cpu.state import (
    CR0_ET,
    CR0_PE,
    CR0_PG,
    CR4_OSFXSR,
    CR4_PAE,
    CS,
    DS,
    EFER_LMA,
    EFER_LME,
    ES,
    FS,
    GS,
    SS,
    Segment,
)
from popek.memory import GuestMemory

MEM_SIZE = 4 << 20
CODE = 0x10000
STACK_TOP = 0x80000
PML4, PDPT, PD = 0x1000, 0x2000, 0x3000
GDT = 0x4000
IDT = 0x5000
SNIPPETS = 0x100000  # `place`d snippets, up to the end of RAM
HANDLERS = 0x6000  # exception handler stubs: handler for vector v at HANDLERS + 16*v


def nasm_available() -> bool:
    return shutil.which("nasm") is not None


_asm_cache: dict[tuple[str, int, int], bytes] = {}


def assemble(source: str, bits: int, org: int) -> bytes:
    key = (source, bits, org)
    if key not in _asm_cache:
        with tempfile.TemporaryDirectory() as d:
            src, out = Path(d) / "s.asm", Path(d) / "s.bin"
            src.write_text(f"bits {bits}\norg {org:#x}\n{source}\n")
            subprocess.run(["nasm", "-f", "bin", "-o", str(out), str(src)], check=True, capture_output=True)
            _asm_cache[key] = out.read_bytes()
    return _asm_cache[key]


class Bus:
    """Records port writes; port reads return a programmed value (default all ones)."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, int, int]] = []
        self.reads: dict[int, int] = {}
        self.mmio: dict[int, int] = {}

    def pio_read(self, port: int, size: int) -> int:
        return self.reads.get(port, (1 << (8 * size)) - 1)

    def pio_write(self, port: int, size: int, value: int) -> None:
        self.writes.append((port, size, value))

    def mmio_read(self, addr: int, size: int) -> int:
        return self.mmio.get(addr, 0)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        self.mmio[addr] = value


class Machine:
    def __init__(self, mode: int = 64) -> None:
        self.mode = mode
        self.mem = GuestMemory(MEM_SIZE)
        self.bus = Bus()
        self.cpu = Cpu(0, self.mem, self.bus)
        self.interp = Interpreter(self.cpu)
        self._placed: dict[str, int] = {}
        self._next_slot = SNIPPETS
        self.reset()

    def reset(self) -> None:
        """Registers for the mode (memory is left alone)."""
        st = self.cpu.state
        st.gpr[:] = [0] * 16
        st.rflags = 2
        st.halted = False
        st.interrupt_shadow = False
        st.cr4 = CR4_OSFXSR
        if self.mode == 16:
            st.cr0 = CR0_ET
            for i in range(6):
                st.seg[i] = Segment(selector=CODE >> 4, base=CODE, limit=0xFFFF, type=3 if i != CS else 0xB)
            st.seg[SS] = Segment(selector=0x7000, base=0x70000, limit=0xFFFF, type=3)
            st.gpr[4] = 0xFFFE
            st.rip = 0
            st.idtr.base, st.idtr.limit = 0, 0x3FF
            return
        self._write_gdt()
        data = Segment(selector=0x10, base=0, limit=0xFFFFFFFF, type=3, db=1, g=1)
        for i in (ES, SS, DS, FS, GS):
            st.seg[i] = data.copy()
        st.gdtr.base, st.gdtr.limit = GDT, 0x3F
        st.idtr.base, st.idtr.limit = IDT, 0xFFF
        if self.mode == 32:
            st.cr0 = CR0_ET | CR0_PE
            st.seg[CS] = Segment(selector=0x18, base=0, limit=0xFFFFFFFF, type=0xB, db=1, g=1)
            st.efer = 0
        else:
            self._write_page_tables()
            st.cr0 = CR0_ET | CR0_PE | CR0_PG
            st.cr4 |= CR4_PAE
            st.cr3 = PML4
            st.efer = EFER_LME | EFER_LMA
            st.seg[CS] = Segment(selector=0x8, base=0, limit=0xFFFFFFFF, type=0xB, l=1, g=1)
            self.cpu.mmu.flush()
        st.gpr[4] = STACK_TOP
        st.rip = CODE

    def _write_page_tables(self) -> None:
        m = self.mem
        m.write_u64(PML4, PDPT | 7)  # user-accessible, so tests can run at CPL 3
        m.write_u64(PDPT, PD | 7)
        for i in range(MEM_SIZE >> 21):
            m.write_u64(PD + 8 * i, (i << 21) | 0x87)

    def _write_gdt(self) -> None:
        m = self.mem
        m.write_u64(GDT, 0)
        m.write_u64(GDT + 0x08, 0x00AF9B000000FFFF)  # 64-bit code
        m.write_u64(GDT + 0x10, 0x00CF93000000FFFF)  # data
        m.write_u64(GDT + 0x18, 0x00CF9B000000FFFF)  # 32-bit code

    def load(self, source: str, at: int | None = None) -> int:
        """Assemble `source` for the mode and place it at CODE (or `at`); returns its address."""
        addr = CODE if at is None else at
        code = assemble(source, self.mode, addr if self.mode != 16 else addr - CODE)
        self.mem.write(addr, code)
        self.interp.flush_decode_cache()
        return addr

    def place(self, source: str) -> int:
        """Assemble `source` once into its own slot of the snippet area and return its address, so repeated runs
        reuse the decode cache (unlike `load`, which overwrites CODE)."""
        addr = self._placed.get(source)
        if addr is None:
            addr = self._next_slot
            code = assemble(source, self.mode, addr)
            self.mem.write(addr, code)
            self._next_slot = (addr + len(code) + 63) & ~63
            self._placed[source] = addr
        return addr

    def run(self, limit: int = 100_000) -> int:
        return self.interp.run(limit)

    @property
    def gpr(self) -> list[int]:
        return self.cpu.state.gpr
