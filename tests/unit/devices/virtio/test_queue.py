"""The split-virtqueue walker (virtio 1.2 §2.7) against well-formed and hostile rings, without a VM."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popek.devices.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Buffer,
    ChainReader,
    ChainWriter,
    Queue,
    QueueError,
)
from popek.memory import GuestMemory

from .driver import RecordingMemory

SIZE = 8
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
MEM = 1 << 20


def make_queue(mem: GuestMemory, size: int = SIZE, *, indirect: bool = True, event_idx: bool = False) -> Queue:
    q = Queue(size)
    q.desc_table, q.avail_ring, q.used_ring = DESC, AVAIL, USED
    q.indirect, q.event_idx, q.ready = indirect, event_idx, True
    q.validate(mem)
    return q


def desc(mem: GuestMemory, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int = DESC) -> None:
    mem.write(table + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))


def offer(mem: GuestMemory, *heads: int, start: int = 0) -> None:
    for i, head in enumerate(heads):
        mem.write_u16(AVAIL + 4 + 2 * ((start + i) % SIZE), head)
    mem.write_u16(AVAIL + 2, (start + len(heads)) & 0xFFFF)


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory(MEM)


def test_a_chain_is_its_readable_then_writable_buffers(mem: GuestMemory) -> None:
    q = make_queue(mem)
    desc(mem, 3, 0x10000, 16, VIRTQ_DESC_F_NEXT, 5)
    desc(mem, 5, 0x20000, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1)
    desc(mem, 1, 0x30000, 1, VIRTQ_DESC_F_WRITE)
    offer(mem, 3)
    chain = q.pop(mem)
    assert chain is not None and chain.head == 3
    assert chain.readable == [Buffer(0x10000, 16)]
    assert chain.writable == [Buffer(0x20000, 512), Buffer(0x30000, 1)]
    assert q.pop(mem) is None


def test_indirect_table_after_direct_descriptors_is_one_chain(mem: GuestMemory) -> None:
    """§2.7.5.3.2: zero or more normal descriptors followed by one INDIRECT descriptor."""
    q = make_queue(mem)
    table = 0x8008  # Linux kmallocs indirect tables: 8-byte alignment is all it promises, and all §2.7.5.3 asks
    desc(mem, 0, 0x10000, 16, VIRTQ_DESC_F_NEXT, 2)
    desc(mem, 2, table, 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE)  # WRITE on the table is ignored
    desc(mem, 0, 0x11000, 8, VIRTQ_DESC_F_NEXT, 1, table=table)
    desc(mem, 1, 0x12000, 4, VIRTQ_DESC_F_WRITE, table=table)
    offer(mem, 0)
    chain = q.pop(mem)
    assert chain is not None
    assert chain.readable == [Buffer(0x10000, 16), Buffer(0x11000, 8)]
    assert chain.writable == [Buffer(0x12000, 4)]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda m: [desc(m, 0, 0x10000, 1, VIRTQ_DESC_F_NEXT, 1), desc(m, 1, 0x10000, 1, VIRTQ_DESC_F_NEXT, 0)],
         "loops back"),
        (lambda m: desc(m, 0, 0x10000, 1, VIRTQ_DESC_F_NEXT, SIZE), "outside a table"),
        (lambda m: desc(m, 0, MEM - 4, 8), "not in guest RAM"),
        (lambda m: desc(m, 0, 0xFFFF_FFFF_FFFF_F000, 0x2000), "not in guest RAM"),
        (lambda m: [desc(m, 0, 0x10000, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1), desc(m, 1, 0x10000, 1)],
         "device-readable descriptor after a device-writable"),
        (lambda m: desc(m, 0, 0x8000, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1), "INDIRECT and NEXT"),
        (lambda m: desc(m, 0, 0x8000, 24, VIRTQ_DESC_F_INDIRECT), "whole number of descriptors"),
        (lambda m: desc(m, 0, 0x8000, 0, VIRTQ_DESC_F_INDIRECT), "whole number of descriptors"),
        (lambda m: desc(m, 0, 0x8000, 16 * (SIZE + 1), VIRTQ_DESC_F_INDIRECT), "exceeds the queue size"),
        (lambda m: desc(m, 0, MEM - 16, 32, VIRTQ_DESC_F_INDIRECT), "not in guest RAM"),
        (lambda m: [desc(m, 0, 0x8000, 16, VIRTQ_DESC_F_INDIRECT),
                    desc(m, 0, 0x9000, 16, VIRTQ_DESC_F_INDIRECT, table=0x8000)], "inside an indirect table"),
        (lambda m: [desc(m, 0, 0x8000, 32, VIRTQ_DESC_F_INDIRECT),
                    desc(m, 0, 0x10000, 1, VIRTQ_DESC_F_NEXT, 1, table=0x8000),
                    desc(m, 1, 0x10000, 1, VIRTQ_DESC_F_NEXT, 0, table=0x8000)], "loops back"),
        (lambda m: [desc(m, 0, 0x8000, 32, VIRTQ_DESC_F_INDIRECT),
                    desc(m, 0, 0x10000, 1, VIRTQ_DESC_F_NEXT, 2, table=0x8000)], "outside a table of 2"),
        (lambda m: [desc(m, i, 1 << 32, 0xFFFF_FFFF, VIRTQ_DESC_F_NEXT, i + 1) for i in range(2)],
         "longer than 4 GiB"),
    ],
)  # fmt: skip
def test_hostile_chains_are_queue_errors(mem: GuestMemory, build: object, message: str) -> None:
    big = GuestMemory(8 << 30) if "4 GiB" in message else mem  # 4 GiB of buffers must lie in RAM to be counted
    q = make_queue(big)
    build(big)  # type: ignore[operator]
    offer(big, 0)
    with pytest.raises(QueueError, match=message):
        q.pop(big)


def test_a_chain_longer_than_the_queue_is_refused_even_without_a_loop() -> None:
    with GuestMemory(MEM) as mem:
        q = make_queue(mem)
        table = 0x8000
        desc(mem, 0, table, 16 * SIZE, VIRTQ_DESC_F_INDIRECT)
        for i in range(SIZE):
            desc(mem, i, 0x10000, 1, VIRTQ_DESC_F_NEXT, i + 1, table=table)  # the last one points past the table
        offer(mem, 0)
        with pytest.raises(QueueError):
            q.pop(mem)
        # a direct chain through every descriptor of the table is the longest allowed
        q2 = make_queue(mem)
        for i in range(SIZE):
            desc(mem, i, 0x10000, 1, VIRTQ_DESC_F_NEXT if i + 1 < SIZE else 0, i + 1)
        chain = q2.pop(mem)
        assert chain is not None and len(chain.readable) == SIZE


def test_indirect_descriptors_need_the_feature(mem: GuestMemory) -> None:
    q = make_queue(mem, indirect=False)
    desc(mem, 0, 0x8000, 16, VIRTQ_DESC_F_INDIRECT)
    desc(mem, 0, 0x10000, 1, table=0x8000)
    offer(mem, 0)
    with pytest.raises(QueueError, match="VIRTIO_F_INDIRECT_DESC"):
        q.pop(mem)


def test_a_head_outside_the_table_and_an_available_index_jump_are_refused(mem: GuestMemory) -> None:
    q = make_queue(mem)
    offer(mem, SIZE)
    with pytest.raises(QueueError, match="outside a table"):
        q.pop(mem)
    q2 = make_queue(mem)
    mem.write_u16(AVAIL + 2, SIZE + 1)
    with pytest.raises(QueueError, match="jumped"):
        q2.pop(mem)


def test_the_available_index_is_read_once_per_batch(mem: GuestMemory) -> None:
    rec = RecordingMemory(MEM)
    q = make_queue(rec)
    for i in range(3):
        desc(rec, i, 0x10000, 1)
    offer(rec, 0, 1, 2)
    rec.accesses.clear()
    heads = [c.head for c in iter(lambda: q.pop(rec), None)]
    assert heads == [0, 1, 2]
    idx_reads = [a for a in rec.accesses if a == ("read", AVAIL + 2, 2)]
    assert len(idx_reads) == 2  # once for the batch of three, once more to find it empty


@pytest.mark.parametrize(
    ("gpa", "size", "message"),
    [(DESC + 8, SIZE, "not 16-byte aligned"), (MEM - 64, SIZE, "not in guest RAM"), (DESC, 6, "power of two")],
)
def test_queue_validation_checks_alignment_ram_and_size(mem: GuestMemory, gpa: int, size: int, message: str) -> None:
    q = Queue(SIZE)
    q.desc_table, q.avail_ring, q.used_ring, q.size = gpa, AVAIL, USED, size
    with pytest.raises(QueueError, match=message):
        q.validate(mem)


def test_used_elements_are_published_and_interrupts_follow_the_drivers_flags(mem: GuestMemory) -> None:
    q = make_queue(mem)
    q.add_used(mem, 5, 100)
    assert struct.unpack("<II", mem.read(USED + 4, 8)) == (5, 100)
    assert mem.read_u16(USED + 2) == 1
    assert q.needs_interrupt(mem)
    assert not q.needs_interrupt(mem)  # nothing new since
    mem.write_u16(AVAIL, VIRTQ_AVAIL_F_NO_INTERRUPT)
    q.add_used(mem, 6, 1)
    assert not q.needs_interrupt(mem)
    assert (q.interrupts, q.suppressed) == (1, 1)


def test_event_idx_interrupts_when_used_idx_passes_used_event_and_rearms_avail_event(mem: GuestMemory) -> None:
    q = make_queue(mem, event_idx=True)
    mem.write_u16(AVAIL + 4 + 2 * SIZE, 1)  # used_event: interrupt once the used idx passes 1
    q.add_used(mem, 0, 1)
    assert not q.needs_interrupt(mem)  # used idx 1: entry 0 written, the driver asked for entry 1
    q.add_used(mem, 1, 1)
    q.add_used(mem, 2, 1)
    assert q.needs_interrupt(mem)  # entry 1 was written in this batch
    # avail_event: the device asks to be notified at its next index, then looks again
    desc(mem, 0, 0x10000, 1)
    offer(mem, 0)
    assert q.pop(mem) is not None
    assert not q.rearm(mem)
    assert mem.read_u16(USED + 4 + 8 * SIZE) == 1
    offer(mem, 0, start=1)
    assert q.rearm(mem)  # the driver added one meanwhile: the device must not sleep on it


def test_state_round_trips(mem: GuestMemory) -> None:
    q = make_queue(mem, event_idx=True)
    desc(mem, 0, 0x10000, 1)
    offer(mem, 0)
    chain = q.pop(mem)
    assert chain is not None
    q.add_used(mem, chain.head, 0)
    copy = Queue(SIZE)
    copy.restore(q.state())
    assert copy.state() == q.state()


def test_chain_reader_and_writer_cross_buffer_boundaries(mem: GuestMemory) -> None:
    mem.write(0x10000, b"abc")
    mem.write(0x20000, b"defgh")
    reader = ChainReader(mem, [Buffer(0x10000, 3), Buffer(0x20000, 5)])
    assert reader.read(4) == b"abcd"
    assert [bytes(v) for v in reader.views(10)] == [b"efgh"]
    writer = ChainWriter(mem, [Buffer(0x30000, 2), Buffer(0x40000, 3)])
    assert writer.write(b"12345678") == 5
    assert mem.read(0x30000, 2) + mem.read(0x40000, 3) == b"12345"
    writer2 = ChainWriter(mem, [Buffer(0x50000, 4), Buffer(0x60000, 1)])
    writer2.skip_to_last()
    writer2.write(b"!")
    assert mem.read(0x60000, 1) == b"!" and mem.read(0x50000, 4) == bytes(4)


def test_zero_copy_writes_mark_pages_dirty_and_tell_observers(mem: GuestMemory) -> None:
    seen: list[tuple[int, int]] = []
    mem.add_write_observer(lambda gpa, size: seen.append((gpa, size)))
    mem.dirty_pages()
    writer = ChainWriter(mem, [Buffer(0x30000, 0x2000)])
    writer.views(0x1800)[0][:] = b"x" * 0x1800
    assert mem.dirty_pages() == [0x30000, 0x31000]
    assert seen == [(0x30000, 0x1800)]


# --- fuzzing: whatever the driver wrote, a pop ends in a chain, None, or a QueueError ---

FUZZ_MEM = 1 << 20
ADDRESSES = st.one_of(
    st.integers(0, FUZZ_MEM - 1),
    st.sampled_from([0, DESC, 0x8000, FUZZ_MEM - 16, FUZZ_MEM - 1, FUZZ_MEM, 0xC000_0000, 1 << 63, (1 << 64) - 16]),
)
LENGTHS = st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 128, 4096, 0xFFFF_FFFF, 0x8000_0000]))
DESCRIPTORS = st.tuples(ADDRESSES, LENGTHS, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)).map(
    lambda d: (d[0], d[1], d[2] & 0x7 if d[2] < 0xF000 else d[2], d[3] % 12 if d[3] < 0xF000 else d[3])
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=st.lists(DESCRIPTORS, min_size=SIZE, max_size=SIZE),
    indirect_table=st.lists(DESCRIPTORS, min_size=0, max_size=12),
    ring=st.lists(st.integers(0, 0xFFFF).map(lambda h: h % 10 if h < 0xF000 else h), min_size=SIZE, max_size=SIZE),
    avail_idx=st.integers(0, 0xFFFF).map(lambda i: i % (SIZE + 2) if i < 0xF000 else i),
    indirect=st.booleans(),
)
def test_fuzzed_rings_end_in_chains_or_a_queue_error_with_bounded_guest_accesses(
    table: list[tuple[int, int, int, int]],
    indirect_table: list[tuple[int, int, int, int]],
    ring: list[int],
    avail_idx: int,
    indirect: bool,
) -> None:
    with RecordingMemory(FUZZ_MEM) as mem:
        q = make_queue(mem, indirect=indirect)
        for i, (addr, length, flags, nxt) in enumerate(table):
            desc(mem, i, addr, length, flags, nxt)
        for i, (addr, length, flags, nxt) in enumerate(indirect_table):
            desc(mem, i, addr, length, flags, nxt, table=0x8000)
        for i, head in enumerate(ring):
            mem.write_u16(AVAIL + 4 + 2 * i, head)
        mem.write_u16(AVAIL + 2, avail_idx)
        mem.accesses.clear()
        chains = 0
        try:
            while (chain := q.pop(mem)) is not None:
                chains += 1
                for buf in chain.readable + chain.writable:
                    assert buf.length == 0 or mem.contains(buf.addr, buf.length)
                assert chain.readable_len + chain.writable_len < 1 << 32
                assert len(chain.readable) + len(chain.writable) <= SIZE
        except QueueError:
            pass
        assert chains <= SIZE
        # per chain: one ring read and at most SIZE descriptor reads; plus the index reads
        assert len(mem.accesses) <= 2 + chains * (2 + SIZE) + SIZE + 2
