"""virtio-console (virtio 1.2 §5.3), port 0 only: guest output reaches the host fd; host input fills the buffers
the driver posts, waiting (bounded) while there are none; the host path is opened by kind."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from popek.devices.virtio import console
from popek.devices.virtio.console import ConsoleDevice, ConsoleHost
from popek.devices.virtio.mmio import MmioTransport
from popek.errors import ConfigError

from .driver import MEM_SIZE, Driver, Irq, RecordingMemory


class Watch:
    def __init__(self, fd: int, callback: Callable[[], None]) -> None:
        self.fd, self.callback, self.enabled = fd, callback, True

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled


def make(host: ConsoleHost) -> tuple[Driver, ConsoleDevice, list[Watch], RecordingMemory]:
    mem = RecordingMemory(MEM_SIZE)
    device = ConsoleDevice(host)
    transport = MmioTransport(device, mem, Irq())
    watches: list[Watch] = []

    def watch_fd(fd: int, cb: Callable[[], None]) -> Watch:
        watches.append(Watch(fd, lambda: transport.run_device(cb)))
        return watches[-1]

    device.connect_host(watch_fd)
    drv = Driver(transport, mem)
    drv.init()
    return drv, device, watches, mem


def test_output_goes_to_a_file_and_a_file_has_no_input(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old contents")
    drv, device, watches, mem = make(ConsoleHost.open(path))
    try:
        assert watches == []  # a file is output only
        head, _ = drv.submit(console.TRANSMITQ, [b"hello ", b"world\n"], [])
        drv.kick(console.TRANSMITQ)
        assert drv.take_used(console.TRANSMITQ) == [(head, 0)]
        assert path.read_bytes() == b"hello world\n"  # truncated at open, as QEMU's file chardev
        assert device.bytes_out == 12
    finally:
        device.close()
        mem.close()


def test_socket_input_fills_posted_buffers_once_the_port_is_connected() -> None:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    drv, device, watches, mem = make(ConsoleHost(theirs.detach(), True))
    try:
        (watch,) = watches
        ours.sendall(b"typed")
        watch.callback()  # readable: nothing posted yet, so it waits in the device's buffer
        assert device.pending == b"typed"
        h1, outs1 = drv.submit(console.RECEIVEQ, [], [3])
        h2, outs2 = drv.submit(console.RECEIVEQ, [], [16])
        drv.kick(console.RECEIVEQ)
        assert drv.take_used(console.RECEIVEQ) == []  # the first buffers: Linux is not listening yet
        drv.submit(console.TRANSMITQ, [b"prompt"], [])
        drv.kick(console.TRANSMITQ)  # the guest's first output: now it is
        assert ours.recv(16) == b"prompt"
        assert drv.take_used(console.RECEIVEQ) == [(h1, 3), (h2, 2)]
        assert mem.read(outs1[0], 3) + mem.read(outs2[0], 2) == b"typed"
        ours.sendall(b"more")
        watch.callback()
        assert drv.take_used(console.RECEIVEQ) == []  # no buffer left: buffered
        head, outs = drv.submit(console.RECEIVEQ, [], [8])
        drv.kick(console.RECEIVEQ)
        assert drv.take_used(console.RECEIVEQ) == [(head, 4)] and mem.read(outs[0], 4) == b"more"
        # guest output goes down the same socket
        drv.submit(console.TRANSMITQ, [b"echo"], [])
        drv.kick(console.TRANSMITQ)
        assert ours.recv(16) == b"echo"
        ours.close()
        watch.callback()  # EOF: stop watching
        assert device.host_eof and not watch.enabled
    finally:
        device.close()
        mem.close()


def test_input_is_bounded_and_the_watch_pauses_while_the_buffer_is_full() -> None:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    ours.setblocking(False)
    drv, device, watches, mem = make(ConsoleHost(theirs.detach(), True))
    try:
        (watch,) = watches
        sent = 0
        try:
            while sent < 4 * console.INPUT_BUFFER:
                sent += ours.send(b"x" * 65536)
        except BlockingIOError:
            pass
        for _ in range(8):
            watch.callback()
        assert len(device.pending) == console.INPUT_BUFFER and not watch.enabled
        drv.submit(console.RECEIVEQ, [], [2048])
        drv.kick(console.RECEIVEQ)
        drv.submit(console.RECEIVEQ, [], [2048])
        drv.kick(console.RECEIVEQ)  # more buffers after the first: the port is connected
        assert len(device.pending) == console.INPUT_BUFFER - 4096 and watch.enabled
    finally:
        ours.close()
        device.close()
        mem.close()


def test_output_to_a_sink_that_would_block_is_dropped_and_counted() -> None:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    drv, device, _watches, mem = make(ConsoleHost(theirs.detach(), True))
    try:
        for _ in range(64):
            drv.submit(console.TRANSMITQ, [b"y" * 16384], [])
            drv.kick(console.TRANSMITQ)
            drv.take_used(console.TRANSMITQ)
        assert device.dropped > 0 and device.bytes_out + device.dropped == 64 * 16384
    finally:
        ours.close()
        device.close()
        mem.close()


def test_console_paths_are_opened_by_kind(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    host = ConsoleHost.open(fifo)
    assert host.readable
    host.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "sock"))
    listener.listen(1)
    host = ConsoleHost.open(tmp_path / "sock")
    assert host.readable
    host.close()
    listener.close()
    with pytest.raises(ConfigError, match="not a file, a socket"):
        ConsoleHost.open(tmp_path)
    with pytest.raises(ConfigError, match="console"):
        ConsoleHost.open(tmp_path / "missing-dir" / "out")
    (tmp_path / "stale").touch()
    os.unlink(tmp_path / "stale")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "stale"))
    stale.close()  # a socket file nobody listens on
    with pytest.raises(ConfigError, match="Connection refused"):
        ConsoleHost.open(tmp_path / "stale")
