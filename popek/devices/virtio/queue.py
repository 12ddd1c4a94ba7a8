"""Split virtqueues, device side (virtio 1.2 §2.7): the descriptor-chain walker, the available and used rings, and
both kinds of notification suppression.

A queue lives in guest memory, written by a driver popek does not trust, read by a device that may run on another
host thread than the guest's vCPUs (the KVM backend's device event loop). So:

- Every guest-supplied value is checked before it is used: ring addresses, sizes and alignments when the queue is
  activated (`Queue.validate`, §2.7 table of alignments), head and `next` indices against the table they index,
  buffer addresses and lengths against guest RAM, chain length against the queue size (a loop therefore ends as
  "longer than the queue"; it is also named as a loop when an index repeats), the indirect rules of §2.7.5.3.1
  (only with VIRTIO_F_INDIRECT_DESC, no INDIRECT inside an indirect table, not with NEXT, a table length that is
  a whole number of descriptors), device-writable buffers after device-readable ones (§2.7.4.2), a chain's total
  length below 2^32 (§2.7.5.2), and an available index that may move at most `size` entries ahead of the device
  (§2.7.13.3: the ring cannot hold more). A violation raises `QueueError`; the device then sets
  DEVICE_NEEDS_RESET (§2.1.2) and stops using the queue. Nothing here raises anything else for any guest input:
  every access goes through `GuestMemory`, whose bounds checks would turn a missed case into a `GuestMemoryError`
  (which the transport treats the same way), never into a host access outside guest RAM.
- Work per notification is bounded by the queue: at most `size` chains are available at once, each at most
  `size` descriptors long, and a chain is described by (address, length) pairs, never copied.
- Memory ordering (§2.7.13, §2.7.14): the device reads the available `idx` once per batch and only then the ring
  entries and descriptors (load → load); it writes a used element before the used `idx` that publishes it
  (store → store). x86-64 (the only host popek runs on) keeps both orders (Intel SDM Vol. 3A §9.2.2), and CPython
  issues the accesses in program order, so neither needs a fence. What x86 does reorder is a store followed by
  a load: publishing the used `idx` then reading `used_event`/`flags` to decide on an interrupt, or writing
  `avail_event` then re-reading the available `idx` (§2.7.7, §2.7.10). Both go through `memory_fence()`, a locked
  instruction (an uncontended lock's atomic exchange), which orders everything before it against everything after.

The queue's state is plain fields (`state()` / `restore()`), so a snapshot can carry it.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field
from typing import Any

from popek.devices import state as st
from popek.memory import GuestMemory

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768  # §2.7: the largest power of two a 16-bit index can tell full from empty with
MAX_CHAIN_BYTES = (1 << 32) - 1  # §2.7.5.2: drivers MUST NOT add a chain longer than 2^32 bytes; used.len is le32

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_FENCE = threading.Lock()


def memory_fence() -> None:
    """A full barrier between this thread's earlier stores and later loads (what `virtio_mb()` is to Linux).

    Acquiring a lock is an atomic read-modify-write, a LOCK-prefixed instruction on x86, and "reads or writes
    cannot be reordered with locked instructions" (Intel SDM Vol. 3A §9.2.2)."""
    with _FENCE:
        pass


class QueueError(Exception):
    """The driver broke a rule of the virtqueue (or the device's request format); the message says which.
    The device answers by setting DEVICE_NEEDS_RESET and leaving the queue alone."""


@dataclass(frozen=True, slots=True)
class Buffer:
    """One descriptor's buffer: guest-physical address and length, already checked to lie in guest RAM."""

    addr: int
    length: int


@dataclass(slots=True)
class DescriptorChain:
    """A request as the driver laid it out: device-readable buffers, then device-writable ones (§2.7.4)."""

    head: int
    readable: list[Buffer] = field(default_factory=list)
    writable: list[Buffer] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(b.length for b in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(b.length for b in self.writable)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class Queue:
    """One split virtqueue as the device sees it. The transport sets `size`, the three addresses and `ready` from
    the driver's register writes; the device pops chains, adds used elements and asks whether to interrupt."""

    def __init__(self, max_size: int) -> None:
        if not _is_power_of_two(max_size) or max_size > MAX_QUEUE_SIZE:
            raise ValueError(f"a split virtqueue's maximum size is a power of two up to {MAX_QUEUE_SIZE}")
        self.max_size = max_size
        # statistics, kept across resets (they describe the VM's whole run)
        self.chains = 0
        self.interrupts = 0
        self.suppressed = 0
        self.reset()

    def reset(self) -> None:
        """The state after a device reset (§2.4): not ready, addresses and indices zero."""
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.indirect = False  # VIRTIO_F_INDIRECT_DESC negotiated
        self.event_idx = False  # VIRTIO_F_EVENT_IDX negotiated
        self.next_avail = 0  # the next available-ring entry the device will take (free-running, 16 bits)
        self.next_used = 0  # the used-ring index the device will publish next (free-running, 16 bits)
        self.avail_idx = 0  # the driver's available idx as last read (once per batch)
        self.num_added = 0  # used elements added since the last interrupt decision

    # --- set-up ---

    def validate(self, mem: GuestMemory) -> None:
        """Check what the driver configured before the device touches the rings (at DRIVER_OK)."""
        if not _is_power_of_two(self.size) or self.size > self.max_size:
            raise QueueError(f"queue size {self.size} is not a power of two up to QueueNumMax {self.max_size}")
        size = self.size
        extra = 2 if self.event_idx else 0
        for name, addr, align, length in (
            ("descriptor table", self.desc_table, 16, DESC_SIZE * size),
            ("available ring", self.avail_ring, 2, 4 + 2 * size + extra),
            ("used ring", self.used_ring, 4, 4 + 8 * size + extra),
        ):
            if addr % align:
                raise QueueError(f"the {name} at {addr:#x} is not {align}-byte aligned")
            if not mem.contains(addr, length):
                raise QueueError(f"the {name} at {addr:#x}+{length:#x} is not in guest RAM")

    # --- the available ring (§2.7.6) ---

    def pending(self, mem: GuestMemory) -> int:
        """How many chains the driver has made available beyond those taken; reads the available idx."""
        idx = mem.read_u16(self.avail_ring + 2)
        ahead = (idx - self.next_avail) & 0xFFFF
        if ahead > self.size:
            raise QueueError(
                f"the available index jumped to {idx}, {ahead} entries past the device's {self.next_avail}, "
                f"more than the queue size {self.size}"
            )
        self.avail_idx = idx
        return ahead

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """The next available chain, walked and checked, or None when the driver has made none available."""
        if self.next_avail == self.avail_idx and self.pending(mem) == 0:
            return None
        slot = self.next_avail % self.size
        head = mem.read_u16(self.avail_ring + 4 + 2 * slot)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        chain = self._walk(mem, head)
        self.chains += 1
        return chain

    def _walk(self, mem: GuestMemory, head: int) -> DescriptorChain:
        """Follow a chain from `head` (§2.7.5), through at most one indirect table (§2.7.5.3)."""
        size = self.size
        if head >= size:
            raise QueueError(f"available ring entry names descriptor {head}, outside a table of {size}")
        chain = DescriptorChain(head)
        table, entries = self.desc_table, size
        index, count, total = head, 0, 0
        in_indirect = False
        seen: set[int] = set()
        while True:
            if index in seen:
                where = "indirect table" if in_indirect else "descriptor table"
                raise QueueError(f"descriptor chain from head {head} loops back to entry {index} of the {where}")
            seen.add(index)
            count += 1
            if count > size:
                raise QueueError(f"descriptor chain from head {head} is longer than the queue size {size}")
            addr, length, flags, nxt = _DESC.unpack(mem.read(table + DESC_SIZE * index, DESC_SIZE))
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise QueueError("indirect descriptor without VIRTIO_F_INDIRECT_DESC negotiated")
                if in_indirect:
                    raise QueueError("indirect descriptor inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise QueueError("descriptor has both INDIRECT and NEXT set")
                if length == 0 or length % DESC_SIZE:
                    raise QueueError(f"indirect table length {length} is not a whole number of descriptors")
                if length // DESC_SIZE > size:
                    raise QueueError(f"indirect table of {length // DESC_SIZE} descriptors exceeds the queue size")
                if not mem.contains(addr, length):  # no alignment rule: Linux kmallocs the table (8-byte aligned)
                    raise QueueError(f"indirect table at {addr:#x}+{length:#x} is not in guest RAM")
                table, entries = addr, length // DESC_SIZE
                index, in_indirect = 0, True
                count -= 1  # the indirect descriptor itself carries no buffer
                seen = set()
                continue
            if length and not mem.contains(addr, length):
                raise QueueError(f"descriptor buffer {addr:#x}+{length:#x} is not in guest RAM")
            total += length
            if total > MAX_CHAIN_BYTES:
                raise QueueError(f"descriptor chain from head {head} is longer than 4 GiB")
            if flags & VIRTQ_DESC_F_WRITE:
                chain.writable.append(Buffer(addr, length))
            elif chain.writable:
                raise QueueError("device-readable descriptor after a device-writable one")
            else:
                chain.readable.append(Buffer(addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if nxt >= entries:
                raise QueueError(f"descriptor chain from head {head} continues to {nxt}, outside a table of {entries}")
            index = nxt

    # --- the used ring (§2.7.8) ---

    def add_used(self, mem: GuestMemory, head: int, length: int) -> None:
        """Return chain `head` to the driver, `length` bytes written: the element first, then the index."""
        slot = self.next_used % self.size
        mem.write(self.used_ring + 4 + 8 * slot, _USED_ELEM.pack(head, length & 0xFFFFFFFF))
        self.next_used = (self.next_used + 1) & 0xFFFF
        mem.write_u16(self.used_ring + 2, self.next_used)
        self.num_added += 1

    # --- notification suppression (§2.7.7, §2.7.10) ---

    def needs_interrupt(self, mem: GuestMemory) -> bool:
        """Whether the used elements added since the last call deserve a used buffer notification (§2.7.7)."""
        added, self.num_added = self.num_added, 0
        if added == 0:
            return False
        memory_fence()  # the used idx must be visible before the driver's suppression fields are read
        if self.event_idx:
            if added >= 0x10000:
                notify = True  # the 16-bit window cannot express it: err on the side of an interrupt
            else:
                used_event = mem.read_u16(self.avail_ring + 4 + 2 * self.size)
                new, old = self.next_used, (self.next_used - added) & 0xFFFF
                notify = ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        else:
            notify = not mem.read_u16(self.avail_ring) & VIRTQ_AVAIL_F_NO_INTERRUPT
        if notify:
            self.interrupts += 1
        else:
            self.suppressed += 1
        return notify

    def rearm(self, mem: GuestMemory) -> bool:
        """After the device has taken every available chain: ask the driver to notify at the next one, then look
        again, since the driver may have added chains before it could see the request. True if there are more.

        With VIRTIO_F_EVENT_IDX that is `avail_event` = the next index (§2.7.10); without it the device never sets
        VIRTQ_USED_F_NO_NOTIFY, so the driver notifies after every addition and nothing can be missed."""
        if not self.event_idx:
            return False
        mem.write_u16(self.used_ring + 4 + 8 * self.size, self.next_avail)
        memory_fence()  # avail_event must be visible before the available idx is read again
        return self.pending(mem) > 0

    # --- snapshots ---

    def state(self) -> dict[str, Any]:
        return {
            "max_size": self.max_size, "size": self.size, "ready": self.ready,
            "desc_table": self.desc_table, "avail_ring": self.avail_ring, "used_ring": self.used_ring,
            "indirect": self.indirect, "event_idx": self.event_idx,
            "next_avail": self.next_avail, "next_used": self.next_used, "avail_idx": self.avail_idx,
            "num_added": self.num_added,
        }  # fmt: skip

    def load_state(self, state: object, what: str) -> dict[str, Any]:
        """`state` checked against what the registers can hold (a snapshot is hostile input), nothing changed:
        the transport checks every queue before it restores any. The ring addresses and size are the driver's
        register writes, checked against guest RAM by `validate` when the queue is live (§4.2.2)."""
        return st.load(state, {
            "max_size": st.one_of(self.max_size), "size": st.uint(32), "ready": st.boolean,
            "desc_table": st.uint(64), "avail_ring": st.uint(64), "used_ring": st.uint(64),
            "indirect": st.boolean, "event_idx": st.boolean,
            "next_avail": st.uint(16), "next_used": st.uint(16), "avail_idx": st.uint(16), "num_added": st.uint(16),
        }, what)  # fmt: skip

    def restore(self, state: object, what: str = "virtqueue") -> None:
        for name, value in self.load_state(state, what).items():
            setattr(self, name, value)


class ChainReader:
    """Sequential access to a chain's device-readable bytes: small copies (`read`) for headers, zero-copy views
    (`views`) for data."""

    def __init__(self, mem: GuestMemory, buffers: list[Buffer]) -> None:
        self.mem = mem
        self._buffers = buffers
        self._index = 0
        self._offset = 0
        self.remaining = sum(b.length for b in buffers)

    def views(self, n: int) -> list[memoryview]:
        """The next `n` bytes (at most `remaining`) as windows on guest RAM."""
        out: list[memoryview] = []
        n = min(n, self.remaining)
        self.remaining -= n
        while n:
            buf = self._buffers[self._index]
            take = min(n, buf.length - self._offset)
            if take:
                out.append(self.mem.view(buf.addr + self._offset, take))
            self._offset += take
            n -= take
            if self._offset == buf.length:
                self._index, self._offset = self._index + 1, 0
        return out

    def read(self, n: int) -> bytes:
        """The next `n` bytes (at most `remaining`), copied; for headers and other small fields."""
        return b"".join(bytes(v) for v in self.views(n))


class ChainWriter:
    """Sequential access to a chain's device-writable bytes. Every byte handed out is marked written in guest
    memory (dirty tracking, and the software CPU's decoded-code invalidation)."""

    def __init__(self, mem: GuestMemory, buffers: list[Buffer]) -> None:
        self.mem = mem
        self._buffers = buffers
        self._index = 0
        self._offset = 0
        self.remaining = sum(b.length for b in buffers)
        self.written = 0

    def views(self, n: int) -> list[memoryview]:
        """Windows on the next `n` writable bytes (at most `remaining`), for the caller to fill."""
        out: list[memoryview] = []
        n = min(n, self.remaining)
        self.remaining -= n
        self.written += n
        while n:
            buf = self._buffers[self._index]
            take = min(n, buf.length - self._offset)
            if take:
                addr = buf.addr + self._offset
                out.append(self.mem.view(addr, take))
                self.mem.mark_written(addr, take)
            self._offset += take
            n -= take
            if self._offset == buf.length:
                self._index, self._offset = self._index + 1, 0
        return out

    def write(self, data: bytes) -> int:
        """Copy `data` (as much as fits) into the next writable bytes; returns how many were written."""
        pos = 0
        for view in self.views(len(data)):
            view[:] = data[pos : pos + len(view)]
            pos += len(view)
        return pos

    def skip_to_last(self) -> None:
        """Move to the chain's last writable byte (where block requests keep their status)."""
        if self.remaining > 1:
            skip = self.remaining - 1
            while skip:
                buf = self._buffers[self._index]
                take = min(skip, buf.length - self._offset)
                self._offset += take
                skip -= take
                if self._offset == buf.length:
                    self._index, self._offset = self._index + 1, 0
            self.remaining = 1
