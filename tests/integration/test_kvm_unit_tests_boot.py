"""kvm-unit-tests' realmode.flat (a Multiboot ELF loaded at 0x8000) boots through `popek run` as through QEMU's
-kernel: it loads, and its first tests report. (Whether all of them pass is the devices' and CPU's business.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.integration.guests import KVM_MARKS
from tests.kvm_unit_tests import IMAGES

REALMODE = IMAGES / "realmode.flat"


@pytest.mark.skipif(not REALMODE.is_file(), reason="the kvm-unit-tests images are not built on this machine")
@pytest.mark.parametrize("backend", [pytest.param("kvm", marks=KVM_MARKS)])
def test_realmode_flat_loads_and_runs(backend: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "popek", "run", "--accel", backend, "--kernel", str(REALMODE), "--mem", "256M",
         "--timeout", "10"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "popek: error" not in r.stderr, r.stderr
    assert "PASS: null" in r.stdout, (r.stdout, r.stderr)
