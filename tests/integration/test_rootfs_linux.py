"""popek's Debian 12 root disk (popek/image/rootfs.py) built from the Debian mirror by mmdebstrap (or taken from the
cache), then booted once on KVM: the default kernel and initramfs, whose init mounts the disk and switch_roots into
it, where Debian's python3 runs through the agent. The build needs the mirror (apt works here and in CI) and takes
about half a minute; the boot about as long as the default guest's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from popek.image import ImageError, rootfs
from popek.image.build import recipe_init

BOOT_TIMEOUT = 1200  # as test_linux_boot: ring-0 code may be emulated by the host at ~1.4 M instructions/s
BUILD_TIMEOUT = 1800  # a cold build: the default guest's kernel (~5 min on 2 cores) and the Debian tree

pytestmark = [
    pytest.mark.timeout(BUILD_TIMEOUT + BOOT_TIMEOUT + 300),
    pytest.mark.kvm,
    pytest.mark.linux,
    pytest.mark.slow,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs a usable /dev/kvm"),
    pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="needs mmdebstrap (apt-get install mmdebstrap)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the root disk is built as root (mmdebstrap --mode=root)"),
]


@pytest.fixture(scope="module")
def debian() -> rootfs.RootfsImage:
    started = time.monotonic()
    try:
        image = rootfs.ensure_rootfs("debian", progress=False)
    except ImageError as e:
        pytest.fail(f"the Debian root disk could not be built: {e}")
    print(f"Debian root disk ready in {time.monotonic() - started:.1f} s: {image.disk}")
    return image


def test_the_disk_holds_debian_12_with_popeks_init_and_agent(debian: rootfs.RootfsImage) -> None:
    """Read without booting (debugfs): the file system mke2fs wrote from the tree."""
    if shutil.which("debugfs") is None:
        pytest.skip("needs debugfs (e2fsprogs)")

    def cat(path: str) -> bytes:
        return subprocess.run(["debugfs", "-R", f"cat {path}", str(debian.disk)], capture_output=True).stdout

    assert cat("/etc/debian_version").startswith(b"12.")
    assert cat("/usr/sbin/popek-init") == recipe_init()
    assert cat("/usr/sbin/popek-agent").startswith(b"\x7fELF")
    assert cat("/usr/bin/busybox").startswith(b"\x7fELF")


def test_popek_run_image_debian_runs_debians_python(debian: rootfs.RootfsImage, tmp_path: Path) -> None:
    before = debian.disk.stat().st_mtime_ns
    r = subprocess.run(
        [
            sys.executable, "-m", "popek", "run", "--image", "debian", "--console", "--timeout", str(BOOT_TIMEOUT),
            "--", "python3", "-c", "print(6*7)",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=BOOT_TIMEOUT + 120,
    )  # fmt: skip
    console = tmp_path / "console.log"  # the serial log (--console copies it to stderr), kept with the test's tmp
    console.write_text(r.stderr)
    log = f"stdout: {r.stdout!r}\nconsole ({console}), its end:\n{r.stderr[-6000:]}"
    assert "EXT4-fs (vda): mounted filesystem" in r.stderr, log  # the initramfs mounted the disk ...
    assert r.stdout == "42\n", log  # ... and the agent in it ran Debian's python3; stdout is the command's only
    assert r.returncode == 0, log
    assert debian.disk.stat().st_mtime_ns == before  # the run wrote its clone, not the cached disk
