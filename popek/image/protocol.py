"""The host <-> guest protocol of popek's default guest, spoken over the kernel command line and the serial console.

Host to guest: the kernel parameter ``popek.cmd=<urlsafe base64 of a shell command string>`` (see ``init`` beside
this file, which reads it from /proc/cmdline because the kernel keeps dotted parameters away from init's argv and
environment). Guest to host, on the console (ttyS0, so lines may end in CRLF and kernel messages may interleave):

* ``popek-guest-ready``: userspace is up and the command (or the interactive shell) is about to start;
* ``popek-exit-status: N``: the command (or the shell) exited with status N; the guest then resets the machine
  (``reboot -f`` with ``reboot=k`` on the command line: a pulse of the i8042 reset line, since there is no ACPI).
"""

from __future__ import annotations

import base64
import os
import re
import shlex

from popek.image.errors import ImageError

READY_MARKER = b"popek-guest-ready"
EXIT_STATUS_PREFIX = b"popek-exit-status: "
COMMAND_PARAMETER = "popek.cmd"

# x86's COMMAND_LINE_SIZE (arch/x86/include/asm/setup.h): the kernel silently truncates a longer command line,
# which would cut a command in the middle of its base64 and make init fail to decode it.
COMMAND_LINE_SIZE = 2048

# Firecracker's default guest command line, trimmed to what this kernel config can use:
# - console=ttyS0: the only console popek emulates; no earlyprintk, because the 8250 console registers early in
#   this tiny kernel and every console byte costs an I/O exit (see _CMDLINE_NOTES in the module for the rest).
BASE_CMDLINE = " ".join(
    (
        "console=ttyS0",
        "reboot=k",
        "panic=-1",
        "i8042.noaux",
        "i8042.nomux",
        "i8042.nopnp",
        "i8042.dumbkbd",
        "mitigations=off",
        "tsc=reliable",
        "no_timer_check",
    )
)

_EXIT_STATUS_LINE = re.compile(rb"^\r*popek-exit-status: (\d{1,3})[ \t\r]*$", re.MULTILINE)


def command_parameter(argv: list[str]) -> str:
    """The kernel parameter that makes the default guest run argv once and report its exit status.

    argv is shell-quoted (the guest runs it with ``sh -c``, so a single word like ``"echo $HOME"`` stays one
    argument) and base64-encoded with the URL-safe alphabet: the kernel splits its command line at spaces and
    interprets double quotes, and this alphabet has neither. The ``=`` padding stays, because busybox's
    ``base64 -d`` refuses unpadded input and the kernel only splits a parameter at its first ``=``.
    """
    if not argv:
        raise ImageError("no command to run in the guest: give at least a program name")
    if any("\0" in arg for arg in argv):
        raise ImageError("a guest command cannot contain a NUL byte: a shell string cannot carry it")
    encoded = base64.urlsafe_b64encode(os.fsencode(shlex.join(argv))).decode("ascii")
    parameter = f"{COMMAND_PARAMETER}={encoded}"
    room = COMMAND_LINE_SIZE - 1 - len(BASE_CMDLINE) - 1
    if len(parameter) > room:
        raise ImageError(
            f"the guest command is too long for the kernel command line: its encoding takes {len(parameter)} "
            f"bytes of the {room} left after popek's own parameters (x86 Linux keeps at most "
            f"{COMMAND_LINE_SIZE - 1}); put a long script in a file instead"
        )
    return parameter


def parse_exit_status(serial_output: bytes) -> int | None:
    """The status in the last ``popek-exit-status: N`` line of a guest's console output, or None if it has none.

    The last one counts: the command's own output may contain an earlier look-alike line, while init prints the
    real one after the command has exited. CRs are tolerated on either side (the tty's ONLCR turns ``\\n`` into
    ``\\r\\n``); a line with anything else around the marker is not the marker (e.g. a kernel message that happened
    to be printed in the middle of it), since init always starts it on a fresh line.
    """
    matches = _EXIT_STATUS_LINE.findall(serial_output)
    if not matches:
        return None
    return int(matches[-1])
