"""Progress of a guest build on stderr: a one-line bar redrawn in place on a terminal, one line per phase elsewhere.

A bar is drawn only for what can be measured honestly: bytes of the source tarball fed to tar, and kbuild steps
against the count of the last build of the same recipe (capped below 100% until make has actually finished).
Phases without a measure show the elapsed time only.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 30
_REDRAW_SECONDS = 0.1


def _elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    def __init__(
        self, enabled: bool, stream: TextIO | None = None, phases: int = 4, label: str = "the default guest"
    ) -> None:
        self._label = label  # what is being built, as the phase lines name it
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = enabled
        self._tty = enabled and self._stream.isatty()
        self._phases = phases
        self._index = 0
        self._name = ""
        self._started = self._phase_started = time.monotonic()
        self._last_draw = 0.0
        self._line_open = False

    def phase(self, name: str) -> None:
        """Start the next phase (and end the previous one's line)."""
        self._end_line()
        self._index += 1
        self._name = name
        self._phase_started = time.monotonic()
        if self._enabled and not self._tty:
            print(f"popek: building {self._label} [{self._index}/{self._phases}]: {name}", file=self._stream)
            self._stream.flush()
        self.update(force=True)

    def update(
        self,
        done: int | None = None,
        total: int | None = None,
        unit: str = "",
        *,
        estimated: bool = False,
        force: bool = False,
    ) -> None:
        """Redraw the bar (at most every 0.1 s unless forced); estimated marks a total that is only a guess."""
        if not self._tty:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < _REDRAW_SECONDS:
            return
        self._last_draw = now
        head = f"popek {self._label.removeprefix('the ')} [{self._index}/{self._phases}] {self._name:<10}"
        if done is not None and total:
            # 100% is for the next phase to say: a count may reach its (estimated) total before the work ends
            fraction = min(done / total, 0.99)
            filled = int(fraction * _WIDTH)
            bar = "[" + "#" * filled + "." * (_WIDTH - filled) + f"] {int(fraction * 100):3d}%"
            count = f" {done}/{'~' if estimated else ''}{total} {unit}" if unit else ""
        else:
            bar, count = "", ""
        line = f"{head} {bar}{count}  {_elapsed(now - self._phase_started)}"
        self._stream.write("\r\x1b[K" + line)
        self._stream.flush()
        self._line_open = True

    def done(self, message: str) -> None:
        self._end_line()
        if self._enabled:
            print(f"popek: {message} in {_elapsed(time.monotonic() - self._started)}", file=self._stream)
            self._stream.flush()

    def abort(self) -> None:
        self._end_line()

    def _end_line(self) -> None:
        if self._line_open:
            self._stream.write("\n")
            self._stream.flush()
            self._line_open = False
