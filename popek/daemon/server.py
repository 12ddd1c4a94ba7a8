"""`popek serve`: the daemon's Unix socket and its uvicorn server.

The socket is private to its owner: its directory is created 0700, and the socket is bound under a temporary name
with umask 0177 (so it is 0600 from its first moment) and renamed into place (rename(2) is atomic: a client never
sees a half-made socket). One daemon per socket: an exclusive flock(2) on ``PATH.lock``, held while the daemon
runs, refuses a second one; a socket file left by a daemon that died (nobody holds the lock) is replaced.

On SIGTERM or SIGINT uvicorn shuts the server down; the socket and the lock are then removed. The VM processes run
on (each in its own session): a daemon started again on the same socket adopts them (popek/daemon/supervisor.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
from pathlib import Path

from popek.errors import ConfigError


def default_socket() -> Path:
    """$XDG_RUNTIME_DIR/popek/popek.sock, else ~/.cache/popek/run/popek.sock."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "popek" / "popek.sock"
    return Path.home() / ".cache" / "popek" / "run" / "popek.sock"


def state_dir_for(sock_path: Path) -> Path:
    """The daemon's state (its VMs' records and directories) lives beside its socket."""
    return sock_path.with_name(sock_path.name + ".d")


class SocketLock:
    """The one-daemon-per-socket lock and the socket itself."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self.lock_fd: int | None = None
        self.sock: socket.socket | None = None
        self.inode: int | None = None

    def acquire(self) -> socket.socket:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"another popek daemon already serves {self.path}") from None
        self.lock_fd = fd
        if self.path.exists() or self.path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except OSError:
                self.path.unlink()  # a dead daemon's socket (nobody holds the lock)
            else:
                self.release()
                raise ConfigError(f"something already listens on {self.path}")
            finally:
                probe.close()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(tmp))
        except OSError as exc:
            sock.close()
            self.release()
            raise ConfigError(f"cannot bind {self.path}: {exc}") from exc
        finally:
            os.umask(old)
        os.chmod(tmp, 0o600)
        sock.listen(128)
        os.replace(tmp, self.path)
        self.inode = self.path.stat().st_ino
        self.sock = sock
        return sock

    def release(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                if self.path.stat().st_ino == self.inode:
                    self.path.unlink()
            self.sock.close()
            self.sock = None
        if self.lock_fd is not None:
            with contextlib.suppress(OSError):
                self.lock_path.unlink()
            os.close(self.lock_fd)
            self.lock_fd = None


async def serve_async(sock_path: Path, state_dir: Path | None = None) -> None:
    import uvicorn

    from popek.daemon.app import create_app
    from popek.daemon.supervisor import Supervisor

    lock = SocketLock(sock_path)
    sock = lock.acquire()
    try:
        sup = Supervisor(state_dir or state_dir_for(sock_path))
        config = uvicorn.Config(
            create_app(sup), log_level="warning", lifespan="on", access_log=False, timeout_graceful_shutdown=5
        )
        server = uvicorn.Server(config)
        await server.serve(sockets=[sock])
    finally:
        lock.release()


def serve(sock_path: Path, state_dir: Path | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT."""
    # uvicorn re-raises the signal that stopped it once it has shut down; a no-op handler lets this function end
    # normally (and clean up) instead of dying of the default action
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    print(f"popek daemon listening on {sock_path}", flush=True)
    asyncio.run(serve_async(sock_path, state_dir))
    return 0
