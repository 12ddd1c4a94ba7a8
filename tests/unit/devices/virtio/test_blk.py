"""virtio-blk (virtio 1.2 §5.2) on a temporary image: every request type, read-only disks, requests past the
end, framing errors, several requests in flight, and the checks on the host file."""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popek.devices.virtio import blk
from popek.devices.virtio.blk import BlockDevice, DiskImage, DiskSpec
from popek.devices.virtio.device import DeviceStatus
from popek.devices.virtio.mmio import CONFIG_OFFSET, MmioTransport
from popek.errors import ConfigError

from .driver import MEM_SIZE, Driver, Irq, RecordingMemory

SECTORS = 64
IMAGE = SECTORS * 512


def header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


def segment(sector: int, sectors: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, sectors, flags)


class Disk:
    def __init__(self, path: Path, read_only: bool = False, serial: str = "") -> None:
        self.path = path
        self.mem = RecordingMemory(MEM_SIZE)
        self.device = BlockDevice(DiskImage(DiskSpec(path, read_only, serial)))
        self.irq = Irq()
        self.drv = Driver(MmioTransport(self.device, self.mem, self.irq), self.mem)
        self.features = self.drv.init()

    def request(self, kind: int, sector: int = 0, data: bytes = b"", read: int = 0) -> tuple[int, bytes, int]:
        """(status, bytes read, used length) of one request: header + data readable, `read` bytes + status writable."""
        writable = [read, 1] if read else [1]
        head, outs = self.drv.submit(0, [header(kind, sector), *([data] if data else [])], writable)
        self.drv.kick(0)
        used = dict(self.drv.take_used(0))
        status = self.mem.read(outs[-1], 1)[0]
        return status, self.mem.read(outs[0], read) if read else b"", used[head]

    def close(self) -> None:
        self.device.close()
        self.mem.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (IMAGE // 256))
    return path


@pytest.fixture
def disk(image: Path) -> Iterator[Disk]:
    d = Disk(image, serial="popek-disk-0")
    yield d
    d.close()


def test_config_space_has_capacity_seg_max_and_discard_limits(disk: Disk) -> None:
    config = disk.drv.t.read(CONFIG_OFFSET, 60)
    capacity, _size_max, seg_max = struct.unpack_from("<QII", config)
    assert capacity == SECTORS and seg_max == blk.QUEUE_SIZE - 2
    assert struct.unpack_from("<I", config, 20)[0] == 512  # blk_size
    max_discard, max_seg, align, max_wz, max_wz_seg = struct.unpack_from("<5I", config, 36)
    assert (max_discard, max_seg, align) == (blk.MAX_DISCARD_SECTORS, blk.MAX_DISCARD_SEG, 8)
    assert (max_wz, max_wz_seg, config[56]) == (blk.MAX_DISCARD_SECTORS, blk.MAX_DISCARD_SEG, 1)
    assert disk.features & (blk.VIRTIO_BLK_F_FLUSH | blk.VIRTIO_BLK_F_DISCARD | blk.VIRTIO_BLK_F_WRITE_ZEROES)
    assert not disk.features & blk.VIRTIO_BLK_F_RO


def test_read_returns_the_image_and_write_reaches_the_file(disk: Disk, image: Path) -> None:
    status, data, used = disk.request(blk.VIRTIO_BLK_T_IN, 2, read=1024)
    assert status == blk.VIRTIO_BLK_S_OK and used == 1025
    assert data == image.read_bytes()[1024:2048]
    status, _, used = disk.request(blk.VIRTIO_BLK_T_OUT, 5, b"P" * 512)
    assert status == blk.VIRTIO_BLK_S_OK and used == 1
    assert image.read_bytes()[5 * 512 : 6 * 512] == b"P" * 512
    assert disk.request(blk.VIRTIO_BLK_T_FLUSH)[0] == blk.VIRTIO_BLK_S_OK
    assert disk.device.counts["flushes"] == 1 and disk.device.bytes_written == 512


def test_get_id_returns_the_serial_nul_padded(disk: Disk) -> None:
    status, ident, used = disk.request(blk.VIRTIO_BLK_T_GET_ID, read=20)
    assert status == blk.VIRTIO_BLK_S_OK and ident == b"popek-disk-0".ljust(20, b"\0") and used == 21


@pytest.mark.parametrize(
    ("kind", "sector", "data", "read"),
    [
        (blk.VIRTIO_BLK_T_IN, SECTORS - 1, b"", 1024),  # one sector past the end
        (blk.VIRTIO_BLK_T_IN, (1 << 64) - 1, b"", 512),  # a sector number that wraps in 64 bits
        (blk.VIRTIO_BLK_T_OUT, SECTORS, b"x" * 512, 0),
        (blk.VIRTIO_BLK_T_IN, 0, b"", 100),  # not a multiple of 512
        (blk.VIRTIO_BLK_T_OUT, 0, b"x" * 513, 0),
        (blk.VIRTIO_BLK_T_DISCARD, 0, segment(0, 1) + b"xx", 0),  # not whole segments
        (blk.VIRTIO_BLK_T_DISCARD, 0, segment(0, 1) * (blk.MAX_DISCARD_SEG + 1), 0),
        (blk.VIRTIO_BLK_T_WRITE_ZEROES, 0, segment(SECTORS - 1, 2), 0),
        (blk.VIRTIO_BLK_T_WRITE_ZEROES, 0, segment(0, blk.MAX_DISCARD_SECTORS + 1), 0),
    ],
)
def test_bad_requests_are_io_errors_and_leave_the_file_alone(
    disk: Disk, image: Path, kind: int, sector: int, data: bytes, read: int
) -> None:
    before = image.read_bytes()
    assert disk.request(kind, sector, data, read)[0] == blk.VIRTIO_BLK_S_IOERR
    assert image.read_bytes() == before
    assert not disk.drv.status & DeviceStatus.DEVICE_NEEDS_RESET


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        (7, b""),  # not a request type
        (blk.VIRTIO_BLK_T_DISCARD, segment(0, 1, blk.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)),  # unmap on a discard
        (blk.VIRTIO_BLK_T_WRITE_ZEROES, segment(0, 1, 2)),  # an unknown flag
    ],
)
def test_unsupported_requests_and_flags_are_unsupp(disk: Disk, kind: int, data: bytes) -> None:
    assert disk.request(kind, 0, data)[0] == blk.VIRTIO_BLK_S_UNSUPP


def test_discard_and_write_zeroes_punch_holes_that_read_back_as_zeros(disk: Disk, image: Path) -> None:
    size_before = image.stat().st_size
    status, _, _ = disk.request(blk.VIRTIO_BLK_T_DISCARD, 0, segment(8, 8) + segment(32, 8))
    assert status == blk.VIRTIO_BLK_S_OK
    unmap = blk.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    assert disk.request(blk.VIRTIO_BLK_T_WRITE_ZEROES, 0, segment(1, 2) + segment(48, 1, unmap))[0] == 0
    content = image.read_bytes()
    assert image.stat().st_size == size_before
    for first, count in ((1, 2), (48, 1)):
        assert content[first * 512 : (first + count) * 512] == bytes(count * 512)
    assert content[:512] == bytes(range(256)) * 2  # sector 0 untouched
    # discarded ranges need not read as zero, but where the file system punched them they do, as holes
    status, data, _ = disk.request(blk.VIRTIO_BLK_T_IN, 8, read=512)
    assert status == blk.VIRTIO_BLK_S_OK and data in (bytes(512), bytes(range(256)) * 2)


def test_a_read_only_disk_refuses_writes_and_writes_nothing(image: Path) -> None:
    d = Disk(image, read_only=True)
    try:
        before = image.read_bytes()
        assert d.features & blk.VIRTIO_BLK_F_RO
        assert not d.features & (blk.VIRTIO_BLK_F_DISCARD | blk.VIRTIO_BLK_F_WRITE_ZEROES)
        assert d.request(blk.VIRTIO_BLK_T_OUT, 0, b"w" * 512)[0] == blk.VIRTIO_BLK_S_IOERR
        assert d.request(blk.VIRTIO_BLK_T_DISCARD, 0, segment(0, 1))[0] == blk.VIRTIO_BLK_S_UNSUPP  # not negotiated
        assert d.request(blk.VIRTIO_BLK_T_FLUSH)[0] == blk.VIRTIO_BLK_S_OK
        assert d.request(blk.VIRTIO_BLK_T_IN, 0, read=512)[1] == before[:512]
        assert image.read_bytes() == before
    finally:
        d.close()


def test_a_file_the_user_cannot_write_is_a_read_only_disk(image: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root may write any file")
    image.chmod(0o444)
    d = DiskImage(DiskSpec(image))
    assert d.read_only
    d.close()


def test_several_requests_in_flight_complete_in_one_notification(disk: Disk, image: Path) -> None:
    outs = []
    for i in range(10):
        if i % 2:
            outs.append(
                disk.drv.submit(0, [header(blk.VIRTIO_BLK_T_OUT, i), bytes([i]) * 512], [1], indirect=i % 4 == 1)
            )
        else:
            outs.append(disk.drv.submit(0, [header(blk.VIRTIO_BLK_T_IN, i)], [512, 1], indirect=i % 4 == 0))
    disk.drv.kick(0)
    used = disk.drv.take_used(0)
    assert [h for h, _ in used] == [head for head, _ in outs]
    assert all(disk.mem.read(o[-1], 1) == b"\0" for _, o in outs)
    content = image.read_bytes()
    assert all(content[i * 512 : (i + 1) * 512] == bytes([i]) * 512 for i in range(1, 10, 2))
    assert disk.irq.pulses == 1


def test_a_header_split_across_descriptors_is_still_a_request(disk: Disk, image: Path) -> None:
    """§2.7.4.1: the device makes no assumption about how the driver split a request into descriptors."""
    h = header(blk.VIRTIO_BLK_T_IN, 3)
    head, outs = disk.drv.submit(0, [h[:5], h[5:12], h[12:]], [100, 412, 1])
    disk.drv.kick(0)
    assert disk.drv.take_used(0) == [(head, 513)]
    assert disk.mem.read(outs[0], 100) + disk.mem.read(outs[1], 412) == image.read_bytes()[1536:2048]


@pytest.mark.parametrize(("readable", "writable"), [([b"short"], [1]), ([header(blk.VIRTIO_BLK_T_IN)], [])])
def test_a_request_without_header_or_status_needs_a_reset(
    disk: Disk, readable: list[bytes], writable: list[int]
) -> None:
    disk.drv.submit(0, readable, writable)
    disk.drv.kick(0)
    assert disk.drv.status & DeviceStatus.DEVICE_NEEDS_RESET
    assert "header or a status byte" in (disk.drv.t.error or "")


# --- the host side ---


def test_disk_options_parse_and_bad_ones_are_config_errors(tmp_path: Path) -> None:
    assert DiskSpec.parse("a.img,ro,serial=abc") == DiskSpec(Path("a.img"), True, "abc")
    for text, message in [
        ("", "needs a path"),
        ("a.img,rw", "unknown --disk option"),
        ("a.img,serial=" + "x" * 21, "at most 20"),
        ("a.img,serial=caf\u00e9", "printable ASCII"),
    ]:
        with pytest.raises(ConfigError, match=message):
            DiskSpec.parse(text)


def test_bad_images_are_one_line_config_errors(tmp_path: Path, image: Path) -> None:
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    for path, message in [
        (tmp_path / "missing.img", "No such file"),
        (tmp_path, "not a regular file or a block device"),
        (odd, "not a multiple of 512"),
        (Path("/dev/null"), "not a regular file or a block device"),
    ]:
        with pytest.raises(ConfigError, match=message):
            DiskImage(DiskSpec(path))
    holder = os.open(image, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="in use by another process"):
            DiskImage(DiskSpec(image, read_only=True))
    finally:
        os.close(holder)


def test_an_image_is_locked_while_open(image: Path) -> None:
    first = DiskImage(DiskSpec(image))
    try:
        with pytest.raises(ConfigError, match="in use"):
            DiskImage(DiskSpec(image))
    finally:
        first.close()
    DiskImage(DiskSpec(image)).close()  # released


# --- fuzzing the device through its queue ---


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    requests=st.lists(
        st.tuples(
            st.sampled_from([0, 1, 4, 8, 11, 13, 99, 0xFFFFFFFF]),
            st.one_of(st.integers(0, SECTORS + 2), st.integers(0, (1 << 64) - 1)),
            st.lists(st.integers(0, 1100), max_size=3),
            st.lists(st.integers(0, 1100), max_size=3),
            st.booleans(),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_fuzzed_requests_complete_or_fail_cleanly(
    image: Path, requests: list[tuple[int, int, list[int], list[int], bool]]
) -> None:
    d = Disk(image)
    try:
        size = image.stat().st_size
        for kind, sector, reads, writes, indirect in requests:
            readable = [header(kind, sector), *(os.urandom(n) for n in reads)]
            d.drv.submit(0, readable, writes, indirect=indirect)
        d.drv.kick(0)
        used = d.drv.take_used(0)
        if d.drv.status & DeviceStatus.DEVICE_NEEDS_RESET:
            assert d.drv.t.error
        else:
            assert len(used) == len(requests)
        assert image.stat().st_size == size  # nothing grows the image
    finally:
        d.close()
