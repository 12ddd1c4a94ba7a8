"""virtio-vsock (virtio 1.2 §5.10) with Firecracker's host convention, driven as a guest driver would: host clients
connect to the Unix socket and say CONNECT, the guest connects to `<uds>_<port>`, data goes both ways within the
credit each side advertised, shutdowns and resets tear connections down, and hostile packets end in RSTs or
drops with the device's state bounded."""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popek.devices.event_loop import EventLoop
from popek.devices.virtio import mmio, vsock
from popek.devices.virtio.device import COMMON_FEATURES, DeviceStatus
from popek.devices.virtio.mmio import MmioTransport
from popek.devices.virtio.queue import VIRTQ_DESC_F_WRITE
from popek.devices.virtio.vsock import HEADER_SIZE, Header, Op, VsockDevice, VsockSpec
from popek.errors import ConfigError
from popek.memory import GuestMemory

from .driver import Driver, Irq

CID = 7
MEM = 24 << 20
RX_BASE = 2 << 20
RX_BUF = HEADER_SIZE + 4096  # what Linux posts
RX_BUFFERS = 64
TX_BASE = 4 << 20
TX_SLOT = HEADER_SIZE + vsock.MAX_PAYLOAD + 64
GUEST_PORT = 1024


class FakeWatch:
    def __init__(self, loop: FakeLoop, fd: int, callback: Callable[[], None]) -> None:
        self.loop, self.fd, self.callback = loop, fd, callback
        self.enabled, self.writable, self.closed = True, False, False

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled

    def set_writable(self, wanted: bool) -> None:
        self.writable = wanted

    def close(self) -> None:
        self.closed = True


class FakeLoop:
    """What a backend does with the watches: poll the live ones, run their callbacks under the transport lock."""

    def __init__(self, transport: MmioTransport) -> None:
        self.transport = transport
        self.watches: list[FakeWatch] = []

    def watch_fd(self, fd: int, callback: Callable[[], None]) -> FakeWatch:
        watch = FakeWatch(self, fd, lambda: self.transport.run_device(callback))
        self.watches.append(watch)
        return watch

    def live(self) -> list[FakeWatch]:
        self.watches = [w for w in self.watches if not w.closed]
        return self.watches

    def pump(self, rounds: int = 20) -> None:
        """Run callbacks until nothing is ready (or `rounds` polls)."""
        for _ in range(rounds):
            poller = select.poll()
            wanted = {}
            for w in self.live():
                events = (select.POLLIN if w.enabled else 0) | (select.POLLOUT if w.writable else 0)
                if events:
                    poller.register(w.fd, events)
                    wanted[w.fd] = w
            ready = poller.poll(0)
            if not ready:
                return
            for fd, _events in ready:
                w = wanted[fd]
                if not w.closed:
                    w.callback()


class Guest:
    """A guest's vsock driver: rx buffers of RX_BUF bytes kept posted, packets sent one descriptor each."""

    def __init__(
        self, path: Path, connect_timeout: float = vsock.CONNECT_TIMEOUT, event_loop: EventLoop | None = None
    ) -> None:
        self.mem = GuestMemory(MEM)
        self.device = VsockDevice(VsockSpec(CID, path), connect_timeout=connect_timeout)
        self.transport = MmioTransport(self.device, self.mem, Irq())
        self.loop = FakeLoop(self.transport)  # with an event loop, never given a watch: `run` only takes rx
        if event_loop is None:
            self.device.connect_host(self.loop.watch_fd)
        else:
            run = self.transport.run_device
            self.device.connect_host(lambda fd, callback: event_loop.watch(fd, lambda: run(callback)))
        self.drv = Driver(self.transport, self.mem)
        self.drv.init()
        self.tx_free = list(range(self.drv.queues[vsock.TXQ].size))
        self.received: list[tuple[Header, bytes]] = []
        for head in range(RX_BUFFERS):
            self.post_rx(head)
        self.drv.kick(vsock.RXQ)

    def close(self) -> None:
        self.device.close()
        self.mem.close()

    def post_rx(self, head: int, size: int = RX_BUF) -> None:
        q = self.drv.queues[vsock.RXQ]
        self.drv.write_desc(q.desc, head, RX_BASE + head * RX_BUF, size, VIRTQ_DESC_F_WRITE, 0)
        self.drv.publish(vsock.RXQ, head)

    def send(self, op: Op, *, src_port: int = GUEST_PORT, dst_port: int = 0, payload: bytes = b"",
             buf_alloc: int = 1 << 20, fwd_cnt: int = 0, flags: int = 0, length: int | None = None,
             dst_cid: int = vsock.HOST_CID, src_cid: int = CID, type_: int = vsock.TYPE_STREAM) -> None:  # fmt: skip
        hdr = Header(src_cid, dst_cid, src_port, dst_port, len(payload) if length is None else length,
                     type_, op, flags, buf_alloc, fwd_cnt)  # fmt: skip
        self.send_raw(hdr.pack() + payload)

    def send_raw(self, data: bytes) -> None:
        q = self.drv.queues[vsock.TXQ]
        head = self.tx_free.pop()
        addr = TX_BASE + head * TX_SLOT
        self.mem.write(addr, data[:TX_SLOT])
        self.drv.write_desc(q.desc, head, addr, min(len(data), TX_SLOT), 0, 0)
        self.drv.publish(vsock.TXQ, head)
        self.drv.kick(vsock.TXQ)
        for used, _ in self.drv.take_used(vsock.TXQ):
            self.tx_free.append(used)

    def run(self) -> list[tuple[Header, bytes]]:
        """Let the host side run, then take (and re-post) what the device put on rx."""
        self.loop.pump()
        got = []
        for head, length in self.drv.take_used(vsock.RXQ):
            raw = self.mem.read(RX_BASE + head * RX_BUF, length)
            assert length >= HEADER_SIZE
            hdr = Header.unpack(raw[:HEADER_SIZE])
            assert hdr.len == length - HEADER_SIZE
            assert (hdr.src_cid, hdr.dst_cid, hdr.type) == (vsock.HOST_CID, CID, vsock.TYPE_STREAM) or hdr.op == Op.RST
            got.append((hdr, raw[HEADER_SIZE:]))
            self.post_rx(head)
        self.drv.kick(vsock.RXQ)
        self.received += got
        return got


@pytest.fixture
def uds(tmp_path: Path) -> Path:
    return tmp_path / "v.sock"


@pytest.fixture
def guest(uds: Path) -> Iterator[Guest]:
    g = Guest(uds)
    yield g
    g.close()


def connect(uds: Path, port: int = GUEST_PORT) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(str(uds))
    client.sendall(f"CONNECT {port}\n".encode())
    return client


def establish(guest: Guest, uds: Path, port: int = GUEST_PORT, buf_alloc: int = 1 << 20) -> tuple[socket.socket, int]:
    """A host-initiated connection the guest accepts; returns the client (past its OK line) and the local port."""
    client = connect(uds, port)
    (request,) = [h for h, _ in guest.run() if h.op == Op.REQUEST and h.dst_port == port]
    guest.send(Op.RESPONSE, src_port=port, dst_port=request.src_port, buf_alloc=buf_alloc)
    guest.run()
    assert read_line(client) == f"OK {request.src_port}\n".encode()
    return client, request.src_port


def read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return line


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# --- configuration and the host socket ---


def test_the_config_space_is_the_guest_cid_and_no_vsock_feature_is_offered(guest: Guest) -> None:
    assert guest.drv.status & DeviceStatus.DRIVER_OK
    assert guest.transport.read(mmio.CONFIG_OFFSET, 8) == struct.pack("<Q", CID)
    assert guest.drv.device_features() == COMMON_FEATURES
    assert guest.drv.reg(mmio.DEVICE_ID) == 19


@pytest.mark.parametrize(
    "text",
    ["", "3", ":/tmp/x", "3:", "x:/tmp/x", "0:/tmp/x", "1:/tmp/x", "2:/tmp/x", f"{2**32 - 1}:/tmp/x",
     f"{2**40}:/tmp/x", "-3:/tmp/x", "٣:/tmp/x", "3:/" + "a" * 107, "3:/tmp/a\0b"],
)  # fmt: skip
def test_a_bad_vsock_spec_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        VsockSpec.parse(text)


def test_a_good_vsock_spec_parses_and_keeps_colons_in_the_path() -> None:
    assert VsockSpec.parse("3:/tmp/a:b.sock") == VsockSpec(3, Path("/tmp/a:b.sock"))
    assert VsockSpec.parse(f"{2**32 - 2}:v.sock").cid == 2**32 - 2


def test_the_socket_is_made_at_start_and_removed_at_close(uds: Path) -> None:
    g = Guest(uds)
    assert uds.is_socket()
    g.close()
    assert not uds.exists()


def test_a_socket_something_listens_on_is_refused_and_a_stale_one_is_replaced(uds: Path) -> None:
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(uds))
    other.listen()
    with pytest.raises(ConfigError, match="in use"):
        VsockDevice(VsockSpec(CID, uds))
    other.close()  # the file stays, nobody listens
    assert uds.is_socket()
    g = Guest(uds)
    try:
        client, _ = establish(g, uds)  # the new listener works
        client.close()
    finally:
        g.close()


def test_a_file_that_is_not_a_socket_is_left_alone(uds: Path) -> None:
    uds.write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        VsockDevice(VsockSpec(CID, uds))
    assert uds.read_text() == "precious"


# --- host-initiated connections ---


def test_a_host_connect_reaches_the_guest_and_carries_data_both_ways_until_shutdown(guest: Guest, uds: Path) -> None:
    client = connect(uds)
    (request, _), *_ = guest.run()
    assert (request.op, request.dst_cid, request.dst_port) == (Op.REQUEST, CID, GUEST_PORT)
    assert request.src_port >= vsock.EPHEMERAL_BASE and request.buf_alloc == vsock.BUF_ALLOC
    guest.send(Op.RESPONSE, src_port=GUEST_PORT, dst_port=request.src_port)
    guest.run()
    assert read_line(client) == f"OK {request.src_port}\n".encode()

    client.sendall(b"hello from the host")
    got = guest.run()
    assert [(h.op, h.src_port, h.dst_port, p) for h, p in got] == [
        (Op.RW, request.src_port, GUEST_PORT, b"hello from the host")
    ]
    guest.send(Op.RW, src_port=GUEST_PORT, dst_port=request.src_port, payload=b"hello from the guest")
    guest.run()
    assert client.recv(100) == b"hello from the guest"
    assert guest.device.bytes_to_guest == 19 and guest.device.bytes_to_host == 20

    client.shutdown(socket.SHUT_WR)  # the host is done sending: the guest hears SHUTDOWN(SEND)
    got = guest.run()
    assert [(h.op, h.flags) for h, _ in got] == [(Op.SHUTDOWN, vsock.SHUTDOWN_SEND)]
    guest.send(Op.RW, src_port=GUEST_PORT, dst_port=request.src_port, payload=b"last words")
    guest.send(Op.SHUTDOWN, src_port=GUEST_PORT, dst_port=request.src_port,
               flags=vsock.SHUTDOWN_SEND | vsock.SHUTDOWN_RCV)  # fmt: skip
    got = guest.run()
    assert [h.op for h, _ in got] == [Op.RST]  # the clean disconnect's last word (§5.10.6.5)
    assert client.recv(100) == b"last words"
    assert closed_by_peer(client)
    assert guest.device.conns == {}
    client.close()


def test_a_connect_to_a_guest_port_nobody_listens_on_closes_the_client(guest: Guest, uds: Path) -> None:
    client = connect(uds, 9999)
    (request, _), *_ = guest.run()
    guest.send(Op.RST, src_port=9999, dst_port=request.src_port)
    guest.run()
    assert closed_by_peer(client)
    assert guest.device.conns == {} and guest.device.refused == 1
    client.close()


@pytest.mark.parametrize(
    "line", [b"CONNECT\n", b"CONNECT x\n", b"connect 5\n", b"CONNECT 4294967296\n", b"CONNECT 1 \n", b"A" * 40]
)
def test_a_malformed_or_overlong_connect_line_closes_the_client(guest: Guest, uds: Path, line: bytes) -> None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(uds))
    client.sendall(line)
    assert guest.run() == []  # the guest hears nothing of it
    assert closed_by_peer(client)
    assert guest.device.clients == {}
    client.close()


def test_a_client_that_says_nothing_is_closed_after_the_timeout(uds: Path) -> None:
    g = Guest(uds, connect_timeout=0.2)
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(uds))
        g.run()
        assert len(g.device.clients) == 1
        time.sleep(0.4)
        g.run()  # the alarm's eventfd is readable by now
        assert g.device.clients == {}
        assert closed_by_peer(client)
        client.close()
    finally:
        g.close()


def test_a_guest_that_never_answers_the_request_is_given_up_on(uds: Path) -> None:
    g = Guest(uds, connect_timeout=0.2)
    try:
        client = connect(uds)
        (request, _), *_ = g.run()
        time.sleep(0.4)
        got = g.run()
        assert [(h.op, h.src_port) for h, _ in got] == [(Op.RST, request.src_port)]
        assert closed_by_peer(client)
        client.close()
    finally:
        g.close()


def test_data_the_client_sends_with_its_connect_line_reaches_the_guest(guest: Guest, uds: Path) -> None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(uds))
    client.sendall(f"CONNECT {GUEST_PORT}\nearly bytes".encode())
    (request, _), *_ = guest.run()
    guest.send(Op.RESPONSE, src_port=GUEST_PORT, dst_port=request.src_port)
    got = guest.run()
    assert b"".join(p for h, p in got if h.op == Op.RW) == b"early bytes"
    client.close()


# --- guest-initiated connections ---


def test_a_guest_connect_reaches_the_uds_port_socket(guest: Guest, uds: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"{uds}_52")
    server.listen()
    server.settimeout(5)
    guest.send(Op.REQUEST, src_port=40000, dst_port=52)
    got = guest.run()
    assert [(h.op, h.src_port, h.dst_port) for h, _ in got] == [(Op.RESPONSE, 52, 40000)]
    peer, _ = server.accept()
    peer.settimeout(5)
    guest.send(Op.RW, src_port=40000, dst_port=52, payload=b"ping")
    guest.run()
    assert peer.recv(10) == b"ping"
    peer.sendall(b"pong")
    assert [(h.op, p) for h, p in guest.run()] == [(Op.RW, b"pong")]
    peer.close()  # the host end goes: the guest hears SHUTDOWN(SEND), then its own close gets the RST
    assert [(h.op, h.flags) for h, _ in guest.run()] == [(Op.SHUTDOWN, vsock.SHUTDOWN_SEND)]
    guest.send(Op.SHUTDOWN, src_port=40000, dst_port=52, flags=vsock.SHUTDOWN_SEND | vsock.SHUTDOWN_RCV)
    assert [h.op for h, _ in guest.run()] == [Op.RST]
    assert guest.device.conns == {}
    server.close()


def test_a_guest_connect_to_a_missing_socket_gets_an_rst(guest: Guest) -> None:
    guest.send(Op.REQUEST, src_port=40001, dst_port=53)
    got = guest.run()
    assert [(h.op, h.src_port, h.dst_port) for h, _ in got] == [(Op.RST, 53, 40001)]
    assert guest.device.conns == {}


def test_a_guest_connect_to_another_cid_is_refused_from_that_cid(guest: Guest) -> None:
    guest.send(Op.REQUEST, src_port=40002, dst_port=5, dst_cid=9)
    got = guest.run()
    assert [(h.op, h.src_cid, h.src_port, h.dst_port) for h, _ in got] == [(Op.RST, 9, 5, 40002)]


# --- credit ---


def test_the_device_never_sends_the_guest_more_than_its_credit(guest: Guest, uds: Path) -> None:
    client, local = establish(guest, uds, buf_alloc=1000)
    client.sendall(bytes(range(256)) * 20)  # 5120 bytes
    got = guest.run()
    assert sum(len(p) for _, p in got) == 1000  # the guest's whole buffer, not a byte more
    guest.send(Op.RW, src_port=GUEST_PORT, dst_port=local, buf_alloc=1000, fwd_cnt=600)  # consumed 600
    got = guest.run()
    assert sum(len(p) for _, p in got) == 600
    guest.send(Op.CREDIT_UPDATE, src_port=GUEST_PORT, dst_port=local, buf_alloc=10000, fwd_cnt=1600)
    got = guest.run()
    received = b"".join(p for h, p in guest.received if h.op == Op.RW)
    assert received == (bytes(range(256)) * 20)
    client.close()


def test_a_guest_that_claims_more_consumed_than_sent_only_stalls_itself(guest: Guest, uds: Path) -> None:
    client, local = establish(guest, uds, buf_alloc=1000)
    guest.send(Op.CREDIT_UPDATE, src_port=GUEST_PORT, dst_port=local, buf_alloc=1000, fwd_cnt=5000)
    client.sendall(b"x" * 100)
    assert [h for h, _ in guest.run() if h.op == Op.RW] == []
    client.close()


def test_the_guest_hears_of_freed_space_and_its_credit_requests_are_answered(guest: Guest, uds: Path) -> None:
    client, local = establish(guest, uds)
    guest.send(Op.RW, src_port=GUEST_PORT, dst_port=local, payload=b"a" * 40000)
    got = guest.run()
    assert [(h.op, h.fwd_cnt, h.buf_alloc) for h, _ in got] == [(Op.CREDIT_UPDATE, 40000, vsock.BUF_ALLOC)]
    guest.send(Op.CREDIT_REQUEST, src_port=GUEST_PORT, dst_port=local)
    assert [(h.op, h.fwd_cnt) for h, _ in guest.run()] == [(Op.CREDIT_UPDATE, 40000)]
    client.close()


def test_guest_data_a_slow_host_cannot_take_waits_bounded_and_beyond_the_credit_resets(guest: Guest, uds: Path) -> None:
    client, local = establish(guest, uds)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    chunk = os.urandom(vsock.MAX_PAYLOAD)
    sent = 0
    for _ in range(200):
        guest.send(Op.RW, src_port=GUEST_PORT, dst_port=local, payload=chunk)
        got = guest.run()
        conn = guest.device.conns.get((local, GUEST_PORT))
        if conn is None:
            break
        assert conn.buffered <= vsock.BUF_ALLOC
        sent += len(chunk)
    else:
        pytest.fail("a host that reads nothing took everything")
    assert [h.op for h, _ in got] == [Op.RST] and guest.device.protocol_errors == 1
    assert closed_by_peer_after(client, sent)
    client.close()


def closed_by_peer_after(sock: socket.socket, expected: int) -> bool:
    """Drain what the host socket got; True if it is at most `expected` bytes and then end-of-file."""
    total = 0
    sock.settimeout(5)
    while True:
        try:
            data = sock.recv(1 << 20)
        except ConnectionResetError:
            return total <= expected
        if not data:
            return total <= expected
        total += len(data)


def test_a_slow_host_gets_everything_once_it_reads(guest: Guest, uds: Path) -> None:
    client, local = establish(guest, uds)
    data = os.urandom(3 * vsock.MAX_PAYLOAD)
    fwd = 0
    for i in range(0, len(data), 32768):
        guest.send(Op.RW, src_port=GUEST_PORT, dst_port=local, payload=data[i : i + 32768])
        updates = [h.fwd_cnt for h, _ in guest.run() if h.op == Op.CREDIT_UPDATE]
        fwd = max([fwd, *updates])
        assert i + 32768 - fwd <= vsock.BUF_ALLOC  # a guest keeping to its credit always has room
    received = b""
    client.settimeout(0.2)
    while len(received) < len(data):
        received += client.recv(1 << 20)
        guest.run()  # the device flushes what it kept as the socket drains
    assert received == data
    client.close()


# --- many connections, resets, hostile packets ---


def test_many_connections_at_once_keep_their_data_apart(guest: Guest, uds: Path) -> None:
    clients = [establish(guest, uds) for _ in range(40)]
    assert len({local for _, local in clients}) == 40
    for i, (client, local) in enumerate(clients):
        client.sendall(f"from host {i}".encode())
        guest.send(Op.RW, src_port=GUEST_PORT, dst_port=local, payload=f"from guest {i}".encode())
    got = guest.run()
    by_port = {h.src_port: p for h, p in got if h.op == Op.RW}
    assert by_port == {local: f"from host {i}".encode() for i, (_, local) in enumerate(clients)}
    for i, (client, _) in enumerate(clients):
        assert client.recv(100) == f"from guest {i}".encode()
        client.close()


def test_the_connection_limit_refuses_more_clients(guest: Guest, uds: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vsock, "MAX_CONNECTIONS", 3)
    clients = [establish(guest, uds)[0] for _ in range(3)]
    extra = connect(uds)
    assert guest.run() == []
    assert closed_by_peer(extra)
    guest.send(Op.REQUEST, src_port=41000, dst_port=52)
    assert [h.op for h, _ in guest.run()] == [Op.RST]
    for c in [*clients, extra]:
        c.close()


def test_a_driver_reset_closes_every_connection(guest: Guest, uds: Path) -> None:
    client, _ = establish(guest, uds)
    guest.drv.set(mmio.STATUS, 0)
    assert guest.device.conns == {}
    assert closed_by_peer(client)
    client.close()


def test_a_host_end_that_is_gone_makes_an_rst(guest: Guest, uds: Path) -> None:
    client, local = establish(guest, uds)
    client.close()
    guest.send(Op.RW, src_port=GUEST_PORT, dst_port=local, payload=b"anyone?")
    got = guest.run()
    assert [h.op for h, _ in got][-1] == Op.RST and guest.device.conns == {}


def test_packets_for_no_connection_get_an_rst_and_forged_or_short_ones_are_dropped(guest: Guest) -> None:
    guest.send(Op.RW, src_port=1, dst_port=2, payload=b"stray")
    assert [(h.op, h.src_port, h.dst_port) for h, _ in guest.run()] == [(Op.RST, 2, 1)]
    guest.send(Op.RW, src_port=1, dst_port=2, src_cid=CID + 1)  # not the guest's CID
    guest.send_raw(b"\x01" * 20)  # shorter than a header
    guest.send(Op.RST, src_port=1, dst_port=2)  # an RST is never answered
    assert guest.run() == [] and guest.device.dropped == 2


def test_a_packet_whose_len_runs_past_its_buffer_resets_its_connection(guest: Guest, uds: Path) -> None:
    client, local = establish(guest, uds)
    guest.send(Op.RW, src_port=GUEST_PORT, dst_port=local, payload=b"short", length=5000)
    assert [h.op for h, _ in guest.run()] == [Op.RST]
    assert closed_by_peer(client) and guest.device.conns == {}
    client.close()


def test_rsts_waiting_for_rx_buffers_are_bounded(uds: Path) -> None:
    g = Guest(uds)
    try:
        g.drv.take_used(vsock.RXQ)
        for _ in range(RX_BUFFERS):  # take every rx buffer away: answers cannot go out
            g.send(Op.CREDIT_REQUEST, src_port=1, dst_port=2)
        for _ in range(vsock.MAX_RESETS + 50):
            g.send(Op.CREDIT_REQUEST, src_port=1, dst_port=2)
        assert len(g.device._resets) <= vsock.MAX_RESETS and g.device.resets_dropped > 0
    finally:
        g.close()


def test_hostile_tx_packets_end_in_rsts_or_drops_with_bounded_state(guest: Guest, uds: Path) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"{uds}_52")
    server.listen(1024)
    client, local = establish(guest, uds)
    ports = st.sampled_from([0, 1, 52, GUEST_PORT, local, 2**32 - 1])
    header = st.builds(
        Header,
        src_cid=st.sampled_from([CID, CID + 1, 2**64 - 1]),
        dst_cid=st.sampled_from([vsock.HOST_CID, CID, 0, 2**32 - 1]),
        src_port=ports,
        dst_port=ports,
        len=st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1)),
        type=st.sampled_from([vsock.TYPE_STREAM, 0, 2, 0xFFFF]),
        op=st.one_of(st.sampled_from(list(Op)), st.integers(0, 0xFFFF)),
        flags=st.integers(0, 2**32 - 1),
        buf_alloc=st.integers(0, 2**32 - 1),
        fwd_cnt=st.integers(0, 2**32 - 1),
    )

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(header, st.binary(max_size=300)), max_size=8), st.binary(max_size=60))
    def exchange(packets: list[tuple[Header, bytes]], junk: bytes) -> None:
        for hdr, payload in packets:
            guest.send_raw(hdr.pack() + payload)
        guest.send_raw(junk)
        guest.run()
        device = guest.device
        assert guest.transport.error is None  # nothing raised out of the device
        assert not guest.drv.status & DeviceStatus.DEVICE_NEEDS_RESET
        assert len(device.conns) <= vsock.MAX_CONNECTIONS and len(device._resets) <= vsock.MAX_RESETS
        assert all(c.buffered <= vsock.BUF_ALLOC for c in device.conns.values())
        assert set(device._ctrl) <= set(device.conns) and set(device._rx_ready) <= set(device.conns)

    try:
        exchange()
    finally:
        client.close()
        server.close()


def test_the_device_works_on_the_device_event_loop_thread(uds: Path) -> None:
    """The KVM backend's loop (real epoll, its own thread, watches added and closed as connections come and go)."""
    loop = EventLoop("vsock-test")
    errors: list[str] = []
    g = Guest(uds, event_loop=loop)

    def wait_for(op: Op) -> tuple[Header, bytes]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for hdr, payload in g.run():
                if hdr.op == op:
                    return hdr, payload
            time.sleep(0.01)
        raise AssertionError(f"no {op.name} from the device")

    loop.start(errors.append)
    try:
        for round_ in range(3):  # fds come and go: the loop must follow
            client = connect(uds)
            request, _ = wait_for(Op.REQUEST)
            g.send(Op.RESPONSE, src_port=GUEST_PORT, dst_port=request.src_port)
            assert read_line(client) == f"OK {request.src_port}\n".encode()
            client.sendall(b"over epoll %d" % round_)
            assert wait_for(Op.RW)[1] == b"over epoll %d" % round_
            g.send(Op.RW, src_port=GUEST_PORT, dst_port=request.src_port, payload=b"back")
            assert client.recv(10) == b"back"
            client.close()
            assert wait_for(Op.SHUTDOWN)[0].flags == vsock.SHUTDOWN_SEND
            g.send(Op.SHUTDOWN, src_port=GUEST_PORT, dst_port=request.src_port, flags=3)
            wait_for(Op.RST)
        assert errors == [] and g.transport.error is None
    finally:
        loop.stop()
        g.close()
