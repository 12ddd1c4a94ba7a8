"""The popek command line: a guest command is what follows the first `--`, whatever options come after a
positional argument; commands without a guest command keep argparse's reading."""

from __future__ import annotations

from popek import cli


def test_options_after_the_snapshot_dir_are_options_not_the_command() -> None:
    args = cli._parse(["restore", "snap", "--accel", "soft", "--timeout", "5", "--", "cat", "--accel"])
    assert (args.snapshot, args.accel, args.timeout) == ("snap", "soft", 5.0)
    assert cli._guest_command(args) == ["cat", "--accel"]  # a second -- or option belongs to the command


def test_a_command_without_a_separator_is_still_the_command() -> None:
    args = cli._parse(["restore", "snap", "uname", "-a"])
    assert (args.accel, cli._guest_command(args)) == (None, ["uname", "-a"])
    run = cli._parse(["run", "--accel", "soft", "--", "sh", "-c", "echo -- x"])
    assert (run.accel, cli._guest_command(run)) == ("soft", ["sh", "-c", "echo -- x"])


def test_exec_keeps_its_own_command_reading() -> None:
    args = cli._parse(["exec", "web", "--", "ls", "-l"])
    assert args.name == "web" and args.vm_command[-2:] == ["ls", "-l"]
