"""The virtual time base of the software backend: nanoseconds that advance only as the guest executes.

Time is derived from retired instructions, not read from the host, so that a run is reproducible: the same guest
with the same inputs retires the same instructions, sees its timers expire at the same instruction boundaries and
produces the same output, however fast or loaded the host is. The backend converts its instruction count to
nanoseconds and calls `advance_to`; when every vCPU is halted it asks `next_deadline` and jumps straight there, so
an idle guest costs no host time.

Timers are kept in a heap and fired in deadline order (ties in the order they were added). While a callback runs,
`now_ns()` is the timer's own deadline, not the target of the advance, so a periodic device that re-arms itself
relative to `now_ns()` keeps an exact period instead of drifting by however far the backend overshot.

Not thread-safe, deliberately: the software backend runs every vCPU round-robin in one thread, and so every device
that uses the clock (PIT, LAPIC timers) is only ever touched from that thread. No locks are taken.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

from popek.devices import state as st

NS_PER_SECOND = 1_000_000_000


class Timer:
    """A handle for one scheduled callback; `VirtualClock.cancel` takes it. Fires at most once."""

    __slots__ = ("callback", "deadline_ns", "pending")

    def __init__(self, deadline_ns: int, callback: Callable[[], None]) -> None:
        self.deadline_ns = deadline_ns
        self.callback = callback
        self.pending = True  # false once fired or cancelled

    def __repr__(self) -> str:
        return f"Timer(deadline_ns={self.deadline_ns}, pending={self.pending})"


class VirtualClock:
    def __init__(self, start_ns: int = 0) -> None:
        if start_ns < 0:
            raise ValueError("virtual time starts at 0 or later")
        self._now = start_ns
        self._heap: list[tuple[int, int, Timer]] = []
        self._seq = itertools.count()  # tie-breaker: equal deadlines fire in the order they were added
        self.fired = 0

    def now_ns(self) -> int:
        return self._now

    def add_timer(self, deadline_ns: int, callback: Callable[[], None]) -> Timer:
        """Schedule `callback` at `deadline_ns`. A deadline already past fires at the next `advance_to`, at the
        current time: a device that computes a deadline slightly behind `now` must not lose its event."""
        timer = Timer(max(deadline_ns, self._now), callback)
        heapq.heappush(self._heap, (timer.deadline_ns, next(self._seq), timer))
        return timer

    def cancel(self, timer: Timer | None) -> None:
        """Cancel a timer if it has not fired; cancelling twice, or a fired timer, or None, is harmless (devices
        keep one handle per timer and cancel it unconditionally when they re-arm)."""
        if timer is not None:
            timer.pending = False

    def _drop_cancelled(self) -> None:
        while self._heap and not self._heap[0][2].pending:
            heapq.heappop(self._heap)

    def next_deadline(self) -> int | None:
        """The earliest pending deadline, or None when nothing is scheduled (a halted guest would then sleep
        forever, which the backend reports rather than spinning)."""
        self._drop_cancelled()
        return self._heap[0][0] if self._heap else None

    def advance_to(self, ns: int) -> int:
        """Move time forward to `ns`, firing every timer due by then, in deadline order, including timers that the
        callbacks themselves add within the window. Time never goes backwards: an earlier `ns` only fires what is
        already due. Returns how many timers fired."""
        target = max(ns, self._now)
        fired = 0
        while True:
            self._drop_cancelled()
            if not self._heap or self._heap[0][0] > target:
                break
            deadline, _, timer = heapq.heappop(self._heap)
            self._now = deadline
            timer.pending = False
            timer.callback()
            fired += 1
        self._now = target
        self.fired += fired
        return fired

    def advance_by(self, delta_ns: int) -> int:
        if delta_ns < 0:
            raise ValueError("virtual time cannot go backwards")
        return self.advance_to(self._now + delta_ns)

    def pending_timers(self) -> int:
        return sum(1 for _, _, t in self._heap if t.pending)

    # --- snapshots ---

    def state(self) -> dict[str, Any]:
        """Virtual time is all a snapshot needs of the clock: its timers belong to the devices that armed them,
        and each device saves its own deadline (relative to `now`) and re-arms it when it is restored."""
        return {"now_ns": self._now}

    def restore(self, state: dict[str, Any]) -> None:
        """Set virtual time, forward or back, and drop every pending timer: restore the clock first, then the
        devices, which re-arm theirs (a timer left from before would fire at a time that no longer means what
        it meant)."""
        values = st.load(state, {"now_ns": st.integer(0, st.MAX_TIME_NS)}, "virtual clock")
        for _, _, timer in self._heap:
            timer.pending = False
        self._heap.clear()
        self._now = values["now_ns"]


def ticks_at(ns: int, hz: int) -> int:
    """Whole periods of an `hz` clock completed by time `ns` (the clock's edge 0 is at time 0)."""
    return ns * hz // NS_PER_SECOND


def ns_of_tick(tick: int, hz: int) -> int:
    """The first nanosecond at which `ticks_at` reaches `tick`: where a device schedules its tick-aligned events."""
    return -((-tick * NS_PER_SECOND) // hz)
