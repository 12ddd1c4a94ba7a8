"""What the software backend does for devices: guest RAM a device writes (virtio DMA, through GuestMemory) drops the
decoded instructions of those pages, on every vCPU, as a guest store would; host fds are polled between quanta."""

from __future__ import annotations

import os
import resource
import socket

import pytest

from popek.accel.soft import SoftAccel
from popek.memory import GuestMemory


def test_device_writes_to_code_pages_drop_their_decoded_instructions() -> None:
    with GuestMemory(1 << 20) as mem:
        accel = SoftAccel(mem, 2)
        dropped: list[tuple[int, int]] = []
        for i, cpu in enumerate(accel.cpus):
            cpu.mmu.mark_code(0x10)
            cpu.mmu.mark_code(0x30)
            cpu.mmu.on_code_write = lambda page, i=i: dropped.append((i, page))
        mem.mark_written(0x10FF0, 0x20)  # a zero-copy write across pages 0x10 and 0x11
        assert sorted(dropped) == [(0, 0x10), (1, 0x10)]
        mem.write(0x20000, b"data")  # not code: nothing to drop
        mem.fill(0x30000, 0x1000, 0x90)
        assert sorted(dropped) == [(0, 0x10), (0, 0x30), (1, 0x10), (1, 0x30)]
        assert all(not cpu.mmu.code_pages for cpu in accel.cpus)


def test_watched_host_fds_are_polled_and_can_be_paused() -> None:
    with GuestMemory(1 << 20) as mem:
        accel = SoftAccel(mem, 1)
        fd = os.eventfd(0, os.EFD_NONBLOCK)
        calls: list[int] = []
        try:
            watch = accel.watch_fd(fd, lambda: calls.append(os.eventfd_read(fd)))
            accel._poll_host_fds()
            assert calls == []  # not readable
            os.eventfd_write(fd, 2)
            watch.set_enabled(False)
            accel._poll_host_fds()
            assert calls == []
            watch.set_enabled(True)
            accel._poll_host_fds()
            assert calls == [2]
        finally:
            os.close(fd)


def test_a_polled_watch_can_wait_for_writability_and_be_closed() -> None:
    with GuestMemory(1 << 20) as mem:
        accel = SoftAccel(mem, 1)
        ours, theirs = socket.socketpair()
        calls: list[str] = []
        try:
            watch = accel.watch_fd(ours.fileno(), lambda: calls.append("ready"))
            accel._poll_host_fds()
            assert calls == []  # nothing to read, writability not asked for
            watch.set_writable(True)
            accel._poll_host_fds()
            assert calls == ["ready"]
            watch.close()
            theirs.send(b"x")  # readable and writable now, but the watch is gone
            accel._poll_host_fds()
            assert calls == ["ready"] and accel._polled == []
        finally:
            ours.close()
            theirs.close()


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[0] <= 1100, reason="needs an fd limit above 1100")
def test_fds_beyond_select_limit_are_polled() -> None:
    with GuestMemory(1 << 20) as mem:
        accel = SoftAccel(mem, 1)
        fd = os.eventfd(1, os.EFD_NONBLOCK)
        high = -1
        try:
            high = os.dup2(fd, 1100)  # FD_SETSIZE is 1024: select() refuses this number
            calls: list[int] = []
            accel.watch_fd(high, lambda: calls.append(os.eventfd_read(high)))
            accel._poll_host_fds()
            assert calls == [1]
        finally:
            os.close(fd)
            if high >= 0:
                os.close(high)
