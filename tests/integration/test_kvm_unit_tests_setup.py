"""kvm-unit-tests guests get through their set-up on popek: the CPU count from fw_cfg (without fw_cfg they read
65535 and wait forever for 65534 APs), the FADT's PM timer, and their exit through the 4-byte debug-exit port.
Whether each test's checks pass is the CPU's and the backends' business, not asserted here.

The suite's images are found by tests/kvm_unit_tests.py; the tests skip where there is none.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.kvm_unit_tests import AVAILABLE, IMAGES, WHY_ABSENT

from .guests import KVM_MARKS

KUT = IMAGES
pytestmark = [pytest.mark.skipif(not AVAILABLE, reason=WHY_ABSENT)]


def run(flat: str, accel: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "popek", "run", "--accel", accel, "--kernel", str(KUT / flat), "--mem", "256M",
         "--timeout", str(timeout), *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout + 60,
    )  # fmt: skip


def ended_through_debug_exit(r: subprocess.CompletedProcess[str]) -> bool:
    return "VM stopped: debug-exit" in r.stderr and r.returncode % 2 == 1


@pytest.mark.parametrize("accel", [pytest.param("kvm", marks=KVM_MARKS)])
def test_smptest_counts_two_cpus_from_fw_cfg_and_exits_through_debug_exit(accel: str) -> None:
    r = run("smptest.flat", accel, "--cpus", "2")
    assert "smp: waiting for 1 APs" in r.stdout, r.stdout + r.stderr
    assert "found 2 cpus" in r.stdout
    assert ended_through_debug_exit(r), r.stderr


def test_smptest_gets_past_set_up_on_the_software_cpu() -> None:
    r = run("smptest.flat", "soft", "--cpus", "2")
    assert "setup: CPU 1 online" in r.stdout and "smp: waiting for 1 APs" in r.stdout, r.stdout + r.stderr
    assert ended_through_debug_exit(r), r.stderr


@pytest.mark.parametrize("accel", [pytest.param("kvm", marks=KVM_MARKS)])
def test_vmexit_reads_the_pm_timer_the_fadt_names(accel: str) -> None:
    r = run("vmexit.flat", accel, "--append", "vmexit.flat inl_from_pmtimer")
    assert "PM timer port is 608" in r.stdout, r.stdout + r.stderr
    assert "inl_from_pmtimer " in r.stdout
    assert ended_through_debug_exit(r) and r.returncode == 1, r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("accel", [pytest.param("kvm", marks=KVM_MARKS)])
def test_msr_runs_to_its_summary(accel: str) -> None:
    r = run("msr.flat", accel)
    assert "smp: waiting for 0 APs" in r.stdout, r.stdout + r.stderr
    assert "SUMMARY:" in r.stdout
    assert ended_through_debug_exit(r), r.stderr
