"""The 8254 programmable interval timer (Intel 8254 datasheet, order 231164) at ports 0x40-0x43, and the bits of
system control port B (port 0x61, Intel 82371AB PIIX4 datasheet §12.2.5) that gate channel 2 and read its OUT.

The counters run on a 1.193182 MHz input clock laid on the `VirtualClock`: input edge k is at the first
nanosecond where `k * 1193182 / 1e9` reaches k, so counts and OUT levels are pure functions of virtual time and
nothing is polled. Only OUT transitions that somebody listens to (channel 0's, which drives IRQ0) are scheduled as
clock timers; channel 2's OUT, which Linux reads through port 0x61 to calibrate the TSC
(`pit_hpet_ptimer_calibrate_cpu`, `quick_pit_calibrate`), and all counts, are computed when read.

Implemented: modes 0-5 (6 and 7 alias 2 and 3), binary and BCD counting, lobyte/hibyte/lobyte-then-hibyte access,
the counter latch command, the read-back command with status bytes (OUT, null count, mode), the gate (level for
modes 0, 2, 3, 4; rising edge for 1, 2, 3, 5), and the datasheet's "loaded on the next CLK pulse" timing (mode 0's
OUT rises N+1 clocks after the count is written). Simplifications: in mode 3 a new count takes effect at the end of
the whole period rather than the current half-period, and the odd-count half-periods use the datasheet's
(N+1)/2 and (N-1)/2 lengths with approximate intermediate counts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from popek.devices import state as st
from popek.devices.clock import Timer, VirtualClock, ns_of_tick, ticks_at
from popek.snapshot import SnapshotError

PIT_HZ = 1_193_182
REFRESH_PERIOD_NS = 15_085  # port 0x61 bit 4 toggles with DRAM refresh, every 15.085 µs on a PC

RW_LATCH, RW_LSB, RW_MSB, RW_WORD = 0, 1, 2, 3
PORT61_GATE2 = 0x01
PORT61_SPEAKER = 0x02
PORT61_WRITABLE = 0x0F
PORT61_REFRESH = 0x10
PORT61_OUT2 = 0x20


MAX_TICKS = 1 << 60  # an input edge ~30,000 years away is not one a channel keeps
_tick = st.integer(-MAX_TICKS, MAX_TICKS)
_period = st.integer(1, 0x10000)

# a channel's fields; those that are input edges (`start`, `_next_boundary`, `_null_until`) count on the PIT's own
# time (`Pit.elapsed_ns`), which a restore carries over
CHANNEL_FIELDS: dict[str, st.Check] = {
    "gate": st.boolean,
    "mode": st.integer(0, 5),
    "rw": st.integer(RW_LSB, RW_WORD),
    "bcd": st.boolean,
    "count_register": st.uint(16),
    "_low_byte": st.optional(st.uint(8)),
    "_read_high": st.boolean,
    "_latch": st.list_of(st.uint(8), max_length=2),
    "_status": st.optional(st.uint(8)),
    "_has_count": st.boolean,
    "running": st.boolean,
    "start": _tick,
    "start_count": st.uint(16),
    "period": st.integer(0, 0x10000),  # 0 until the first count starts: a running channel's is 1 or more
    "held_count": st.uint(16),
    "held_out": st.boolean,
    "done": st.boolean,
    "_next_period": st.optional(_period),
    "_next_boundary": _tick,
    "_gate_count": st.optional(st.uint(16)),
    "_null": st.boolean,
    "_null_until": st.optional(_tick),
    "_reported_out": st.boolean,
}


def _from_bcd(value: int) -> int:
    return sum(((value >> (4 * i)) & 0xF) * 10**i for i in range(4))


def _to_bcd(value: int) -> int:
    return sum(((value // 10**i) % 10) << (4 * i) for i in range(4))


class Channel:
    """One counter. Its counting element (CE) is described by a phase: from input edge `start` on, CE counts
    down from `start_count` (modes 0, 1, 4, 5) or reloads `period` (modes 2, 3); before `start` (a load that
    waits for the next clock, or a counter that is stopped) it holds `held_count` and OUT holds `held_out`."""

    def __init__(self, pit: Pit, index: int) -> None:
        self.pit = pit
        self.index = index
        self.gate = index != 2  # channels 0 and 1 have their gates tied high on a PC
        self.on_out: Callable[[bool], None] | None = None
        self.mode = 0
        self.rw = RW_WORD
        self.bcd = False
        self.count_register = 0  # CR as last written (0 stands for 65536, or 10000 in BCD)
        self._low_byte: int | None = None  # lobyte-then-hibyte write in progress
        self._read_high = False  # lobyte-then-hibyte read in progress (unlatched)
        self._latch: list[int] = []  # latched count bytes still to be read
        self._status: int | None = None  # latched status byte
        self._has_count = False
        self.running = False
        self.start = 0
        self.start_count = 0
        self.period = 0
        self.held_count = 0
        self.held_out = True
        self.done = False  # modes 0, 1, 4, 5: the terminal count of this count was reached before `start`
        self._next_period: int | None = None  # modes 2, 3: a new count, loaded at the end of the current period
        self._next_boundary = 0
        self._gate_count: int | None = None  # modes 0, 4: a count written while the gate was low
        self._null = False
        self._null_until: int | None = None  # the edge at which the pending count reaches CE (None: not yet known)
        self._timer: Timer | None = None
        self._reported_out = True

    # --- arithmetic of the phase ---

    @property
    def modulus(self) -> int:
        return 10000 if self.bcd else 0x10000

    def _effective(self, count: int) -> int:
        return count or self.modulus

    def _catch_up(self, tick: int) -> None:
        """Apply a new count written in mode 2 or 3 once the period in which it was written has ended."""
        if self._next_period is not None and tick >= self._next_boundary:
            self.start, self.period = self._next_boundary, self._next_period
            self.start_count = self.period
            self._next_period = None

    def _state(self, tick: int) -> tuple[int, bool]:
        """(count, OUT) at input edge `tick`."""
        self._catch_up(tick)
        if not self.running or tick < self.start:
            return self.held_count, self.held_out
        e = tick - self.start
        mode = self.mode
        if mode in (2, 3):
            n = self.period
            r = e % n
            if mode == 2:
                return n - r, r != n - 1
            first = (n + 1) // 2
            if r < first:
                return n - 2 * r, True
            return (n - (n & 1)) - 2 * (r - first), False
        count = (self.start_count - e) % self.modulus
        terminal = self._effective(self.start_count)
        if mode in (0, 1):
            return count, self.done or e >= terminal
        return count, self.done or e != terminal  # modes 4, 5: low for the one clock of the terminal count

    def _next_transition(self, tick: int) -> int | None:
        """The first input edge after `tick` at which OUT may change (a superset is fine: a timer that finds OUT
        unchanged just schedules the next one)."""
        if not self.running:
            return None
        if tick < self.start:
            return self.start
        e = tick - self.start
        if self.mode in (2, 3):
            n = self.period
            if n == 1:
                return None  # a count of 1 (illegal in mode 2, a constant level in mode 3) never toggles OUT
            cycle = self.start + (e // n) * n
            r = e % n
            edge = n - 1 if self.mode == 2 else (n + 1) // 2
            return cycle + edge if r < edge else cycle + n
        if self.done:
            return None
        terminal = self._effective(self.start_count)
        if e < terminal:
            return self.start + terminal
        if self.mode in (4, 5) and e == terminal:
            return self.start + terminal + 1
        return None

    # --- time ---

    def _tick(self) -> int:
        return ticks_at(self.pit.elapsed_ns(), PIT_HZ)

    def out(self) -> bool:
        return self._state(self._tick())[1]

    def count(self) -> int:
        return self._state(self._tick())[0]

    def null_count(self, tick: int) -> bool:
        """A count written (or a control word) whose count has not yet been transferred into the counting
        element: the status byte's bit 6."""
        return self._null and (self._null_until is None or tick < self._null_until)

    def _freeze(self, tick: int) -> None:
        """Stop the counting element where it is, OUT included."""
        self.held_count, self.held_out = self._state(tick)
        if self.running and self.mode in (0, 1, 4, 5) and tick >= self.start:
            self.done = self.done or tick - self.start >= self._effective(self.start_count)
        self.running = False

    def _start(self, start: int, count: int, load: bool) -> None:
        self.running = True
        self.start = start
        self.start_count = count
        self.period = self._effective(count)
        self._next_period = None
        if load:
            self._null_until = start

    def _reschedule(self) -> None:
        """Tell the listener about an OUT change that has happened, and arm the timer for the next one."""
        if self.on_out is None:
            return
        clock = self.pit.clock
        clock.cancel(self._timer)
        self._timer = None
        tick = self._tick()
        out = self._state(tick)[1]
        if out != self._reported_out:
            self._reported_out = out
            self.on_out(out)
        following = self._next_transition(tick)
        if following is not None:
            self._timer = clock.add_timer(ns_of_tick(following, PIT_HZ) + self.pit.origin_ns, self._reschedule)

    # --- programming ---

    def control(self, rw: int, mode: int, bcd: bool) -> None:
        tick = self._tick()
        self._freeze(tick)
        self.rw = rw
        self.mode = mode if mode < 6 else mode - 4
        self.bcd = bcd
        self._low_byte = None
        self._read_high = False
        self._has_count = False
        self._gate_count = None
        self._null, self._null_until = True, None
        self.done = False
        self.held_out = self.mode != 0  # mode 0 starts low, every other mode high
        self._reschedule()

    def write(self, value: int) -> None:
        if self.rw == RW_LSB:
            self._load(value)
        elif self.rw == RW_MSB:
            self._load(value << 8)
        elif self._low_byte is None:
            self._low_byte = value
            if self.mode == 0:  # writing the first byte stops the count and lowers OUT at once
                self._freeze(self._tick())
                self.held_out = False
                self._reschedule()
        else:
            word = self._low_byte | value << 8
            self._low_byte = None
            self._load(word)

    def _load(self, raw: int) -> None:
        count = _from_bcd(raw) if self.bcd else raw
        self.count_register = count
        tick = self._tick()
        first = not self._has_count
        self._has_count = True
        self._null, self._null_until = True, None
        mode = self.mode
        if mode in (2, 3) and not first and self.running:
            n = self.period
            self._next_boundary = self.start + (max(tick - self.start, 0) // n + 1) * n
            self._next_period = self._effective(count)
            self._null_until = self._next_boundary
        elif mode in (0, 4) or (mode in (2, 3) and first):
            self._freeze(tick)
            if mode == 0:
                self.held_out = False
            self.done = False
            if self.gate:
                self._start(tick + 1, count, load=True)
            elif mode in (0, 4):
                self._gate_count = count
        # modes 1 and 5 wait for a gate trigger; so do 2 and 3 while the gate is low
        self._reschedule()

    def set_gate(self, level: bool) -> None:
        if level == self.gate:
            return
        self.gate = level
        if not self._has_count:
            return
        tick = self._tick()
        mode = self.mode
        if mode in (0, 4):
            if not level:
                self._freeze(tick)
            elif self._gate_count is not None:
                self._start(tick + 1, self._gate_count, load=True)
                self._gate_count = None
            else:
                self._start(tick, self.held_count, load=False)  # counting resumes from where it stopped
        elif mode in (2, 3):
            if level:
                self._start(tick + 1, self.count_register, load=True)
            else:
                self._freeze(tick)
                self.held_out = True  # gate low forces OUT high in modes 2 and 3
        elif level:  # modes 1 and 5: a rising edge (re)triggers
            self._freeze(tick)  # OUT keeps its level until the load on the next clock
            self.done = False
            self._start(tick + 1, self.count_register, load=True)
        self._reschedule()

    # --- snapshots ---

    def state(self) -> dict[str, Any]:
        """The channel's registers and phase; its input edges are on the PIT's own time (`Pit.state`)."""
        return st.save(self, CHANNEL_FIELDS)

    def load_state(self, state: object) -> dict[str, Any]:
        """The checked fields of a saved channel, not applied."""
        values = st.load(state, CHANNEL_FIELDS, f"pit channel {self.index}")
        if values["bcd"] and (values["count_register"] > 9999 or values["start_count"] > 9999):
            raise SnapshotError(f"pit channel {self.index}: a BCD count above 9999")
        if values["running"] and not values["period"]:
            raise SnapshotError(f"pit channel {self.index}.period: a running channel has a period of 1 or more")
        return values

    def restore(self, state: dict[str, Any]) -> None:
        self.apply_state(self.load_state(state))

    def apply_state(self, values: dict[str, Any]) -> None:
        self.pit.clock.cancel(self._timer)
        self._timer = None
        for name, value in values.items():
            setattr(self, name, value)
        self._reschedule()  # arms the next OUT edge; reports OUT if it is not what the listener was told

    # --- reading ---

    def latch_count(self) -> None:
        if self._latch:
            return  # a second latch before the first is read is ignored
        value = self.count()
        if self.bcd:
            value = _to_bcd(value % 10000)
        value &= 0xFFFF
        if self.rw == RW_LSB:
            self._latch = [value & 0xFF]
        elif self.rw == RW_MSB:
            self._latch = [value >> 8]
        else:
            self._latch = [value & 0xFF, value >> 8]

    def latch_status(self) -> None:
        if self._status is not None:
            return
        tick = self._tick()
        out = self._state(tick)[1]
        self._status = (
            (0x80 if out else 0)
            | (0x40 if self.null_count(tick) else 0)
            | self.rw << 4
            | self.mode << 1
            | int(self.bcd)
        )

    def read(self) -> int:
        if self._status is not None:
            value, self._status = self._status, None
            return value
        if self._latch:
            return self._latch.pop(0)
        count = self.count()
        if self.bcd:
            count = _to_bcd(count % 10000)
        count &= 0xFFFF
        if self.rw == RW_LSB:
            return count & 0xFF
        if self.rw == RW_MSB:
            return count >> 8
        high, self._read_high = self._read_high, not self._read_high
        return count >> 8 if high else count & 0xFF


class Pit:
    """Three channels behind ports 0x40-0x42 (data) and 0x43 (control). `on_out0(level)` receives channel 0's OUT
    at the virtual time it changes: the platform connects it to IRQ0."""

    def __init__(self, clock: VirtualClock, on_out0: Callable[[bool], None] | None = None) -> None:
        self.clock = clock
        self.origin_ns = 0  # the clock's time at the PIT's input edge 0 (a restore moves it: see `restore`)
        self.channels = [Channel(self, i) for i in range(3)]
        self.channels[0].on_out = on_out0

    def elapsed_ns(self) -> int:
        """The PIT's own time: nanoseconds since its input edge 0, from which every count and OUT level follows."""
        return self.clock.now_ns() - self.origin_ns

    def state(self) -> dict[str, Any]:
        """The three channels and the PIT's own time (`elapsed_ns`), which its input edges count on. A restore
        on a clock that reads another time sets `origin_ns` so that the PIT's time goes on from the saved one:
        every count, the phase within the 1.193182 MHz input clock included, and every OUT edge are then where
        they would have been had the VM not paused."""
        return {"elapsed_ns": self.elapsed_ns(), "channels": [channel.state() for channel in self.channels]}

    def restore(self, state: dict[str, Any]) -> None:
        """All three channels, each validated before any changes (a bad channel 2 leaves channel 0 as it was)."""
        saved = st.sub(state, "channels", "pit")
        if not isinstance(saved, list) or len(saved) != len(self.channels) or set(state) != {"channels", "elapsed_ns"}:
            raise SnapshotError("pit: the state is the PIT's time and a list of three channels")
        try:
            elapsed = st.integer(0, st.MAX_TIME_NS)(state["elapsed_ns"])
        except ValueError as e:
            raise SnapshotError(f"pit.elapsed_ns: {e}") from None
        loaded = [channel.load_state(channel_state) for channel, channel_state in zip(self.channels, saved)]
        self.origin_ns = self.clock.now_ns() - elapsed
        for channel, values in zip(self.channels, loaded, strict=True):
            channel.apply_state(values)

    def read(self, offset: int, size: int) -> bytes:
        value = self.channels[offset].read() if offset < 3 else 0xFF  # the control port is write-only
        return bytes([value]) * size

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        value = data[0]
        if offset < 3:
            self.channels[offset].write(value)
            return
        select = value >> 6
        if select == 3:  # read-back
            for i in range(3):
                if value & (2 << i):
                    if not value & 0x10:
                        self.channels[i].latch_status()
                    if not value & 0x20:
                        self.channels[i].latch_count()
            return
        channel = self.channels[select]
        rw = (value >> 4) & 3
        if rw == RW_LATCH:
            channel.latch_count()
        else:
            channel.control(rw, (value >> 1) & 7, bool(value & 1))


class SystemControlPort:
    """Port 0x61 (NMI status and control, "port B"): channel 2's gate and speaker enable, its OUT and the
    refresh toggle read back. Parity/IOCHK bits read 0: there are no such errors to report."""

    def __init__(self, pit: Pit) -> None:
        self.pit = pit
        self.value = 0

    def read(self, offset: int, size: int) -> bytes:
        v = self.value & PORT61_WRITABLE
        if (self.pit.elapsed_ns() // REFRESH_PERIOD_NS) & 1:
            v |= PORT61_REFRESH
        if self.pit.channels[2].out():
            v |= PORT61_OUT2
        return bytes([v]) * size

    def write(self, offset: int, data: bytes) -> None:
        if data:
            self.value = data[0] & PORT61_WRITABLE
            self.pit.channels[2].set_gate(bool(self.value & PORT61_GATE2))

    def state(self) -> dict[str, Any]:
        return {"value": self.value}

    def restore(self, state: dict[str, Any]) -> None:
        """Port B's writable bits; channel 2's gate, which they drive, is in the PIT's own state."""
        st.apply(self, state, {"value": st.masked(PORT61_WRITABLE)}, "system control port")
