"""The conformance runner (benchmarks/conformance.py) reads unittests.cfg as upstream's run_tests.sh does."""

from __future__ import annotations

import time
from pathlib import Path

from tests.kvm_unit_tests import conformance


def _entry(tmp_path: Path, text: str) -> conformance.Entry:
    cfg = tmp_path / "unittests.cfg"
    cfg.write_text(text)
    (entry,) = conformance.parse_config(cfg)
    return entry


def test_test_args_with_backticks_are_evaluated_when_the_entry_runs(tmp_path: Path) -> None:
    entry = _entry(tmp_path, '[clock]\nfile = kvmclock_test.flat\ntest_args = "10000000 `date +%s`"\n')
    words = " ".join(entry.test_args).split()
    time.sleep(1.1)
    later = " ".join(entry.test_args).split()
    assert words[0] == later[0] == "10000000"
    assert int(later[1]) > int(words[1])  # the wall clock when the entry starts, not when the cfg was read


def test_quoted_test_args_reach_the_guest_as_one_command_line(tmp_path: Path) -> None:
    entry = _entry(tmp_path, '[svm]\nfile = svm.flat\nsmp = 2\ntest_args = "-pause_filter_test -svm_x"\n')
    argv = conformance.command(entry, "kvm", Path("env"), ["popek"])
    assert argv[argv.index("--append") + 1] == "-pause_filter_test -svm_x"
    assert argv[argv.index("--cpus") + 1] == "2"
