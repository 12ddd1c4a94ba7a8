"""A real Linux kernel (popek's default guest: Debian's linux-source-6.1, tinyconfig plus popek's fragment, and a
busybox initramfs) boots on the KVM backend of this machine.

Where the host can deliver system calls from guest user mode (`test_user_mode`), the guest's init runs a command
and popek returns its status. Where it cannot (a PVM host running a non-PVM guest: SYSCALL from ring 3 never
reaches the guest kernel), the kernel still boots to the point of starting /init, and popek reports that the
guest never returned a status instead of pretending success.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from .test_user_mode import user_syscalls_reach_the_kernel

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.linux,
    pytest.mark.slow,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs a usable /dev/kvm"),
    pytest.mark.skipif(shutil.which("nasm") is None, reason="needs nasm for the user-mode probe guest"),
]

BOOT_TIMEOUT = 1200  # ring-0 code may be emulated by the host at ~1.4 M instructions/s


@pytest.fixture(scope="module")
def guest() -> object:
    from popek import image

    try:
        return image.ensure_default_guest(progress=False)
    except image.ImageError as e:
        pytest.fail(f"the default guest could not be built: {e}")


@pytest.fixture(scope="module")
def syscalls_work(tmp_path_factory: pytest.TempPathFactory) -> bool:
    return user_syscalls_reach_the_kernel(tmp_path_factory.mktemp("probe"))


def popek(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "popek", "run", "--timeout", str(BOOT_TIMEOUT), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=BOOT_TIMEOUT + 120,
    )


def test_default_guest_boots_linux_and_returns_the_commands_status(guest: object, syscalls_work: bool) -> None:
    r = popek("--stats", "--", "sh", "-c", "echo popek-linux-marker; uname -sr; exit 7")
    log = f"stdout:\n{r.stdout[-6000:]}\nstderr:\n{r.stderr[-4000:]}"
    assert "Linux version 6.1" in r.stdout, log
    assert "Run /init as init process" in r.stdout, log
    if syscalls_work:
        assert "popek-guest-ready" in r.stdout and "popek-linux-marker" in r.stdout, log
        assert r.returncode == 7, log
    else:
        assert r.returncode != 0, log
        assert "never reported" in r.stderr, log
    assert "assists:" in r.stderr, log


def test_bzimage_of_the_same_kernel_boots_through_the_64_bit_protocol(guest: object) -> None:
    g = guest
    r = popek("--kernel", str(g.bzimage), "--initrd", str(g.initrd), "--append", g.cmdline)  # type: ignore[attr-defined]
    log = f"stdout:\n{r.stdout[-6000:]}\nstderr:\n{r.stderr[-4000:]}"
    assert "Linux version 6.1" in r.stdout, log
    assert "Run /init as init process" in r.stdout, log
    assert "popek: VM stopped: reset" in r.stderr, log
