"""virtio-blk on a raw image file or block device (virtio 1.2 §5.2).

One request queue of 256 entries. Requests (§5.2.6): a 16-byte device-readable header (type, reserved, sector),
data, and a one-byte device-writable status at the very end of the chain; the device makes no assumption about how
the driver split them into descriptors (§2.7.4.1). A chain without a whole header or without a status byte is a
framing error: DEVICE_NEEDS_RESET, as QEMU does. Everything else is answered in the status byte:

- IN / OUT read and write with preadv/pwritev straight between the image and guest memory (zero copy). Data
  that is not a multiple of 512 bytes or reaches past `capacity` is VIRTIO_BLK_S_IOERR (§5.2.6.1), and so is a
  host I/O error. On a read-only disk (VIRTIO_BLK_F_RO) a write is IOERR and writes nothing (§5.2.6.2).
- FLUSH (VIRTIO_BLK_F_FLUSH offered, so the driver assumes a writeback cache, §5.2.5.1): fdatasync.
- GET_ID: the serial, NUL-padded to 20 bytes (no NUL at 20).
- DISCARD and WRITE_ZEROES (not offered on a read-only disk): up to `max_*_seg` segments of 16 bytes; each range
  becomes a hole (fallocate PUNCH_HOLE|KEEP_SIZE, which reads back as zeros; where the file system cannot punch,
  a discard does nothing, as §5.2.6.2 allows, and write-zeroes writes zeros). Unknown flags, and `unmap` on a
  discard, are VIRTIO_BLK_S_UNSUPP (§5.2.6.2); too many segments, a segment too long or past the end are IOERR.
- Any other type is VIRTIO_BLK_S_UNSUPP.

The driver may keep up to the queue size of requests in flight; each notification serves all that are available,
in ring order, each completed before the next starts. SEG_MAX = queue size - 2, so a request with its header and
status fits the queue (Linux sizes its scatter lists from it).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from popek import hostio
from popek.devices import state as st
from popek.devices.virtio.device import COMMON_FEATURES, DeviceId, VirtioDevice
from popek.devices.virtio.queue import ChainReader, ChainWriter, DescriptorChain, QueueError
from popek.errors import ConfigError
from popek.snapshot import SnapshotError

SECTOR = 512
QUEUE_SIZE = 256
ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES

# feature bits (§5.2.3)
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_DISCARD = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14

# request types and status values (§5.2.6)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

SEG_MAX = QUEUE_SIZE - 2
MAX_DISCARD_SECTORS = (1 << 30) // SECTOR  # 1 GiB per segment
MAX_DISCARD_SEG = 32
DISCARD_ALIGNMENT = 4096 // SECTOR

_HEADER = struct.Struct("<IIQ")
_SEGMENT = struct.Struct("<QII")
# struct virtio_blk_config (§5.2.4) up to the secure-erase fields
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3xIII")


@dataclass(frozen=True)
class DiskSpec:
    """One `--disk PATH[,ro][,serial=ID]`."""

    path: Path
    read_only: bool = False
    serial: str = ""

    @classmethod
    def parse(cls, text: str) -> DiskSpec:
        path, *options = text.split(",")
        if not path:
            raise ConfigError("--disk needs a path: --disk PATH[,ro][,serial=ID]")
        read_only, serial = False, ""
        for option in options:
            if option == "ro":
                read_only = True
            elif option.startswith("serial="):
                serial = option[len("serial=") :]
            else:
                raise ConfigError(f"unknown --disk option {option!r} (known: ro, serial=ID)")
        spec = cls(Path(path), read_only, serial)
        spec.validate()
        return spec

    def validate(self) -> None:
        if len(self.serial.encode("ascii", "replace")) > ID_BYTES or not all(" " <= c <= "~" for c in self.serial):
            raise ConfigError(f"a disk serial is at most {ID_BYTES} printable ASCII characters, not {self.serial!r}")


class DiskImage:
    """The host side of a disk: the open image, its size in bytes, and whether the guest may write it. The image is
    locked (flock: shared when read-only, exclusive otherwise) for as long as the VM has it open."""

    def __init__(self, spec: DiskSpec) -> None:
        spec.validate()
        path = spec.path
        try:
            st = os.stat(path)
        except OSError as e:
            raise ConfigError(f"disk image {path}: {e.strerror}") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise ConfigError(f"disk image {path} is not a regular file or a block device")
        self.path = path
        self.serial = spec.serial
        self.read_only = spec.read_only
        self.fd = -1
        try:
            self.fd = os.open(path, (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            if self.read_only or e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise ConfigError(f"disk image {path}: {e.strerror}") from None
            try:  # a file the user may only read is a read-only disk
                self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e2:
                raise ConfigError(f"disk image {path}: {e2.strerror}") from None
            self.read_only = True
        try:
            self.size = os.lseek(self.fd, 0, os.SEEK_END)  # the size of a block device too
            if self.size % SECTOR:
                raise ConfigError(f"disk image {path} is {self.size} bytes, not a multiple of {SECTOR}")
            try:
                fcntl.flock(self.fd, (fcntl.LOCK_SH if self.read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"disk image {path} is in use by another process (it is locked)") from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class BlockDevice(VirtioDevice):
    device_id: ClassVar[DeviceId] = DeviceId.BLOCK

    def __init__(self, image: DiskImage, name: str = "vda") -> None:
        super().__init__(f"virtio-blk {name}", [QUEUE_SIZE])
        self.image = image
        self.capacity = image.size // SECTOR
        self.counts = {"reads": 0, "writes": 0, "flushes": 0, "discards": 0, "write_zeroes": 0, "get_id": 0}
        self.bytes_read = 0
        self.bytes_written = 0
        self.ioerr = 0
        self.unsupported = 0

    # --- the device's description ---

    def device_features(self) -> int:
        features = COMMON_FEATURES | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH
        if self.image.read_only:
            return features | VIRTIO_BLK_F_RO
        return features | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES

    def config_bytes(self) -> bytes:
        discard = 0 if self.image.read_only else 1
        return _CONFIG.pack(
            self.capacity, 0, SEG_MAX, 0, 0, 0, SECTOR,  # capacity, size_max, seg_max, geometry, blk_size
            0, 0, 0, 0,  # topology
            0, 0, 0,  # writeback, unused0, num_queues
            MAX_DISCARD_SECTORS * discard, MAX_DISCARD_SEG * discard, DISCARD_ALIGNMENT * discard,
            MAX_DISCARD_SECTORS * discard, MAX_DISCARD_SEG * discard, discard,  # write zeroes, may_unmap
            0, 0, 0,  # secure erase
        )  # fmt: skip

    # --- requests ---

    def process_queue(self, index: int) -> None:
        self.serve(index, self._request)

    def _request(self, chain: DescriptorChain) -> int:
        assert self.mem is not None
        reader = ChainReader(self.mem, chain.readable)
        writer = ChainWriter(self.mem, chain.writable)
        if reader.remaining < _HEADER.size or writer.remaining < 1:
            raise QueueError(f"virtio-blk request (head {chain.head}) without a 16-byte header or a status byte")
        kind, _reserved, sector = _HEADER.unpack(reader.read(_HEADER.size))
        try:
            status, written = self._execute(kind, sector, reader, writer)
        except OSError:
            status, written = VIRTIO_BLK_S_IOERR, 0
        if status == VIRTIO_BLK_S_IOERR:
            self.ioerr += 1
        elif status == VIRTIO_BLK_S_UNSUPP:
            self.unsupported += 1
        writer.skip_to_last()
        writer.write(bytes([status]))
        return written + 1

    def _in_range(self, sector: int, length: int) -> bool:
        return sector * SECTOR + length <= self.capacity * SECTOR

    def _execute(self, kind: int, sector: int, reader: ChainReader, writer: ChainWriter) -> tuple[int, int]:
        """(status, data bytes written to the guest) for one request."""
        fd = self.image.fd
        if kind == VIRTIO_BLK_T_IN:
            length = writer.remaining - 1
            if length % SECTOR or not self._in_range(sector, length):
                return VIRTIO_BLK_S_IOERR, 0
            hostio.preadv_all(fd, writer.views(length), sector * SECTOR)
            self.counts["reads"] += 1
            self.bytes_read += length
            return VIRTIO_BLK_S_OK, length
        if kind == VIRTIO_BLK_T_OUT:
            length = reader.remaining
            if self.image.read_only or length % SECTOR or not self._in_range(sector, length):
                return VIRTIO_BLK_S_IOERR, 0
            hostio.pwritev_all(fd, reader.views(length), sector * SECTOR)
            self.counts["writes"] += 1
            self.bytes_written += length
            return VIRTIO_BLK_S_OK, 0
        if kind == VIRTIO_BLK_T_FLUSH:
            os.fdatasync(fd)
            self.counts["flushes"] += 1
            return VIRTIO_BLK_S_OK, 0
        if kind == VIRTIO_BLK_T_GET_ID:
            self.counts["get_id"] += 1
            ident = self.image.serial.encode("ascii").ljust(ID_BYTES, b"\0")
            return VIRTIO_BLK_S_OK, writer.write(ident[: writer.remaining - 1])
        if kind in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            return self._discard_or_zero(kind, reader), 0
        return VIRTIO_BLK_S_UNSUPP, 0

    def _discard_or_zero(self, kind: int, reader: ChainReader) -> int:
        feature = VIRTIO_BLK_F_DISCARD if kind == VIRTIO_BLK_T_DISCARD else VIRTIO_BLK_F_WRITE_ZEROES
        if not self.has_feature(feature):
            return VIRTIO_BLK_S_UNSUPP
        if self.image.read_only:
            return VIRTIO_BLK_S_IOERR
        count, rest = divmod(reader.remaining, _SEGMENT.size)
        if rest or not 1 <= count <= MAX_DISCARD_SEG:
            return VIRTIO_BLK_S_IOERR
        segments = [_SEGMENT.unpack(reader.read(_SEGMENT.size)) for _ in range(count)]
        for sector, sectors, flags in segments:
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                return VIRTIO_BLK_S_UNSUPP
            if kind == VIRTIO_BLK_T_DISCARD and flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                return VIRTIO_BLK_S_UNSUPP
            if sectors > MAX_DISCARD_SECTORS or not self._in_range(sector, sectors * SECTOR):
                return VIRTIO_BLK_S_IOERR
        fd = self.image.fd
        for sector, sectors, _flags in segments:
            if kind == VIRTIO_BLK_T_WRITE_ZEROES:
                hostio.write_zeroes(fd, sector * SECTOR, sectors * SECTOR)
                continue
            try:
                hostio.punch_hole(fd, sector * SECTOR, sectors * SECTOR)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        self.counts["discards" if kind == VIRTIO_BLK_T_DISCARD else "write_zeroes"] += 1
        return VIRTIO_BLK_S_OK

    # --- reporting ---

    def stats(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in self.counts.items())
        return (
            f"{self.capacity * SECTOR} bytes{' ro' if self.image.read_only else ''}: {counts} "
            f"read={self.bytes_read} written={self.bytes_written} ioerr={self.ioerr} unsupp={self.unsupported}"
        )

    def counters(self) -> dict[str, int]:
        return {"disk_read_bytes": self.bytes_read, "disk_written_bytes": self.bytes_written}

    def state(self) -> dict[str, Any]:
        return {"capacity": self.capacity}

    def restore(self, state: dict[str, Any]) -> None:
        capacity = st.load(state, {"capacity": st.uint(64)}, self.name)["capacity"]
        if capacity != self.capacity:
            raise SnapshotError(f"{self.name}: the snapshot's disk had {capacity} sectors, {self.image.path} has "
                                f"{self.capacity}")  # fmt: skip

    def close(self) -> None:
        self.image.close()
