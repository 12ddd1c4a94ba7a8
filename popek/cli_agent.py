"""``popek run -- CMD`` through the guest agent: the command's stdout and stderr are popek's, and nothing else is.

The default guest boots with a vsock device (popek.VM); the command runs through its agent (docs/agent-protocol.md)
instead of the serial console's ``popek.cmd=`` protocol, so the kernel log stays out of the output (``--console``
copies it to stderr) and the exit status is the command's own (a signal N is 128+N, as a shell reports it).
``-i`` feeds popek's stdin to the command (else it reads /dev/null); ``-t`` gives it a pseudo-terminal the size of
popek's (the agent's pty, resized on SIGWINCH), with popek's terminal in raw mode meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import sys
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

from popek.accel.exits import StopReason
from popek.agent import CommandTimeout
from popek.api import DEFAULT_BOOT_TIMEOUT, DEFAULT_RESTORE_TIMEOUT, VM, BootTimeout, VMError, VMStopped
from popek.devices.virtio.blk import DiskSpec
from popek.devices.virtio.net import NetSpec
from popek.devices.virtio.vsock import VsockSpec

EXIT_NO_STATUS = 125
EXIT_TIMEOUT = 124
EXIT_VMM_FAILURE = 4
CONSOLE_LINES = 20  # of the guest's console shown with an error
POLL_INTERVAL = 0.05  # -i/-t: how often the loop looks at stdin between reads of the command's output
DEFAULT_SHELL = ["/bin/sh", "-l"]


def _writer(fd: int) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    return write


def _console_tail(tail: bytes) -> str:
    lines = tail.decode(errors="replace").replace("\r", "").splitlines()[-CONSOLE_LINES:]
    return "".join(f"  | {line}\n" for line in lines)


@contextlib.contextmanager
def _raw_terminal(fd: int) -> Iterator[None]:
    """popek's terminal passes every key to the guest's pty (whose line discipline does the editing and ^C)."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSADRAIN)  # not TCSAFLUSH: keys typed while popek starts reach the guest (as in ssh)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _terminal_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of the terminal on fd; 24x80 (what a terminal starts as) when fd is not one."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 24, 80
    return size.lines or 24, size.columns or 80


def _interactive(
    vm: VM, command: list[str], use_pty: bool, stdin_fd: int = 0, stdout_fd: int = 1, stderr_fd: int = 2
) -> int:
    """Feed stdin and copy output until the command ends: its exit status. One thread: Process.read holds the
    process's lock while it waits, so reads are short and stdin is looked at in between."""
    proc = vm.spawn(command, stdin=True, pty=_terminal_size(stdout_fd) if use_pty else None)
    out, err = _writer(stdout_fd), _writer(stderr_fd)
    resized = False

    def on_winch(_signum: int, _frame: object) -> None:
        nonlocal resized
        resized = True

    main_thread = threading.current_thread() is threading.main_thread()
    old_winch = signal.signal(signal.SIGWINCH, on_winch) if use_pty and main_thread else None
    try:
        with proc, _raw_terminal(stdin_fd) if use_pty else contextlib.nullcontext():
            stdin_open = True
            while True:
                if stdin_open and select.select([stdin_fd], [], [], 0)[0]:
                    data = os.read(stdin_fd, 4096)
                    if data:
                        proc.write(data)
                    else:
                        proc.close_stdin()
                        stdin_open = False
                if resized:
                    resized = False
                    proc.resize(*_terminal_size(stdout_fd))
                try:
                    item = proc.read(timeout=POLL_INTERVAL)
                except CommandTimeout:
                    continue
                if item is None:
                    break
                stream, data = item
                (out if stream == "stdout" else err)(data)
            result = proc.wait()
    finally:
        if old_winch is not None:
            signal.signal(signal.SIGWINCH, old_winch)
    return result.status


def run(
    args: argparse.Namespace, command: list[str], disks: list[DiskSpec], vsock: VsockSpec | None, net: NetSpec | None
) -> int:
    """Boot the default guest (or restore its warm snapshot: popek.warm; --cold boots), run the command through
    its agent, stop the VM: the command's exit status. With --vsock the agent is reached through that device (so
    other host programs can use it too)."""
    jail = getattr(args, "jail", False)
    kernel = initrd = None
    append = args.append
    if jail:  # the default guest made explicit: its cache (and the warm snapshots) are not in the jail
        from popek import image

        guest = image.ensure_default_guest(progress=sys.stderr.isatty())
        kernel, initrd = guest.kernel, guest.initrd
        append = " ".join(part for part in (guest.cmdline, args.append) if part)
    vm = VM(
        kernel=kernel,
        initrd=initrd,
        append=append,
        image=args.image,
        mem=args.mem,
        cpus=args.cpus,
        accel=args.accel,
        cpu_template=args.cpu_template,
        disks=disks,
        rng=args.rng,
        console2=args.console2,
        acpi=not args.no_acpi,
        eventfds=not args.no_eventfds,
        kvm_device=args.kvm_device,
        vsock=vsock,
        net=net,
        timeout=args.timeout,
        boot_timeout=args.boot_timeout if args.boot_timeout is not None else DEFAULT_BOOT_TIMEOUT,
        console=_writer(2) if args.console else None,
        console_tail=64 << 10,
        cold=args.cold,
    )
    if jail:
        from popek.cli import jail_vm

        jail_vm(args, kernel, initrd, disks, net)
    return drive(vm, args, command)


def restore(args: argparse.Namespace, command: list[str]) -> int:
    """``popek restore DIR -- CMD``: a clone of the snapshot in DIR runs the command through its agent."""
    vm = VM.restore(
        args.snapshot,
        accel=args.accel,
        timeout=args.timeout,
        boot_timeout=args.boot_timeout if args.boot_timeout is not None else DEFAULT_RESTORE_TIMEOUT,
        console=_writer(2) if args.console else None,
        console_tail=64 << 10,
    )
    return drive(vm, args, command)


def drive(vm: VM, args: argparse.Namespace, command: list[str]) -> int:
    """Start `vm`, run the command (a shell on a pty with -t), stop the VM: the command's exit status, or the
    status that says why there was none (the VM stopped, the agent never answered)."""
    try:
        with vm:
            if args.tty or args.interactive:
                status = _interactive(vm, command or DEFAULT_SHELL, args.tty)
            else:
                result = vm.exec(command, on_stdout=_writer(1), on_stderr=_writer(2))
                status = result.status
            if args.stats:
                print(vm.stats(), file=sys.stderr)
            return status
    except VMStopped as e:
        print(f"popek: error: {e}", file=sys.stderr)
        if not args.console:
            print(_console_tail(e.console_tail), end="", file=sys.stderr)
        stop = e.stop
        if stop is None or stop.reason in (StopReason.RESET, StopReason.POWEROFF, StopReason.USER_QUIT):
            return EXIT_NO_STATUS  # the guest went down without the command's end: no success
        if stop.reason is StopReason.TIMEOUT:
            return EXIT_TIMEOUT
        if stop.reason is StopReason.SIGNAL:
            return 128 + (stop.signum or signal.SIGINT)
        from popek.cli import exit_status

        return exit_status(stop, None)
    except (BootTimeout, VMError) as e:
        print(f"popek: error: {e}", file=sys.stderr)
        if not args.console:
            print(_console_tail(e.console_tail), end="", file=sys.stderr)
        return EXIT_TIMEOUT if isinstance(e, BootTimeout) else EXIT_VMM_FAILURE


def create_snapshot(args: argparse.Namespace) -> int:
    """``popek snapshot create DIR``: boot the default guest (always cold), wait for its agent, snapshot it into
    DIR, stop it; prints what was written and how long each step took."""
    import time

    from popek import snapshot

    vm = VM(
        append=args.append, mem=args.mem, cpus=args.cpus, accel=args.accel, rng=args.rng,
        boot_timeout=args.boot_timeout if args.boot_timeout is not None else DEFAULT_BOOT_TIMEOUT,
        console=_writer(2) if args.console else None, console_tail=64 << 10, cold=True,
    )  # fmt: skip
    try:
        started = time.monotonic()
        with vm:
            booted = time.monotonic()
            vm.pause()
            vm.snapshot(args.snapshot)
            written = time.monotonic()
        manifest = snapshot.read_manifest(args.snapshot)
        disk = sum(f.stat().st_blocks * 512 for f in Path(args.snapshot).iterdir() if f.is_file())
        print(
            f"snapshot {args.snapshot}: generation {manifest.generation}, {manifest.memory_bytes >> 20} MiB of guest "
            f"memory in {disk / (1 << 20):.1f} MiB on disk; boot {booted - started:.1f} s, snapshot "
            f"{written - booted:.2f} s"
        )
        return 0
    except (BootTimeout, VMError) as e:
        print(f"popek: error: {e}", file=sys.stderr)
        print(_console_tail(e.console_tail), end="", file=sys.stderr)
        return EXIT_TIMEOUT if isinstance(e, BootTimeout) else EXIT_VMM_FAILURE
