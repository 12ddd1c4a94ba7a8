"""The default Linux guest boots to userspace on popek's software CPU (`--accel soft`), with no /dev/kvm involved:
the kernel, its interrupt and timer platform (PIC, PIT, I/O APIC, local APIC) and busybox all run in Python.
About 75 M guest instructions; minutes of wall time."""

from __future__ import annotations

import subprocess
import sys

import pytest

from popek import image

BOOT_TIMEOUT = 2400  # ~8 minutes on a busy 2-core machine; the margin is for slower ones

pytestmark = [pytest.mark.linux, pytest.mark.slow, pytest.mark.timeout(BOOT_TIMEOUT + 180)]


def test_default_guest_boots_to_userspace_on_the_software_cpu(guest: image.GuestImage) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "popek", "run", "--accel", "soft", "--timeout", str(BOOT_TIMEOUT), "--stats",
         "--no-agent", "--", "sh", "-c", "echo popek-soft-marker; uname -sm; exit 9"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=BOOT_TIMEOUT + 120,
    )  # fmt: skip
    log = f"stdout:\n{r.stdout[-6000:]}\nstderr:\n{r.stderr[-4000:]}"
    assert "Linux version 6.1" in r.stdout, log
    assert "popek-guest-ready" in r.stdout and "popek-soft-marker" in r.stdout, log
    assert "\nLinux x86_64" in r.stdout, log  # uname -sm, from busybox in guest user mode on the software CPU
    assert r.returncode == 9, log
    assert "instructions: " in r.stderr, log
