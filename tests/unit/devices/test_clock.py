from __future__ import annotations

import pytest

from popek.devices.clock import VirtualClock, ns_of_tick, ticks_at


def test_timers_fire_in_deadline_order_with_ties_in_insertion_order() -> None:
    clock = VirtualClock()
    fired: list[tuple[str, int]] = []
    for name, deadline in (("c", 300), ("a", 100), ("b1", 200), ("b2", 200), ("late", 1000)):
        clock.add_timer(deadline, lambda name=name: fired.append((name, clock.now_ns())))
    assert clock.advance_to(500) == 4
    assert fired == [("a", 100), ("b1", 200), ("b2", 200), ("c", 300)]
    assert clock.now_ns() == 500
    assert clock.next_deadline() == 1000


def test_callbacks_see_their_own_deadline_and_may_rearm_inside_the_window() -> None:
    clock = VirtualClock()
    times: list[int] = []

    def periodic() -> None:
        times.append(clock.now_ns())
        clock.add_timer(clock.now_ns() + 30, periodic)

    clock.add_timer(30, periodic)
    clock.advance_to(100)
    assert times == [30, 60, 90]
    assert clock.next_deadline() == 120


def test_cancel_and_next_deadline() -> None:
    clock = VirtualClock()
    fired: list[int] = []
    t1 = clock.add_timer(10, lambda: fired.append(1))
    clock.add_timer(20, lambda: fired.append(2))
    clock.cancel(t1)
    clock.cancel(t1)
    clock.cancel(None)
    assert clock.next_deadline() == 20
    clock.advance_to(20)
    assert fired == [2]
    assert not t1.pending
    assert clock.next_deadline() is None
    assert clock.pending_timers() == 0


def test_time_never_goes_back_and_past_deadlines_fire_at_once() -> None:
    clock = VirtualClock(1000)
    clock.advance_to(500)
    assert clock.now_ns() == 1000
    fired: list[int] = []
    clock.add_timer(10, lambda: fired.append(clock.now_ns()))
    assert clock.next_deadline() == 1000
    clock.advance_to(1000)
    assert fired == [1000]
    with pytest.raises(ValueError):
        clock.advance_by(-1)


def test_halted_guest_skips_to_next_deadline() -> None:
    clock = VirtualClock()
    fired: list[int] = []
    clock.add_timer(5_000_000, lambda: fired.append(clock.now_ns()))
    deadline = clock.next_deadline()
    assert deadline is not None
    clock.advance_to(deadline)
    assert fired == [5_000_000]


def test_tick_conversions_round_trip() -> None:
    hz = 1_193_182
    for tick in (0, 1, 2, 1193, 65536, 10**9):
        ns = ns_of_tick(tick, hz)
        assert ticks_at(ns, hz) == tick
        assert ticks_at(ns - 1, hz) == tick - 1 or tick == 0
