"""A snapshot taken while the guest writes its disk loses nothing it was told was written: the Linux guest writes
a known pattern to /dev/vda in the background, the VM is snapshotted mid-write (with a copy of the disk image
taken in the same pause, as a disk travels with a snapshot), and the clone restored from both finishes the write:
the disk then holds the whole pattern, read back past the page cache (O_DIRECT)."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import pytest

import popek
from popek.api import VM

from .guests import KVM_MARKS

pytestmark = [*KVM_MARKS, pytest.mark.linux, pytest.mark.slow]

MIB = 1 << 20
TOTAL_MIB = 3  # 48 writes of 64 KiB: enough to be caught in flight, each one slow where ring 0 is emulated
# the pattern: each 1 MiB block is its block number's line repeated, so a block lost or written twice changes it
WRITER = (
    f"i=0; while [ $i -lt {TOTAL_MIB} ]; do yes \"popek block $i\" | head -c {MIB}; i=$((i+1)); done "
    f"| dd of=/dev/vda bs=64k iflag=fullblock oflag=direct 2>/dev/null; sync; echo done > /root/written"
)


def pattern() -> bytes:
    out = b""
    for i in range(TOTAL_MIB):
        line = f"popek block {i}\n".encode()
        out += (line * (MIB // len(line) + 1))[:MIB]
    return out


def test_a_snapshot_mid_write_restores_to_a_disk_that_holds_everything(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(TOTAL_MIB * MIB + MIB))
    copy = tmp_path / "disk-at-snapshot.img"
    folder = tmp_path / "snap"
    with popek.VM(mem="256M", disks=[str(disk)], cold=True) as vm:
        vm.exec(["sh", "-c", f"setsid sh -c '{WRITER}' </dev/null >/dev/null 2>&1 &"], check=True)
        deadline = time.monotonic() + 120
        while disk.read_bytes()[:12] != b"popek block " and time.monotonic() < deadline:
            time.sleep(0.05)  # the write has begun: a snapshot now catches it in flight
        vm.pause()
        vm.snapshot(folder)
        shutil.copyfile(disk, copy)  # the disk as the paused guest left it: every acknowledged write is in it
        vm.resume()
    written_at_snapshot = copy.read_bytes()[: TOTAL_MIB * MIB]
    assert written_at_snapshot != pattern(), "the write ended before the snapshot: nothing was in flight"
    with VM.restore(folder, disks=[str(copy)]) as clone:
        deadline = time.monotonic() + 300
        while clone.exec(["test", "-e", "/root/written"]).exit_code != 0:
            assert time.monotonic() < deadline, "the clone never finished the write"
            time.sleep(1)
        read = clone.exec(["sh", "-c", f"dd if=/dev/vda bs=1M count={TOTAL_MIB} iflag=direct 2>/dev/null | md5sum"])
    assert read.stdout.split()[0].decode() == hashlib.md5(pattern()).hexdigest()
    assert copy.read_bytes()[: TOTAL_MIB * MIB] == pattern()
