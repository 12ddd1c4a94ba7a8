"""The device event loop: callbacks for readable fds on its own thread, pause and resume from other threads, a
clean stop, and a callback's exception reported instead of hanging the VM."""

from __future__ import annotations

import os
import socket
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


def test_a_watch_asked_for_writability_is_called_while_its_fd_is_writable() -> None:
    loop = EventLoop()
    ours, theirs = socket.socketpair()
    calls = threading.Semaphore(0)
    try:
        watch = loop.watch(ours.fileno(), calls.release)
        loop.start(lambda message: None)
        assert not calls.acquire(timeout=0.3)  # nothing to read: no call
        watch.set_writable(True)  # an empty send buffer: writable at once
        assert calls.acquire(timeout=WAIT)
        watch.set_writable(False)
        while calls.acquire(timeout=0.3):
            pass  # calls already collected before the change
        assert not calls.acquire(timeout=0.3)
    finally:
        loop.stop()
        ours.close()
        theirs.close()


def test_a_closed_watch_is_never_called_and_its_fd_number_can_be_watched_again() -> None:
    loop = EventLoop()
    first = os.eventfd(0, os.EFD_NONBLOCK)
    old_calls: list[int] = []
    new_calls = threading.Semaphore(0)
    try:
        watch = loop.watch(first, lambda: old_calls.append(drain_eventfd(first)))
        loop.start(lambda message: None)
        watch.close()
        watch.set_enabled(True)  # no effect once closed
        os.close(first)
        second = os.eventfd(1, os.EFD_NONBLOCK)  # very likely the same number: the kernel reuses the lowest
        loop.watch(second, lambda: (drain_eventfd(second), new_calls.release()))
        assert new_calls.acquire(timeout=WAIT)
        assert old_calls == []
        os.close(second)
    finally:
        loop.stop()


def test_a_paused_loop_runs_no_callback_until_resumed_and_then_runs_what_came_meanwhile() -> None:
    loop = EventLoop("test-loop")
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    calls: list[int] = []
    called = threading.Event()
    in_callback = threading.Event()
    release = threading.Event()

    def on_ready() -> None:
        in_callback.set()
        release.wait(WAIT)
        calls.append(drain_eventfd(fd))
        called.set()

    try:
        loop.watch(fd, on_ready)
        loop.start(lambda message: None)
        os.eventfd_write(fd, 1)
        assert in_callback.wait(WAIT)
        assert not loop.pause(0.2), "pause returned while a callback was still running"
        release.set()
        assert called.wait(WAIT)
        assert loop.pause(WAIT)  # the callback ended: the loop is parked now
        called.clear()
        os.eventfd_write(fd, 2)
        assert not called.wait(0.3), "a paused loop ran a callback"
        loop.resume()
        assert called.wait(WAIT)
        assert calls == [1, 2]
    finally:
        release.set()
        loop.stop()
        os.close(fd)


def test_a_paused_loop_still_stops() -> None:
    loop = EventLoop("test-loop")
    loop.start(lambda message: None)
    assert loop.pause(WAIT)
    thread = loop._thread
    loop.stop()
    assert thread is not None and not thread.is_alive()
