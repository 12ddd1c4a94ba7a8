"""virtio-net (virtio 1.2 §5.1) driven through its MMIO transport, with a socketpair as the host side: guest frames
reach the host without the virtio header; host frames land in posted buffers after a zeroed header; host input
waits (bounded) while there are no buffers; bad sizes and bad streams are dropped or take the link down, counted,
never raised; the host side's parsing and the device's queues are fuzzed. Also `--net`/`--port` parsing, the TAP
ioctl against the kernel headers, and passt itself when it is installed."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popek.devices import tap
from popek.devices.virtio import net
from popek.devices.virtio.device import DeviceStatus
from popek.devices.virtio.mmio import CONFIG_OFFSET as CONFIG
from popek.devices.virtio.mmio import STATUS, MmioTransport
from popek.devices.virtio.net import NetDevice, NetSpec, StreamHost, TapHost, parse_port
from popek.errors import ConfigError

from .driver import DATA_BASE, MEM_SIZE, Driver, Irq, RecordingMemory

MAC = bytes.fromhex("525400abcdef")
HDR = 12


class Watch:
    def __init__(self, fd: int, callback: Callable[[], None]) -> None:
        self.fd, self.callback, self.enabled = fd, callback, True

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled


class Rig:
    """A NetDevice on a transport, a driver, and the peer socket that plays the host side."""

    def __init__(self, host: net.FrameHost, peer: socket.socket, init: bool = True) -> None:
        self.mem = RecordingMemory(MEM_SIZE)
        self.device = NetDevice(host, MAC)
        self.transport = MmioTransport(self.device, self.mem, Irq())
        self.watches: list[Watch] = []

        def watch_fd(fd: int, cb: Callable[[], None]) -> Watch:
            self.watches.append(Watch(fd, lambda: self.transport.run_device(cb)))
            return self.watches[-1]

        self.device.connect_host(watch_fd)
        self.drv = Driver(self.transport, self.mem)
        self.peer = peer
        if init:
            self.drv.init()

    @property
    def watch(self) -> Watch:
        (watch,) = self.watches
        return watch

    def transmit(self, frame: bytes, split: int | None = None) -> None:
        data = bytes(HDR) + frame
        parts = [data] if split is None else [data[:split], data[split:]]
        self.drv.submit(net.TRANSMITQ, parts, [])
        self.drv.kick(net.TRANSMITQ)

    def post(self, *sizes: int) -> list[tuple[int, int]]:
        """Post receive buffers of the given sizes; (head, address) of each."""
        posted = []
        for size in sizes:
            head, (addr,) = self.drv.submit(net.RECEIVEQ, [], [size])
            posted.append((head, addr))
        self.drv.kick(net.RECEIVEQ)
        return posted

    def host_readable(self) -> None:
        if self.watch.enabled:
            self.watch.callback()

    def close(self) -> None:
        self.device.close()
        self.peer.close()
        self.mem.close()


def stream_rig(init: bool = True) -> Rig:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Rig(StreamHost(theirs), ours, init)


def tap_rig() -> Rig:
    """TapHost on a datagram socketpair: one read is one frame, one write sends one, as on a TAP fd."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    theirs.setblocking(False)
    return Rig(TapHost(theirs.detach(), "test"), ours)


def framed(frame: bytes) -> bytes:
    return struct.pack(">I", len(frame)) + frame


def recv_framed(sock: socket.socket, count: int, timeout: float = 2.0) -> list[bytes]:
    """`count` frames of the stream framing from `sock`."""
    sock.settimeout(timeout)
    data = b""
    frames: list[bytes] = []
    while len(frames) < count:
        while len(data) >= 4 and len(data) >= 4 + struct.unpack(">I", data[:4])[0]:
            n = struct.unpack(">I", data[:4])[0]
            frames.append(data[4 : 4 + n])
            data = data[4 + n :]
        if len(frames) < count:
            data += sock.recv(1 << 20)
    return frames


def ethernet(payload: bytes, ethertype: int = 0x0800) -> bytes:
    return b"\xff" * 6 + MAC + struct.pack(">H", ethertype) + payload


def test_the_configuration_space_holds_the_mac_and_the_link_is_up() -> None:
    rig = stream_rig()
    try:
        features = rig.drv.device_features()
        assert features & net.VIRTIO_NET_F_MAC and features & net.VIRTIO_NET_F_STATUS
        assert features & (1 << 15) == 0  # no VIRTIO_NET_F_MRG_RXBUF: one buffer per frame
        config = rig.transport.read(CONFIG, 8)
        assert config[:6] == MAC and struct.unpack("<H", config[6:8])[0] == net.VIRTIO_NET_S_LINK_UP
    finally:
        rig.close()


def test_transmitted_frames_reach_the_host_without_the_header() -> None:
    rig = stream_rig()
    try:
        first, second = ethernet(b"hello" * 20), ethernet(b"x" * 1500)
        rig.transmit(first)
        rig.transmit(second, split=5)  # the header split across descriptors
        assert recv_framed(rig.peer, 2) == [first, second]
        assert [length for _head, length in rig.drv.take_used(net.TRANSMITQ)] == [0, 0]
        assert rig.device.tx_frames == 2 and rig.device.tx_bytes == len(first) + len(second)
    finally:
        rig.close()


def test_host_frames_land_in_posted_buffers_after_a_zeroed_header() -> None:
    rig = stream_rig()
    try:
        posted = rig.post(2048, 2048)
        frames = [ethernet(b"a" * 50), ethernet(b"b" * 1000)]
        rig.peer.sendall(b"".join(framed(f) for f in frames))
        rig.host_readable()
        used = rig.drv.take_used(net.RECEIVEQ)
        assert used == [(head, HDR + len(f)) for (head, _addr), f in zip(posted, frames)]
        for (_head, addr), frame in zip(posted, frames):
            header = struct.unpack("<BBHHHHH", rig.mem.read(addr, HDR))
            assert header == (0, 0, 0, 0, 0, 0, 1)  # no offloads, num_buffers 1
            assert rig.mem.read(addr + HDR, len(frame)) == frame
        assert rig.device.rx_frames == 2 and rig.drv.ack() & 1
    finally:
        rig.close()


def test_a_frame_split_across_stream_reads_is_reassembled() -> None:
    rig = stream_rig()
    try:
        ((head, addr),) = rig.post(2048)
        frame = ethernet(b"z" * 700)
        data = framed(frame)
        for cut in (2, 300, len(data)):  # the length itself arrives in two pieces
            rig.peer.sendall(data[:cut])
            data = data[cut:]
            rig.host_readable()
            if data:
                assert rig.drv.take_used(net.RECEIVEQ) == []
        assert rig.drv.take_used(net.RECEIVEQ) == [(head, HDR + len(frame))]
        assert rig.mem.read(addr + HDR, len(frame)) == frame
    finally:
        rig.close()


def test_without_receive_buffers_the_host_fd_is_paused_and_resumes_when_buffers_come() -> None:
    rig = stream_rig()
    try:
        frames = [ethernet(bytes([i]) * 60) for i in range(3 * net.RX_BACKLOG)]
        rig.peer.sendall(b"".join(framed(f) for f in frames))
        for _ in range(4):
            rig.host_readable()
        assert len(rig.device.backlog) == net.RX_BACKLOG and not rig.watch.enabled
        rig.post(*[256] * 4)  # four go; the backlog refills from the host side, so the watch stays paused
        assert len(rig.drv.take_used(net.RECEIVEQ)) == 4
        assert len(rig.device.backlog) == net.RX_BACKLOG and not rig.watch.enabled
        rig.post(*[256] * (len(frames) - 4))
        used = rig.drv.take_used(net.RECEIVEQ)
        assert len(used) == len(frames) - 4 and not rig.device.backlog and rig.watch.enabled
        assert rig.device.rx_frames == len(frames) and rig.device.rx_dropped == 0
    finally:
        rig.close()


def test_frames_of_bad_size_from_the_guest_are_dropped_and_counted() -> None:
    rig = stream_rig()
    try:
        rig.transmit(b"\x01" * 13)  # shorter than an Ethernet header
        rig.drv.submit(net.TRANSMITQ, [b"\0" * 8], [])  # shorter than the virtio header
        rig.drv.submit(net.TRANSMITQ, [bytes(HDR) + b"\x02" * (net.MAX_FRAME + 1)], [])
        rig.drv.kick(net.TRANSMITQ)
        assert len(rig.drv.take_used(net.TRANSMITQ)) == 3
        assert rig.device.tx_malformed == 3 and rig.device.tx_frames == 0
        rig.transmit(ethernet(b"ok"))
        assert recv_framed(rig.peer, 1) == [ethernet(b"ok")]  # nothing else came before it
    finally:
        rig.close()


def test_a_frame_larger_than_its_buffer_is_dropped_and_the_buffer_returned_empty() -> None:
    rig = stream_rig()
    try:
        (small, _), (big, addr) = rig.post(100, 2048)
        frames = [ethernet(b"L" * 500), ethernet(b"s" * 20)]
        rig.peer.sendall(b"".join(framed(f) for f in frames))
        rig.host_readable()
        assert rig.drv.take_used(net.RECEIVEQ) == [(small, 0), (big, HDR + len(frames[1]))]
        assert rig.mem.read(addr + HDR, len(frames[1])) == frames[1]
        assert rig.device.rx_dropped == 1 and rig.device.rx_frames == 1
    finally:
        rig.close()


@pytest.mark.parametrize("length", [0, net.MAX_FRAME + 1, 0xFFFFFFFF])
def test_a_bad_length_in_the_stream_takes_the_link_down(length: int) -> None:
    rig = stream_rig()
    try:
        rig.post(2048)
        generation = rig.transport.config_generation
        rig.peer.sendall(framed(ethernet(b"fine")) + struct.pack(">I", length) + b"junk" * 10)
        rig.host_readable()
        assert len(rig.drv.take_used(net.RECEIVEQ)) == 1  # the frame before the bad length got through
        assert rig.device.link_error is not None and str(length) in rig.device.link_error
        assert not rig.watch.enabled
        assert rig.transport.config_generation != generation and rig.drv.ack() & 2  # configuration change
        assert struct.unpack("<H", rig.transport.read(CONFIG + 6, 2))[0] == 0  # link down
        assert not rig.drv.status & DeviceStatus.DEVICE_NEEDS_RESET  # the device itself is fine
        rig.transmit(ethernet(b"after"))
        assert rig.device.tx_dropped == 1
        assert "LINK DOWN" in rig.device.stats()
    finally:
        rig.close()


def test_the_host_closing_the_stream_takes_the_link_down() -> None:
    rig = stream_rig()
    try:
        rig.peer.close()
        rig.host_readable()
        assert rig.device.link_error == "stream closed the connection" and not rig.watch.enabled
    finally:
        rig.device.close()
        rig.mem.close()


def test_sends_the_host_cannot_take_are_dropped_and_the_stream_stays_framed() -> None:
    rig = stream_rig()
    try:
        frames = [ethernet(bytes([i % 251]) * 9000) for i in range(400)]  # far more than the socket buffers hold
        for frame in frames:
            rig.drv._next_data = DATA_BASE  # the previous frame's buffer is free again
            rig.transmit(frame)
            ((head, _length),) = rig.drv.take_used(net.TRANSMITQ)
            rig.drv.queues[net.TRANSMITQ].free.append(head)
        device = rig.device
        assert device.tx_dropped > 0 and device.tx_frames + device.tx_dropped == len(frames)
        received = recv_framed(rig.peer, device.tx_frames - 1, timeout=5)  # the last may still be partly sent
        assert all(frame in frames for frame in received)
        assert received == sorted(received, key=frames.index)
    finally:
        rig.close()


def test_frames_arriving_before_the_driver_is_ready_are_dropped() -> None:
    rig = stream_rig(init=False)
    try:
        rig.peer.sendall(b"".join(framed(ethernet(b"early")) for _ in range(3)))
        rig.host_readable()
        assert rig.device.rx_dropped == 3 and not rig.device.backlog and rig.watch.enabled
        rig.drv.init()
        rig.post(2048)
        assert rig.drv.take_used(net.RECEIVEQ) == []
    finally:
        rig.close()


def test_a_tap_host_reads_and_writes_one_frame_per_call() -> None:
    rig = tap_rig()
    try:
        posted = rig.post(2048, 2048)
        rig.peer.send(ethernet(b"one"))
        rig.peer.send(b"runt")  # shorter than an Ethernet header: counted, not delivered
        rig.peer.send(ethernet(b"two"))
        rig.host_readable()
        used = rig.drv.take_used(net.RECEIVEQ)
        assert [length for _h, length in used] == [HDR + len(ethernet(b"one")), HDR + len(ethernet(b"two"))]
        assert rig.mem.read(posted[1][1] + HDR, len(ethernet(b"two"))) == ethernet(b"two")
        assert rig.device.rx_malformed == 1
        rig.transmit(ethernet(b"out"), split=3)
        assert rig.peer.recv(65536) == ethernet(b"out")
    finally:
        rig.close()


def test_a_reset_drops_held_frames() -> None:
    rig = stream_rig()
    try:
        rig.peer.sendall(b"".join(framed(ethernet(b"held")) for _ in range(net.RX_BACKLOG)))
        rig.host_readable()
        assert len(rig.device.backlog) == net.RX_BACKLOG and not rig.watch.enabled
        rig.drv.set(STATUS, 0)  # reset
        assert not rig.device.backlog and rig.watch.enabled
    finally:
        rig.close()


# --- fuzzing ---


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(st.binary(max_size=300), max_size=30), buffers=st.integers(0, 6))
def test_any_stream_from_the_host_stays_inside_the_device(chunks: list[bytes], buffers: int) -> None:
    """Whatever bytes passt sends (lengths that lie, frames cut anywhere), the device neither raises nor buffers
    more than its bounds: the stream host holds less than two frames, the backlog at most RX_BACKLOG."""
    rig = stream_rig()
    try:
        rig.post(*[1600] * buffers)
        for chunk in chunks:
            try:
                rig.peer.send(chunk)
            except BlockingIOError:
                break
            rig.host_readable()
            assert not rig.drv.status & DeviceStatus.DEVICE_NEEDS_RESET
            host = rig.device.host
            assert isinstance(host, StreamHost)
            assert len(host.inbuf) < 2 * net.STREAM_READ
            assert len(rig.device.backlog) <= net.RX_BACKLOG
        assert len(rig.drv.take_used(net.RECEIVEQ)) <= buffers
    finally:
        rig.close()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chains=st.lists(
        st.tuples(st.lists(st.binary(max_size=200), min_size=1, max_size=4), st.lists(st.integers(0, 64), max_size=2)),
        min_size=1,
        max_size=12,
    )
)
def test_any_transmit_chain_is_sent_or_counted(chains: list[tuple[list[bytes], list[int]]]) -> None:
    """Transmit chains of any shape (short, header only, with device-writable buffers) end sent or counted."""
    rig = stream_rig()
    try:
        for readable, writable in chains:
            rig.drv.submit(net.TRANSMITQ, readable, writable)
        rig.drv.kick(net.TRANSMITQ)
        assert len(rig.drv.take_used(net.TRANSMITQ)) == len(chains)
        device = rig.device
        assert device.tx_frames + device.tx_malformed + device.tx_dropped == len(chains)
        good = [b"".join(r)[HDR:] for r, _w in chains if net.ETH_HLEN <= sum(map(len, r)) - HDR <= net.MAX_FRAME]
        assert recv_framed(rig.peer, len(good)) == good
    finally:
        rig.close()


# --- the user's description ---


def test_net_specs_parse() -> None:
    spec = NetSpec.parse("passt", ((8080, 80),))
    assert spec.backend == "passt" and spec.ports == ((8080, 80),) and spec.kernel_parameters() == []
    assert spec.mac[:3] == b"\x52\x54\x00" and len(spec.mac) == 6
    assert len({NetSpec.parse("passt").mac for _ in range(8)}) > 1  # random per VM (24 bits: collisions are rare)
    tapped = NetSpec.parse("tap:tap0,mac=02:00:00:00:00:01,ip=10.0.0.2/24,gw=10.0.0.1")
    assert (tapped.backend, tapped.tap, tapped.mac_text) == ("tap", "tap0", "02:00:00:00:00:01")
    assert tapped.kernel_parameters() == ["popek.ip=10.0.0.2/24,10.0.0.1"]
    assert parse_port("2222:22") == (2222, 22)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("slirp", "expected passt or tap:NAME"),
        ("tap", "expected passt or tap:NAME"),
        ("tap:", "expected passt or tap:NAME"),
        ("passt:x", "expected passt or tap:NAME"),
        ("tap:" + "x" * 16, "not a valid interface name"),
        ("tap:a/b", "not a valid interface name"),
        ("tap:..", "not a valid interface name"),
        ("passt,mac=01:00:00:00:00:01", "multicast"),
        ("passt,mac=52:54:00:00:00", "not a MAC address"),
        ("passt,mac=00:00:00:00:00:00", "not a usable address"),
        ("passt,speed=10", "unknown option"),
        ("passt,mac=52:54:00:00:00:01,mac=52:54:00:00:00:02", "given twice"),
        ("tap:t0,ip=10.0.0.300/24", "not an IPv4"),
        ("tap:t0,ip=10.0.0.3", "needs its prefix"),
        ("tap:t0,gw=10.0.0.1", "gw= needs ip="),
        ("tap:t0,ip=10.0.0.2/24,gw=nowhere", "not an IPv4 address"),
    ],
)
def test_bad_net_options_are_config_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NetSpec.parse(text)


@pytest.mark.parametrize("text", ["80", "a:b", "0:80", "80:65536", "1:2:3", ":80", "123456:1", ""])
def test_bad_port_forwards_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError, match="--port"):
        parse_port(text)


def test_port_forwards_need_passt_and_distinct_host_ports() -> None:
    with pytest.raises(ConfigError, match="passt"):
        NetSpec.parse("tap:t0", ((8080, 80),))
    with pytest.raises(ConfigError, match="twice"):
        NetSpec.parse("passt", ((8080, 80), (8080, 81)))


# --- the TAP ioctl ---


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc compiles the check against <linux/if_tun.h>")
def test_the_tap_ioctl_matches_the_kernel_headers(tmp_path: Path) -> None:
    source = tmp_path / "tun.c"
    source.write_text(
        "#include <stdio.h>\n#include <sys/ioctl.h>\n#include <sys/socket.h>\n#include <linux/if.h>\n"
        "#include <linux/if_tun.h>\n"
        'int main(void) { printf("%lu %zu %d %d\\n", (unsigned long)TUNSETIFF, sizeof(struct ifreq), '
        "IFF_TAP, IFF_NO_PI); return 0; }\n"
    )
    subprocess.run(["gcc", "-o", str(tmp_path / "tun"), str(source)], check=True, capture_output=True)
    out = subprocess.run([str(tmp_path / "tun")], check=True, capture_output=True, text=True).stdout.split()
    assert [int(x) for x in out] == [tap.TUNSETIFF, tap.ctypes.sizeof(tap.ifreq), tap.IFF_TAP, tap.IFF_NO_PI]


def test_a_bad_tap_name_is_refused_before_any_system_call() -> None:
    with pytest.raises(ConfigError, match="not a valid interface name"):
        tap.open_tap("no spaces")


# --- passt itself ---

needs_passt = pytest.mark.skipif(shutil.which("passt") is None, reason="passt is not installed (apt-get install passt)")


def test_passt_missing_is_a_config_error_naming_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="Debian package passt"):
        net.PasstHost()


@needs_passt
def test_passt_answers_the_guest_and_is_reaped_at_close() -> None:
    """A real passt: an ARP request for the gateway gets a reply; closing ends the process."""
    host = net.PasstHost()
    process = host.process.process
    assert process is not None and process.poll() is None
    try:
        mac = MAC
        arp = b"\xff" * 6 + mac + b"\x08\x06" + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 1) + mac
        arp += socket.inet_aton("192.0.2.2") + bytes(6) + socket.inet_aton("192.0.2.1")
        assert host.send_frame([memoryview(arp)])
        deadline = time.monotonic() + 5
        reply = None
        while reply is None and time.monotonic() < deadline:
            reply = host.recv_frame()
            time.sleep(0.01)
        assert reply is not None and reply[:6] == mac and reply[12:14] == b"\x08\x06"
    finally:
        host.close()
    assert process.returncode is not None


@needs_passt
def test_a_forwarded_port_already_in_use_is_a_config_error() -> None:
    busy = socket.socket()
    busy.bind(("", 0))
    busy.listen()
    try:
        with pytest.raises(ConfigError, match="cannot be bound"):
            net.PasstHost(((busy.getsockname()[1], 80),))
    finally:
        busy.close()


# --- a real TAP device, in a network namespace of the test's own ---

TAP_PROBE = r"""
import select, socket, struct, subprocess, sys
from popek.devices.virtio.net import TapHost
host = TapHost.open("popektap0")
for cmd in ("ip link set popektap0 up", "ip addr add 10.9.0.1/24 dev popektap0"):
    subprocess.run(cmd.split(), check=True)
guest_mac = bytes.fromhex("525400000002")
arp = b"\xff" * 6 + guest_mac + b"\x08\x06" + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 1) + guest_mac
arp += socket.inet_aton("10.9.0.2") + bytes(6) + socket.inet_aton("10.9.0.1")
assert host.send_frame([memoryview(arp)])
for _ in range(50):
    select.select([host.fd], [], [], 0.1)
    frame = host.recv_frame()
    if frame is not None and frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02":
        print("arp-reply-for", frame[:6].hex(), "from", socket.inet_ntoa(frame[28:32]))
        break
from popek.devices.tap import open_tap
from popek.errors import ConfigError
try:
    open_tap("lo")
except ConfigError as e:
    print("lo-refused:", "not a TAP device" in str(e))
"""


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare(1)")
def test_a_tap_device_carries_frames_to_the_host_kernel_and_back() -> None:
    """TUNSETIFF creates the TAP interface; the host kernel answers an ARP request the guest side sends; a name
    that is taken by another kind of interface is a ConfigError."""
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {probe.stderr.decode().strip()}")
    root = Path(__file__).resolve().parents[4]
    r = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", TAP_PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["arp-reply-for", "525400000002", "from", "10.9.0.1", "lo-refused:", "True"], (
        r.stdout + r.stderr
    )
