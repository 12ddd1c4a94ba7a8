"""The default Linux guest with a virtio-blk disk on popek's software CPU (`--accel soft`): the same driver and
device as on KVM, with every notification handled synchronously in the deterministic run loop. One boot, minutes
of wall time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from popek import image

BOOT_TIMEOUT = 2400

pytestmark = [pytest.mark.linux, pytest.mark.slow, pytest.mark.timeout(BOOT_TIMEOUT + 180)]

SCRIPT = (
    "echo host=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 9);"
    " printf SOFT-WROTE | dd of=/dev/vda bs=512 seek=1 conv=sync,fsync 2>/dev/null && echo soft-write-ok"
)


def test_a_disk_is_read_and_written_on_the_software_cpu(guest: image.GuestImage, tmp_path: Path) -> None:
    disk = tmp_path / "soft.img"
    disk.write_bytes(b"HOST-DATA".ljust(256 * 512, b"\0"))
    r = subprocess.run(
        [sys.executable, "-m", "popek", "run", "--accel", "soft", "--timeout", str(BOOT_TIMEOUT), "--stats",
         "--disk", str(disk), "--no-agent", "--", "sh", "-c", SCRIPT],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=BOOT_TIMEOUT + 120,
    )  # fmt: skip
    log = f"stdout:\n{r.stdout[-6000:]}\nstderr:\n{r.stderr[-4000:]}"
    assert "\nhost=HOST-DATA" in r.stdout and "soft-write-ok" in r.stdout, log
    assert r.returncode == 0, log
    assert disk.read_bytes()[512:522] == b"SOFT-WROTE"
    stats = next(line for line in r.stderr.splitlines() if line.startswith("virtio-blk vda"))
    assert "flushes=0" not in stats and "NEEDS RESET" not in stats, stats
