"""The default Linux guest boots to userspace on popek's software CPU (`--accel soft`), with no /dev/kvm involved:
the kernel, its interrupt and timer platform (PIC, PIT, I/O APIC, local APIC) and busybox all run in Python; the
command runs through the guest agent over virtio-vsock (as `popek run -- CMD` does on KVM: its output and exit
status are the command's), and a virtio-blk disk is read and written through the same driver and device as on
KVM, with every notification handled synchronously in the deterministic run loop. About 75 M guest instructions
to userspace; minutes of wall time, so ONE boot (a module fixture) serves the tests."""

from __future__ import annotations

import subprocess
import sys

import pytest

from popek import image

from .guests import Boot

BOOT_TIMEOUT = 2400  # ~8 minutes on a busy 2-core machine; the margin is for slower ones

pytestmark = [pytest.mark.linux, pytest.mark.slow, pytest.mark.timeout(BOOT_TIMEOUT + 180)]

DISK = "soft.img"  # in the module's folder (Boot.tmp)
SCRIPT = (
    "echo popek-soft-marker; uname -sm;"
    " echo host=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 9);"
    " printf SOFT-WROTE | dd of=/dev/vda bs=512 seek=1 conv=sync,fsync 2>/dev/null && echo soft-write-ok;"
    " exit 9"
)


@pytest.fixture(scope="module")
def soft_boot(guest: image.GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Boot:
    tmp = tmp_path_factory.mktemp("soft")
    disk = tmp / DISK
    disk.write_bytes(b"HOST-DATA".ljust(256 * 512, b"\0"))
    r = subprocess.run(
        [sys.executable, "-m", "popek", "run", "--accel", "soft", "--timeout", str(BOOT_TIMEOUT), "--stats",
         "--boot-timeout", str(BOOT_TIMEOUT), "--console", "--disk", str(disk), "--", "sh", "-c", SCRIPT],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=BOOT_TIMEOUT + 120,
    )  # fmt: skip
    return Boot(r, tmp)


def test_default_guest_boots_to_userspace_on_the_software_cpu(soft_boot: Boot) -> None:
    r, log = soft_boot.result, soft_boot.log
    assert "Linux version 6.1" in r.stderr, log  # the kernel log, on stderr with --console
    assert "instructions: " in r.stderr, log


def test_the_agent_runs_the_command_over_vsock_on_the_software_cpu(soft_boot: Boot) -> None:
    r, log = soft_boot.result, soft_boot.log
    # through the agent, stdout is the command's alone: busybox's uname -sm, in guest user mode on the software CPU
    assert r.stdout.startswith("popek-soft-marker\nLinux x86_64\n"), log
    assert "Linux version" not in r.stdout, log
    assert r.returncode == 9, log
    stats = next((line for line in r.stderr.splitlines() if line.startswith("virtio-vsock")), None)
    assert stats is not None, log
    assert "NEEDS RESET" not in stats, stats


def test_a_disk_is_read_and_written_on_the_software_cpu(soft_boot: Boot) -> None:
    r, log = soft_boot.result, soft_boot.log
    assert "\nhost=HOST-DATA" in r.stdout and "soft-write-ok" in r.stdout, log
    assert (soft_boot.tmp / DISK).read_bytes()[512:522] == b"SOFT-WROTE"
    stats = next((line for line in r.stderr.splitlines() if line.startswith("virtio-blk vda")), None)
    assert stats is not None, log
    assert "flushes=0" not in stats and "NEEDS RESET" not in stats, stats
