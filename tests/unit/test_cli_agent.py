"""`popek run -- CMD` through the agent: what of the console an error shows. (How a command's end becomes popek's
exit status is ExecResult.status, tests/unit/agent/test_client.py.)"""

from __future__ import annotations

from popek.cli_agent import CONSOLE_LINES, _console_tail


def test_an_error_shows_the_last_console_lines_without_carriage_returns() -> None:
    tail = b"".join(b"line %d\r\n" % i for i in range(100)) + b"\xffpanic"
    shown = _console_tail(tail).splitlines()
    assert len(shown) == CONSOLE_LINES
    assert shown[-1] == "  | \ufffdpanic" and shown[0] == f"  | line {100 - CONSOLE_LINES + 1}"
    assert _console_tail(b"") == ""
