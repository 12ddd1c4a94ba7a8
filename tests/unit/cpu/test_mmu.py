"""The software MMU against hand-built page tables: walks in every paging mode, access rights and #PF error
codes, accessed/dirty flags, the TLB and its invalidation, page-crossing and MMIO accesses."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from popek.cpu.core import Cpu
from popek.cpu.mmu import Access
from popek.cpu.state import (
    AC,
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_PAE,
    CR4_PGE,
    CR4_PSE,
    CR4_SMAP,
    CR4_SMEP,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    PF_I,
    PF_P,
    PF_RSVD,
    PF_U,
    PF_W,
    CpuException,
    Vector,
)
from popek.memory import GuestMemory

P, RW, US, A, D, PS, G = 1, 2, 4, 0x20, 0x40, 0x80, 0x100
NX = 1 << 63
MMIO = 0xFEC00000


class FakeBus:
    """Records MMIO cycles; reads return a pattern derived from the address."""

    def __init__(self) -> None:
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int, int]] = []

    def mmio_read(self, addr: int, size: int) -> int:
        self.reads.append((addr, size))
        return int.from_bytes(bytes((addr + i) & 0xFF for i in range(size)), "little")

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        self.writes.append((addr, size, value))

    def pio_read(self, port: int, size: int) -> int:
        return 0

    def pio_write(self, port: int, size: int, value: int) -> None:
        pass


@pytest.fixture
def cpu() -> Iterator[Cpu]:
    with GuestMemory(16 << 20) as mem:
        yield Cpu(0, mem, FakeBus())


def bus(cpu: Cpu) -> FakeBus:
    assert isinstance(cpu.bus, FakeBus)
    return cpu.bus


def fault(fn: object, *args: object, **kwargs: object) -> CpuException:
    with pytest.raises(CpuException) as info:
        fn(*args, **kwargs)  # type: ignore[operator]
    assert info.value.vector == Vector.PF
    return info.value


def paging32(cpu: Cpu, pse: bool = False) -> None:
    st = cpu.state
    st.cr0 = CR0_PE | CR0_PG
    st.cr3 = 0x10000
    st.cr4 = CR4_PSE if pse else 0
    cpu.mmu.flush()


def map32(cpu: Cpu, linear: int, frame: int, flags: int = P | RW | US, pde_flags: int = P | RW | US) -> None:
    """Map a 4-KiB page with 32-bit paging (page directory at 0x10000, tables from 0x11000)."""
    mem = cpu.mem
    pde_addr = 0x10000 + (linear >> 22) * 4
    pde = mem.read_u32(pde_addr)
    table = pde & ~0xFFF if pde & P else 0x11000 + (linear >> 22) * 0x1000
    mem.write_u32(pde_addr, table | pde_flags)
    mem.write_u32(table + ((linear >> 12) & 0x3FF) * 4, frame | flags)


def long_mode(cpu: Cpu) -> None:
    st = cpu.state
    st.cr0 = CR0_PE | CR0_PG | CR0_WP
    st.cr4 = CR4_PAE
    st.efer = EFER_LME | EFER_LMA | EFER_NXE
    st.cr3 = 0x20000
    cpu.mmu.flush()


def map64(cpu: Cpu, linear: int, frame: int, flags: int = P | RW | US, level: int = 1, upper: int = P | RW | US) -> int:
    """Map `linear` with 4-level paging (PML4 at 0x20000, tables allocated from 0x21000 per slot): a 4-KiB page
    (level 1), a 2-MiB page (level 2) or a 1-GiB page (level 3). Returns the leaf entry's address."""
    mem = cpu.mem
    table = 0x20000
    for lvl in (4, 3, 2, 1):
        shift = 12 + 9 * (lvl - 1)
        addr = table + ((linear >> shift) & 0x1FF) * 8
        if lvl == level:
            mem.write_u64(addr, frame | flags | (PS if level > 1 else 0))
            return addr
        e = mem.read_u64(addr)
        if not e & P:
            fresh = mem.read_u32(0x1F000) or 0x100000  # a bump allocator kept in scratch guest memory
            mem.write_u32(0x1F000, fresh + 0x1000)
            e = fresh | upper
            mem.write_u64(addr, e)
        table = e & 0xFFFFFFFFF000
    raise AssertionError


# --- paging off ---


def test_paging_off_is_identity_with_32_bit_wrap(cpu: Cpu) -> None:
    cpu.mem.write_u32(0x1000, 0xCAFEF00D)
    assert cpu.mmu.translate(0x1_0000_1000, Access.READ, False) == 0x1000
    assert cpu.mmu.read(0x1_0000_1000, 4) == 0xCAFEF00D
    cpu.mmu.write(0x2000, 2, 0x1234_5678)  # only the low two bytes
    assert cpu.mem.read_u32(0x2000) == 0x5678
    assert cpu.mmu.tlb_hits == cpu.mmu.tlb_misses == cpu.mmu.walks == 0


def test_physical_helpers_cross_pages(cpu: Cpu) -> None:
    cpu.mmu.write_phys(0xFFE, 4, 0xA1B2C3D4)
    assert cpu.mem.read_u32(0xFFE) == 0xA1B2C3D4
    assert cpu.mmu.read_phys(0xFFE, 4) == 0xA1B2C3D4


# --- 32-bit paging ---


def test_32bit_walk_sets_accessed_then_dirty(cpu: Cpu) -> None:
    paging32(cpu)
    map32(cpu, 0x5000, 0x200000)
    cpu.mem.write_u32(0x200123, 0x11223344)
    assert cpu.mmu.read(0x5123, 4, user=False) == 0x11223344
    pde, pte = cpu.mem.read_u32(0x10000), cpu.mem.read_u32(0x11000 + 5 * 4)
    assert pde & A and pte & A and not pte & D
    cpu.mmu.write(0x5123, 4, 0x55667788, user=False)
    assert cpu.mem.read_u32(0x11000 + 5 * 4) & D
    assert not cpu.mem.read_u32(0x10000) & D  # D only on the leaf
    assert cpu.mem.read_u32(0x200123) == 0x55667788


def test_32bit_4mib_page_and_pse36(cpu: Cpu) -> None:
    paging32(cpu, pse=True)
    cpu.mem.write_u32(0x10000 + 1 * 4, 0x800000 | PS | P | RW)
    assert cpu.mmu.translate(0x412345, Access.READ, False) == 0x812345
    # bits 20:13 of a 4-MiB PDE are physical address bits 39:32
    cpu.mem.write_u32(0x10000 + 2 * 4, 0x400000 | (0x3 << 13) | PS | P | RW)
    assert cpu.mmu.translate(0x800010, Access.READ, False) == 0x3_0040_0010
    # bit 21 is reserved
    cpu.mem.write_u32(0x10000 + 3 * 4, 0x400000 | (1 << 21) | PS | P)
    exc = fault(cpu.mmu.translate, 0xC00000, Access.READ, False)
    assert exc.error_code == PF_P | PF_RSVD


def test_32bit_ps_is_ignored_without_cr4_pse(cpu: Cpu) -> None:
    paging32(cpu, pse=False)
    map32(cpu, 0x0, 0x300000)
    cpu.mem.write_u32(0x10000, cpu.mem.read_u32(0x10000) | PS)
    assert cpu.mmu.translate(0x0, Access.READ, False) == 0x300000


def test_not_present_faults_and_cr2(cpu: Cpu) -> None:
    paging32(cpu)
    exc = fault(cpu.mmu.read, 0x7000_0010, 4, user=True)
    assert exc.error_code == PF_U and exc.cr2 == 0x7000_0010
    exc = fault(cpu.mmu.write, 0x7000_0010, 4, 1, user=False)
    assert exc.error_code == PF_W
    # 32-bit paging has no execute-disable: the I bit only with SMEP
    exc = fault(cpu.mmu.read, 0x7000_0010, 1, Access.EXECUTE, user=False)
    assert exc.error_code == 0
    cpu.state.cr4 |= CR4_SMEP
    cpu.mmu.flush()
    exc = fault(cpu.mmu.read, 0x7000_0010, 1, Access.EXECUTE, user=False)
    assert exc.error_code == PF_I


def test_user_supervisor_and_read_write_rights(cpu: Cpu) -> None:
    paging32(cpu)
    map32(cpu, 0x1000, 0x200000, P | RW)  # supervisor page
    map32(cpu, 0x2000, 0x201000, P | US)  # user, read-only
    assert fault(cpu.mmu.read, 0x1000, 4, user=True).error_code == PF_P | PF_U
    assert fault(cpu.mmu.write, 0x2000, 4, 0, user=True).error_code == PF_P | PF_W | PF_U
    assert cpu.mmu.read(0x2000, 4, user=True) == 0
    # supervisor writes to a read-only page succeed unless CR0.WP
    cpu.mmu.write(0x2000, 4, 7, user=False)
    cpu.state.cr0 |= CR0_WP
    cpu.mmu.flush()
    exc = fault(cpu.mmu.write, 0x2004, 4, 7, user=False)
    assert exc.error_code == PF_P | PF_W and exc.cr2 == 0x2004


def test_user_bit_must_be_set_at_every_level(cpu: Cpu) -> None:
    paging32(cpu)
    map32(cpu, 0x3000, 0x202000, P | RW | US, pde_flags=P | RW)
    assert fault(cpu.mmu.read, 0x3000, 4, user=True).error_code == PF_P | PF_U


def test_user_follows_cpl_by_default(cpu: Cpu) -> None:
    paging32(cpu)
    map32(cpu, 0x1000, 0x200000, P | RW)
    cpu.mmu.read(0x1000, 4)  # CPL 0
    cpu.state.seg[2].dpl = 3  # SS.DPL is the CPL
    assert fault(cpu.mmu.read, 0x1000, 4).error_code == PF_P | PF_U
    cpu.mmu.read(0x1000, 4, implicit=True)  # descriptor-table style accesses are supervisor accesses


# --- PAE paging ---


def pae(cpu: Cpu, nxe: bool = True) -> None:
    st = cpu.state
    st.cr0 = CR0_PE | CR0_PG
    st.cr4 = CR4_PAE
    st.efer = EFER_NXE if nxe else 0
    st.cr3 = 0x30000
    mem = cpu.mem
    mem.write_u64(0x30000, 0x31000 | P)  # PDPTE 0 → PD at 0x31000
    mem.write_u64(0x31000, 0x32000 | P | RW | US)  # PDE 0 → PT at 0x32000
    mem.write_u64(0x32000 + 8 * 4, 0x400000 | P | RW | US)  # 0x4000 → 0x400000
    mem.write_u64(0x32000 + 8 * 5, 0x401000 | P | RW | US | NX)  # 0x5000 → 0x401000, no execute
    mem.write_u64(0x31000 + 8 * 1, 0x600000 | PS | P | RW | US)  # 0x200000 → 2-MiB page at 0x600000
    cpu.mmu.load_pdptes()
    cpu.mmu.flush()


def test_pae_walks_4k_and_2m_pages(cpu: Cpu) -> None:
    pae(cpu)
    assert cpu.mmu.translate(0x4ABC, Access.READ, True) == 0x400ABC
    assert cpu.mmu.translate(0x2ABCDE, Access.WRITE, True) == 0x6ABCDE
    assert cpu.mem.read_u64(0x31000 + 8) & (A | D) == A | D
    assert not cpu.mem.read_u64(0x30000) & A  # PDPTEs are registers: no accessed flag


def test_pae_execute_disable(cpu: Cpu) -> None:
    pae(cpu)
    assert cpu.mmu.translate(0x5000, Access.READ, True) == 0x401000
    exc = fault(cpu.mmu.read_bytes, 0x5000, 4, Access.EXECUTE, user=True)
    assert exc.error_code == PF_P | PF_U | PF_I
    # without EFER.NXE bit 63 is reserved
    cpu.state.efer = 0
    cpu.mmu.flush()
    assert fault(cpu.mmu.read, 0x5000, 1).error_code == PF_P | PF_RSVD


def test_pae_reserved_pdpte_is_gp_at_load(cpu: Cpu) -> None:
    pae(cpu)
    cpu.mem.write_u64(0x30008, 0x33000 | P | RW)  # R/W is reserved in a PDPTE
    with pytest.raises(CpuException) as info:
        cpu.mmu.load_pdptes()
    assert info.value.vector == Vector.GP and info.value.error_code == 0


def test_pae_pdptes_are_cached_until_reloaded(cpu: Cpu) -> None:
    pae(cpu)
    cpu.mem.write_u64(0x30000, 0)  # not seen: the PDPTE registers hold the old value
    cpu.mmu.flush()
    assert cpu.mmu.translate(0x4000, Access.READ, False) == 0x400000
    cpu.mmu.load_pdptes()
    cpu.mmu.flush()
    assert fault(cpu.mmu.translate, 0x4000, Access.READ, False).error_code == 0


def test_pae_2m_page_reserved_bits(cpu: Cpu) -> None:
    pae(cpu)
    cpu.mem.write_u64(0x31000 + 8 * 2, 0x800000 | (1 << 13) | PS | P)
    assert fault(cpu.mmu.translate, 0x400000, Access.READ, False).error_code == PF_P | PF_RSVD


# --- 4-level paging ---


def test_4level_4k_2m_1g(cpu: Cpu) -> None:
    long_mode(cpu)
    map64(cpu, 0x7FFF_0000_1000, 0x500000)
    map64(cpu, 0x4000_0000, 0xA00000, level=2)
    map64(cpu, 0xFFFF_8000_4000_0000, 0x4000_0000, level=3)
    assert cpu.mmu.translate(0x7FFF_0000_1234, Access.READ, True) == 0x500234
    assert cpu.mmu.translate(0x4012_3456, Access.READ, True) == 0xB23456
    assert cpu.mmu.translate(0xFFFF_8000_7654_3210, Access.READ, True) == 0x7654_3210
    cpu.mem.write_u64(0x500238, 0x0102030405060708)
    assert cpu.mmu.read(0x7FFF_0000_1238, 8) == 0x0102030405060708


def test_4level_reserved_bits(cpu: Cpu) -> None:
    long_mode(cpu)
    leaf = map64(cpu, 0x1000, 0x500000)
    cpu.mem.write_u64(leaf, 0x500000 | (1 << 50) | P)  # above MAXPHYADDR (46)
    assert fault(cpu.mmu.translate, 0x1000, Access.WRITE, True).error_code == PF_P | PF_RSVD | PF_W | PF_U
    cpu.mem.write_u64(0x20000, cpu.mem.read_u64(0x20000) | PS)  # PS is reserved in a PML4E
    cpu.mmu.flush()
    assert fault(cpu.mmu.translate, 0x1000, Access.READ, False).error_code == PF_P | PF_RSVD
    cpu.mem.write_u64(0x20000, cpu.mem.read_u64(0x20000) & ~PS)
    map64(cpu, 0x8000_0000, 0x4000_0000 | (1 << 20), level=3)  # 1-GiB page: bits 29:13 reserved
    cpu.mmu.flush()
    assert fault(cpu.mmu.translate, 0x8000_0000, Access.READ, False).error_code == PF_P | PF_RSVD


def test_4level_nx_smep_smap(cpu: Cpu) -> None:
    long_mode(cpu)
    map64(cpu, 0x1000, 0x500000, P | RW | US)  # user page
    map64(cpu, 0xFFFF_8000_0000_0000, 0x501000, P | RW | NX)  # supervisor, no execute
    assert fault(cpu.mmu.translate, 0xFFFF_8000_0000_0000, Access.EXECUTE, False).error_code == PF_P | PF_I
    assert cpu.mmu.translate(0x1000, Access.EXECUTE, False) == 0x500000  # no SMEP yet
    st = cpu.state
    st.cr4 |= CR4_SMEP | CR4_SMAP
    cpu.mmu.flush()
    assert fault(cpu.mmu.translate, 0x1000, Access.EXECUTE, False).error_code == PF_P | PF_I
    assert fault(cpu.mmu.read, 0x1000, 4, user=False).error_code == PF_P
    assert fault(cpu.mmu.write, 0x1000, 4, 0, user=False).error_code == PF_P | PF_W
    st.rflags |= AC  # STAC: explicit supervisor accesses may touch user pages...
    assert cpu.mmu.read(0x1000, 4, user=False) == 0
    cpu.mmu.write(0x1000, 4, 5, user=False)
    # ...but implicit ones never may (SDM §4.6.1)
    assert fault(cpu.mmu.read, 0x1000, 4, user=False, implicit=True).error_code == PF_P
    st.rflags &= ~AC
    assert fault(cpu.mmu.read, 0x1000, 4, user=False).error_code == PF_P  # the AC=1 entry is not reused
    assert cpu.mmu.read(0x1000, 4, user=True) == 5


def test_5level_walk(cpu: Cpu) -> None:
    from popek.cpu.state import CR4_LA57

    long_mode(cpu)
    cpu.state.cr4 |= CR4_LA57
    cpu.state.cr3 = 0x40000
    cpu.mem.write_u64(0x40000 + 8 * 1, 0x20000 | P | RW | US)  # PML5[1] → the 4-level tree at 0x20000
    map64(cpu, 0x1000, 0x500000)
    cpu.mmu.flush()
    assert cpu.mmu.translate((1 << 48) | 0x1010, Access.READ, True) == 0x500010


# --- the TLB ---


def test_tlb_caches_until_invlpg_or_flush(cpu: Cpu) -> None:
    long_mode(cpu)
    leaf = map64(cpu, 0x1000, 0x500000)
    mmu = cpu.mmu
    assert mmu.translate(0x1000, Access.READ, False) == 0x500000
    assert (mmu.walks, mmu.tlb_misses, mmu.tlb_hits) == (1, 1, 0)
    assert mmu.translate(0x1FFF, Access.READ, False) == 0x500FFF
    assert (mmu.walks, mmu.tlb_hits) == (1, 1)
    cpu.mem.write_u64(leaf, 0x600000 | P | RW | US)
    assert mmu.translate(0x1000, Access.READ, False) == 0x500000  # stale until invalidated
    mmu.invlpg(0x1234)
    assert mmu.translate(0x1000, Access.READ, False) == 0x600000
    cpu.mem.write_u64(leaf, 0x700000 | P | RW | US)
    mmu.flush(global_too=False)
    assert mmu.translate(0x1000, Access.READ, False) == 0x700000
    cpu.mem.write_u64(leaf, 0)
    assert mmu.translate(0x1000, Access.READ, False) == 0x700000
    mmu.flush()
    assert fault(mmu.translate, 0x1000, Access.READ, False).error_code == 0
    assert mmu.flushes >= 2


def test_global_pages_survive_non_global_flush(cpu: Cpu) -> None:
    long_mode(cpu)
    cpu.state.cr4 |= CR4_PGE
    g = map64(cpu, 0x1000, 0x500000, P | RW | G)
    n = map64(cpu, 0x2000, 0x501000, P | RW)
    mmu = cpu.mmu
    mmu.translate(0x1000, Access.READ, False)
    mmu.translate(0x2000, Access.READ, False)
    cpu.mem.write_u64(g, 0x600000 | P | RW | G)
    cpu.mem.write_u64(n, 0x601000 | P | RW)
    mmu.flush(global_too=False)  # MOV CR3
    assert mmu.translate(0x1000, Access.READ, False) == 0x500000
    assert mmu.translate(0x2000, Access.READ, False) == 0x601000
    mmu.invlpg(0x1000)  # INVLPG drops global entries too
    assert mmu.translate(0x1000, Access.READ, False) == 0x600000
    cpu.mem.write_u64(g, 0x700000 | P | RW | G)
    mmu.flush(global_too=True)
    assert mmu.translate(0x1000, Access.READ, False) == 0x700000


def test_invlpg_drops_every_piece_of_a_large_page(cpu: Cpu) -> None:
    long_mode(cpu)
    leaf = map64(cpu, 0x20_0000, 0x40_0000, level=2)
    mmu = cpu.mmu
    assert mmu.translate(0x20_0000, Access.READ, False) == 0x40_0000
    assert mmu.translate(0x3F_F000, Access.READ, False) == 0x5F_F000
    cpu.mem.write_u64(leaf, 0x80_0000 | PS | P | RW)
    mmu.invlpg(0x30_0000)  # any address inside the 2-MiB page
    assert mmu.translate(0x20_0000, Access.READ, False) == 0x80_0000
    assert mmu.translate(0x3F_F000, Access.READ, False) == 0x9F_F000


def test_a_cached_read_does_not_allow_a_write_without_dirty(cpu: Cpu) -> None:
    long_mode(cpu)
    leaf = map64(cpu, 0x1000, 0x500000)
    cpu.mmu.read(0x1000, 4, user=False)
    assert cpu.mem.read_u64(leaf) & (A | D) == A
    cpu.mmu.write(0x1000, 4, 1, user=False)
    assert cpu.mem.read_u64(leaf) & D
    walks = cpu.mmu.walks
    cpu.mmu.write(0x1008, 4, 1, user=False)
    assert cpu.mmu.walks == walks  # now cached for writes
    # a read-only mapping cached for reads still faults on a user write
    cpu.mem.write_u64(leaf, 0x500000 | P | US)
    cpu.mmu.flush()
    cpu.mmu.read(0x1000, 4, user=True)
    assert fault(cpu.mmu.write, 0x1000, 4, 0, user=True).error_code == PF_P | PF_W | PF_U


# --- page-crossing and MMIO ---


def test_page_crossing_write_that_faults_writes_nothing(cpu: Cpu) -> None:
    long_mode(cpu)
    map64(cpu, 0x1000, 0x500000)
    cpu.mem.write_u64(0x500FF8, 0x1111111111111111)
    exc = fault(cpu.mmu.write, 0x1FFC, 8, 0x2222222222222222, user=False)
    assert exc.cr2 == 0x2000 and exc.error_code == PF_W
    assert cpu.mem.read_u64(0x500FF8) == 0x1111111111111111
    exc = fault(cpu.mmu.write_bytes, 0x1FF0, b"x" * 0x20, user=False)
    assert cpu.mem.read_u64(0x500FF8) == 0x1111111111111111


def test_page_crossing_access_joins_two_frames(cpu: Cpu) -> None:
    long_mode(cpu)
    map64(cpu, 0x1000, 0x500000)
    map64(cpu, 0x2000, 0x300000)
    cpu.mmu.write(0x1FFE, 4, 0xAABBCCDD)
    assert cpu.mem.read_u16(0x500FFE) == 0xCCDD and cpu.mem.read_u16(0x300000) == 0xAABB
    assert cpu.mmu.read(0x1FFE, 4) == 0xAABBCCDD
    assert cpu.mmu.read_bytes(0x1FFF, 2) == bytes([0xCC, 0xBB])


def test_32bit_linear_wraps_across_4g(cpu: Cpu) -> None:
    cpu.mem.write_u8(0, 0x42)
    value = cpu.mmu.read(0xFFFFFFFF, 2)  # 0xFFFFFFFF is beyond 16 MiB of RAM: MMIO
    assert value == 0x42FF and bus(cpu).reads == [(0xFFFFFFFF, 1)]


def test_mmio_routing_and_splitting(cpu: Cpu) -> None:
    b = bus(cpu)
    assert cpu.mmu.read(MMIO + 0x10, 4) == 0x13121110
    cpu.mmu.write(MMIO + 0x20, 4, 0xDEADBEEF)
    assert b.reads == [(MMIO + 0x10, 4)] and b.writes == [(MMIO + 0x20, 4, 0xDEADBEEF)]
    b.reads.clear()
    b.writes.clear()
    cpu.mmu.write(MMIO + 0x31, 8, 0x0807060504030201)  # misaligned: naturally aligned pieces
    assert b.writes == [
        (MMIO + 0x31, 1, 0x01),
        (MMIO + 0x32, 2, 0x0302),
        (MMIO + 0x34, 4, 0x07060504),
        (MMIO + 0x38, 1, 0x08),
    ]
    value = cpu.mmu.read(MMIO + 0x40, 16)
    assert b.reads == [(MMIO + 0x40, 8), (MMIO + 0x48, 8)]
    assert value == int.from_bytes(bytes(range(0x40, 0x50)), "little")


def test_mmio_through_paging(cpu: Cpu) -> None:
    long_mode(cpu)
    map64(cpu, 0x1000, MMIO)
    cpu.mmu.write(0x1004, 4, 7)
    assert bus(cpu).writes == [(MMIO + 4, 4, 7)]


def test_code_write_hook(cpu: Cpu) -> None:
    seen: list[int] = []
    cpu.mmu.on_code_write = seen.append
    cpu.mmu.mark_code(0x5)
    cpu.mmu.write(0x4FFF, 1, 1)  # the page before: nothing
    assert seen == []
    cpu.mmu.write(0x5FFE, 4, 1)  # crosses into page 6: page 5 is hit once
    assert seen == [0x5] and 0x5 not in cpu.mmu.code_pages
    cpu.mmu.write(0x5000, 1, 1)  # unmarked until decoded from again
    assert seen == [0x5]
    cpu.mmu.mark_code(0x5)
    cpu.mmu.write_bytes(0x5100, b"\x90")
    assert seen == [0x5, 0x5]


def test_protection_keys_govern_data_accesses_to_user_and_supervisor_pages(cpu: Cpu) -> None:
    """SDM vol. 3A §4.6.2: PKRU (CR4.PKE) for user pages, IA32_PKRS (CR4.PKS) for supervisor pages; AD stops
    every data access, WD writes (supervisor writes only with CR0.WP); fetches are not checked; #PF has PK."""
    from popek.cpu.state import CR4_PKE, CR4_PKS, MSR_IA32_PKRS, PF_PK

    long_mode(cpu)
    key2 = 2 << 59
    map64(cpu, 0x1000, 0x200000, P | RW | US | key2)  # a user page with key 2
    map64(cpu, 0x2000, 0x201000, P | RW | key2)  # a supervisor page with key 2
    st = cpu.state
    st.pkru = 0b01 << 4  # key 2: access disabled
    assert cpu.mmu.read(0x1000, 4, user=True) == 0  # CR4.PKE clear: no keys
    st.cr4 |= CR4_PKE
    cpu.mmu.flush()
    assert fault(cpu.mmu.read, 0x1000, 4, user=True).error_code == PF_P | PF_U | PF_PK
    assert fault(cpu.mmu.read, 0x1000, 4, user=False).error_code == PF_P | PF_PK
    cpu.mmu.translate(0x1000, Access.EXECUTE, True)  # fetches ignore keys
    cpu.mmu.write(0x2000, 4, 1, user=False)  # supervisor pages are not PKRU's
    st.pkru = 0b10 << 4  # key 2: write disabled
    cpu.mmu.flush()
    assert cpu.mmu.read(0x1000, 4, user=True) == 0
    assert fault(cpu.mmu.write, 0x1000, 4, 1, user=True).error_code == PF_P | PF_W | PF_U | PF_PK
    assert fault(cpu.mmu.write, 0x1000, 4, 1, user=False).error_code == PF_P | PF_W | PF_PK  # CR0.WP set
    st.cr0 &= ~CR0_WP
    cpu.mmu.flush()
    cpu.mmu.write(0x1000, 4, 1, user=False)
    st.cr4 |= CR4_PKS
    st.msrs[MSR_IA32_PKRS] = 0b01 << 4
    cpu.mmu.flush()
    assert fault(cpu.mmu.read, 0x2000, 4, user=False).error_code == PF_P | PF_PK
