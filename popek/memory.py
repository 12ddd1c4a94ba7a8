"""Guest RAM: anonymous mmaps placed in guest-physical space around the 32-bit MMIO hole.

Every access is bounds-checked against the regions, so a hostile guest address (a virtio descriptor, a boot
parameter) becomes a `GuestMemoryError`, never a host access outside guest RAM. Writes made by the VMM on the
guest's behalf mark pages dirty; a backend that tracks guest writes itself (KVM's dirty log) merges its bitmap
in through `mark_dirty_bitmap`. A device that fills guest RAM through a zero-copy `view` (virtio DMA) reports the
range with `mark_written`; write observers (`add_write_observer`: the software CPU, whose decoded-instruction cache
must forget rewritten code) hear of every VMM write, made this way or through `write`, `fill` or `zero`.

Large ranges are never built in host memory: `zero` drops whole pages of an anonymous region with
madvise(MADV_DONTNEED) (madvise(2): the next access of a private anonymous page reads zeros), so a kernel's
gigabytes of bss cost nothing; `fill` writes in bounded chunks.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from popek.errors import ConfigError, GuestMemoryError

PAGE_SIZE = 4096
_PROT_READ, _PROT_WRITE = mmap.PROT_READ, mmap.PROT_WRITE
# PyDLL, not CDLL: the GIL stays held across the call, so no other Python thread touches guest RAM between the
# two mprotect calls of `GuestMemory.remap_page`
_libc = ctypes.PyDLL(None, use_errno=True)
_mprotect = _libc.mprotect
_mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_mprotect.restype = ctypes.c_int
MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 0x1_0000_0000
FILL_CHUNK = 1 << 20  # the most host memory one fill or zero builds at a time


@dataclass
class Region:
    """One contiguous guest-physical range backed by one host mapping."""

    gpa: int
    size: int
    mapping: mmap.mmap
    # an anonymous private mapping reads back zeros after MADV_DONTNEED; a private file mapping (a snapshot)
    # would read back the file's contents, so only an anonymous region may be zeroed that way
    anonymous: bool = True
    dirty: bytearray = field(init=False)

    def __post_init__(self) -> None:
        self.dirty = bytearray((self.size // PAGE_SIZE + 7) // 8)

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def host_address(self) -> int:
        """The userspace address KVM needs for a memory slot."""
        anchor = ctypes.c_char.from_buffer(self.mapping)
        address = ctypes.addressof(anchor)
        del anchor
        return address


def layout(size: int) -> list[tuple[int, int]]:
    """Split `size` bytes of RAM into (gpa, size) ranges that skip the MMIO hole below 4 GiB."""
    if size <= 0:
        raise ConfigError(f"guest memory size must be positive, not {size}")
    if size % PAGE_SIZE:
        raise ConfigError(f"guest memory size {size} is not a multiple of {PAGE_SIZE}")
    if size <= MMIO_HOLE_START:
        return [(0, size)]
    return [(0, MMIO_HOLE_START), (MMIO_HOLE_END, size - MMIO_HOLE_START)]


class GuestMemory:
    def __init__(self, size: int) -> None:
        self.size = size
        self.regions: list[Region] = []
        self._observers: list[Callable[[int, int], None]] = []
        try:
            for gpa, length in layout(size):
                mapping = mmap.mmap(
                    -1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
                )
                self.regions.append(Region(gpa, length, mapping))
        except OSError as e:
            self.close()
            raise ConfigError(f"cannot allocate {size} bytes of guest memory: {e.strerror}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], regions: list[tuple[int, int, int]]) -> GuestMemory:
        """Guest memory mapped privately from a file (a snapshot's memory): `regions` are (gpa, size, offset in
        the file), and must be the layout `layout` gives for their total size, so a restored VM has the RAM
        map a booted one has. MAP_PRIVATE: the host kernel reads pages on the guest's first touch and copies a
        page on its first write, so restore costs no time per byte and clones of one file share what they have
        not written (mmap(2))."""
        size = sum(length for _, length, _ in regions)
        if [(gpa, length) for gpa, length, _ in regions] != layout(size):
            raise ConfigError(f"memory regions {regions} are not popek's layout of {size} bytes")
        mem = cls.__new__(cls)
        mem.size, mem.regions, mem._observers = size, [], []
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"guest memory file {path}: {e.strerror}") from None
        try:
            for gpa, length, offset in regions:
                mapping = mmap.mmap(
                    fd, length, flags=mmap.MAP_PRIVATE, prot=_PROT_READ | _PROT_WRITE, offset=offset
                )
                mem.regions.append(Region(gpa, length, mapping, anonymous=False))
        except (OSError, ValueError) as e:
            mem.close()
            raise ConfigError(f"cannot map guest memory from {path}: {e}") from None
        finally:
            os.close(fd)
        return mem

    def close(self) -> None:
        for region in self.regions:
            try:
                region.mapping.close()
            except BufferError:
                pass  # a view is still exported; the mapping goes with the last reference
        self.regions = []

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Region]:
        return iter(self.regions)

    @property
    def top(self) -> int:
        """The first guest-physical address above all RAM."""
        return self.regions[-1].end

    @property
    def low_top(self) -> int:
        """The end of RAM below the 32-bit MMIO hole."""
        return self.regions[0].end

    def _find(self, gpa: int, size: int) -> tuple[Region, int]:
        if size < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest access at {gpa:#x} of {size} bytes")
        for region in self.regions:
            if region.gpa <= gpa and gpa + size <= region.end:
                return region, gpa - region.gpa
        raise GuestMemoryError(f"guest-physical range {gpa:#x}+{size:#x} is not in guest RAM")

    def contains(self, gpa: int, size: int = 1) -> bool:
        return any(r.gpa <= gpa and gpa + size <= r.end for r in self.regions)

    def view(self, gpa: int, size: int) -> memoryview:
        """A zero-copy window on guest RAM; the range must lie inside one region."""
        region, offset = self._find(gpa, size)
        return memoryview(region.mapping)[offset : offset + size]

    def read(self, gpa: int, size: int) -> bytes:
        region, offset = self._find(gpa, size)
        return region.mapping[offset : offset + size]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        size = len(data)
        region, offset = self._find(gpa, size)
        region.mapping[offset : offset + size] = data
        self._written(region, offset, size)

    def mark_written(self, gpa: int, size: int) -> None:
        """Record that the VMM wrote `size` bytes at `gpa` through a `view` (dirty pages, write observers)."""
        region, offset = self._find(gpa, size)
        self._written(region, offset, size)

    def _written(self, region: Region, offset: int, size: int) -> None:
        self._mark(region, offset, size)
        for observer in self._observers:
            observer(region.gpa + offset, size)

    def add_write_observer(self, observer: Callable[[int, int], None]) -> None:
        """Call `observer(gpa, size)` after every VMM write to guest RAM (`write`, `mark_written`)."""
        self._observers.append(observer)

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        """Set `size` bytes to `byte`, a bounded chunk at a time (a guest-sized range is never built in host
        memory); zeros go through `zero`."""
        if byte == 0:
            self.zero(gpa, size)
            return
        region, offset = self._find(gpa, size)
        chunk = bytes([byte]) * min(size, FILL_CHUNK)
        for pos in range(offset, offset + size, FILL_CHUNK):
            n = min(FILL_CHUNK, offset + size - pos)
            region.mapping[pos : pos + n] = chunk[:n]
        self._written(region, offset, size)

    def zero(self, gpa: int, size: int) -> None:
        """Make `size` bytes read as zero without materialising them: whole pages of an anonymous region are
        dropped with madvise(MADV_DONTNEED) (the kernel maps the zero page back on the next read, so RSS
        shrinks instead of growing); partial pages, and regions backed by a file, are written with zeros."""
        if size <= 0:
            if size < 0:
                raise GuestMemoryError(f"bad guest access at {gpa:#x} of {size} bytes")
            return
        region, offset = self._find(gpa, size)
        end = offset + size
        first = -(-offset // PAGE_SIZE) * PAGE_SIZE
        last = end // PAGE_SIZE * PAGE_SIZE
        if region.anonymous and last > first:
            region.mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
            self._write_zeros(region, offset, first)
            self._write_zeros(region, last, end)
        else:
            self._write_zeros(region, offset, end)
        self._written(region, offset, size)

    @staticmethod
    def _write_zeros(region: Region, start: int, end: int) -> None:
        zeros = bytes(min(end - start, FILL_CHUNK)) if end > start else b""
        for pos in range(start, end, FILL_CHUNK):
            n = min(FILL_CHUNK, end - pos)
            region.mapping[pos : pos + n] = zeros[:n]

    def read_u8(self, gpa: int) -> int:
        return self.read(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return int(struct.unpack("<H", self.read(gpa, 2))[0])

    def read_u32(self, gpa: int) -> int:
        return int(struct.unpack("<I", self.read(gpa, 4))[0])

    def read_u64(self, gpa: int) -> int:
        return int(struct.unpack("<Q", self.read(gpa, 8))[0])

    def write_u8(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<B", value))

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<H", value))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<I", value))

    def write_u64(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<Q", value))

    def read_cstring(self, gpa: int, limit: int = 4096) -> bytes:
        """A NUL-terminated string starting at `gpa`, at most `limit` bytes, clipped to its region."""
        region, offset = self._find(gpa, 1)
        chunk = region.mapping[offset : min(offset + limit, region.size)]
        end = chunk.find(b"\0")
        return chunk if end < 0 else chunk[:end]

    def remap_page(self, gpa: int) -> bool:
        """Make the host kernel drop every mapping it derived from the RAM page at `gpa`, keeping its contents:
        the page is made read-only and then read-write again, and the change of protection runs the kernel's MMU
        notifiers, so KVM forgets its EPT or shadow entries for the page and the guest's next access to it faults
        into KVM's MMU. This is what QEMU's pc-testdev flush-page port does (with PROT_NONE; read-only is enough
        for the notifiers and keeps readers safe). A write to the page by another vCPU inside KVM_RUN in the
        microseconds between the two calls would fail that KVM_RUN (an error stop). Returns False for an address
        outside RAM."""
        if not self.contains(gpa - gpa % PAGE_SIZE, PAGE_SIZE):
            return False
        page = gpa - gpa % PAGE_SIZE
        region, offset = self._find(page, PAGE_SIZE)
        address = region.host_address + offset
        if _mprotect(address, PAGE_SIZE, _PROT_READ) or _mprotect(address, PAGE_SIZE, _PROT_READ | _PROT_WRITE):
            errno = ctypes.get_errno()
            raise GuestMemoryError(f"mprotect of guest page {page:#x} failed: {os.strerror(errno)}")
        return True

    # --- dirty tracking ---

    @staticmethod
    def _mark(region: Region, offset: int, size: int) -> None:
        if size == 0:
            return
        for page in range(offset // PAGE_SIZE, (offset + size - 1) // PAGE_SIZE + 1):
            region.dirty[page >> 3] |= 1 << (page & 7)

    def mark_dirty_bitmap(self, region_index: int, bitmap: bytes) -> None:
        """Merge a backend's dirty bitmap (bit per page, little-endian bit order as KVM returns it)."""
        dirty = self.regions[region_index].dirty
        for i, byte in enumerate(bitmap[: len(dirty)]):
            dirty[i] |= byte

    def dirty_pages(self, clear: bool = True) -> list[int]:
        """Guest-physical addresses of pages written since the last call."""
        pages = []
        for region in self.regions:
            for i, byte in enumerate(region.dirty):
                if byte:
                    for bit in range(8):
                        if byte & (1 << bit):
                            pages.append(region.gpa + (i * 8 + bit) * PAGE_SIZE)
            if clear:
                region.dirty[:] = bytes(len(region.dirty))
        return pages
