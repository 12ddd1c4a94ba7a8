"""The default guest image itself, cross-checked under QEMU's TCG (a peer that runs guest user mode on this
machine): its init runs the command popek passes on the kernel command line and reports the command's exit
status in the form popek parses. This separates "the image is right" from "the host can run it"."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from popek import image

pytestmark = [
    pytest.mark.linux,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86 (the TCG peer)"),
]


def qemu(guest: image.GuestImage, argv: list[str]) -> bytes:
    cmdline = f"{guest.cmdline} {image.command_parameter(argv)}"
    r = subprocess.run(
        [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            "256",
            "-nographic",
            "-no-reboot",
            "-cpu",
            "max",
            "-kernel",
            str(guest.kernel),
            "-initrd",
            str(guest.initrd),
            "-append",
            cmdline,
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=300,
    )
    return r.stdout


def test_init_runs_the_command_and_reports_its_status_under_tcg(guest: image.GuestImage) -> None:
    out = qemu(guest, ["sh", "-c", "uname -sr; echo 'quoted $HOME'; exit 7"])
    assert image.READY_MARKER in out, out[-3000:]
    assert b"Linux 6.1" in out and b"quoted $HOME" in out, out[-3000:]
    assert image.parse_exit_status(out) == 7, out[-3000:]


def test_init_reports_success_of_a_plain_command_under_tcg(guest: image.GuestImage) -> None:
    out = qemu(guest, ["true"])
    assert image.parse_exit_status(out) == 0, out[-3000:]
