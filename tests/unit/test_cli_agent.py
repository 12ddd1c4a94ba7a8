"""`popek run -- CMD` through the agent: how a command's end becomes popek's exit status, and what of the console
an error shows."""

from __future__ import annotations

import signal

from popek.cli_agent import CONSOLE_LINES, _console_tail, _status


def test_the_exit_status_is_the_commands_and_a_signal_is_128_plus_its_number() -> None:
    assert _status(7, None) == 7
    assert _status(0, None) == 0
    assert _status(256 + 3, None) == 3  # as a shell keeps the low byte
    assert _status(None, signal.SIGKILL) == 128 + 9
    assert _status(None, signal.SIGTERM) == 143


def test_an_error_shows_the_last_console_lines_without_carriage_returns() -> None:
    tail = b"".join(b"line %d\r\n" % i for i in range(100)) + b"\xffpanic"
    shown = _console_tail(tail).splitlines()
    assert len(shown) == CONSOLE_LINES
    assert shown[-1] == "  | \ufffdpanic" and shown[0] == f"  | line {100 - CONSOLE_LINES + 1}"
    assert _console_tail(b"") == ""
