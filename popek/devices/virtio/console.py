"""virtio-console, a second console beside the serial port (virtio 1.2 §5.3): port 0 only, no VIRTIO_CONSOLE_F_SIZE,
F_MULTIPORT or F_EMERG_WRITE, so two queues — receiveq (0, host to guest) and transmitq (1, guest to host) — and
Linux makes it /dev/hvc0.

The host side is one path (`--console2 PATH`), opened as QEMU's chardevs would be: a regular file (created or
truncated) takes the output; a Unix stream socket is connected to and carries both directions; a FIFO or a
character device (a pty) is opened read-write. Output is written as the guest sends it; a sink that would block
(a socket or pipe nobody reads) drops what it cannot take, counted in `--stats`, so a stuck reader cannot stall the
VM. Input is read as it arrives into a buffer of at most INPUT_BUFFER bytes and copied into the buffers the driver
posts on receiveq; while the buffer is full the host fd is not read (the sender waits, nothing is lost). On the
KVM backend the fd is watched by the device event loop; on the software backend it is polled between quanta.

Input waits until the port is connected. Linux posts its receive buffers before it attaches the hvc console to the
port, and discards data that arrives in between (drivers/char/virtio_console.c: add_port calls fill_queue before
init_port_console sets guest_connected); without VIRTIO_CONSOLE_F_MULTIPORT no PORT_OPEN message says when that is
done. So the device takes the port as connected at the guest's next sign of life after the buffers first arrive:
output on transmitq, more buffers, or new host input — never on the first buffers alone.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path
from typing import Any, ClassVar

from popek.devices import state as st
from popek.devices.event_loop import FdWatch
from popek.devices.virtio.device import DeviceId, VirtioDevice, WatchFd
from popek.devices.virtio.queue import ChainReader, ChainWriter, DescriptorChain
from popek.errors import ConfigError
from popek.hostio import advance_views

QUEUE_SIZE = 256
RECEIVEQ, TRANSMITQ = 0, 1
INPUT_BUFFER = 64 << 10
CONFIG_SIZE = 12  # cols, rows, max_nr_ports, emerg_wr: meaningless without the features, read as zeros


class ConsoleHost:
    """The host end of the console: an fd for output and, for sockets, FIFOs and ttys, input."""

    def __init__(self, fd: int, readable: bool, path: Path | None = None) -> None:
        self.fd = fd
        self.readable = readable
        self.path = path

    @classmethod
    def open(cls, path: Path) -> ConsoleHost:
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            mode = stat.S_IFREG
        except OSError as e:
            raise ConfigError(f"console {path}: {e.strerror}") from None
        try:
            if stat.S_ISSOCK(mode):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(str(path))
                except OSError:
                    sock.close()
                    raise
                sock.setblocking(False)
                return cls(sock.detach(), True, path)
            if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
                flags = os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
                return cls(os.open(path, flags), True, path)
            if stat.S_ISREG(mode):
                return cls(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644), False, path)
        except OSError as e:
            raise ConfigError(f"console {path}: {e.strerror}") from None
        raise ConfigError(f"console {path} is not a file, a socket, a FIFO or a character device")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ConsoleDevice(VirtioDevice):
    device_id: ClassVar[DeviceId] = DeviceId.CONSOLE

    def __init__(self, host: ConsoleHost, name: str = "virtio-console hvc0") -> None:
        super().__init__(name, [QUEUE_SIZE, QUEUE_SIZE])
        self.host = host
        self.pending = bytearray()  # host input not yet in a guest buffer
        self.rx_posted = False  # the driver has posted receive buffers since the last reset
        self.connected = False  # ... and shown life since (see the module docstring)
        self.host_eof = not host.readable
        self.watch: FdWatch | None = None
        self.bytes_out = 0
        self.bytes_in = 0
        self.dropped = 0

    def connect_host(self, watch_fd: WatchFd) -> None:
        if self.host.readable:
            self.watch = watch_fd(self.host.fd, self.on_host_input)

    def config_bytes(self) -> bytes:
        return bytes(CONFIG_SIZE)

    # --- guest to host ---

    def process_queue(self, index: int) -> None:
        if index == TRANSMITQ:
            self.serve(TRANSMITQ, self._transmit)
        elif self.mem is not None and self.queues[RECEIVEQ].pending(self.mem):  # buffers posted (not a bare kick)
            self.connected = self.connected or self.rx_posted
            self.rx_posted = True
        self._deliver()

    def _transmit(self, chain: DescriptorChain) -> int:
        assert self.mem is not None
        self.connected = True  # the guest writes to the port: it is attached
        reader = ChainReader(self.mem, chain.readable)
        views = reader.views(reader.remaining)
        total = sum(len(v) for v in views)
        while views:
            try:
                done = os.writev(self.host.fd, views)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.EINTR:
                    break
                continue
            self.bytes_out += done
            total -= done
            views = advance_views(views, done)
        self.dropped += total
        return 0  # nothing written into the chain

    # --- host to guest ---

    def on_host_input(self) -> None:
        """The host fd is readable (called with the transport's lock held)."""
        room = INPUT_BUFFER - len(self.pending)
        if room > 0 and not self.host_eof:
            try:
                data = os.read(self.host.fd, room)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                self.host_eof = True  # the other end went away: stop watching
            elif data:
                self.pending += data
                self.connected = self.connected or self.rx_posted
        self._deliver()

    def _deliver(self) -> None:
        queue, mem = self.queues[RECEIVEQ], self.mem
        if mem is not None and queue.ready and self.connected:
            while self.pending:
                chain = queue.pop(mem)
                if chain is None:
                    if queue.rearm(mem):
                        continue
                    break
                writer = ChainWriter(mem, chain.writable)
                n = writer.write(bytes(self.pending[: writer.remaining]))
                del self.pending[:n]
                self.bytes_in += n
                queue.add_used(mem, chain.head, n)
            self.signal_used(RECEIVEQ)
        if self.watch is not None:
            self.watch.set_enabled(not self.host_eof and len(self.pending) < INPUT_BUFFER)

    def on_needs_reset(self) -> None:
        if self.watch is not None:
            self.watch.set_enabled(False)  # re-enabled by `_deliver` once the driver is back

    def on_reset(self) -> None:
        self.rx_posted = self.connected = False

    # --- reporting and lifetime ---

    def stats(self) -> str:
        return f"out={self.bytes_out} in={self.bytes_in} dropped={self.dropped} buffered={len(self.pending)}"

    def state(self) -> dict[str, Any]:
        return {"pending": bytes(self.pending), "rx_posted": self.rx_posted, "connected": self.connected}

    def restore(self, state: dict[str, Any]) -> None:
        st.apply(self, state, {"pending": st.blob(INPUT_BUFFER), "rx_posted": st.boolean, "connected": st.boolean},
                 "virtio-console")  # fmt: skip

    def close(self) -> None:
        self.host.close()
