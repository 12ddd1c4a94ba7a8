"""Paging and linear-address memory access for the software CPU (Intel SDM vol. 3A ch. 4).

Implemented:
- §4.1.1-4.1.2 paging modes: paging off (linear = physical, 32-bit wrap outside IA-32e mode), 32-bit paging
  (§4.3, with CR4.PSE 4-MiB pages and PSE-36 high address bits), PAE paging (§4.4, PDPTEs loaded into registers on
  CR3 load, §4.4.1), 4-level and 5-level paging (§4.5, 2-MiB and 1-GiB pages).
- §4.6 access rights: U/S and R/W combined over every level, CR0.WP for supervisor writes, execute-disable when
  EFER.NXE, SMEP and SMAP (explicit supervisor accesses honour RFLAGS.AC, implicit ones never do, §4.6.1).
- §4.7 page-fault error codes (P, W/R, U/S, RSVD, I/D) and CR2 (carried in `CpuException.cr2`).
- §4.8 accessed and dirty flags: A on every entry used, D on the leaf for writes, set only when the translation
  succeeds (as KVM's walker does, so lockstep comparisons agree) and written back as single bytes, so a
  concurrent update of the entry's other bytes by another vCPU is not lost.
- §4.10 TLBs: a software TLB caching successful translations together with their permission outcome; global
  pages (CR4.PGE and G) survive non-global flushes; INVLPG drops every cached piece of a large page.

Not implemented: protection keys (CR4.PKE, PKRU; PF_PK is never set), PCID tagging (every CR3 load may flush all
non-global entries, which the SDM allows), HLAT/shadow-stack pages, and the PAT/MTRR memory types (caching has no
effect on an interpreter).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from typing import TYPE_CHECKING

from popek.cpu.state import (
    AC,
    CR0_PG,
    CR0_WP,
    CR4_LA57,
    CR4_PAE,
    CR4_PGE,
    CR4_PKE,
    CR4_PKS,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_LMA,
    EFER_NXE,
    MSR_IA32_PKRS,
    PF_I,
    PF_P,
    PF_PK,
    PF_RSVD,
    PF_U,
    PF_W,
    CpuException,
    Vector,
)
from popek.memory import PAGE_SIZE

if TYPE_CHECKING:
    from popek.cpu.core import Cpu


class Access(IntEnum):
    """The kind of a memory access, as paging and segmentation distinguish them."""

    READ = 0
    WRITE = 1
    EXECUTE = 2


_READ, _WRITE, _EXECUTE = 0, 1, 2
# the privilege part of a TLB key: supervisor access with SMAP enforced (AC=0, or implicit), user access,
# explicit supervisor access with RFLAGS.AC=1 (SMAP waived). Separate keys keep the cached outcome exact.
_SUP, _USER, _SUP_AC = 0, 1, 2
_KINDS = tuple((a << 2) | p for a in (_READ, _WRITE, _EXECUTE) for p in (_SUP, _USER, _SUP_AC))
_LARGE_SHIFTS = (21, 22, 30)  # 2-MiB, 4-MiB and 1-GiB pages
_TLB_CAPACITY = 1 << 16  # entries before the TLB is emptied (a guest touching more pages just re-walks)

# paging-structure entry bits
_P, _RW, _US, _A, _D, _PS, _G = 1 << 0, 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 7, 1 << 8
_XD = 1 << 63
MASK32 = 0xFFFFFFFF


def _no_op(page: int) -> None:
    """The default code-write hook: nothing has been translated yet."""


class Mmu:
    """The paging unit and the memory port of one `Cpu`.

    The interpreter reaches memory only through `read`/`write` (and the `_bytes` variants) with linear addresses
    that `popek.cpu.segments.linear` produced; everything here is keyed off `cpu.state`, read at each access, so a
    state loaded from elsewhere (KVM, a snapshot) is honoured once `flush()` has dropped stale translations.
    """

    def __init__(self, cpu: Cpu) -> None:
        self.cpu = cpu
        self.mem = cpu.mem
        # key: (linear page number << 4) | (access << 2) | privilege kind → guest-physical page address
        self._tlb: dict[int, int] = {}
        self._global: set[int] = set()  # keys of entries for global pages
        self._large: dict[int, list[int]] = {}  # (region number << 6 | page shift) → keys of its 4-KiB pieces
        self.pdptes: list[int] | None = None  # PAE paging's four PDPTE registers (§4.4.1)
        self.code_pages: set[int] = set()  # guest-physical page numbers (gpa >> 12) holding decoded code
        self.on_code_write: Callable[[int], None] = _no_op
        self.tlb_hits = 0
        self.tlb_misses = 0
        self.walks = 0
        self.flushes = 0
        self.phys_bits = 46  # MAXPHYADDR: the address bits above it are reserved in paging entries
        # armed data breakpoints (DR7 R/W = 01 or 11, SDM vol. 3B §18.2.4): (first byte, last byte, DR number,
        # writes only); an access that overlaps one sets its B bit in `cpu.db_pending` (delivered as a trap)
        self.watch: tuple[tuple[int, int, int, bool], ...] = ()
        regions = list(self.mem.regions)
        # the fast path: guest-physical 0 up to the first region's end is one mmap (the layout always starts at 0)
        if regions and regions[0].gpa == 0:
            self._ram0 = regions[0].mapping
            self._ram0_end = regions[0].end
            self._dirty0 = regions[0].dirty
        else:  # pragma: no cover - GuestMemory always has RAM at 0
            self._ram0_end = 0

    # --- MAXPHYADDR ---

    @property
    def phys_bits(self) -> int:
        return self._phys_bits

    @phys_bits.setter
    def phys_bits(self, bits: int) -> None:
        """Set MAXPHYADDR (CPUID 0x80000008 EAX[7:0]) and the masks that depend on it."""
        self._phys_bits = bits
        self._addr_mask = ((1 << bits) - 1) & ~0xFFF  # address bits of an entry, for 4-KiB frames/tables
        self._rsvd_hi = ((1 << 52) - 1) & ~((1 << bits) - 1)  # bits 51:M of 64-bit entries
        self._rsvd_pae = ((1 << 63) - 1) & ~((1 << bits) - 1)  # bits 62:M of PAE PDEs/PTEs (SDM tables 4-8..4-11)
        self.flush()

    # --- TLB management ---

    def flush(self, global_too: bool = True) -> None:
        """Drop cached translations: all of them, or all but global pages (MOV CR3, task switch; SDM §4.10.4.1)."""
        self.flushes += 1
        if global_too or not self._global:
            self._tlb = {}
            self._global = set()
            self._large = {}
            return
        tlb = self._tlb
        keep = {k: tlb[k] for k in self._global if k in tlb}
        self._tlb = keep
        self._global = set(keep)
        self._large = {r: kept for r, keys in self._large.items() if (kept := [k for k in keys if k in keep])}

    def invlpg(self, linear: int) -> None:
        """INVLPG: drop every translation for the page holding `linear`, global or not, whatever its size."""
        if not self.cpu.state.efer & EFER_LMA:
            linear &= MASK32
        tlb, glob = self._tlb, self._global
        base = (linear >> 12) << 4
        for kind in _KINDS:
            key = base | kind
            if tlb.pop(key, None) is not None:
                glob.discard(key)
        for shift in _LARGE_SHIFTS:
            keys = self._large.pop(((linear >> shift) << 6) | shift, None)
            if keys:
                for key in keys:
                    tlb.pop(key, None)
                    glob.discard(key)

    def load_pdptes(self) -> None:
        """Load the four PAE PDPTE registers from CR3 (SDM §4.4.1): on MOV CR3 in PAE paging, and on CR0/CR4
        writes that enter PAE paging. A present PDPTE with a reserved bit set → #GP(0) at that instruction."""
        st = self.cpu.state
        base = st.cr3 & 0xFFFFFFE0
        entries = [self._phys_read(base + 8 * i, 8) for i in range(4)]
        # bits 2:1, 8:5 and 63:M are reserved in a present PDPTE (§4.4.1, table 4-8)
        rsvd = 0x1E6 | ~((1 << self._phys_bits) - 1) & ((1 << 64) - 1)
        for e in entries:
            if e & _P and e & rsvd:
                raise CpuException(Vector.GP, 0)
        self.pdptes = entries  # the caller flushes the TLB as the instruction requires

    def mark_code(self, phys_page: int) -> None:
        """Record that guest-physical page number `phys_page` (gpa >> 12) holds decoded code: a write to it
        calls `on_code_write(phys_page)` after the write, having first removed the page from `code_pages`
        (the translator marks it again when it decodes from it again)."""
        self.code_pages.add(phys_page)

    # --- translation ---

    def translate(self, linear: int, access: Access, user: bool, *, implicit: bool = False) -> int:
        """The guest-physical address of `linear` for `access`, or #PF.

        `user` is a user-mode access (CPL 3, not implicit); `implicit` marks the supervisor accesses the processor
        makes on its own (descriptor tables, IDT, TSS, the stack of an event delivery), to which SMAP applies
        whatever RFLAGS.AC says (SDM §4.6.1).
        """
        st = self.cpu.state
        if not st.efer & EFER_LMA:
            linear &= MASK32
        if not st.cr0 & CR0_PG:
            return linear
        priv = _USER if user else (_SUP if implicit or not st.rflags & AC else _SUP_AC)
        key = ((linear >> 12) << 4) | (access << 2) | priv
        page = self._tlb.get(key)
        if page is None:
            page = self._fill(linear, access, user, priv, key)
        else:
            self.tlb_hits += 1
        return page | (linear & 0xFFF)

    def _fill(self, linear: int, access: int, user: bool, priv: int, key: int) -> int:
        """A TLB miss: walk, check, set A/D, cache. Returns the physical page address."""
        self.tlb_misses += 1
        page, is_global, shift = self._walk(linear, access, user, priv != _SUP_AC)
        tlb = self._tlb
        if len(tlb) >= _TLB_CAPACITY:
            self.flush()
            tlb = self._tlb
        tlb[key] = page
        if is_global:
            self._global.add(key)
        if shift > 12:
            self._large.setdefault(((linear >> shift) << 6) | shift, []).append(key)
        return page

    def _fault(
        self, linear: int, access: int, user: bool, present: bool, rsvd: bool = False, pk: bool = False
    ) -> CpuException:
        """The #PF for an access to `linear`, with its error code (SDM §4.7)."""
        st = self.cpu.state
        code = (PF_P if present else 0) | (PF_RSVD if rsvd else 0) | (PF_PK if pk else 0)
        if access == _WRITE:
            code |= PF_W
        if user:
            code |= PF_U
        if access == _EXECUTE and (st.cr4 & CR4_SMEP or (st.cr4 & CR4_PAE and st.efer & EFER_NXE)):
            code |= PF_I
        return CpuException(Vector.PF, code, cr2=linear)

    def _walk(self, linear: int, access: int, user: bool, smap_strict: bool) -> tuple[int, bool, int]:
        """Walk the paging structures for `linear`: (4-KiB physical frame, global, page shift), or #PF.

        `smap_strict` is False only for an explicit supervisor access with RFLAGS.AC set.
        """
        self.walks += 1
        st = self.cpu.state
        cr4, efer = st.cr4, st.efer
        nxe = efer & EFER_NXE
        used: list[tuple[int, int, int]] = []  # (entry address, entry, entry size) of every entry used
        us = rw = 1
        xd = 0
        if efer & EFER_LMA:
            rsvd = self._rsvd_hi | (0 if nxe else _XD)
            table = st.cr3 & self._addr_mask
            level = 5 if cr4 & CR4_LA57 else 4
            while True:
                shift = 12 + 9 * (level - 1)
                addr = table + ((linear >> shift) & 0x1FF) * 8
                e = self._phys_read(addr, 8)
                if not e & _P:
                    raise self._fault(linear, access, user, False)
                ps = e & _PS
                if e & rsvd or (ps and (level >= 4 or e & ((1 << shift) - 1) & ~0x1FFF)):
                    # PS is reserved in PML5E/PML4E; a large page's address bits below its size (except PAT, 12)
                    raise self._fault(linear, access, user, True, rsvd=True)
                used.append((addr, e, 8))
                us &= e >> 2
                rw &= e >> 1
                xd |= e >> 63
                if level == 1 or ps:
                    break
                table = e & self._addr_mask
                level -= 1
            size_mask = (1 << shift) - 1
            frame = (e & self._addr_mask & ~size_mask) | (linear & size_mask & ~0xFFF)
        elif cr4 & CR4_PAE:
            pdptes = self.pdptes
            if pdptes is None:  # state loaded without a CR3 write: take the PDPTEs as they are in memory
                base = st.cr3 & 0xFFFFFFE0
                pdptes = self.pdptes = [self._phys_read(base + 8 * i, 8) for i in range(4)]
            pdpte = pdptes[(linear >> 30) & 3]
            if not pdpte & _P:
                raise self._fault(linear, access, user, False)
            rsvd = self._rsvd_pae | (0 if nxe else _XD)
            table = pdpte & self._addr_mask
            shift = 21
            while True:
                addr = table + ((linear >> shift) & 0x1FF) * 8
                e = self._phys_read(addr, 8)
                if not e & _P:
                    raise self._fault(linear, access, user, False)
                ps = shift == 21 and e & _PS
                if e & rsvd or (ps and e & 0x1FE000):
                    raise self._fault(linear, access, user, True, rsvd=True)
                used.append((addr, e, 8))
                us &= e >> 2
                rw &= e >> 1
                xd |= e >> 63
                if shift == 12 or ps:
                    break
                table = e & self._addr_mask
                shift = 12
            size_mask = (1 << shift) - 1
            frame = (e & self._addr_mask & ~size_mask) | (linear & size_mask & ~0xFFF)
        else:
            addr = (st.cr3 & 0xFFFFF000) + ((linear >> 22) & 0x3FF) * 4
            e = self._phys_read(addr, 4)
            if not e & _P:
                raise self._fault(linear, access, user, False)
            if e & _PS and cr4 & CR4_PSE:
                # 4-MiB page: bits 20:13 are physical address bits 39:32 up to MAXPHYADDR (PSE-36), bit 21 reserved
                high_bits = min(self._phys_bits, 40) - 32
                if e & (1 << 21) or (e >> 13) & 0xFF & ~((1 << high_bits) - 1):
                    raise self._fault(linear, access, user, True, rsvd=True)
                used.append((addr, e, 4))
                us, rw = (e >> 2) & 1, (e >> 1) & 1
                shift = 22
                frame = (e & 0xFFC00000) | (((e >> 13) & 0xFF) << 32) | (linear & 0x3FF000)
            else:
                used.append((addr, e, 4))
                us, rw = (e >> 2) & 1, (e >> 1) & 1
                addr = (e & 0xFFFFF000) + ((linear >> 12) & 0x3FF) * 4
                e = self._phys_read(addr, 4)
                if not e & _P:
                    raise self._fault(linear, access, user, False)
                used.append((addr, e, 4))
                us &= e >> 2
                rw &= e >> 1
                shift = 12
                frame = e & 0xFFFFF000
        us &= 1
        rw &= 1
        # access rights (SDM §4.6)
        if access == _EXECUTE:
            if xd & 1 and nxe:
                raise self._fault(linear, access, user, True)
            if (not us) if user else (us and cr4 & CR4_SMEP):
                raise self._fault(linear, access, user, True)
        elif user:
            if not us or (access == _WRITE and not rw):
                raise self._fault(linear, access, user, True)
        else:
            if us and cr4 & CR4_SMAP and smap_strict:
                raise self._fault(linear, access, user, True)
            if access == _WRITE and not rw and st.cr0 & CR0_WP:
                raise self._fault(linear, access, user, True)
        if efer & EFER_LMA and access != _EXECUTE and cr4 & (CR4_PKE | CR4_PKS):
            self._check_key(linear, access, user, e, bool(us))
        # accessed and dirty flags (SDM §4.8)
        last = len(used) - 1
        for i, (addr, e, _size) in enumerate(used):
            new = e | _A
            if i == last and access == _WRITE:
                new |= _D
            if new != e:
                self._phys_write(addr, 1, new & 0xFF)
        return frame, bool(e & _G and cr4 & CR4_PGE), shift

    def _check_key(self, linear: int, access: int, user: bool, leaf: int, user_page: bool) -> None:
        """Protection keys (SDM §4.6.2), IA-32e paging only: the leaf entry's bits 62:59 pick a key whose
        access-disable bit forbids every data access and whose write-disable bit forbids writes (from
        supervisor mode only with CR0.WP) — PKRU's for user pages (CR4.PKE), IA32_PKRS's for supervisor pages
        (CR4.PKS). Instruction fetches are not checked. The rights are read when the TLB entry is filled, so
        WRPKRU and writes of IA32_PKRS flush the TLB."""
        st = self.cpu.state
        if user_page:
            if not st.cr4 & CR4_PKE:
                return
            rights = st.pkru
        else:
            if not st.cr4 & CR4_PKS:
                return
            rights = st.msrs.get(MSR_IA32_PKRS, 0)
        shift = 2 * ((leaf >> 59) & 0xF)
        ad, wd = rights >> shift & 1, rights >> (shift + 1) & 1
        if ad or (access == _WRITE and wd and (user or st.cr0 & CR0_WP)):
            raise self._fault(linear, access, user, True, pk=True)

    # --- physical access ---

    def _phys_read(self, addr: int, size: int) -> int:
        """A little-endian read of guest-physical memory: RAM, or MMIO split into naturally aligned pieces."""
        if addr + size <= self._ram0_end:
            return int.from_bytes(self._ram0[addr : addr + size], "little")
        if self.mem.contains(addr, size):
            return int.from_bytes(self.mem.read(addr, size), "little")
        value = 0
        for piece_addr, piece_size in _pieces(addr, size):
            value |= (self.cpu.bus.mmio_read(piece_addr, piece_size) & ((1 << (8 * piece_size)) - 1)) << (
                8 * (piece_addr - addr)
            )
        return value

    def _phys_write(self, addr: int, size: int, value: int) -> None:
        """A little-endian write of guest-physical memory (RAM marks the page dirty and runs the code hook)."""
        value &= (1 << (8 * size)) - 1
        if addr + size <= self._ram0_end:
            self._ram0[addr : addr + size] = value.to_bytes(size, "little")
            page = addr >> 12
            self._dirty0[page >> 3] |= 1 << (page & 7)
        elif self.mem.contains(addr, size):
            self.mem.write(addr, value.to_bytes(size, "little"))
        else:
            for piece_addr, piece_size in _pieces(addr, size):
                self.cpu.bus.mmio_write(
                    piece_addr, piece_size, (value >> (8 * (piece_addr - addr))) & ((1 << (8 * piece_size)) - 1)
                )
            return
        if self.code_pages:
            page = addr >> 12
            if page in self.code_pages:
                self.code_pages.discard(page)
                self.on_code_write(page)

    def read_phys(self, addr: int, size: int) -> int:
        """Read `size` bytes of guest-physical memory (any size; MMIO split into naturally aligned pieces)."""
        if (addr & 0xFFF) + size > PAGE_SIZE:
            first = PAGE_SIZE - (addr & 0xFFF)
            return self.read_phys(addr, first) | (self.read_phys(addr + first, size - first) << (8 * first))
        return self._phys_read(addr, size)

    def write_phys(self, addr: int, size: int, value: int) -> None:
        """Write `size` bytes of guest-physical memory."""
        if (addr & 0xFFF) + size > PAGE_SIZE:
            first = PAGE_SIZE - (addr & 0xFFF)
            self.write_phys(addr, first, value)
            self.write_phys(addr + first, size - first, value >> (8 * first))
            return
        self._phys_write(addr, size, value)

    # --- linear access (what the interpreter uses) ---

    def read(
        self, linear: int, size: int, access: Access = Access.READ, user: bool | None = None, *, implicit: bool = False
    ) -> int:
        """Read `size` bytes at `linear` as a little-endian int. `user=None`: a user access iff CPL is 3."""
        st = self.cpu.state
        if user is None:
            user = st.cpl == 3 and not implicit
        if not st.efer & EFER_LMA:
            linear &= MASK32
        if self.watch and access != _EXECUTE:
            self._watched(linear, size, False)
        off = linear & 0xFFF
        if off + size > PAGE_SIZE:
            return int.from_bytes(self._read_split(linear, size, access, user, implicit), "little")
        if st.cr0 & CR0_PG:
            priv = _USER if user else (_SUP if implicit or not st.rflags & AC else _SUP_AC)
            key = ((linear >> 12) << 4) | (access << 2) | priv
            page = self._tlb.get(key)
            if page is None:
                page = self._fill(linear, access, user, priv, key)
            else:
                self.tlb_hits += 1
            phys = page | off
        else:
            phys = linear
        if phys + size <= self._ram0_end:
            return int.from_bytes(self._ram0[phys : phys + size], "little")
        return self._phys_read(phys, size)

    def write(self, linear: int, size: int, value: int, user: bool | None = None, *, implicit: bool = False) -> None:
        """Write the low `size` bytes of `value` at `linear`; nothing is written unless every byte translates."""
        st = self.cpu.state
        if user is None:
            user = st.cpl == 3 and not implicit
        if not st.efer & EFER_LMA:
            linear &= MASK32
        if self.watch:
            self._watched(linear, size, True)
        off = linear & 0xFFF
        if off + size > PAGE_SIZE:
            self._write_split(linear, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"), user, implicit)
            return
        if st.cr0 & CR0_PG:
            priv = _USER if user else (_SUP if implicit or not st.rflags & AC else _SUP_AC)
            key = ((linear >> 12) << 4) | (_WRITE << 2) | priv
            page = self._tlb.get(key)
            if page is None:
                page = self._fill(linear, _WRITE, user, priv, key)
            else:
                self.tlb_hits += 1
            phys = page | off
        else:
            phys = linear
        if phys + size <= self._ram0_end and not self.code_pages:
            self._ram0[phys : phys + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            page = phys >> 12
            self._dirty0[page >> 3] |= 1 << (page & 7)
            return
        self._phys_write(phys, size, value)

    def read_bytes(
        self, linear: int, n: int, access: Access = Access.READ, user: bool | None = None, *, implicit: bool = False
    ) -> bytes:
        """Read `n` bytes at `linear` (an instruction fetch passes Access.EXECUTE)."""
        st = self.cpu.state
        if user is None:
            user = st.cpl == 3 and not implicit
        if not st.efer & EFER_LMA:
            linear &= MASK32
        if self.watch and access != _EXECUTE:
            self._watched(linear, n, False)
        if (linear & 0xFFF) + n > PAGE_SIZE:
            return self._read_split(linear, n, access, user, implicit)
        phys = self.translate(linear, access, user, implicit=implicit)
        if phys + n <= self._ram0_end:
            return self._ram0[phys : phys + n]
        return self._phys_read(phys, n).to_bytes(n, "little")

    def write_bytes(
        self, linear: int, data: bytes | bytearray, user: bool | None = None, *, implicit: bool = False
    ) -> None:
        """Write `data` at `linear`; every page it touches is translated before any byte is written."""
        st = self.cpu.state
        if user is None:
            user = st.cpl == 3 and not implicit
        if not st.efer & EFER_LMA:
            linear &= MASK32
        if self.watch:
            self._watched(linear, len(data), True)
        if (linear & 0xFFF) + len(data) > PAGE_SIZE:
            self._write_split(linear, bytes(data), user, implicit)
            return
        phys = self.translate(linear, Access.WRITE, user, implicit=implicit)
        self._phys_write(phys, len(data), int.from_bytes(data, "little"))

    def _watched(self, linear: int, size: int, write: bool) -> None:
        last = linear + size - 1
        for first, end, n, writes_only in self.watch:
            if first <= last and linear <= end and (write or not writes_only):
                self.cpu.db_pending |= 1 << n

    def _chunks(self, linear: int, n: int, access: Access, user: bool, implicit: bool) -> list[tuple[int, int]]:
        """(physical address, length) of each page-sized piece of an access, all translated first."""
        mask = (1 << 64) - 1 if self.cpu.state.efer & EFER_LMA else MASK32
        out = []
        while n:
            length = min(n, PAGE_SIZE - (linear & 0xFFF))
            out.append((self.translate(linear, access, user, implicit=implicit), length))
            linear = (linear + length) & mask
            n -= length
        return out

    def _read_split(self, linear: int, n: int, access: Access, user: bool, implicit: bool) -> bytes:
        chunks = self._chunks(linear, n, access, user, implicit)
        return b"".join(self._phys_read(phys, length).to_bytes(length, "little") for phys, length in chunks)

    def _write_split(self, linear: int, data: bytes, user: bool, implicit: bool) -> None:
        chunks = self._chunks(linear, len(data), Access.WRITE, user, implicit)
        pos = 0
        for phys, length in chunks:
            self._phys_write(phys, length, int.from_bytes(data[pos : pos + length], "little"))
            pos += length


def _pieces(addr: int, size: int) -> list[tuple[int, int]]:
    """Split an MMIO access into naturally aligned 1/2/4/8-byte pieces, as the bus sees a processor's cycles."""
    if size in (1, 2, 4, 8) and not addr & (size - 1):
        return [(addr, size)]
    out = []
    while size:
        piece = 8
        while piece > size or addr & (piece - 1):
            piece >>= 1
        out.append((addr, piece))
        addr += piece
        size -= piece
    return out
