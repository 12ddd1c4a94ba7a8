"""Where the tests find kvm-unit-tests (the conformance suite, built in the project's shared/ folder beside the
checkout; see its README) and the runner that runs its entries as upstream does (benchmarks/conformance.py, one
implementation for the benchmark table and the CI subset). Tests that need the suite skip where it is absent."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_RUNNER = Path(__file__).resolve().parent.parent / "benchmarks" / "conformance.py"


def _load_runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("popek_conformance", _RUNNER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


conformance = _load_runner()
SUITE: Path = conformance.DEFAULT_SUITE
IMAGES = SUITE / "x86"
AVAILABLE = (IMAGES / "unittests.cfg").is_file()
WHY_ABSENT = f"no kvm-unit-tests build in {IMAGES}"
