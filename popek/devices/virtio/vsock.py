"""virtio-vsock (virtio 1.2 §5.10), stream sockets only, with Firecracker's host convention (its docs/vsock.md):
guest AF_VSOCK ports map to host AF_UNIX sockets.

The device: device ID 19, configuration space `guest_cid` (le64, §5.10.4), three queues — rx (0, device to
driver), tx (1, driver to device) and event (2, §5.10.2; popek sends one event, TRANSPORT_RESET, after a
snapshot restore: `on_restored`). No device-specific feature bit is offered, so the driver takes stream
sockets (§5.10.3: without VIRTIO_VSOCK_F_STREAM negotiated a device acts as if it were). Every packet starts
with the 44-byte header of
§5.10.6 (`Header`); ops REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST (§5.10.6.4-5).

The host side (Firecracker's convention):
- host-initiated: the device listens on the Unix socket `uds_path`. A client connects and writes `CONNECT <port>\\n`
  (at most LINE_MAX bytes, within CONNECT_TIMEOUT); the device sends the guest a REQUEST from (2, an ephemeral
  local port) to (guest_cid, port); the guest's RESPONSE makes it write `OK <local port>\\n` to the client, and
  the stream is then the guest's; an RST (nothing listens there) or no answer within CONNECT_TIMEOUT closes the
  client. A malformed line closes it too.
- guest-initiated: a guest connect to (2, P) makes the device connect to the Unix socket `<uds_path>_<P>`: a
  RESPONSE if that works, an RST if not.
- shutdown: a guest SHUTDOWN with SEND becomes shutdown(SHUT_WR) of the host socket once what the guest sent has
  reached it (RCV becomes SHUT_RD); end-of-file from the host becomes a SHUTDOWN with SEND; once neither side can
  send, the host socket is closed and the guest gets the RST that ends a clean disconnect (§5.10.6.5). A host
  socket error (EPIPE, ECONNRESET) is an RST.

Credit (§5.10.6.3), both ways, with 32-bit wrapping counters:
- to the guest: a packet carries at most what the guest's last `buf_alloc - (tx_cnt - fwd_cnt)` allows, so the
  device reads a host socket only while that connection has credit; with none, its fd is not watched for input
  until a packet from the guest (a CREDIT_UPDATE, or any other) raises it.
- from the guest: the device advertises BUF_ALLOC per connection, and `fwd_cnt` counts the bytes written to the host
  socket. Guest data goes straight to the socket; what the socket will not take now is kept — never more than
  BUF_ALLOC, since a guest sending beyond its credit is a protocol error that resets the connection — and the fd is
  watched for writability until it is flushed (`FdWatch.set_writable`: the event loop watches EVENT_WRITE, the soft
  backend POLLOUT). A CREDIT_UPDATE goes out when the guest's view of the free space has fallen below half and the
  device has forwarded more since it last told it; a CREDIT_REQUEST is answered at once.
So no host write ever blocks the device loop (every socket is non-blocking) and memory stays bounded:
MAX_CONNECTIONS connections of at most BUF_ALLOC buffered each, MAX_PENDING_CLIENTS clients still writing their
CONNECT line, at most MAX_RESETS RSTs waiting for an rx buffer (more are dropped, counted), and no copy of host
data at all on the way in: it is read from the host socket straight into the guest's rx buffer. A device that has
taken an rx buffer and then found nothing to put in it keeps that buffer for the next packet.

Packets from the guest are checked before use: a chain shorter than a header, a `len` beyond the chain or beyond
MAX_PAYLOAD, a source CID that is not the guest's, is dropped (counted); a packet for another CID than the host's,
of another type than stream, with an unknown op, or that breaks the connection state machine gets an RST (the
connection, if there is one, is torn down). Nothing a guest sends raises out of the device; QueueError comes only
from the virtqueue layer, for broken virtqueue rules.

Timers (the CONNECT line and the guest's answer) use an alarm: an eventfd watched like any host fd, written by a
small thread when the earliest deadline passes, so the timeout runs on the device loop with the transport lock
held like every other event (Python 3.11 has no timerfd).

Every callback runs with the transport's lock held (`MmioTransport.run_device`), from the device loop or a vCPU
thread, so the device needs no lock of its own; the alarm thread touches only its eventfd and its condition.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, ClassVar

from popek.devices import state as st
from popek.devices.event_loop import FdWatch, drain_eventfd
from popek.devices.virtio.device import DeviceId, VirtioDevice, WatchFd
from popek.devices.virtio.queue import ChainReader, ChainWriter, DescriptorChain
from popek.errors import ConfigError
from popek.memory import GuestMemory

QUEUE_SIZE = 256
RXQ, TXQ, EVENTQ = 0, 1, 2
EVENT_TRANSPORT_RESET = 0  # struct virtio_vsock_event.id (§5.10.6.7)

HOST_CID = 2  # VMADDR_CID_HOST; 0 (hypervisor), 1 (local) and U32_MAX (VMADDR_CID_ANY) are reserved too
MIN_GUEST_CID = 3
MAX_GUEST_CID = (1 << 32) - 2  # the upper 32 bits of guest_cid are reserved and zero (§5.10.4)
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) less its terminating NUL

TYPE_STREAM = 1
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2

BUF_ALLOC = 64 << 10  # what each connection may buffer on its way to the host
MAX_PAYLOAD = 64 << 10  # the largest packet either way (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE)
MAX_CONNECTIONS = 1024
MAX_PENDING_CLIENTS = 64
MAX_RESETS = 256
LINE_MAX = 32  # "CONNECT 4294967295\n" is 19 bytes
# How long a host client's CONNECT waits for the guest's RESPONSE. Not 5 s (Firecracker's figure): a guest on an
# oversubscribed host (load average 7 on two cores, ring 0 emulated by a nested host: each agent call ~10 s) can
# take longer than that to answer a REQUEST, and the daemon's first call after its VM's agent had answered a PING
# was refused with "nothing listens there". A guest with no listener answers RST at once whatever this is, and
# clients bound their own wait (the daemon: 60 s).
CONNECT_TIMEOUT = 30.0
ACCEPT_RETRY = 0.5  # out of fds: try accepting again after this long
EPHEMERAL_BASE = 1 << 30  # host-side ports of host-initiated connections, as Firecracker numbers them
U32 = 0xFFFFFFFF

_CONNECT_LINE = re.compile(rb"CONNECT ([0-9]{1,10})\n")
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Op(IntEnum):
    """VIRTIO_VSOCK_OP_* (§5.10.6)."""

    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


@dataclass(frozen=True, slots=True)
class Header:
    """struct virtio_vsock_hdr (§5.10.6), little-endian and packed: 44 bytes."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    FORMAT: ClassVar[struct.Struct] = struct.Struct("<QQIIIHHIII")

    def pack(self) -> bytes:
        return self.FORMAT.pack(
            self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len, self.type, self.op, self.flags,
            self.buf_alloc, self.fwd_cnt,
        )  # fmt: skip

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        return cls(*cls.FORMAT.unpack(data))


HEADER_SIZE = Header.FORMAT.size
assert HEADER_SIZE == 44


@dataclass(frozen=True)
class VsockSpec:
    """`--vsock CID:SOCKET`: the guest's CID and the host Unix socket of Firecracker's convention."""

    cid: int
    uds_path: Path

    @classmethod
    def parse(cls, text: str) -> VsockSpec:
        cid_text, sep, path = text.partition(":")
        if not sep or not cid_text or not path:
            raise ConfigError(f"--vsock wants CID:SOCKET (e.g. 3:/tmp/vm.vsock), not {text!r}")
        if not cid_text.isascii() or not cid_text.isdigit():
            raise ConfigError(f"vsock CID {cid_text!r} is not a decimal number")
        spec = cls(int(cid_text), Path(path))
        spec.validate()
        return spec

    def validate(self) -> None:
        if not MIN_GUEST_CID <= self.cid <= MAX_GUEST_CID:
            raise ConfigError(
                f"vsock CID {self.cid} is reserved or out of range: a guest CID is {MIN_GUEST_CID} to "
                f"{MAX_GUEST_CID} (0 is the hypervisor, 1 local, 2 the host, {U32} any)"
            )
        raw = os.fsencode(self.uds_path)
        if b"\0" in raw:
            raise ConfigError("the vsock socket path contains a NUL byte")
        if len(raw) > SUN_PATH_MAX:
            raise ConfigError(
                f"the vsock socket path is {len(raw)} bytes, more than a Unix socket address holds ({SUN_PATH_MAX})"
            )


def _listen(path: Path) -> socket.socket:
    """Bind and listen at `path`, replacing a socket file nothing listens on; ConfigError otherwise."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise ConfigError(f"vsock socket {path}: {e.strerror}") from None
    if mode is not None:
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"vsock socket {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(os.fspath(path))
        except OSError:
            pass  # nothing listens: a stale socket file, replaced below
        else:
            raise ConfigError(f"vsock socket {path} is in use (something listens on it)")
        finally:
            probe.close()
        try:
            os.unlink(path)
        except OSError as e:
            raise ConfigError(f"vsock socket {path}: cannot remove the stale socket: {e.strerror}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise ConfigError(f"vsock socket {path}: {e.strerror}") from None
    return sock


class _Alarm:
    """An eventfd that becomes readable once the deadline given to `set` has passed (see the module docstring)."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._cond = threading.Condition()
        self._when: float | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def set(self, when: float | None) -> None:
        with self._cond:
            if when == self._when:
                return
            self._when = when
            if self._thread is None and when is not None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="vsock-alarm", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._when is None:
                    self._cond.wait()
                    continue
                delay = self._when - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                self._when = None
                os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(5.0)
        os.close(self.fd)


class _Unwatched:
    """The watch of a connection before it has one of its own."""

    def set_enabled(self, enabled: bool) -> None:
        pass

    def set_writable(self, wanted: bool) -> None:
        pass

    def close(self) -> None:
        pass


class _Client:
    """A host client of `uds_path` that has not finished its CONNECT line."""

    def __init__(self, sock: socket.socket, watch: FdWatch, deadline: float) -> None:
        self.sock = sock
        self.watch = watch
        self.deadline = deadline
        self.line = b""


class State(IntEnum):
    CONNECTING = 1  # host-initiated: REQUEST sent or to be sent, waiting for the guest's RESPONSE
    ESTABLISHED = 2


class Connection:
    """One stream between a guest port and a host Unix socket; `local_port` is the host side's vsock port."""

    def __init__(self, sock: socket.socket, local_port: int, peer_port: int, state: State) -> None:
        self.sock = sock
        self.watch: FdWatch = _Unwatched()
        self.local_port = local_port
        self.peer_port = peer_port
        self.state = state
        self.deadline: float | None = None  # CONNECTING: when to give up on the guest
        # guest to host
        self.to_host = bytearray()  # what the host socket has not taken yet (the OK line, then guest data)
        self.buffered = 0  # guest data in `to_host` (the OK line is not the guest's to count)
        self.fwd_cnt = 0  # guest bytes written to the host socket (u32)
        self.reported_fwd_cnt = 0  # the fwd_cnt the guest last heard from us
        self.guest_shut_send = False  # the guest will send no more: SHUT_WR once `to_host` is flushed
        self.guest_shut_rcv = False  # the guest will read no more: stop reading the host
        self.host_shut_wr = False
        # host to guest
        self.tx_cnt = 0  # payload bytes sent to the guest (u32)
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        self.host_eof = False  # the host socket reached end-of-file: SHUTDOWN(SEND) sent or to be sent
        # control packets waiting for an rx buffer
        self.send_request = False
        self.send_response = False
        self.send_credit = False
        self.send_shutdown = 0  # flags of a SHUTDOWN to send

    @property
    def key(self) -> tuple[int, int]:
        return self.local_port, self.peer_port

    def credit(self) -> int:
        """How many payload bytes the guest can take now (§5.10.6.3); a guest that reports more forwarded than it
        was sent wraps to a huge in-flight count, so to no credit: it can only stall itself."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return max(0, min(self.peer_buf_alloc, U32) - in_flight)

    def has_control(self) -> bool:
        return self.send_request or self.send_response or self.send_credit or bool(self.send_shutdown)


class VsockDevice(VirtioDevice):
    device_id: ClassVar[DeviceId] = DeviceId.VSOCK

    def __init__(self, spec: VsockSpec, name: str = "virtio-vsock", connect_timeout: float = CONNECT_TIMEOUT) -> None:
        spec.validate()
        super().__init__(name, [QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE])
        self.spec = spec
        self.guest_cid = spec.cid
        self.connect_timeout = connect_timeout
        self.listener: socket.socket | None = _listen(spec.uds_path)
        self._listener_ino = os.stat(spec.uds_path).st_ino
        self._alarm = _Alarm()
        self._watch_fd: WatchFd | None = None
        self._listener_watch: FdWatch | None = None
        self._alarm_watch: FdWatch | None = None
        self._accept_resume: float | None = None  # out of fds: when to try accepting again
        self.clients: dict[int, _Client] = {}  # by fd
        self.conns: dict[tuple[int, int], Connection] = {}
        self._ctrl: dict[tuple[int, int], None] = {}  # connections with control packets to send, in order
        self._rx_ready: dict[tuple[int, int], None] = {}  # connections whose host socket is readable, in order
        self._resets: deque[tuple[int, int, int]] = deque()  # RSTs to send: (source CID, source port, guest port)
        self._held: DescriptorChain | None = None  # an rx buffer taken with nothing to put in it yet
        self._next_port = EPHEMERAL_BASE
        # statistics
        self.accepted = 0
        self.refused = 0  # host clients closed without a connection (bad line, no listener, timeout, limits)
        self.guest_connects = 0
        self.bytes_to_guest = 0
        self.bytes_to_host = 0
        self.resets_sent = 0
        self.resets_dropped = 0
        self.dropped = 0  # malformed packets from the guest
        self.protocol_errors = 0  # connections reset for breaking the protocol
        self.transport_resets = 0  # TRANSPORT_RESET events sent after a restore
        self.events_dropped = 0
        self._restored_held: int | None = None

    # --- host fds ---

    def connect_host(self, watch_fd: WatchFd) -> None:
        self._watch_fd = watch_fd
        assert self.listener is not None
        self._listener_watch = watch_fd(self.listener.fileno(), self._on_listener)
        self._alarm_watch = watch_fd(self._alarm.fd, self._on_alarm)

    def _watch(self, sock: socket.socket, callback: Callable[[], None]) -> FdWatch:
        assert self._watch_fd is not None
        return self._watch_fd(sock.fileno(), callback)

    def _on_listener(self) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno in _OUT_OF_FDS and self._listener_watch is not None:
                    self._listener_watch.set_enabled(False)  # retried by the alarm
                    self._accept_resume = time.monotonic() + ACCEPT_RETRY
                    self._arm()
                break
            self.accepted += 1
            if len(self.clients) >= MAX_PENDING_CLIENTS or len(self.conns) >= MAX_CONNECTIONS:
                self.refused += 1
                sock.close()
                continue
            sock.setblocking(False)
            fd = sock.fileno()
            watch = self._watch(sock, functools.partial(self._on_client, fd))
            self.clients[fd] = _Client(sock, watch, time.monotonic() + self.connect_timeout)
            self._arm()

    def _on_client(self, fd: int) -> None:
        """A host client's CONNECT line, read a byte at a time so nothing after it is taken from the stream."""
        client = self.clients.get(fd)
        if client is None:
            return
        while not client.line.endswith(b"\n"):
            if len(client.line) >= LINE_MAX:
                return self._refuse(client)
            try:
                byte = client.sock.recv(1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                byte = b""
            if not byte:
                return self._refuse(client)
            client.line += byte
        match = _CONNECT_LINE.fullmatch(client.line)
        port = int(match.group(1)) if match else -1
        if not 0 <= port <= U32 or not self.active or len(self.conns) >= MAX_CONNECTIONS:
            return self._refuse(client)
        del self.clients[fd]
        client.watch.close()
        local = self._ephemeral_port(port)
        if local is None:
            self.refused += 1
            client.sock.close()
            return
        conn = Connection(client.sock, local, port, State.CONNECTING)
        self._bind(conn)
        conn.deadline = time.monotonic() + self.connect_timeout
        conn.send_request = True
        self.conns[conn.key] = conn
        self._ctrl[conn.key] = None
        self._update_watch(conn)
        self._arm()
        self._fill_rx()

    def _refuse(self, client: _Client) -> None:
        self.refused += 1
        self.clients.pop(client.sock.fileno(), None)
        client.watch.close()
        client.sock.close()

    def _ephemeral_port(self, peer: int) -> int | None:
        for _ in range(MAX_CONNECTIONS + 1):
            port = self._next_port
            self._next_port = port + 1 if port + 1 < U32 else EPHEMERAL_BASE
            if (port, peer) not in self.conns:
                return port
        return None

    def _bind(self, conn: Connection) -> None:
        """Watch the connection's host socket (paused until `_update_watch` says what it waits for)."""
        conn.watch = self._watch(conn.sock, functools.partial(self._on_conn, conn.key))
        conn.watch.set_enabled(False)

    def _on_conn(self, key: tuple[int, int]) -> None:
        conn = self.conns.get(key)
        if conn is None:
            return
        if conn.to_host:
            self._flush(conn)
            if self.conns.get(key) is not conn:
                return
        if self._wants_read(conn):
            self._rx_ready[key] = None
        self._update_watch(conn)
        self._fill_rx()

    def _wants_read(self, conn: Connection) -> bool:
        return conn.state == State.ESTABLISHED and not conn.host_eof and not conn.guest_shut_rcv and conn.credit() > 0

    def _update_watch(self, conn: Connection) -> None:
        conn.watch.set_enabled(self._wants_read(conn) and conn.key not in self._rx_ready)
        conn.watch.set_writable(bool(conn.to_host))

    def _on_alarm(self) -> None:
        drain_eventfd(self._alarm.fd)
        now = time.monotonic()
        for client in [c for c in self.clients.values() if c.deadline <= now]:
            self._refuse(client)
        for conn in [c for c in self.conns.values() if c.deadline is not None and c.deadline <= now]:
            self.refused += 1
            self._reset(conn)  # the guest never answered: forget it on both sides
        if self._accept_resume is not None and self._accept_resume <= now:
            self._accept_resume = None
            if self._listener_watch is not None:
                self._listener_watch.set_enabled(True)
        self._arm()
        self._fill_rx()

    def _arm(self) -> None:
        deadlines = [c.deadline for c in self.clients.values()]
        deadlines += [c.deadline for c in self.conns.values() if c.deadline is not None]
        if self._accept_resume is not None:
            deadlines.append(self._accept_resume)
        self._alarm.set(min(deadlines) if deadlines else None)

    # --- guest to host: the tx queue ---

    def device_features(self) -> int:
        return super().device_features()  # no VIRTIO_VSOCK_F_*: stream sockets (§5.10.3)

    def config_bytes(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)

    def process_queue(self, index: int) -> None:
        if index == TXQ:
            self.serve(TXQ, self._transmit)
        # rx: new buffers for what waits; event: buffers kept for the TRANSPORT_RESET of a restore
        self._fill_rx()

    def _transmit(self, chain: DescriptorChain) -> int:
        assert self.mem is not None
        reader = ChainReader(self.mem, chain.readable)
        if reader.remaining < HEADER_SIZE:
            self.dropped += 1
            return 0
        hdr = Header.unpack(reader.read(HEADER_SIZE))
        if hdr.src_cid != self.guest_cid:
            self.dropped += 1  # a forged source: nobody to answer
            return 0
        key = (hdr.dst_port, hdr.src_port)
        if hdr.dst_cid != HOST_CID:
            if hdr.op != Op.RST:  # no other VM or CID is reachable: refused, from the CID the guest asked for
                self._reset_key(key, hdr.dst_cid & U32)
            return 0
        conn = self.conns.get(key)
        if hdr.len > MAX_PAYLOAD or hdr.len > reader.remaining or hdr.type != TYPE_STREAM:
            self.dropped += 1  # not a packet a stream connection can carry: it ends here
            if conn is not None:
                self.protocol_errors += 1
                self._reset(conn)
            elif hdr.op != Op.RST:
                self._reset_key(key)
            return 0
        if hdr.op == Op.RST:
            if conn is not None:
                self.refused += conn.state == State.CONNECTING
                self._close(conn)  # the guest ended it (or nothing listens on its port): nothing to answer
            return 0
        if hdr.op == Op.REQUEST:
            if conn is not None:
                self.protocol_errors += 1
                self._reset(conn)
            else:
                self._guest_connect(hdr)
            return 0
        if conn is None:
            self._reset_key(key)  # §5.10.6.4: a packet for no connection gets an RST
            return 0
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        if hdr.op == Op.RESPONSE and conn.state == State.CONNECTING:
            conn.state = State.ESTABLISHED
            conn.deadline = None
            conn.to_host[:0] = f"OK {conn.local_port}\n".encode()
            self._flush(conn)
        elif conn.state != State.ESTABLISHED:
            self.protocol_errors += 1
            self._reset(conn)
            return 0
        elif hdr.op == Op.RW:
            self._guest_data(conn, reader, hdr.len)
        elif hdr.op == Op.CREDIT_UPDATE:
            pass
        elif hdr.op == Op.CREDIT_REQUEST:
            self._queue_control(conn, credit=True)
        elif hdr.op == Op.SHUTDOWN:
            conn.guest_shut_send |= bool(hdr.flags & SHUTDOWN_SEND)
            if hdr.flags & SHUTDOWN_RCV and not conn.guest_shut_rcv:
                conn.guest_shut_rcv = True
                self._rx_ready.pop(conn.key, None)
                try:
                    conn.sock.shutdown(socket.SHUT_RD)  # the host writer learns (EPIPE) that nobody reads
                except OSError:
                    pass
            self._flush(conn)
        else:  # RESPONSE when established, INVALID, unknown ops
            self.protocol_errors += 1
            self._reset(conn)
            return 0
        if self.conns.get(key) is conn:
            self._update_watch(conn)
        return 0

    def _guest_connect(self, hdr: Header) -> None:
        key = (hdr.dst_port, hdr.src_port)
        self.guest_connects += 1
        if len(self.conns) >= MAX_CONNECTIONS:
            self._reset_key(key)
            return
        path = os.fsencode(self.spec.uds_path) + f"_{hdr.dst_port}".encode()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.connect(path)  # a Unix socket connects at once or not at all (EAGAIN: its backlog is full)
        except (OSError, ValueError):
            sock.close()
            self._reset_key(key)
            return
        conn = Connection(sock, hdr.dst_port, hdr.src_port, State.ESTABLISHED)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        self.conns[key] = conn
        self._bind(conn)
        self._queue_control(conn, response=True)
        self._update_watch(conn)

    def _guest_data(self, conn: Connection, reader: ChainReader, length: int) -> None:
        if conn.guest_shut_send or conn.host_shut_wr:
            self.protocol_errors += 1  # data after its own SHUTDOWN(SEND)
            return self._reset(conn)
        if conn.buffered + length > BUF_ALLOC:
            self.protocol_errors += 1  # beyond the credit the device advertised
            return self._reset(conn)
        views = reader.views(length)
        if not conn.to_host:
            try:
                sent = conn.sock.sendmsg(views, [], socket.MSG_NOSIGNAL) if views else 0
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return self._reset(conn)  # the host end is gone
            conn.fwd_cnt = (conn.fwd_cnt + sent) & U32
            self.bytes_to_host += sent
        else:
            sent = 0
        if sent < length:
            rest = b"".join(bytes(v) for v in views)[sent:]
            conn.to_host += rest
            conn.buffered += len(rest)
        self._advance_credit(conn)

    def _flush(self, conn: Connection) -> None:
        """Write what the host socket will take of `to_host`; act on a finished SHUTDOWN once it is empty."""
        if conn.to_host:
            try:
                sent = conn.sock.send(conn.to_host, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return self._reset(conn)
            line = len(conn.to_host) - conn.buffered  # the OK line goes first and is not guest data
            del conn.to_host[:sent]
            data = max(0, sent - line)
            conn.buffered -= data
            conn.fwd_cnt = (conn.fwd_cnt + data) & U32
            self.bytes_to_host += data
            self._advance_credit(conn)
        if conn.to_host:
            return
        if conn.guest_shut_send and not conn.host_shut_wr:
            conn.host_shut_wr = True
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if conn.guest_shut_send and (conn.guest_shut_rcv or conn.host_eof):
            self._reset(conn)  # neither side can send any more: the RST that ends a clean disconnect

    def _advance_credit(self, conn: Connection) -> None:
        """Tell the guest about freed space once its view of it has fallen below half (module docstring)."""
        rx_cnt = (conn.fwd_cnt + conn.buffered) & U32
        seen_free = BUF_ALLOC - ((rx_cnt - conn.reported_fwd_cnt) & U32)
        if seen_free < BUF_ALLOC // 2 and conn.fwd_cnt != conn.reported_fwd_cnt:
            self._queue_control(conn, credit=True)

    def _queue_control(
        self, conn: Connection, *, response: bool = False, credit: bool = False, shutdown: int = 0
    ) -> None:
        conn.send_response |= response
        conn.send_credit |= credit
        conn.send_shutdown |= shutdown
        self._ctrl[conn.key] = None

    # --- teardown ---

    def _close(self, conn: Connection) -> None:
        """Forget a connection and close its host socket (no packet to the guest)."""
        if self.conns.get(conn.key) is conn:
            del self.conns[conn.key]
        self._ctrl.pop(conn.key, None)
        self._rx_ready.pop(conn.key, None)
        conn.watch.close()
        conn.sock.close()

    def _reset(self, conn: Connection) -> None:
        """Close a connection and tell the guest with an RST."""
        self._close(conn)
        self._reset_key(conn.key)

    def _reset_key(self, key: tuple[int, int], src_cid: int = HOST_CID) -> None:
        """An RST to guest port key[1] from (src_cid, key[0]), once an rx buffer comes (bounded: MAX_RESETS)."""
        if len(self._resets) >= MAX_RESETS:
            self.resets_dropped += 1
            return
        self._resets.append((src_cid, *key))

    # --- host to guest: the rx queue ---

    def _fill_rx(self) -> None:
        """Put what waits (RSTs, control packets, then host data, round robin) into the driver's rx buffers."""
        queue, mem = self.queues[RXQ], self.mem
        if mem is None or not queue.ready:
            return
        used = False
        while self._resets or self._ctrl or self._rx_ready:
            chain = self._held
            self._held = None
            if chain is None:
                chain = queue.pop(mem)
            if chain is None:
                if queue.rearm(mem):
                    continue
                break
            if chain.writable_len < HEADER_SIZE:
                queue.add_used(mem, chain.head, 0)  # too small for any packet: returned empty
                used = True
                self.dropped += 1
                continue
            written = self._next_packet(mem, chain)
            if written is None:
                self._held = chain
                break
            queue.add_used(mem, chain.head, written)
            used = True
        if used:
            self.signal_used(RXQ)

    def _header(self, conn: Connection, op: Op, length: int = 0, flags: int = 0) -> bytes:
        conn.reported_fwd_cnt = conn.fwd_cnt
        return Header(
            HOST_CID, self.guest_cid, conn.local_port, conn.peer_port, length, TYPE_STREAM, op, flags,
            BUF_ALLOC, conn.fwd_cnt,
        ).pack()  # fmt: skip

    def _rst(self, src_cid: int, src_port: int, dst_port: int) -> bytes:
        self.resets_sent += 1
        return Header(src_cid, self.guest_cid, src_port, dst_port, 0, TYPE_STREAM, Op.RST, 0, 0, 0).pack()

    def _next_packet(self, mem: GuestMemory, chain: DescriptorChain) -> int | None:
        """Write the next packet into `chain`; its length, or None if nothing could be produced after all."""
        if self._resets:
            return ChainWriter(mem, chain.writable).write(self._rst(*self._resets.popleft()))
        while self._ctrl:
            key = next(iter(self._ctrl))
            del self._ctrl[key]
            conn = self.conns.get(key)
            if conn is None or not conn.has_control():
                continue
            if conn.send_request:
                conn.send_request = False
                op, flags = Op.REQUEST, 0
            elif conn.send_response:
                conn.send_response = False
                op, flags = Op.RESPONSE, 0
            elif conn.send_credit:
                conn.send_credit = False
                op, flags = Op.CREDIT_UPDATE, 0
            else:
                op, flags, conn.send_shutdown = Op.SHUTDOWN, conn.send_shutdown, 0
            if conn.has_control():
                self._ctrl[key] = None
            return ChainWriter(mem, chain.writable).write(self._header(conn, op, flags=flags))
        while self._rx_ready:
            key = next(iter(self._rx_ready))
            del self._rx_ready[key]
            conn = self.conns.get(key)
            if conn is None:
                continue
            written = self._host_data(conn, ChainWriter(mem, chain.writable))
            if self.conns.get(key) is conn:
                self._update_watch(conn)
            if written is not None:
                return written
        return None

    def _host_data(self, conn: Connection, writer: ChainWriter) -> int | None:
        """Read host data for `conn` straight into the rx buffer behind a header (None: nothing to send)."""
        if not self._wants_read(conn):
            return None
        room = min(conn.credit(), writer.remaining - HEADER_SIZE, MAX_PAYLOAD)
        if room <= 0:
            return None  # a buffer with room for a header only: the read watch comes back on
        header_views = writer.views(HEADER_SIZE)
        views = writer.views(room)
        try:
            n = conn.sock.recvmsg_into(views)[0] if len(views) > 1 else conn.sock.recv_into(views[0])
        except (BlockingIOError, InterruptedError):
            return None  # not readable after all: the watch says when it is
        except OSError:  # ECONNRESET: the host end is gone
            self._close(conn)
            return self._packet(header_views, self._rst(HOST_CID, *conn.key))
        if n == 0:
            conn.host_eof = True
            self._packet(header_views, self._header(conn, Op.SHUTDOWN, flags=SHUTDOWN_SEND))
            if conn.guest_shut_send:
                self._flush(conn)  # neither side sends any more: closed, with an RST to follow
            return HEADER_SIZE
        conn.tx_cnt = (conn.tx_cnt + n) & U32
        self.bytes_to_guest += n
        self._packet(header_views, self._header(conn, Op.RW, length=n))
        if n == room and conn.credit() > 0:
            self._rx_ready[conn.key] = None  # there may be more: its turn comes again after the others
        return HEADER_SIZE + n

    @staticmethod
    def _packet(views: list[memoryview], header: bytes) -> int:
        pos = 0
        for view in views:
            view[:] = header[pos : pos + len(view)]
            pos += len(view)
        return HEADER_SIZE

    # --- lifetime ---

    def on_activate(self) -> None:
        self._fill_rx()

    def on_needs_reset(self) -> None:
        watches = [self._listener_watch, self._alarm_watch, *(c.watch for c in self.clients.values())]
        for watch in [*watches, *(c.watch for c in self.conns.values())]:
            if watch is not None:
                watch.set_enabled(False)
                watch.set_writable(False)

    def on_reset(self) -> None:
        """A driver reset ends every connection the guest had (the guest forgets them too); host clients still
        writing their CONNECT line stay."""
        for conn in list(self.conns.values()):
            self._close(conn)
        self._resets.clear()
        self._held = None
        if self._listener_watch is not None and self._accept_resume is None:
            self._listener_watch.set_enabled(True)
        for watch in [self._alarm_watch, *(c.watch for c in self.clients.values())]:
            if watch is not None:
                watch.set_enabled(True)
        self._arm()

    # --- snapshots ---

    def state(self) -> dict[str, Any]:
        """What a snapshot keeps: only the rx buffer the device holds (its head), which restore gives back. Host
        connections are sockets of this process and cannot be saved; the restored device tells the driver so
        (`on_restored`)."""
        return {"held": None if self._held is None else self._held.head}

    def restore(self, state: dict[str, Any]) -> None:
        values = st.load(state, {"held": st.optional(st.integer(0, QUEUE_SIZE - 1))}, self.name)
        self._restored_held = values["held"]

    def on_restored(self) -> None:
        """After a restore: the rx buffer the old device held goes back to the driver empty (Linux drops a
        packet shorter than a header and refills), and a VIRTIO_VSOCK_EVENT_TRANSPORT_RESET event (§5.10.6.7)
        makes the driver reset every connection, none of which exists on this side any more, and read the
        guest CID again (a clone may have another)."""
        mem = self.mem
        assert mem is not None
        held, self._restored_held = self._restored_held, None
        if held is not None:
            self.queues[RXQ].add_used(mem, held, 0)
            self.signal_used(RXQ)
        events = self.queues[EVENTQ]
        if not events.ready:
            return
        chain = events.pop(mem)
        if chain is None:
            self.events_dropped += 1  # the driver posted no event buffer: its connections time out instead
            return
        written = ChainWriter(mem, chain.writable).write(struct.pack("<I", EVENT_TRANSPORT_RESET))
        events.add_used(mem, chain.head, written)
        self.signal_used(EVENTQ)
        self.transport_resets += 1

    def stats(self) -> str:
        return (
            f"connections={len(self.conns)} accepted={self.accepted} refused={self.refused} "
            f"guest_connects={self.guest_connects} to_guest={self.bytes_to_guest} to_host={self.bytes_to_host} "
            f"resets={self.resets_sent} resets_dropped={self.resets_dropped} dropped={self.dropped} "
            f"protocol_errors={self.protocol_errors}"
            + (f" transport_resets={self.transport_resets}" if self.transport_resets else "")
            + (f" events_dropped={self.events_dropped}" if self.events_dropped else "")
        )

    def counters(self) -> dict[str, int]:
        return {"vsock_to_guest_bytes": self.bytes_to_guest, "vsock_to_host_bytes": self.bytes_to_host}

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        for client in list(self.clients.values()):
            client.watch.close()
            client.sock.close()
        self.clients.clear()
        for watch in (self._listener_watch, self._alarm_watch):
            if watch is not None:
                watch.close()
        self._listener_watch = self._alarm_watch = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:  # only the socket this device made: another popek may have replaced it since
                if os.stat(self.spec.uds_path).st_ino == self._listener_ino:
                    os.unlink(self.spec.uds_path)
            except OSError:
                pass
            self._alarm.close()
