"""The guest protocol: popek.cmd encoding, decoded and run by the real init script's own lines under busybox on the
host, and the exit-status marker found in realistic console logs."""

from __future__ import annotations

import base64
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from popek.image import READY_MARKER, ImageError, command_parameter, parse_exit_status
from popek.image.build import recipe_init
from popek.image.protocol import BASE_CMDLINE, COMMAND_LINE_SIZE

BUSYBOX = Path("/bin/busybox")
needs_busybox = pytest.mark.skipif(not BUSYBOX.is_file(), reason="busybox-static is not installed")

AWKWARD = [
    ["sh", "-c", "echo 'a b' \"$x\""],
    ["printf", "%s|", "a b", "$HOME", "'", '"', "\\", "", "*", "~", "é", "line\nbreak", "-n", "a;b", "`x`", "$(x)"],
    ["echo", "-"],
]


def test_parameter_is_one_kernel_token() -> None:
    for argv in AWKWARD:
        parameter = command_parameter(argv)
        name, _, value = parameter.partition("=")
        assert name == "popek.cmd"
        assert not set(parameter) & set(" \t\n\"'\\")
        assert set(value) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")
        assert shlex.split(base64.urlsafe_b64decode(value).decode()) == argv


def test_bad_commands_are_refused() -> None:
    with pytest.raises(ImageError):
        command_parameter([])
    with pytest.raises(ImageError, match="NUL"):
        command_parameter(["echo", "a\0b"])
    room = COMMAND_LINE_SIZE - 2 - len(BASE_CMDLINE)
    fits = ["x" * ((room - len("popek.cmd=")) // 4 * 3)]
    assert len(BASE_CMDLINE + " " + command_parameter(fits)) <= COMMAND_LINE_SIZE - 1
    with pytest.raises(ImageError, match="too long"):
        command_parameter(["x" * 2000])


def init_protocol_section() -> str:
    """The lines of the real init from reading the command line to printing the exit status."""
    lines = recipe_init().decode().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("encoded="))
    end = next(i for i, line in enumerate(lines) if "popek-exit-status" in line and line.startswith("printf"))
    return "\n".join(lines[start : end + 1]) + "\n"


def run_init_section(tmp_path: Path, cmdline: str, stdin: bytes = b"") -> tuple[bytes, int]:
    """Run the section under busybox sh with only busybox applets on PATH and cmdline as /proc/cmdline.

    cttyhack is the one stand-in: on a host it would find the host's console in /sys and take it over. It is
    replaced in the script's text, because busybox sh runs its own applets ahead of anything on PATH.
    """
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        for applet in ("sh", "tr", "base64", "setsid", "printf", "echo", "cat"):
            (bin_dir / applet).symlink_to(BUSYBOX)
        (bin_dir / "fake-cttyhack").write_text(f'#!{BUSYBOX} sh\nexec "$@"\n')
        (bin_dir / "fake-cttyhack").chmod(0o755)
    proc_cmdline = tmp_path / "cmdline"
    proc_cmdline.write_text(cmdline + "\n")
    section = init_protocol_section()
    assert "setsid cttyhack sh" in section
    script = section.replace("/proc/cmdline", str(proc_cmdline)).replace(" cttyhack ", f" {bin_dir}/fake-cttyhack ")
    result = subprocess.run(
        [str(BUSYBOX), "sh", "-c", script],
        input=stdin,
        capture_output=True,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
        cwd=tmp_path,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr, result.returncode


@needs_busybox
def test_busybox_base64_decodes_the_parameter() -> None:
    for argv in AWKWARD:
        value = command_parameter(argv).partition("=")[2]
        decoded = subprocess.run(
            [str(BUSYBOX), "sh", "-c", "printf '%s' \"$1\" | tr -- '-_' '+/' | base64 -d", "sh", value],
            capture_output=True,
            check=True,
        ).stdout
        assert decoded.decode() == shlex.join(argv)


@needs_busybox
@pytest.mark.parametrize("argv", AWKWARD)
def test_init_runs_awkward_argv_as_given(tmp_path: Path, argv: list[str]) -> None:
    expected = subprocess.run(argv, capture_output=True, check=True, env={"PATH": os.environ["PATH"]}).stdout
    output, _ = run_init_section(tmp_path, f"{BASE_CMDLINE} {command_parameter(argv)} quiet")
    ready = output.index(READY_MARKER + b"\n")
    body = output[ready + len(READY_MARKER) + 1 :]
    assert body == expected + b"\npopek-exit-status: 0\n"
    assert parse_exit_status(output) == 0


@needs_busybox
def test_init_reports_the_command_status(tmp_path: Path) -> None:
    output, _ = run_init_section(tmp_path, f"x=1 {command_parameter(['sh', '-c', 'printf partial; exit 7'])} y")
    assert output.endswith(b"partial\npopek-exit-status: 7\n")
    assert parse_exit_status(output) == 7
    output, _ = run_init_section(tmp_path, command_parameter(["no-such-command-here"]))
    assert parse_exit_status(output) == 127


@needs_busybox
def test_init_without_a_command_runs_a_shell_on_the_console(tmp_path: Path) -> None:
    output, _ = run_init_section(tmp_path, BASE_CMDLINE, stdin=b"echo from-the-shell\nexit 3\n")
    assert READY_MARKER in output and b"from-the-shell\n" in output
    assert parse_exit_status(output) == 3


@needs_busybox
def test_init_rejects_a_garbled_parameter(tmp_path: Path) -> None:
    output, _ = run_init_section(tmp_path, "popek.cmd=@@@")
    assert parse_exit_status(output) == 125
    assert b"not valid base64" in output


SERIAL_LOG = (
    b"[    0.000000] Linux version 6.1.0 (popek@popek) #1 SMP PREEMPT_DYNAMIC\r\n"
    b"[    0.412000] Run /init as init process\r\n"
    b"popek-guest-ready\r\n"
    b"Linux popek 6.1.0 #1 SMP x86_64 GNU/Linux\r\n"
    b"[    0.933120] random: crng init done\r\n"
    b"popek-exit-status: 1 is what the program printed, not init\r\n"
    b"no newline at the end\r\n"
    b"popek-exit-status: 42\r\n"
    b"[    1.020000] reboot: Restarting system\r\n"
    b"[    1.021000] reboot: machine restart\r\n"
)


def test_exit_status_in_a_kernel_log_with_crlf() -> None:
    assert parse_exit_status(SERIAL_LOG) == 42


def test_the_last_status_line_wins_and_only_whole_lines_count() -> None:
    assert parse_exit_status(b"popek-exit-status: 3\npopek-exit-status: 4\n") == 4
    assert parse_exit_status(b"\r\r\npopek-exit-status: 0\r\r\n") == 0
    assert parse_exit_status(b"output\npopek-exit-status: 255") == 255  # the console was cut before the newline
    assert parse_exit_status(b"echo popek-exit-status: 5\r\n") is None
    assert parse_exit_status(b"popek-exit-status: x\n") is None
    assert parse_exit_status(b"") is None
    assert parse_exit_status(SERIAL_LOG.replace(b"popek-exit-status: 42", b"[ 1.0] popek-exit-status: 42")) is None


def test_a_guest_that_never_finished_has_no_status() -> None:
    assert parse_exit_status(SERIAL_LOG.split(b"no newline")[0].replace(b"popek-exit-status: 1 is", b"x")) is None


def init_agent_section() -> str:
    """The real init's lines that start the guest agent."""
    lines = recipe_init().decode().splitlines()
    start = next(i for i, line in enumerate(lines) if "/dev/vsock" in line and line.startswith("if "))
    end = next(i for i in range(start, len(lines)) if lines[i] == "fi")
    section = "\n".join(lines[start : end + 1]) + "\n"
    ready = next(i for i, line in enumerate(lines) if line == "echo popek-guest-ready")
    assert end < ready, "the agent must be started before the ready marker"
    return section


@needs_busybox
@pytest.mark.parametrize("has_vsock", [False, True])
def test_init_starts_the_agent_only_with_a_vsock_device(tmp_path: Path, has_vsock: bool) -> None:
    """The section under busybox with its paths moved into tmp_path: /dev/vsock is a character device there
    (/dev/null stands in) or missing, and the agent is a script that records how it was started."""
    agent = tmp_path / "popek-agent"
    agent.write_text(f'#!{BUSYBOX} sh\necho "args: $*" > {tmp_path}/started\necho noise; echo more noise >&2\n')
    agent.chmod(0o755)
    device = "/dev/null" if has_vsock else str(tmp_path / "no-vsock")
    section = (
        init_agent_section()
        .replace("/dev/vsock", device)
        .replace("/sbin/popek-agent", str(agent))
        .replace("/run/popek-agent.log", str(tmp_path / "agent.log"))
    )
    result = subprocess.run(
        [str(BUSYBOX), "sh", "-c", section + "wait\n"],
        capture_output=True,
        env={"PATH": "/bin:/usr/bin"},
        timeout=30,
        check=False,
    )
    assert result.returncode == 0 and result.stdout == b"" and result.stderr == b""  # quiet on the console
    if has_vsock:
        deadline = time.monotonic() + 10  # setsid detaches it: wait for its file
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (tmp_path / "started").read_text() == "args: --vsock 1024\n"
        time.sleep(0.1)
        assert (tmp_path / "agent.log").read_text() == "noise\nmore noise\n"
    else:
        time.sleep(0.2)
        assert not (tmp_path / "started").exists() and not (tmp_path / "agent.log").exists()
