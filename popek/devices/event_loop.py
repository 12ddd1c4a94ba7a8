"""The device event loop of the KVM backend: one host thread that waits (epoll, through `selectors`) on every fd
the devices serve — the eventfds KVM signals when a vCPU writes a virtio QueueNotify register (KVM_IOEVENTFD,
Documentation/virt/kvm/api.rst §4.59), and host-side fds such as a console socket — and runs each one's callback.
This is Firecracker's VMM event loop in miniature: a notification costs the vCPU no exit to userspace, the device
works beside the running guest, and its interrupt goes back through a KVM irqfd (§4.75) without a vCPU either.

Callbacks run on the loop thread only; devices take their own lock. Watches can be paused and resumed from any
thread (a console stops reading its host fd while its input buffer is full), asked to report writability too (a
vsock connection waiting for a slow host reader), and closed (a vsock connection torn down): the change is queued
and applied by the loop thread, at once when it makes the change itself, otherwise when an eventfd wakes it.
A closed watch is never called again, even for an event the loop has already collected; an fd number the kernel
reuses for a new watch after the old fd was closed is re-registered for the new one (epoll drops a closed fd by
itself, so unregistering the old one may find nothing, which selectors tolerates). An exception out of a callback
is a VMM bug: the loop reports it through `on_error` (the VM stops with it) and exits.
"""

from __future__ import annotations

import collections
import os
import selectors
import threading
from collections.abc import Callable
from typing import Protocol

STOP_TIMEOUT = 5.0


class FdWatch(Protocol):
    """A registered host fd whose callback runs when it is readable. `set_enabled(False)` stops the readable
    callbacks until it is enabled again; `set_writable(True)` makes the callback run when the fd is writable too
    (one callback for both: the device looks at what it was waiting for); `close()` removes the watch for good
    (before the device closes the fd)."""

    def set_enabled(self, enabled: bool) -> None: ...

    def set_writable(self, wanted: bool) -> None: ...

    def close(self) -> None: ...


def drain_eventfd(fd: int) -> int:
    """Read (and so reset) an eventfd's counter; 0 if it was not signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class Watch:
    """A host fd's watch state, one class for every backend's `FdWatch`: the KVM device loop (`_Watch`) and the
    software backend's run-loop poll (`popek.accel.soft`). A change to what it waits for calls `_changed`, where
    a loop re-registers the fd; `wants_read`/`wants_write` are what it waits for now (nothing once closed)."""

    def __init__(self, fd: int, callback: Callable[[], None]) -> None:
        self.fd = fd
        self.callback = callback
        self.enabled = True
        self.writable = False
        self.closed = False

    @property
    def wants_read(self) -> bool:
        return self.enabled and not self.closed

    @property
    def wants_write(self) -> bool:
        return self.writable and not self.closed

    def _changed(self) -> None:
        """What the watch waits for changed (no-op for a loop that polls every round)."""

    def set_enabled(self, enabled: bool) -> None:
        if enabled != self.enabled and not self.closed:
            self.enabled = enabled
            self._changed()

    def set_writable(self, wanted: bool) -> None:
        if wanted != self.writable and not self.closed:
            self.writable = wanted
            self._changed()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._changed()


class _Watch(Watch):
    def __init__(self, loop: EventLoop, fd: int, callback: Callable[[], None]) -> None:
        super().__init__(fd, callback)
        self.loop = loop

    @property
    def events(self) -> int:
        """The selector events this watch wants now (0: none, so not registered)."""
        return (selectors.EVENT_READ if self.wants_read else 0) | (selectors.EVENT_WRITE if self.wants_write else 0)

    def _changed(self) -> None:
        self.loop._change(self)


class EventLoop:
    def __init__(self, name: str = "device-events") -> None:
        self.name = name
        self._selector = selectors.DefaultSelector()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._selector.register(self._wake, selectors.EVENT_READ, None)
        self._changes: collections.deque[_Watch] = collections.deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # pause(): the loop thread parks between callbacks (`_held` set) until resume() sets `_go`
        self._hold = False
        self._held = threading.Event()
        self._go = threading.Event()
        self.on_error: Callable[[str], None] = lambda _message: None
        self.dispatched = 0

    def watch(self, fd: int, callback: Callable[[], None]) -> FdWatch:
        """Call `callback()` on the loop thread whenever `fd` is readable (until paused or closed)."""
        watch = _Watch(self, fd, callback)
        self._change(watch)
        return watch

    def _change(self, watch: _Watch) -> None:
        if self._stopping:
            return
        self._changes.append(watch)
        if self._thread is None or self._thread.ident == threading.get_ident():
            self._apply_changes()  # before the start, or a callback changing watches: no other thread applies
        else:
            os.eventfd_write(self._wake, 1)

    def _apply_changes(self) -> None:
        while self._changes:
            watch = self._changes.popleft()
            events = watch.events
            key = self._selector.get_map().get(watch.fd)
            if key is not None and key.data is not watch:
                if not events:
                    continue  # the fd number belongs to a newer watch now
                self._selector.unregister(watch.fd)  # an older watch's fd was closed and its number reused
                key = None
            if key is None:
                if events:
                    self._selector.register(watch.fd, events, watch)
            elif not events:
                self._selector.unregister(watch.fd)
            elif key.events != events:
                self._selector.modify(watch.fd, events, watch)

    def start(self, on_error: Callable[[str], None]) -> None:
        self.on_error = on_error
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stopping:
                if self._hold:
                    self._held.set()
                    self._go.wait()
                    continue
                for key, _events in self._selector.select():
                    watch = key.data
                    if watch is None:
                        drain_eventfd(self._wake)
                        self._apply_changes()
                    elif self._hold:
                        break  # the rest of this round's events are still pending after resume()
                    elif watch.events and not self._stopping:
                        self.dispatched += 1
                        watch.callback()
        except Exception as e:  # a VMM bug: the VM must end with its cause, not hang
            if not self._stopping:
                self.on_error(f"{self.name}: {type(e).__name__}: {e}")

    def pause(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Park the loop thread between callbacks, so no device runs a host event (a snapshot needs the devices
        still: popek.vm.Vm.pause); False if a callback did not end within `timeout`. Events that arrive meanwhile
        wait in their fds (an ioeventfd counts), and run after resume()."""
        if self._thread is None or self._thread.ident == threading.get_ident():
            return True  # not started (nothing runs), or called from a callback (which is the only one running)
        if not self._hold:  # a pause that timed out is still asked for: wait on for the same park
            self._go.clear()
            self._held.clear()
            self._hold = True
            os.eventfd_write(self._wake, 1)
        return self._held.wait(timeout) or not self._thread.is_alive()

    def resume(self) -> None:
        self._hold = False
        self._go.set()

    def stop(self) -> None:
        """End the loop thread (waiting for a callback in progress) and release the selector."""
        self._stopping = True
        self._go.set()  # a paused loop wakes to end
        if self._thread is not None:
            os.eventfd_write(self._wake, 1)
            self._thread.join(STOP_TIMEOUT)
            self._thread = None
        self._selector.close()
        os.close(self._wake)
