"""A fast subset of kvm-unit-tests entries that pass on popek, run by the same runner as the full table
(benchmarks/conformance.py, docs/conformance.md) and exactly as upstream's run_tests.sh runs them: each must keep
passing on the backend it is listed for. The subset is the entries that pass in a few seconds each; the slow and
the failing ones stay in the benchmark table, where every entry is run on every backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kvm_unit_tests import AVAILABLE, SUITE, WHY_ABSENT, conformance

from .guests import KVM_MARKS

pytestmark = [pytest.mark.skipif(not AVAILABLE, reason=WHY_ABSENT)]

# entries that pass on both backends, and those that pass on one (the other's failure is in docs/conformance.md)
BOTH = ["smptest", "smptest3", "vmexit_tscdeadline", "smap", "hypercall", "idt_test", "memory", "setjmp",
        "pcid-enabled", "pcid-disabled", "la57", "lam", "rdpru", "umip", "emulator", "xsave",
        "vmexit_tscdeadline_immed", "pcid-asymmetric"]  # fmt: skip
KVM_ONLY = ["vmexit_cpuid", "vmexit_inl_pmtimer", "vmexit_ipi", "vmexit_cr4_pge", "vmexit_mov_from_cr8",
            "vmexit_mov_to_cr8", "vmexit_ipi_halt", "vmexit_ple_round_robin", "vmexit_cr0_wp"]  # fmt: skip
SOFT_ONLY = ["eventinj", "tsc", "debug", "tsc_adjust"]



def _host_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((set(line.split(":", 1)[1].split()) for line in cpuinfo if line.startswith("flags")), set())
    except OSError:
        return set()


# an entry that needs a processor feature KVM can only pass through, not emulate: on --accel kvm it runs where the
# host has it (la57.flat enters 5-level paging unconditionally: without LA57 the host faults it, as QEMU with
# -accel kvm would); the software CPU implements it and runs it everywhere
NEEDS_HOST = {"la57": "la57"}
HOST_FLAGS = _host_flags()


def _kvm_marks(name: str) -> list[pytest.MarkDecorator]:
    flag = NEEDS_HOST.get(name)
    if flag is None or flag in HOST_FLAGS:
        return KVM_MARKS
    return [*KVM_MARKS, pytest.mark.skip(reason=f"the host processor has no {flag} for KVM to give the guest")]


CASES = [
    *(pytest.param(name, "kvm", marks=_kvm_marks(name), id=f"{name}-kvm") for name in BOTH + KVM_ONLY),
    *(pytest.param(name, "soft", id=f"{name}-soft") for name in BOTH + SOFT_ONLY),
]
ENTRIES = {e.name: e for e in conformance.parse_config(SUITE / "x86" / "unittests.cfg")} if AVAILABLE else {}


@pytest.mark.parametrize("name,backend", CASES)
def test_kvm_unit_tests_entry_passes(name: str, backend: str, tmp_path: Path) -> None:
    r = conformance.run_one(ENTRIES[name], backend, SUITE, tmp_path)
    log = Path(r.log).read_text(errors="replace")[-4000:] if r.log else r.reason
    assert not r.traceback, log
    assert r.verdict == "PASS", f"{r.verdict} ({r.summary or r.reason}) after {r.seconds} s\n{log}"
