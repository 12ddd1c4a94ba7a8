"""A real Linux kernel (popek's default guest: Debian's linux-source-6.1, tinyconfig plus popek's fragment, and a
busybox initramfs) boots on the KVM backend of this machine to userspace, where its init runs a command, and
popek returns the command's status (the bzImage of the same kernel, through the 64-bit boot protocol, boots in
test_virtio_linux's second boot). On hosts that do only half of a SYSCALL from guest ring 3, that takes
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


# Many processes, each ending with a SIGCHLD to its parent and a signal of its own: every signal delivery makes the
# guest kernel XSAVE the FPU state into a new frame on the user's stack, at ring 0, where this machine's KVM hands
# the XSAVE to popek; a frame on a stack page not yet faulted in must be the guest's #PF (it once stopped the VM
# with "guest address ... is not mapped" in 2 of 5 boots).
REPEATED = (
    "for i in $(seq 30); do sh -c 'trap \"echo sig$1\" USR1; kill -USR1 $$; uname -sr >/dev/null' x $i || exit 99;"
    " done; echo popek-linux-marker; uname -sr; exit 7"
)


def test_default_guest_boots_linux_and_runs_commands_repeatedly_returning_the_status(guest: image.GuestImage) -> None:
    r = popek("--stats", "--no-agent", "--", "sh", "-c", REPEATED)  # the serial-console protocol
    log = f"stdout:\n{r.stdout[-6000:]}\nstderr:\n{r.stderr[-4000:]}"
    assert "Linux version 6.1" in r.stdout, log
    assert "popek-guest-ready" in r.stdout and "popek-linux-marker" in r.stdout, log
    assert all(f"sig{i}" in r.stdout.split() for i in range(1, 31)), log  # every handler ran, in user mode
    assert "\nLinux 6.1." in r.stdout, log  # uname -sr, run by busybox in guest user mode
    assert r.returncode == 7, log
    assert "assists:" in r.stderr, log

