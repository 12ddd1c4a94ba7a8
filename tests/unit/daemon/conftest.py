"""Fixtures of the daemon's unit tests."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A `popek serve` on a socket in a folder it has to create (run/), stopped by SIGTERM: it leaves neither its
    socket nor its lock."""
    sock = tmp_path_factory.mktemp("serve") / "run" / "popek.sock"
    process = subprocess.Popen(
        [sys.executable, "-m", "popek", "serve", "--socket", str(sock)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield sock
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    assert not sock.exists() and not sock.with_name("popek.sock.lock").exists()
