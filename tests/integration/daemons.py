"""Running `popek serve` in integration tests: one daemon process on a test's own socket with a client for it
(`running`, a context manager that deletes what a failed test left and requires a clean exit), stopped as a user
would stop it (SIGTERM), and whether a process is still alive (the daemon's VM processes)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from popek.daemon.client import DEFAULT_TIMEOUT, Client


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


@dataclass
class Daemon:
    """A `popek serve` on `folder`/popek.sock, its output in `folder`/daemon.log, and a client of its API."""

    folder: Path
    log: IO[bytes]
    client_timeout: float
    process: subprocess.Popen[bytes]
    client: Client

    @property
    def socket(self) -> Path:
        return self.folder / "popek.sock"

    @property
    def state(self) -> Path:
        """The daemon's state folder (its VMs' folders are under vms/)."""
        return self.socket.with_name(self.socket.name + ".d")

    def stop(self) -> int:
        """Close the client, SIGTERM the daemon; its exit status. Its VM processes outlive it."""
        self.client.close()
        return stop(self.process)

    def start(self) -> None:
        """Serve again on the same socket and state (a restarted daemon adopts the VMs it finds), with a new client."""
        self.process = serve(self.socket, self.log)
        self.client = Client(self.socket, timeout=self.client_timeout)


@contextmanager
def running(folder: Path, client_timeout: float = DEFAULT_TIMEOUT) -> Iterator[Daemon]:
    """A daemon for a module's tests. On the way out the VMs a failed test left are deleted (the daemon keeps them),
    the daemon is stopped, and it must have exited 0 (the assertion carries its log) leaving no socket or lock."""
    log = (folder / "daemon.log").open("wb")
    sock = folder / "popek.sock"
    daemon = Daemon(folder, log, client_timeout, serve(sock, log), Client(sock, timeout=client_timeout))
    try:
        yield daemon
    finally:
        try:
            if daemon.process.poll() is None:
                for info in daemon.client.list():
                    daemon.client.get(info["id"]).delete()
        finally:  # stopped even when the clean-up's calls fail
            status = daemon.stop()
            log.close()
    assert status == 0, (folder / "daemon.log").read_text()
    assert not sock.exists(), "the daemon left its socket behind"
    assert not sock.with_name(sock.name + ".lock").exists(), "the daemon left its lock behind"
