"""virtio-net, the network device (virtio 1.2 §5.1), in its simplest form: one receiveq (0) and one transmitq (1),
no control queue, no multiqueue, no offloads (so no VIRTIO_NET_F_CSUM/GUEST_CSUM: the driver checksums every
packet itself, and every header the device writes is zero), no VIRTIO_NET_F_MRG_RXBUF. Features offered:
VIRTIO_NET_F_MAC (the configuration space holds the MAC, §5.1.4) and VIRTIO_NET_F_STATUS (the link goes down,
with a configuration change notification, when the host side fails), beside VERSION_1, INDIRECT_DESC, EVENT_IDX.

Every buffer starts with a struct virtio_net_hdr, 12 bytes with VERSION_1 (§5.1.6: flags, gso_type, hdr_len,
gso_size, csum_start, csum_offset, num_buffers). Transmit (§5.1.6.2): the device strips the header and sends the
frame to the host; a frame shorter than an Ethernet header (14 bytes) or longer than 65535 bytes is dropped and
counted. Receive (§5.1.6.3, §5.1.6.4): each frame from the host fills one chain of the driver's posted buffers
after a zeroed header whose num_buffers is 1 (the value §5.1.6.4 requires without MRG_RXBUF); a frame its chain
cannot hold is dropped and the chain returned empty (Linux counts it as a length error).

The host side is a `FrameHost`: passt over a stream socket (`StreamHost` with QEMU's framing, popek.devices.passt
starts the process) or a TAP device (`TapHost`, popek.devices.tap). Its fd is watched by the backend's device loop
(`connect_host`). Host frames wait in a backlog of at most RX_BACKLOG frames while the driver has posted no
buffers; when it is full the watch pauses, so the host side (passt's socket, the TAP queue) holds the rest, and
it resumes when the driver posts buffers. Frames arriving while no driver is active are dropped, as a NIC without
a driver drops them. Sends to the host never block: a frame the host side cannot take now is dropped and
counted, as a NIC drops on a full queue, and the guest's TCP retransmits.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import os
import re
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from popek.devices.event_loop import FdWatch
from popek.devices.virtio.device import COMMON_FEATURES, DeviceId, VirtioDevice, WatchFd
from popek.devices.virtio.queue import ChainReader, ChainWriter, DescriptorChain
from popek.errors import ConfigError
from popek.hostio import advance_views

VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_STATUS = 1 << 16
VIRTIO_NET_S_LINK_UP = 1

QUEUE_SIZE = 256
RECEIVEQ, TRANSMITQ = 0, 1
NET_HDR = struct.Struct("<BBHHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
RX_HEADER = NET_HDR.pack(0, 0, 0, 0, 0, 0, 1)  # VIRTIO_NET_HDR_GSO_NONE, no checksum to complete, one buffer
ETH_HLEN = 14
MAX_FRAME = 65535  # the largest frame either side may pass: a 16-bit IP length plus headers fits
RX_BACKLOG = 8  # host frames held while the driver has posted no buffers
STREAM_LENGTH = struct.Struct(">I")  # QEMU's -netdev stream framing, as passt speaks it
STREAM_READ = STREAM_LENGTH.size + MAX_FRAME  # one receive never takes more than one whole frame
DROPPED_ACTIVE = 64  # frames read and dropped per readable event while no driver is active


class HostLinkError(Exception):
    """The host side of the network broke (passt exited or sent a malformed stream); the link stays down."""


# --- the user's description ---------------------------------------------------------------------------------------

_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def random_mac() -> bytes:
    """52:54:00:xx:xx:xx, QEMU's range: locally administered (bit 1 of the first byte set), unicast (bit 0 clear)."""
    return b"\x52\x54\x00" + os.urandom(3)


def parse_mac(text: str) -> bytes:
    if not _MAC.match(text):
        raise ConfigError(f"mac={text[:40]!r} is not a MAC address like 52:54:00:12:34:56")
    mac = bytes.fromhex(text.replace(":", ""))
    if mac[0] & 1:
        raise ConfigError(f"mac={text} is a multicast address: a NIC needs a unicast one (first byte even)")
    if mac == bytes(6):
        raise ConfigError("mac=00:00:00:00:00:00 is not a usable address")
    return mac


def parse_port(text: str) -> tuple[int, int]:
    """`--port HOST:GUEST` (TCP): a host port forwarded to a guest port."""
    host, sep, guest = text.partition(":")
    if not sep or not host.isdigit() or not guest.isdigit() or len(host) > 5 or len(guest) > 5:
        raise ConfigError(f"--port {text[:40]!r}: expected HOST:GUEST, two TCP port numbers (e.g. 8080:80)")
    ports = int(host), int(guest)
    if not all(1 <= p <= 65535 for p in ports):
        raise ConfigError(f"--port {text}: port numbers go from 1 to 65535")
    return ports


@dataclass(frozen=True)
class NetSpec:
    """One network device: `--net passt|tap:NAME[,mac=MAC][,ip=ADDR/PREFIX[,gw=ADDR]]` and `--port HOST:GUEST`.

    `ip` gives the guest a static address (passed as popek.ip= on the kernel command line for the default guest's
    init); without it the guest asks DHCP, which passt answers."""

    backend: str  # "passt" or "tap"
    tap: str | None = None
    mac: bytes = field(default_factory=random_mac)
    ports: tuple[tuple[int, int], ...] = ()
    ip: str | None = None  # ADDR/PREFIX
    gateway: str | None = None

    @classmethod
    def parse(cls, text: str, ports: tuple[tuple[int, int], ...] = ()) -> NetSpec:
        kind, _, options = text.partition(",")
        backend, _, name = kind.partition(":")
        if kind == "passt":
            tap = None
        elif backend == "tap" and name:
            from popek.devices.tap import valid_interface_name

            if not valid_interface_name(name):
                raise ConfigError(f"--net tap:{name[:40]!r}: not a valid interface name (1-15 characters, no '/', "
                                  "':' or spaces)")  # fmt: skip
            tap = name
        else:
            raise ConfigError(f"--net {text[:60]!r}: expected passt or tap:NAME, then ,mac=... ,ip=... ,gw=...")
        values: dict[str, str] = {}
        for option in options.split(",") if options else []:
            key, eq, value = option.partition("=")
            if not eq or key not in ("mac", "ip", "gw"):
                raise ConfigError(f"--net: unknown option {option[:40]!r} (known: mac=, ip=, gw=)")
            if key in values:
                raise ConfigError(f"--net: {key}= is given twice")
            values[key] = value
        kwargs: dict[str, object] = {}
        if "mac" in values:
            kwargs["mac"] = parse_mac(values["mac"])
        if "ip" in values:
            try:
                address = ipaddress.IPv4Interface(values["ip"])
            except ValueError:
                raise ConfigError(f"--net: ip={values['ip'][:40]!r} is not an IPv4 ADDRESS/PREFIX") from None
            if "/" not in values["ip"]:
                raise ConfigError(f"--net: ip={values['ip']} needs its prefix length (e.g. {address.ip}/24)")
            kwargs["ip"] = str(address)
        if "gw" in values:
            if "ip" not in values:
                raise ConfigError("--net: gw= needs ip= (a gateway for a static address)")
            try:
                kwargs["gateway"] = str(ipaddress.IPv4Address(values["gw"]))
            except ValueError:
                raise ConfigError(f"--net: gw={values['gw'][:40]!r} is not an IPv4 address") from None
        spec = cls(backend, tap, ports=tuple(ports), **kwargs)  # type: ignore[arg-type]
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.backend not in ("passt", "tap"):
            raise ConfigError(f"unknown network backend {self.backend!r}: passt or tap")
        if len(self.mac) != 6 or self.mac[0] & 1:
            raise ConfigError("a network device needs a 6-byte unicast MAC address")
        if self.ports and self.backend != "passt":
            raise ConfigError("--port forwards through passt; with a TAP device the host reaches the guest directly")
        hosts = [host for host, _guest in self.ports]
        if len(set(hosts)) != len(hosts):
            raise ConfigError("--port: a host port is forwarded twice")

    @property
    def mac_text(self) -> str:
        return ":".join(f"{b:02x}" for b in self.mac)

    def kernel_parameters(self) -> list[str]:
        """What the default guest's init reads to configure eth0 statically (nothing: it asks DHCP)."""
        if self.ip is None:
            return []
        return [f"popek.ip={self.ip}" + (f",{self.gateway}" if self.gateway else "")]


# --- host sides ---------------------------------------------------------------------------------------------------


class FrameHost:
    """The host end of the link: a non-blocking fd that is readable when frames arrive."""

    fd: int
    name = "host"

    def recv_frame(self) -> bytes | None:
        """One frame, or None when none is ready now; HostLinkError when the host side is gone or broken."""
        raise NotImplementedError

    def send_frame(self, views: list[memoryview]) -> bool:
        """Send one frame (its bytes are `views`) without blocking; False if the host could not take it now."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the fd (and whatever runs behind it)."""


class StreamHost(FrameHost):
    """Frames over a stream socket, each preceded by its length as a 32-bit big-endian number (QEMU's
    `-netdev stream`, which passt speaks). A length of 0 or above MAX_FRAME ends the link: the stream cannot be
    resynchronised. A send the socket takes only in part keeps the rest (at most one frame) to finish first;
    while that rest is still waiting, new frames are dropped."""

    name = "stream"

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.unsent = b""  # the tail of a frame the socket took only part of

    def _frame_from_buffer(self) -> bytes | None:
        if len(self.inbuf) < STREAM_LENGTH.size:
            return None
        (length,) = STREAM_LENGTH.unpack_from(self.inbuf)
        if not 0 < length <= MAX_FRAME:
            raise HostLinkError(f"the {self.name} stream announced a frame of {length} bytes (1 to {MAX_FRAME})")
        end = STREAM_LENGTH.size + length
        if len(self.inbuf) < end:
            return None
        frame = bytes(self.inbuf[STREAM_LENGTH.size : end])
        del self.inbuf[:end]
        return frame

    def recv_frame(self) -> bytes | None:
        frame = self._frame_from_buffer()
        if frame is not None:
            return frame
        try:
            data = self.sock.recv(STREAM_READ)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            raise HostLinkError(f"the {self.name} socket failed: {e.strerror}") from None
        if not data:
            raise HostLinkError(f"{self.name} closed the connection")
        self.inbuf += data  # at most one partial frame was left, so this stays under two frames
        return self._frame_from_buffer()

    def _send(self, views: list[memoryview | bytes]) -> int:
        try:
            return self.sock.sendmsg(views, [], socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as e:
            if e.errno == errno.ENOBUFS:
                return 0
            raise HostLinkError(f"the {self.name} socket failed: {e.strerror}") from None

    def flush(self) -> bool:
        """Finish a partly sent frame; True when nothing is left over."""
        if self.unsent:
            self.unsent = self.unsent[self._send([self.unsent]) :]
        return not self.unsent

    def send_frame(self, views: list[memoryview]) -> bool:
        if not self.flush():
            return False
        length = sum(len(v) for v in views)
        parts: list[memoryview | bytes] = [STREAM_LENGTH.pack(length), *views]
        done = self._send(parts)
        if done == 0:
            return False
        rest = advance_views([memoryview(p) for p in parts], done)
        self.unsent = b"".join(bytes(v) for v in rest)  # guest memory may change once the chain is returned
        return True

    def close(self) -> None:
        self.sock.close()


class PasstHost(StreamHost):
    """A `StreamHost` to a passt child process (popek.devices.passt), which it ends and reaps at close."""

    name = "passt"

    def __init__(self, ports: tuple[tuple[int, int], ...] = ()) -> None:
        from popek.devices.passt import PasstProcess

        self.process = PasstProcess(ports)
        super().__init__(self.process.sock)

    def close(self) -> None:
        self.process.close()


class TapHost(FrameHost):
    """A TAP device: one read is one frame, one write sends one."""

    name = "tap"

    def __init__(self, fd: int, interface: str = "") -> None:
        self.fd = fd
        self.interface = interface

    @classmethod
    def open(cls, interface: str) -> TapHost:
        from popek.devices.tap import open_tap

        return cls(open_tap(interface), interface)

    def recv_frame(self) -> bytes | None:
        try:
            return os.read(self.fd, MAX_FRAME + 1)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            raise HostLinkError(f"tap {self.interface}: read failed: {e.strerror}") from None

    def send_frame(self, views: list[memoryview]) -> bool:
        try:
            return os.writev(self.fd, views) > 0
        except OSError:
            return False  # EAGAIN (queue full), EIO (interface down): what a NIC without a link does, drop

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_host(spec: NetSpec) -> FrameHost:
    if spec.backend == "tap":
        assert spec.tap is not None
        return TapHost.open(spec.tap)
    return PasstHost(spec.ports)


# --- the device ---------------------------------------------------------------------------------------------------


class NetDevice(VirtioDevice):
    device_id: ClassVar[DeviceId] = DeviceId.NET

    def __init__(self, host: FrameHost, mac: bytes, name: str = "virtio-net eth0") -> None:
        super().__init__(name, [QUEUE_SIZE, QUEUE_SIZE])
        if len(mac) != 6:
            raise ValueError("a MAC address is 6 bytes")
        self.host = host
        self.mac = mac
        self.backlog: collections.deque[bytes] = collections.deque()  # host frames waiting for receive buffers
        self.watch: FdWatch | None = None
        self.link_error: str | None = None  # why the host side is gone; the link is down from then on
        # statistics
        self.tx_frames = self.tx_bytes = self.rx_frames = self.rx_bytes = 0
        self.tx_dropped = 0  # the host side could not take the frame
        self.tx_malformed = 0  # shorter than an Ethernet header or longer than MAX_FRAME
        self.rx_dropped = 0  # arrived with no driver, or did not fit the buffer it was given
        self.rx_malformed = 0  # shorter than an Ethernet header

    def connect_host(self, watch_fd: WatchFd) -> None:
        self.watch = watch_fd(self.host.fd, self.on_host_readable)

    def device_features(self) -> int:
        return COMMON_FEATURES | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS

    def config_bytes(self) -> bytes:
        """struct virtio_net_config up to `status` (§5.1.4): mac[6], le16 status."""
        status = 0 if self.link_error is not None else VIRTIO_NET_S_LINK_UP
        return self.mac + struct.pack("<H", status)

    def process_queue(self, index: int) -> None:
        if index == TRANSMITQ:
            self.serve(TRANSMITQ, self._transmit)
        else:
            self._receive()  # new receive buffers: frames held back can go, and the host fd is read again

    # --- guest to host ---

    def _transmit(self, chain: DescriptorChain) -> int:
        assert self.mem is not None
        reader = ChainReader(self.mem, chain.readable)
        length = reader.remaining - NET_HDR.size
        if not ETH_HLEN <= length <= MAX_FRAME:
            self.tx_malformed += 1
            return 0
        reader.read(NET_HDR.size)  # nothing in it for a device without offloads
        if self.link_error is not None:
            self.tx_dropped += 1
            return 0
        try:
            sent = self.host.send_frame(reader.views(length))
        except HostLinkError as e:
            self._link_failed(str(e))
            sent = False
        if sent:
            self.tx_frames += 1
            self.tx_bytes += length
        else:
            self.tx_dropped += 1
        return 0  # a transmit chain has nothing for the device to write

    # --- host to guest ---

    def on_host_readable(self) -> None:
        """The host fd is readable (called by the device loop with the transport's lock held)."""
        self._receive()

    def _pull(self) -> bytes | None:
        """The next acceptable frame from the host, or None; drops runts, takes the link down on host errors."""
        while self.link_error is None:
            try:
                frame = self.host.recv_frame()
            except HostLinkError as e:
                self._link_failed(str(e))
                return None
            if frame is None:
                return None
            if ETH_HLEN <= len(frame) <= MAX_FRAME:
                return frame
            self.rx_malformed += 1
        return None

    def _receive(self) -> None:
        try:
            self._move_frames()
        except BaseException:
            # a broken queue (QueueError: the transport sets DEVICE_NEEDS_RESET and calls the device no more until
            # the driver resets it): stop watching the host fd, which would otherwise wake the loop forever
            if self.watch is not None:
                self.watch.set_enabled(False)
            raise
        if self.watch is not None:
            self.watch.set_enabled(self.link_error is None and len(self.backlog) < RX_BACKLOG)

    def _move_frames(self) -> None:
        queue, mem = self.queues[RECEIVEQ], self.mem
        if mem is None or not queue.ready:
            self.backlog.clear()
            for _ in range(DROPPED_ACTIVE):  # nobody to give them to; bounded work per event
                if self._pull() is None:
                    break
                self.rx_dropped += 1
        else:
            delivered = False
            while True:
                while len(self.backlog) < RX_BACKLOG and (frame := self._pull()) is not None:
                    self.backlog.append(frame)
                if not self.backlog:
                    break
                chain = queue.pop(mem)
                if chain is None and queue.rearm(mem):
                    chain = queue.pop(mem)
                if chain is None:
                    break
                frame = self.backlog.popleft()
                writer = ChainWriter(mem, chain.writable)
                if writer.remaining < NET_HDR.size + len(frame):
                    self.rx_dropped += 1
                    queue.add_used(mem, chain.head, 0)
                else:
                    writer.write(RX_HEADER)
                    writer.write(frame)
                    self.rx_frames += 1
                    self.rx_bytes += len(frame)
                    queue.add_used(mem, chain.head, NET_HDR.size + len(frame))
                delivered = True
            if delivered:
                self.signal_used(RECEIVEQ)

    def _link_failed(self, reason: str) -> None:
        if self.link_error is None:
            self.link_error = reason  # frames already received stay in the backlog: they were whole
            if self.watch is not None:
                self.watch.set_enabled(False)
            self.config_changed()  # VIRTIO_NET_F_STATUS: the driver reads the link as down

    def on_reset(self) -> None:
        self.backlog.clear()
        if self.watch is not None:
            self.watch.set_enabled(self.link_error is None)

    # --- reporting and lifetime ---

    def counters(self) -> dict[str, int]:
        return {"net_tx_bytes": self.tx_bytes, "net_rx_bytes": self.rx_bytes}

    def stats(self) -> str:
        parts = [
            f"tx={self.tx_frames} frames/{self.tx_bytes} bytes rx={self.rx_frames} frames/{self.rx_bytes} bytes",
            f"dropped: tx={self.tx_dropped} tx-malformed={self.tx_malformed} rx={self.rx_dropped} "
            f"rx-malformed={self.rx_malformed} backlog={len(self.backlog)}",
        ]
        if self.link_error is not None:
            parts.append(f"LINK DOWN: {self.link_error}")
        return " ".join(parts)

    def close(self) -> None:
        self.host.close()


def net_spec(text: str | None, ports: Sequence[str] = ()) -> NetSpec | None:
    """`--net` and its `--port` forwards (the CLI's, popek.VM's and the VM file's): None without a network device;
    a forward without one is a mistake worth naming."""
    forwards = tuple(parse_port(port) for port in ports)
    if text is None:
        if forwards:
            raise ConfigError("--port forwards into the guest's network: it needs --net passt")
        return None
    return NetSpec.parse(text, forwards)
