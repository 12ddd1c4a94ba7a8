"""passt, user-mode networking for the guest (passt(1), https://passt.top): a separate program that translates the
guest's Ethernet frames into ordinary host sockets, so the guest reaches what the host reaches, with no root and
no TCP/IP stack in popek. It gives the guest the host's own address and gateway by DHCP; TCP connections the guest
opens to the gateway address go to the host's loopback (passt(1) NOTES, "Handling of traffic with local
destination and source addresses"); `-t HOST:GUEST` forwards a host TCP port into the guest.

popek starts it as a child: one end of a Unix stream socketpair is passed with `--fd`, over which passt speaks
QEMU's "stream" framing (each frame preceded by its length, 32-bit big-endian); `-f` keeps it in the foreground
so popek owns its lifetime (`--fd` also makes it exit when the socket closes); `-q` and a private log keep its
messages off the guest's console; `-m 1500` makes it offer the MTU the guest driver's receive buffers hold
(popek's virtio-net has no mergeable or big receive buffers). A pid file (`-P`) says when it is ready: passt
writes it after parsing its options and binding the forwarded ports, so an error surfaces before the VM boots.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from popek.errors import ConfigError

PASST = "passt"
PACKAGE = "passt"  # Debian's package name
MTU = 1500
READY_TIMEOUT = 10.0
EXIT_TIMEOUT = 2.0
SOCKET_BUFFER = 1 << 20  # room for several 64 KiB frames each way before a non-blocking send would block


def check_host_port(port: int) -> None:
    """A forwarded host port must be free: passt itself only logs a port it could not bind and carries on."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT leftover is no conflict
        probe.bind(("", port))
    except OSError as e:
        raise ConfigError(f"--port {port}: the host port cannot be bound: {e.strerror}") from None
    finally:
        probe.close()


class PasstProcess:
    """A running passt and popek's end of its socket (`sock`, non-blocking). `close()` ends and reaps it."""

    def __init__(self, ports: Sequence[tuple[int, int]] = (), binary: str | None = None) -> None:
        path = binary or shutil.which(PASST)
        if path is None:
            raise ConfigError(f"--net passt needs the passt program (Debian package {PACKAGE}: apt-get install passt)")
        for host_port, _guest_port in ports:
            check_host_port(host_port)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = ours
        self.process: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="popek-passt-")
        self.log: IO[bytes] = tempfile.TemporaryFile(prefix="popek-passt-log-")  # noqa: SIM115 - closed by close()
        try:
            for s in (ours, theirs):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            # run as root, passt drops to "nobody" before it writes the pid file: let it reach the file, only that
            pid_file = Path(self._dir.name) / "passt.pid"
            os.chmod(self._dir.name, 0o711)
            fd = os.open(pid_file, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            os.fchmod(fd, 0o666)
            os.close(fd)
            argv = [path, "-f", "-q", "--fd", str(theirs.fileno()), "-P", str(pid_file), "-m", str(MTU)]
            for host_port, guest_port in ports:
                argv += ["-t", f"{host_port}:{guest_port}"]
            try:
                self.process = subprocess.Popen(
                    argv,
                    pass_fds=[theirs.fileno()],
                    stdin=subprocess.DEVNULL,
                    stdout=self.log,
                    stderr=self.log,
                    start_new_session=True,  # ^C at popek's terminal is popek's to handle, not passt's
                )
            except OSError as e:
                raise ConfigError(f"cannot start {path}: {e.strerror}") from None
            theirs.close()
            self._wait_ready(pid_file)
            ours.setblocking(False)
        except BaseException:
            theirs.close()
            self.close()
            raise

    def _wait_ready(self, pid_file: Path) -> None:
        assert self.process is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigError(f"passt exited at start (status {self.process.returncode}): {self.messages()}")
            if pid_file.stat().st_size:
                return
            time.sleep(0.005)
        raise ConfigError(f"passt did not become ready in {READY_TIMEOUT:g} s: {self.messages()}")

    def messages(self, limit: int = 400) -> str:
        """What passt logged, without its complaints that there is no syslog to log to."""
        self.log.seek(0)
        lines = self.log.read(64 << 10).decode(errors="replace").splitlines()
        kept = [line.strip() for line in lines if line.strip() and not line.startswith("Failed to send")]
        text = "; ".join(line for line in kept if not line.startswith("Don't run as root"))
        return (text[:limit] + "...") if len(text) > limit else (text or "no message")

    def close(self) -> None:
        """Close popek's end (passt exits when its socket closes), then reap it, killing it if it lingers."""
        if self.sock.fileno() >= 0:
            self.sock.close()
        if self.process is not None:
            try:
                self.process.wait(EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        self.log.close()
        self._dir.cleanup()
