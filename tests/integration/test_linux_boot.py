"""A real Linux kernel (popek's default guest: Debian's linux-source-6.1, tinyconfig plus popek's fragment, and a
busybox initramfs) boots on the KVM backend of this machine to userspace, where its init runs a command, and
popek returns the command's status. On hosts that do only half of a SYSCALL from guest ring 3, that takes
popek's syscall assist (`popek.accel.kvm_syscall`).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from popek import image

BOOT_TIMEOUT = 1200  # ring-0 code may be emulated by the host at ~1.4 M instructions/s

pytestmark = [
    pytest.mark.timeout(BOOT_TIMEOUT + 180),  # the suite's default (600 s) is for everything else
    pytest.mark.kvm,
    pytest.mark.linux,
    pytest.mark.slow,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs a usable /dev/kvm"),
]


def popek(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "popek", "run", "--timeout", str(BOOT_TIMEOUT), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=BOOT_TIMEOUT + 120,
    )


def test_default_guest_boots_linux_and_returns_the_commands_status(guest: image.GuestImage) -> None:
    r = popek("--stats", "--", "sh", "-c", "echo popek-linux-marker; uname -sr; exit 7")
    log = f"stdout:\n{r.stdout[-6000:]}\nstderr:\n{r.stderr[-4000:]}"
    assert "Linux version 6.1" in r.stdout, log
    assert "popek-guest-ready" in r.stdout and "popek-linux-marker" in r.stdout, log
    assert "\nLinux 6.1." in r.stdout, log  # uname -sr, run by busybox in guest user mode
    assert r.returncode == 7, log
    assert "assists:" in r.stderr, log


def test_bzimage_of_the_same_kernel_boots_through_the_64_bit_protocol(guest: image.GuestImage) -> None:
    append = f"{guest.cmdline} {image.command_parameter(['sh', '-c', 'exit 3'])}"
    r = popek("--kernel", str(guest.bzimage), "--initrd", str(guest.initrd), "--append", append)
    log = f"stdout:\n{r.stdout[-6000:]}\nstderr:\n{r.stderr[-4000:]}"
    assert "Linux version 6.1" in r.stdout, log
    assert "popek-guest-ready" in r.stdout and "popek-exit-status: 3" in r.stdout, log
    # with --kernel popek does not read the default guest's protocol: the guest's reset ends the VM
    assert "popek: VM stopped: reset" in r.stderr, log
    assert r.returncode == 0, log
