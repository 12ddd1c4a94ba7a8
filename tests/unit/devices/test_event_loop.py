"""The device event loop: callbacks for readable fds on its own thread, pause and resume from other threads, a
clean stop, and a callback's exception reported instead of hanging the VM."""

from __future__ import annotations

import os
import threading

from popek.devices.event_loop import EventLoop, drain_eventfd

WAIT = 5.0


def test_callbacks_run_on_the_loop_thread_when_their_fd_is_readable() -> None:
    loop = EventLoop("test-loop")
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    seen = threading.Event()
    threads: list[str] = []

    def on_ready() -> None:
        assert drain_eventfd(fd) == 3
        threads.append(threading.current_thread().name)
        seen.set()

    try:
        loop.watch(fd, on_ready)
        loop.start(lambda message: None)
        os.eventfd_write(fd, 3)
        assert seen.wait(WAIT)
        assert threads == ["test-loop"] and loop.dispatched == 1
    finally:
        loop.stop()
        os.close(fd)


def test_a_paused_watch_is_not_called_until_resumed() -> None:
    loop = EventLoop()
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    calls = threading.Semaphore(0)

    def on_ready() -> None:
        drain_eventfd(fd)
        calls.release()

    try:
        watch = loop.watch(fd, on_ready)
        loop.start(lambda message: None)
        watch.set_enabled(False)
        os.eventfd_write(fd, 1)
        assert not calls.acquire(timeout=0.3)
        watch.set_enabled(True)  # still readable: the callback comes now
        assert calls.acquire(timeout=WAIT)
    finally:
        loop.stop()
        os.close(fd)


def test_an_exception_in_a_callback_is_reported_and_ends_the_loop() -> None:
    loop = EventLoop()
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    errors: list[str] = []
    reported = threading.Event()

    def broken() -> None:
        raise RuntimeError("device loop bug")

    def on_error(message: str) -> None:
        errors.append(message)
        reported.set()

    try:
        loop.watch(fd, broken)
        loop.start(on_error)
        os.eventfd_write(fd, 1)
        assert reported.wait(WAIT)
        assert errors == ["device-events: RuntimeError: device loop bug"]
    finally:
        loop.stop()
        os.close(fd)
