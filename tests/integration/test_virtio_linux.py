"""The default Linux guest with virtio devices on the KVM backend: its virtio_mmio driver finds the devices on the
command line popek extends; virtio-blk disks (raw, read-only, ext4) are read and written from guest userspace
and the host sees the writes after the VM stops; a second boot, of the bzImage through the 64-bit boot protocol
and through vCPU exits instead of ioeventfd/irqfd, reads them back; /dev/hwrng reads work; /dev/hvc0 carries
output to a file and input from a socket."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from popek import image

from .guests import Boot

BOOT_TIMEOUT = 1200

pytestmark = [
    pytest.mark.timeout(2 * BOOT_TIMEOUT + 300),
    pytest.mark.kvm,
    pytest.mark.linux,
    pytest.mark.slow,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs a usable /dev/kvm"),
]

SECTORS = 2048  # a 1 MiB raw disk
HOST_PATTERN = b"HOST-PATTERN-popek"
GUEST_PATTERN = "GUEST-PATTERN-0123456789"
HOST_TO_GUEST = "ping-from-the-host"

FIRST_BOOT = f"""
echo "serial=$(cat /sys/block/vda/serial)"
echo "size=$(cat /sys/block/vda/size)"
echo "host-pattern=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c {len(HOST_PATTERN)})"
printf {GUEST_PATTERN} | dd of=/dev/vda bs=512 seek=8 conv=sync,fsync 2>/dev/null && echo guest-write-ok
dd if=/dev/zero of=/dev/vda bs=512 seek={SECTORS} count=1 2>/dev/null || echo past-end-write-failed
echo "past-end-read=$(dd if=/dev/vda bs=512 skip={SECTORS} count=1 2>/dev/null | wc -c)"
echo "vdb-ro=$(cat /sys/block/vdb/ro)"
dd if=/dev/zero of=/dev/vdb bs=512 count=1 2>/dev/null || echo ro-write-refused
echo "ro-read=$(dd if=/dev/vdb bs=512 count=1 2>/dev/null | head -c 8)"
mkdir -p /tmp/m && mount -t ext4 /dev/vdc /tmp/m && cat /tmp/m/hello.txt && echo from-the-guest > /tmp/m/guest.txt \
  && umount /tmp/m && echo ext4-ok
echo "rng-bytes=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | wc -c)"
exec 3<>/dev/hvc0  # one open: the host's line arrived at boot, and a tty's last close drops unread input
echo popek-hvc-out >&3
read -r line <&3; echo "hvc-in=$line"
"""
SECOND_BOOT = 'echo "read-back=$(dd if=/dev/vda bs=512 skip=8 count=1 2>/dev/null | head -c 24)"'


def popek(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "popek", "run", "--timeout", str(BOOT_TIMEOUT), "--stats", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=BOOT_TIMEOUT + 120,
    )


def serve_console(path: Path, received: list[bytes]) -> socket.socket:
    """A Unix socket popek connects --console2 to: it sends a line at once and keeps what the guest writes."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(HOST_TO_GUEST.encode() + b"\n")
            while data := conn.recv(4096):
                received.append(data)

    threading.Thread(target=serve, daemon=True).start()
    return listener


@pytest.fixture(scope="module")
def first_boot(guest: image.GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Boot:
    tmp = tmp_path_factory.mktemp("virtio")
    (tmp / "raw.img").write_bytes(HOST_PATTERN.ljust(SECTORS * 512, b"\0"))
    (tmp / "ro.img").write_bytes(b"RO-IMAGE".ljust(64 * 512, b"\0"))
    content = tmp / "ext4-content"
    content.mkdir()
    (content / "hello.txt").write_text("hello from an ext4 image\n")
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(content), str(tmp / "ext4.img"), "4M"], check=True, capture_output=True
    )
    received: list[bytes] = []
    listener = serve_console(tmp / "console.sock", received)
    try:
        result = popek(
            "--disk", f"{tmp / 'raw.img'},serial=popek-raw-0",
            "--disk", f"{tmp / 'ro.img'},ro",
            "--disk", str(tmp / "ext4.img"),
            "--rng",
            "--console2", str(tmp / "console.sock"),
            "--no-agent", "--", "sh", "-c", FIRST_BOOT,
        )  # fmt: skip
    finally:
        listener.close()
    (tmp / "console.out").write_bytes(b"".join(received))
    return Boot(result, tmp)


pytestmark.append(pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs mkfs.ext4 (e2fsprogs)"))


def test_the_guest_finds_every_device_on_the_command_line(first_boot: Boot) -> None:
    out = first_boot.result.stdout
    for base, irq in ((0xD0000000, 5), (0xD0001000, 6), (0xD0002000, 7), (0xD0003000, 10), (0xD0004000, 11)):
        assert f"Registering device virtio-mmio.{(base - 0xD0000000) >> 12} at {base:#x}" in out, first_boot.log
        assert f"IRQ {irq}." in out, first_boot.log
    assert first_boot.result.returncode == 0, first_boot.log


def test_disk_size_serial_and_host_data_are_what_the_guest_reads(first_boot: Boot) -> None:
    assert first_boot.value("size") == str(SECTORS)
    assert first_boot.value("serial") == "popek-raw-0"
    assert first_boot.value("host-pattern") == HOST_PATTERN.decode()


def test_a_guest_write_reaches_the_host_file(first_boot: Boot) -> None:
    assert "guest-write-ok" in first_boot.result.stdout, first_boot.log
    data = (first_boot.tmp / "raw.img").read_bytes()
    assert data[8 * 512 : 8 * 512 + len(GUEST_PATTERN)] == GUEST_PATTERN.encode()
    assert len(data) == SECTORS * 512
    stats = next(line for line in first_boot.result.stderr.splitlines() if line.startswith("virtio-blk vda"))
    assert "flushes=0" not in stats, stats  # conv=fsync reached the device as VIRTIO_BLK_T_FLUSH


def test_nothing_is_read_or_written_past_the_end(first_boot: Boot) -> None:
    assert "past-end-write-failed" in first_boot.result.stdout, first_boot.log
    assert first_boot.value("past-end-read") == "0"


def test_a_read_only_disk_refuses_writes(first_boot: Boot) -> None:
    assert first_boot.value("vdb-ro") == "1"  # the guest honours VIRTIO_BLK_F_RO
    assert "ro-write-refused" in first_boot.result.stdout, first_boot.log
    assert first_boot.value("ro-read") == "RO-IMAGE"
    assert (first_boot.tmp / "ro.img").read_bytes() == b"RO-IMAGE".ljust(64 * 512, b"\0")


def test_an_ext4_image_mounts_and_keeps_what_the_guest_wrote(first_boot: Boot) -> None:
    assert "hello from an ext4 image" in first_boot.result.stdout and "ext4-ok" in first_boot.result.stdout, (
        first_boot.log
    )
    r = subprocess.run(
        ["debugfs", "-R", "cat /guest.txt", str(first_boot.tmp / "ext4.img")], capture_output=True, text=True
    )
    assert r.stdout == "from-the-guest\n", r.stderr


def test_hwrng_reads_come_from_virtio_rng(first_boot: Boot) -> None:
    assert first_boot.value("rng-bytes") == "32"
    stats = next(line for line in first_boot.result.stderr.splitlines() if line.startswith("virtio-rng"))
    assert "bytes=0" not in stats, stats


def test_the_second_console_carries_both_directions(first_boot: Boot) -> None:
    assert first_boot.value("hvc-in") == HOST_TO_GUEST
    assert b"popek-hvc-out" in (first_boot.tmp / "console.out").read_bytes(), first_boot.log


def virtio_stats(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("virtio-")]


def test_the_fast_path_kept_notifications_off_the_vcpus(first_boot: Boot) -> None:
    err = first_boot.result.stderr
    assert "ioeventfd=on irqfd=on" in err, first_boot.log
    devices = virtio_stats(err)
    assert len(devices) == 5 and all("notify-exits=0" in line for line in devices), err
    assert sum(int(n) for line in devices for n in re.findall(r"notifies=(\d+)", line)) > 10, err


def test_a_second_boot_from_the_bzimage_through_vcpu_exits_reads_the_data_back(
    guest: image.GuestImage, first_boot: Boot
) -> None:
    # the bzImage of the same kernel, through the 64-bit boot protocol; with --kernel popek does not read the
    # default guest's exit protocol, so the command's status is the guest's line and the guest's reset ends the VM
    raw = str(first_boot.tmp / "raw.img")
    append = f"{guest.cmdline} {image.command_parameter(['sh', '-c', SECOND_BOOT + '; exit 3'])}"
    r = popek("--no-eventfds", "--disk", raw, "--kernel", str(guest.bzimage), "--initrd", str(guest.initrd),
              "--append", append)  # fmt: skip
    boot = Boot(r, first_boot.tmp)
    assert "Linux version 6.1" in r.stdout, boot.log
    assert "popek-guest-ready" in r.stdout and "popek-exit-status: 3" in r.stdout, boot.log
    assert "popek: VM stopped: reset" in r.stderr and r.returncode == 0, boot.log
    assert boot.value("read-back") == GUEST_PATTERN
    assert "ioeventfd=off irqfd=off" in r.stderr, boot.log
    (disk,) = virtio_stats(r.stderr)
    notifies = sum(int(n) for n in re.findall(r"notifies=(\d+)", disk))
    assert notifies > 0 and f"notify-exits={notifies}" in disk, disk
