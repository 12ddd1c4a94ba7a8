"""The `popek` command: `popek run` boots a VM; `popek image build|info` manages the default guest.

Every failure a user can cause is reported as one line on stderr and a non-zero exit status; the exit status
of `popek run` reflects how the guest ended (see `exit_status`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from popek.accel.exits import Stop, StopReason
from popek.errors import ConfigError, PopekError
from popek.kvm import KvmError

if TYPE_CHECKING:
    from popek.devices.virtio.blk import DiskSpec
    from popek.devices.virtio.net import NetSpec
    from popek.devices.virtio.vsock import VsockSpec

EXIT_ERROR = 1
EXIT_TRIPLE_FAULT = 3
EXIT_VMM_FAILURE = 4
EXIT_DIVERGENCE = 5
EXIT_NO_STATUS = 125
EXIT_TIMEOUT = 124

DAEMON_COMMANDS = ("serve", "ps", "create", "exec", "stop", "rm", "logs")
VMFILE_COMMANDS = ("up", "status", "ssh", "provision", "sync", "halt", "suspend", "resume", "destroy")
_SIZE = re.compile(r"^\s*(\d{1,30})\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)  # VmSpec bounds the value


def parse_size(text: str) -> int:
    """'512M', '1G', '65536K', '1048576' (bytes) → bytes; sizes count in powers of 1024, as QEMU's -m does."""
    m = _SIZE.match(text)
    if not m:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise ConfigError(f"cannot read {shown!r} as a size (examples: 512M, 2G)")
    number, unit = int(m.group(1)), m.group(2).upper()
    if not unit and m.group(3) is None and number < 1 << 20:
        unit = "M"  # like QEMU, a bare small number means MiB
    return number << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[unit]


def exit_status(stop: Stop, guest_status: int | None) -> int:
    if stop.status is not None:
        return stop.status & 0xFF
    if guest_status is not None:
        return guest_status & 0xFF
    if stop.reason is StopReason.SIGNAL:
        return 128 + (stop.signum or signal.SIGINT)  # as a shell reports a process a signal ended
    return {
        StopReason.POWEROFF: 0,
        StopReason.RESET: 0,
        StopReason.USER_QUIT: 0,
        StopReason.HALTED: 0,
        StopReason.MIGRATED: 0,
        StopReason.TRIPLE_FAULT: EXIT_TRIPLE_FAULT,
        StopReason.TIMEOUT: EXIT_TIMEOUT,
        StopReason.DIVERGENCE: EXIT_DIVERGENCE,
    }.get(stop.reason, EXIT_VMM_FAILURE)


class UsageError(Exception):
    """A command line argparse cannot read; `prog` is the (sub)command whose --help explains it."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 1, like every other bad input to popek."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog)


def _parser(separated: bool = False) -> argparse.ArgumentParser:
    """separated: the guest command was cut off at `--` (_parse), so what is left of it is only a command given
    without `--`; argparse's REMAINDER would otherwise take options after a positional as the command."""
    rest: str | int = "*" if separated else argparse.REMAINDER
    p = _Parser(prog="popek", description="popek: a programmable virtual machine monitor")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="boot a VM (the default guest unless --kernel is given)")
    run.add_argument("--kernel", help="bzImage, ELF vmlinux (PVH), Multiboot kernel or boot sector")
    run.add_argument("--initrd", help="initial ramdisk")
    run.add_argument(
        "--image",
        default="default",
        metavar="default|debian",
        help="the default guest's userspace: its busybox initramfs (default), or a Debian 12 root disk "
        "(built on first use; each run writes a copy-on-write clone of it)",
    )
    run.add_argument("--append", default=None, help="kernel command line (added to the default guest's)")
    run.add_argument("--mem", default="512M", help="guest memory, e.g. 512M or 2G (default 512M)")
    run.add_argument("--cpus", type=int, default=1, help="number of vCPUs (default 1)")
    run.add_argument(
        "--accel",
        default="kvm",
        help="backend: kvm (default), soft (popek's x86-64 CPU in Python), or lockstep (both, compared)",
    )
    run.add_argument("--cpu-template", default="portable", help="CPUID template: portable (default) or host")
    run.add_argument("--kvm-device", default="/dev/kvm", help="the KVM device (default /dev/kvm)")
    run.add_argument("--timeout", type=float, default=None, help="stop the VM after this many seconds")
    run.add_argument("--stats", action="store_true", help="print exit, port, MMIO and assist counts at the end")
    run.add_argument(
        "--virtual-time",
        action="store_true",
        help="--accel soft: a halted guest skips to its next timer at once (replays, instruction counts); "
        "by default idle time passes in wall time and costs no host CPU",
    )
    run.add_argument("--no-acpi", action="store_true", help="no ACPI tables or PM registers (the MP table only)")
    run.add_argument(
        "--pc-testdev", action="store_true", help="attach QEMU's pc-testdev (ports 0xe0, 0x2000; MMIO 0xff000000)"
    )
    run.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="PATH[,ro][,serial=ID]",
        help="a virtio-blk disk on a raw image or block device (repeatable: vda, vdb, ...)",
    )
    run.add_argument("--rng", action="store_true", help="a virtio-rng device fed by the host's /dev/urandom")
    run.add_argument(
        "--console2",
        metavar="PATH",
        help="a virtio-console (/dev/hvc0) on a file (output), a Unix socket, a FIFO or a tty (both ways)",
    )
    run.add_argument(
        "--vsock",
        metavar="CID:SOCKET",
        help="a virtio-vsock device, guest CID (3 or more), Firecracker's host side: popek listens on the Unix "
        "socket SOCKET, where a host client writes 'CONNECT <port>\\n' to reach a guest port and reads 'OK <n>\\n'; "
        "a guest connect to CID 2 port P reaches the Unix socket SOCKET_P",
    )
    run.add_argument(
        "--net",
        metavar="passt|tap:NAME[,mac=MAC][,ip=ADDR/PREFIX[,gw=ADDR]]",
        help="a virtio-net device (eth0): user-mode networking through passt, or a TAP device (needs root)",
    )
    run.add_argument(
        "--port",
        action="append",
        default=[],
        metavar="HOST:GUEST",
        help="with --net passt: forward host TCP port HOST to the guest's port GUEST (repeatable)",
    )
    run.add_argument(
        "--no-eventfds",
        action="store_true",
        help="KVM: virtio notifications and interrupts through vCPU exits instead of ioeventfd/irqfd",
    )
    run.add_argument(
        "--no-agent",
        action="store_true",
        help="run the guest command through the serial console (popek.cmd=) instead of the guest agent",
    )
    run.add_argument(
        "--console", action="store_true", help="with the agent: copy the guest's console (kernel log) to stderr"
    )
    run.add_argument(
        "--boot-timeout",
        type=float,
        default=None,
        help="with the agent: how long to wait for it while the guest boots (default 600 s)",
    )
    run.add_argument("-i", "--interactive", action="store_true", help="with the agent: feed stdin to the command")
    run.add_argument(
        "-t", "--tty", action="store_true", help="with the agent: run the command (default: sh) on a pseudo-terminal"
    )
    run.add_argument(
        "--cold", action="store_true", help="with the agent: boot, even where the default guest's warm snapshot exists"
    )
    run.add_argument(
        "--jail",
        action="store_true",
        help="confine the VMM as Firecracker's jailer does: namespaces, a private root, no capabilities, seccomp "
        "(root only; see docs/daemon.md, Confinement)",
    )
    run.add_argument("--jail-uid", type=int, default=None, metavar="N", help="with --jail: run as this uid")
    run.add_argument("--jail-gid", type=int, default=None, metavar="N", help="with --jail: run as this gid")
    run.add_argument("guest_command", nargs=rest, help="-- COMMAND...: run it in the default guest")
    snap = sub.add_parser("snapshot", help="VM snapshots: create one of the default guest, show or verify one")
    snap_sub = snap.add_subparsers(dest="snapshot_command", required=True)
    create = snap_sub.add_parser("create", help="boot the default guest, wait for its agent, snapshot it into DIR")
    create.add_argument("snapshot", metavar="DIR")
    create.add_argument("--append", default=None, help="kernel command line (added to the default guest's)")
    create.add_argument("--mem", default="512M", help="guest memory (default 512M)")
    create.add_argument("--cpus", type=int, default=1, help="number of vCPUs (default 1)")
    create.add_argument("--accel", default="kvm", help="backend: kvm (default) or soft")
    create.add_argument("--rng", action="store_true", help="a virtio-rng device")
    create.add_argument("--boot-timeout", type=float, default=None, help="how long to wait for the agent")
    create.add_argument("--console", action="store_true", help="copy the guest's console to stderr")
    info = snap_sub.add_parser("info", help="what a snapshot holds (every field checked)")
    info.add_argument("snapshot", metavar="DIR")
    info.add_argument("--verify", action="store_true", help="also check the memory file's checksum (reads it all)")
    restore = sub.add_parser("restore", help="start a clone of a snapshot and run a command in it")
    restore.add_argument("snapshot", metavar="DIR")
    restore.add_argument(
        "--accel",
        choices=("kvm", "soft"),
        default=None,
        help="restore on this backend (default: the snapshot's); a snapshot that cannot cross says why",
    )
    restore.add_argument("--timeout", type=float, default=None, help="stop the VM after this many seconds")
    restore.add_argument("--stats", action="store_true", help="print exit, port, MMIO and assist counts at the end")
    restore.add_argument("--console", action="store_true", help="copy the guest's console to stderr")
    restore.add_argument("--boot-timeout", type=float, default=None, help="how long to wait for the agent")
    restore.add_argument("-i", "--interactive", action="store_true", help="feed stdin to the command")
    restore.add_argument("-t", "--tty", action="store_true", help="run the command (default: sh) on a pseudo-terminal")
    restore.add_argument("guest_command", nargs=rest, help="-- COMMAND...: run it in the clone")
    image = sub.add_parser("image", help="the default guest image")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    build = image_sub.add_parser("build", help="build (or reuse) the default guest kernel and initramfs")
    build.add_argument("--force", action="store_true", help="rebuild even if a cached image matches")
    build.add_argument(
        "--rootfs",
        metavar="debian",
        help="also build (or reuse) a root disk: debian (Debian 12 with python3, by mmdebstrap; needs the mirror)",
    )
    image_sub.add_parser("info", help="say what is cached and where it came from")
    init = sub.add_parser("init", help="write a commented popek.toml (the VM file) in a folder")
    init.add_argument("folder", nargs="?", default=".", help="where to write it (default: here)")
    init.add_argument("--force", action="store_true", help="overwrite an existing popek.toml")
    _daemon_parsers(sub)
    return p


def _daemon_parsers(sub: argparse._SubParsersAction[_Parser]) -> None:
    """The daemon (`popek serve`) and the verbs that drive it through popek.Client (docs/daemon.md)."""
    from popek.daemon.server import default_socket

    def with_socket(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument(
            "--socket", type=Path, default=default_socket(), help=f"the daemon's socket (default {default_socket()})"
        )
        return parser

    serve = with_socket(sub.add_parser("serve", help="run the popek daemon (REST API on a Unix socket, mode 0600)"))
    serve.add_argument("--state-dir", type=Path, default=None, help="where VM records live (default: SOCKET.d)")
    with_socket(sub.add_parser("ps", help="list the daemon's VMs"))
    create = with_socket(sub.add_parser("create", help="create and boot a VM in the daemon"))
    create.add_argument("--name", default=None)
    create.add_argument("--cpus", type=int, default=1)
    create.add_argument("--mem", default="512M")
    create.add_argument("--accel", default="kvm")
    create.add_argument("--kernel", default=None)
    create.add_argument("--initrd", default=None)
    create.add_argument("--append", default=None, help="kernel command line (added to the default guest's)")
    create.add_argument("--disk", action="append", default=[], metavar="PATH[,ro]")
    create.add_argument("--rng", action="store_true")
    create.add_argument("--snapshot", default=None, help="restore this snapshot instead of booting")
    create.add_argument("--wait", action="store_true", help="wait until the guest agent answers")
    exe = with_socket(sub.add_parser("exec", help="run a command in a daemon's VM: popek exec NAME -- CMD..."))
    exe.add_argument("name")
    exe.add_argument("--timeout", type=float, default=None)
    exe.add_argument("vm_command", nargs=argparse.REMAINDER, help="-- COMMAND...")
    for verb, text in (("stop", "stop a daemon's VM"), ("rm", "stop and delete a daemon's VM")):
        with_socket(sub.add_parser(verb, help=text)).add_argument("name")
    logs = with_socket(sub.add_parser("logs", help="a daemon's VM's console log"))
    logs.add_argument("name")
    logs.add_argument("-f", "--follow", action="store_true", help="then follow it as it grows")
    # --- the VM file's verbs (popek up/status/ssh/...: popek/cli_vmfile.py)
    from popek import cli_vmfile

    cli_vmfile.add_parsers(sub, with_socket)


def _cmd_daemon(args: argparse.Namespace) -> int:
    """popek serve, ps, create, exec, stop, rm, logs."""
    if args.command == "serve":
        from popek.daemon import server

        return server.serve(args.socket, args.state_dir)
    from popek.daemon.client import Client

    with Client(args.socket) as client:
        if args.command == "ps":
            _print_table(client.list())
            return 0
        if args.command == "create":
            spec: dict[str, object] = {"cpus": args.cpus, "mem": args.mem, "accel": args.accel, "rng": args.rng}
            for key, value in (
                ("name", args.name),
                ("kernel", args.kernel),
                ("initrd", args.initrd),
                ("cmdline", args.append),
                ("snapshot", args.snapshot),
            ):
                if value is not None:
                    spec[key] = str(Path(value).resolve()) if key in ("kernel", "initrd", "snapshot") else value
            if args.disk:
                spec["disks"] = [str(Path(d.split(",")[0]).resolve()) + d[len(d.split(",")[0]) :] for d in args.disk]
            vm = client.create(**spec)
            if args.wait:
                vm.wait_ready()
            print(f"{vm.id} {vm.name}")
            return 0
        vm = client.get(args.name)
        if args.command == "exec":
            command = list(args.vm_command)
            if command and command[0] == "--":
                command = command[1:]
            if not command:
                raise ConfigError("popek exec NAME -- COMMAND...: no command given")
            result = vm.exec(
                command,
                timeout=args.timeout,
                on_stdout=lambda data: (sys.stdout.buffer.write(data), sys.stdout.buffer.flush()),
                on_stderr=lambda data: (sys.stderr.buffer.write(data), sys.stderr.buffer.flush()),
            )
            return result.status
        if args.command == "stop":
            vm.stop()
            return 0
        if args.command == "rm":
            vm.delete()
            return 0
        # logs
        if args.follow:
            for data in vm.follow_console():
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
        else:
            sys.stdout.buffer.write(vm.console())
        return 0


def _print_table(vms: list[dict[str, object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("ID", "NAME", "STATE", "PID", "CPUS", "MEM", "UPTIME", "CAUSE"):
        table.add_column(column, overflow="fold")
    for vm in vms:
        spec = vm.get("spec")
        spec = spec if isinstance(spec, dict) else {}
        uptime = vm.get("uptime")
        table.add_row(
            str(vm["id"]),
            str(vm["name"]),
            str(vm["state"]),
            str(vm.get("pid") or "-"),
            str(spec.get("cpus", "-")),
            str(spec.get("mem", "-")),
            f"{uptime:.0f}s" if isinstance(uptime, int | float) else "-",
            str(vm.get("cause") or ""),
        )
    Console(soft_wrap=False).print(table)


def _cmd_init(args: argparse.Namespace) -> int:
    from popek.daemon import vmfile

    print(f"wrote {vmfile.init(Path(args.folder), force=args.force)}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from popek.devices.virtio.blk import DiskSpec
    from popek.devices.virtio.net import net_spec
    from popek.devices.virtio.vsock import VsockSpec
    from popek.image import rootfs

    command = _guest_command(args)
    image_name = rootfs.check_image_name(args.image)
    disks = [DiskSpec.parse(text) for text in args.disk]  # before a default guest build: bad options fail fast
    vsock = VsockSpec.parse(args.vsock) if args.vsock is not None else None
    net = net_spec(args.net, args.port)
    default_guest = args.kernel is None
    # the default guest's own initramfs starts the agent; a custom one may not: it keeps the serial protocol
    agent = default_guest and args.initrd is None and not args.no_agent
    if image_name != rootfs.DEFAULT_IMAGE and (not default_guest or args.initrd is not None):
        raise ConfigError(f"--image {image_name} boots the default kernel and initramfs: drop --kernel and --initrd")
    if (args.tty or args.interactive) and not agent:
        raise ConfigError("-t and -i need the guest agent: the default guest without --initrd or --no-agent")
    if args.jail or args.jail_uid is not None or args.jail_gid is not None:
        _check_jail(args, net, image_name)
    if agent and (command or args.tty or args.interactive):
        from popek import cli_agent

        return cli_agent.run(args, command, disks, vsock, net)
    workdir = None
    if default_guest:
        from popek import image

        guest = image.ensure_default_guest(progress=sys.stderr.isatty())
        kernel, initrd = guest.kernel, args.initrd or guest.initrd
        parts = [guest.cmdline]
        if image_name == "debian":
            root = rootfs.ensure_rootfs(image_name, progress=sys.stderr.isatty())
            workdir = Path(tempfile.mkdtemp(prefix="popek-run-"))
            disks.insert(0, DiskSpec(rootfs.clone_disk(root, workdir), serial=rootfs.ROOT_SERIAL))
            parts = [root.cmdline]
        if args.append:
            parts.append(args.append)
        if command:
            parts.append(image.command_parameter(command))
        cmdline = " ".join(parts)
        if len(cmdline) > image.COMMAND_LINE_SIZE - 1:  # the kernel would cut it silently (protocol.py)
            raise ConfigError(
                f"the kernel command line would be {len(cmdline)} bytes, over Linux's {image.COMMAND_LINE_SIZE - 1}"
            )
    else:
        if command:
            raise ConfigError("a guest command (after --) needs the default guest; with --kernel use --append")
        kernel, initrd, cmdline = args.kernel, args.initrd, args.append or ""
    try:
        return _run_vm(args, command, default_guest, kernel, initrd, cmdline, disks, vsock, net)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _run_vm(
    args: argparse.Namespace,
    command: list[str],
    default_guest: bool,
    kernel: str | Path,
    initrd: str | Path | None,
    cmdline: str,
    disks: list[DiskSpec],
    vsock: VsockSpec | None,
    net: NetSpec | None,
) -> int:
    from popek.console import HostConsole
    from popek.vm import Vm, VmSpec

    spec = VmSpec(
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        mem=parse_size(args.mem),
        cpus=args.cpus,
        accel=args.accel,
        cpu_template=args.cpu_template,
        timeout=args.timeout,
        kvm_device=args.kvm_device,
        acpi=not args.no_acpi,
        pc_testdev=args.pc_testdev,
        disks=disks,
        rng=args.rng,
        console2=Path(args.console2) if args.console2 is not None else None,
        vsock=vsock,
        kvm_eventfds=not args.no_eventfds,
        net=net,
        virtual_time=args.virtual_time,
    )
    console: HostConsole | None = None
    if args.jail:
        jail_vm(args, spec.kernel, spec.initrd, disks, net)

    def to_console(data: bytes) -> None:
        if console is not None:
            console.write(data)

    with Vm(spec, console=to_console) as vm:
        console = HostConsole(
            vm.console_input, lambda: vm.request_stop(Stop(StopReason.USER_QUIT, "quit from the console (Ctrl-A x)"))
        )
        with console:
            stop = vm.run()
        guest_status = None
        if default_guest:
            from popek import image

            guest_status = image.parse_exit_status(bytes(vm.serial_log.tail))
            if guest_status is None and command and stop.reason in (StopReason.RESET, StopReason.POWEROFF):
                # the guest went down without saying how the command ended: that is no success
                print("\npopek: the guest never reported the command's exit status", file=sys.stderr)
                guest_status = EXIT_NO_STATUS
        if guest_status is None or stop.reason not in (StopReason.RESET, StopReason.POWEROFF):
            print(
                f"\npopek: VM stopped: {stop.reason.value}" + (f": {stop.detail}" if stop.detail else ""),
                file=sys.stderr,
            )
        if args.stats:
            print(vm.stats(), file=sys.stderr)
            print(
                f"console: {console.dropped} bytes of guest output dropped (the host did not read them in time)",
                file=sys.stderr,
            )
        return exit_status(stop, guest_status)


JAIL_SCRATCH = "/run/popek"


def _check_jail(args: argparse.Namespace, net: NetSpec | None, image_name: str) -> None:
    """--jail's own errors, before anything is built: one line each."""
    from popek import jail
    from popek.image import rootfs

    if not args.jail:
        raise ConfigError("--jail-uid and --jail-gid go with --jail")
    if net is not None and net.backend == "passt":
        raise ConfigError(jail.PASST_REFUSED)
    if image_name != rootfs.DEFAULT_IMAGE:
        raise ConfigError("--jail boots the default image only (the Debian root disk's cache is not in the jail)")
    if args.console2 is not None or args.vsock is not None:
        raise ConfigError("--jail has no --console2 or --vsock yet (their host files are not in the jail)")
    try:
        jail.check_possible()
    except jail.JailError as exc:
        raise ConfigError(str(exc)) from exc


def jail_vm(
    args: argparse.Namespace,
    kernel: str | os.PathLike[str] | None,
    initrd: str | os.PathLike[str] | None,
    disks: Sequence[DiskSpec],
    net: NetSpec | None,
    readonly: Sequence[str | os.PathLike[str]] = (),
) -> None:
    """Enter the jail (popek.jail) for one `popek run --jail` VM; its work dir is a fresh temporary directory."""
    from popek import jail

    try:
        jail.confine_vm(
            workdir=None,
            scratch=JAIL_SCRATCH,  # a tmpfs of the jail's own: the VM's sockets leave nothing on the host
            kernel=kernel,
            initrd=initrd,
            disks=disks,
            net=net,
            accel=args.accel,
            uid=args.jail_uid,
            gid=args.jail_gid,
            readonly=readonly,
        )
    except jail.JailError as exc:
        raise ConfigError(str(exc)) from exc


def _guest_command(args: argparse.Namespace) -> list[str]:
    command = list(args.guest_command)
    return command[1:] if command and command[0] == "--" else command


def _cmd_snapshot(args: argparse.Namespace) -> int:
    from popek import cli_agent, snapshot, vm_snapshot

    if args.snapshot_command == "create":
        return cli_agent.create_snapshot(args)
    saved = snapshot.read(args.snapshot, verify_memory=args.verify)
    top = vm_snapshot.parse_state(saved.state)
    spec = vm_snapshot.spec_from_state(top["spec"])
    m = saved.manifest
    kind = f"diff of {m.parent} ({sum(n for _, n in m.diff_pages or ())} pages)" if m.parent else "full"
    print(f"snapshot {args.snapshot}: format {snapshot.FORMAT} {snapshot.VERSION}, generation {m.generation}, {kind}")
    print(f"machine: --accel {spec.accel}, {spec.cpus} vCPU(s), {spec.mem >> 20} MiB, cpu template {spec.cpu_template}")
    devices = [key for key in top["devices"] if key != "platform"]
    print(f"devices: {', '.join(devices)}")
    print(f"kernel: {spec.kernel}" + (f", initrd {spec.initrd}" if spec.initrd else ""))
    print("memory: checksum verified" if args.verify else "memory: size checked (--verify reads and checks it all)")
    return 0


def _cmd_image(args: argparse.Namespace) -> int:
    from popek import image

    if args.image_command == "build":
        from popek.image import rootfs

        if args.rootfs is not None and rootfs.check_image_name(args.rootfs) != "debian":
            raise ConfigError(f"--rootfs {args.rootfs}: the root disk popek builds is debian")
        guest = image.ensure_default_guest(progress=sys.stderr.isatty(), force=args.force)
        print(f"kernel: {guest.kernel}\ninitrd: {guest.initrd}\ncmdline: {guest.cmdline}")
        if args.rootfs is not None:
            root = rootfs.ensure_rootfs(args.rootfs, progress=sys.stderr.isatty(), force=args.force)
            print(f"rootfs: {root.disk}\ncmdline with it: {root.cmdline}")
        return 0
    print(image.image_info())
    return 0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; a guest command is what follows the first `--`, so that options may also come after a
    positional (`popek restore DIR --accel soft -- CMD`: argparse's REMAINDER would take `--accel` as the command).
    Commands without a guest command (exec, ssh, ...) keep argparse's own reading."""
    raw = list(sys.argv[1:] if argv is None else argv)
    if "--" in raw:
        cut = raw.index("--")
        try:
            args = _parser(separated=True).parse_args(raw[:cut])
        except UsageError:
            args = None  # what precedes `--` is not a whole command line of its own (exec NAME ...): as it was
        if args is not None and hasattr(args, "guest_command") and not args.guest_command:
            args.guest_command = raw[cut + 1 :]
            return args
    return _parser().parse_args(raw)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parse(argv)
    except UsageError as e:
        print(f"popek: error: {e} (try {e.prog} --help)", file=sys.stderr)
        return EXIT_ERROR
    if args.command in DAEMON_COMMANDS or args.command in VMFILE_COMMANDS:
        try:
            if args.command in VMFILE_COMMANDS:  # the VM file's verbs, through the daemon
                from popek import cli_vmfile

                return cli_vmfile.run(args)
            return _cmd_daemon(args)
        except KeyboardInterrupt:
            return 128 + signal.SIGINT
        except PopekError as e:
            print(f"popek: error: {e}", file=sys.stderr)
            return EXIT_ERROR
    from popek.vm import HostSignal, stop_on_signals

    try:
        with stop_on_signals():
            if args.command == "run":
                return _cmd_run(args)
            if args.command == "init":
                return _cmd_init(args)
            if args.command == "snapshot":
                return _cmd_snapshot(args)
            if args.command == "restore":
                from popek import cli_agent

                return cli_agent.restore(args, _guest_command(args))
            return _cmd_image(args)
    except HostSignal as e:  # before or after the VM ran: Vm.run turns one that comes while it runs into a Stop
        print(f"popek: stopped by {signal.Signals(e.signum).name}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("popek: interrupted (SIGINT)", file=sys.stderr)
        return 128 + signal.SIGINT
    except (PopekError, KvmError) as e:
        print(f"popek: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # the image builder's errors, and anything unexpected, still end in one line
        from popek import image

        if isinstance(e, image.ImageError):
            print(f"popek: error: {e}", file=sys.stderr)
            return EXIT_ERROR
        raise


if __name__ == "__main__":
    sys.exit(main())
