"""Running `popek serve` in integration tests: one daemon process on a test's own socket, stopped as a user would
stop it (SIGTERM), and whether a process is still alive (the daemon's VM processes)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO


def serve(sock: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """`popek serve --socket sock`, its output into log; returns once the socket exists."""
    process = subprocess.Popen(
        [sys.executable, "-m", "popek", "serve", "--socket", str(sock)], stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert process.poll() is None, "the daemon ended at once (see daemon.log)"
        assert time.monotonic() < deadline, "the daemon did not create its socket"
        time.sleep(0.1)
    return process


def stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, and the daemon's exit status (killed after 60 s)."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def alive(pid: int) -> bool:
    """Running, not a zombie (an adopted VM process's new parent may be slow to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
