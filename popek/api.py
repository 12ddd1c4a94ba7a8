"""popek as a Python library: ``popek.VM`` boots a guest and runs commands and moves files in it via its agent.

::

    with popek.VM(cpus=1, mem="512M") as vm:
        r = vm.exec(["uname", "-a"])          # r.stdout, r.stderr, r.exit_code, r.signal, r.duration
        vm.files.write("/tmp/x.py", b"print(42)")
        proc = vm.spawn(["sleep", "100"]); proc.kill()

A VM is a `popek.vm.Vm` whose ``run()`` goes on in a background thread, with a virtio-vsock device (its host
side a Unix socket in a private temporary directory, Firecracker's convention: virtio 1.2 §5.10 in the guest,
``CONNECT <port>`` on the host) through which `popek.agent.AgentClient` reaches the guest agent (docs/
agent-protocol.md). The default guest's init starts the agent on vsock port 1024 (popek/image/init).

Everything that goes wrong is an exception named for its cause: `BootTimeout` (the agent did not answer while the
guest booted), `VMStopped` (the VM ended, whoever ended it, before or while the agent answered; its ``stop`` says
why), and the agent's own errors (popek.agent: CommandStartError, CommandTimeout, RemoteFileError, ...). The VM
errors carry the tail of the guest's console, where a dying kernel says why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, ParamSpec, TypeVar

from popek import migrate as popek_migrate
from popek import snapshot, warm
from popek.accel.exits import Stop, StopReason
from popek.agent import AgentClient, ExecResult, Process, protocol, vsock_unix_connector
from popek.agent.client import Command, OutputCallback, PathLike
from popek.agent.errors import AgentDisconnected, AgentUnavailable
from popek.devices.virtio.blk import DiskSpec
from popek.devices.virtio.net import NetSpec, net_spec, random_mac
from popek.devices.virtio.vsock import VsockSpec
from popek.errors import ConfigError, PopekError
from popek.vm import ACCELS, VIRTIO_IRQS, RunState, Vm, VmSpec

if TYPE_CHECKING:
    from popek.image.rootfs import RootfsImage

AGENT_PORT = 1024  # where the default guest's init starts the agent (popek/image/init)
GUEST_CID = 3  # the first CID a guest may have (virtio 1.2 §5.10.4: 0-2 are reserved); each VM has its own socket
DEFAULT_BOOT_TIMEOUT = 600.0  # the default guest takes ~2 min to boot on nested KVM, more on --accel soft
# every wait for the agent but a command's run: generous, as on a nested KVM host each connection costs the guest
# a fork with ring 0 emulated (seconds); a VM that stops is noticed at once anyway (its connections are cut)
DEFAULT_AGENT_TIMEOUT = 60.0
DEFAULT_RESTORE_TIMEOUT = 120.0  # a restored guest's agent answers at once: a long wait means it is broken
WARM_READY_TIMEOUT = 60.0  # a warm start whose agent does not answer in this time boots cold instead
REFRESH_ENTROPY = 64  # bytes of host entropy a restored guest is reseeded with (512 bits, ChaCha20's key twice)
STOP_GRACE = 2.0  # how long a dropped connection waits for the VM thread to say the VM stopped
JOIN_TIMEOUT = 30.0  # close(): how long the VM thread may take to stop its vCPUs
DEFAULT_CONSOLE_TAIL = 16 << 10  # console bytes an error carries
MAX_CONSOLE_TAIL = 1 << 20  # the serial log keeps this much (popek.vm.SERIAL_TAIL)

P = ParamSpec("P")
R = TypeVar("R")

DiskArg = str | os.PathLike[str] | DiskSpec


class VMError(PopekError):
    """Base of the errors of a popek.VM; ``console_tail`` is the end of the guest's console output."""

    def __init__(self, message: str, console_tail: bytes = b"") -> None:
        super().__init__(message)
        self.console_tail = console_tail


class VMStopped(VMError):
    """The VM stopped before or while the agent answered; ``stop`` (popek.accel.exits.Stop) says why: the guest
    powered off or reset, a VMM error, a timeout, or close()."""

    def __init__(self, message: str, stop: Stop | None, console_tail: bytes = b"") -> None:
        super().__init__(message, console_tail)
        self.stop = stop


class BootTimeout(VMError, AgentUnavailable):
    """The guest agent did not answer within the boot timeout: the guest is still booting, hangs, or has no agent
    (a custom kernel or initrd without popek's init)."""


def _describe(stop: Stop | None) -> str:
    if stop is None:
        return "the VM stopped"
    return f"the VM stopped: {stop.reason.value}" + (f": {stop.detail.splitlines()[0]}" if stop.detail else "")


def _positive(name: str, value: float | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")


def _disk(disk: DiskArg) -> DiskSpec:
    if isinstance(disk, DiskSpec):
        disk.validate()
        return disk
    if isinstance(disk, str):
        return DiskSpec.parse(disk)  # "path[,ro][,serial=ID]", as --disk
    if isinstance(disk, os.PathLike):
        return DiskSpec(Path(disk))
    raise ConfigError(f"a disk is a path, a 'path,ro' string or a DiskSpec, not {type(disk).__name__}")


def _mem(mem: int | str) -> int:
    from popek.cli import parse_size

    if isinstance(mem, bool) or not isinstance(mem, int | str):
        raise ConfigError(f"mem is a number of bytes or a size like '512M', not {type(mem).__name__}")
    return parse_size(mem) if isinstance(mem, str) else mem


class _Runtime:
    """What a started VM owns, apart from the VM object (so weakref.finalize can stop a forgotten one): the Vm,
    the thread running it, the agent connections open on its vsock socket, and the temporary directory."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.vm: Vm | None = None
        self.thread: threading.Thread | None = None
        self.stop: Stop | None = None
        self.stats = ""
        self.io: dict[str, int] = {}
        self.done = threading.Event()
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._lock = threading.Lock()

    def connector(self, inner: Callable[[], socket.socket]) -> Callable[[], socket.socket]:
        """Connections that are cut (shutdown) when the VM stops, so no caller waits for a guest that is gone."""

        def connect() -> socket.socket:
            if self.done.is_set():
                raise AgentUnavailable(_describe(self.stop))
            sock = inner()
            with self._lock:
                self._sockets.add(sock)
            if self.done.is_set():  # the VM stopped while this connected: cut() may have missed it
                self._cut(sock)
            return sock

        return connect

    @staticmethod
    def _cut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def cut_all(self) -> None:
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            self._cut(sock)

    def run(self) -> None:
        vm = self.vm
        assert vm is not None
        try:
            self.stop = vm.run()
        except BaseException as exc:  # a VMM bug still ends in a Stop the caller can read
            self.stop = Stop(StopReason.ERROR, f"{type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(Exception):
                self.stats = vm.stats()  # for VM.stats() and io_counters() after the VM is gone
                self.io = vm.io_counters()
            self.done.set()
            self.cut_all()

    def shutdown(self) -> None:
        """Stop the VM, wait (bounded) for its thread, close it and remove the directory. Runs once (finalize)."""
        vm = self.vm
        thread = self.thread
        if vm is not None:
            if thread is not None and thread.is_alive():
                vm.request_stop(Stop(StopReason.USER_QUIT, "the popek.VM was closed"))
                thread.join(JOIN_TIMEOUT)
            if thread is None or not thread.is_alive():
                vm.close()
            # else: vCPU threads still run in it; closing its memory under them would crash the process
        self.done.set()
        self.cut_all()
        shutil.rmtree(self.workdir, ignore_errors=True)


class _ConsoleSink:
    """The serial log's sink (called on a vCPU thread): the user's console callback. One that raises is dropped
    (kept in ``error``) rather than stopping the VM. Apart from the VM object, so the Vm does not keep it alive."""

    def __init__(self, callback: Callable[[bytes], object] | None) -> None:
        self.callback = callback
        self.error: Exception | None = None

    def __call__(self, data: bytes) -> None:
        if self.callback is None:
            return
        try:
            self.callback(data)
        except Exception as exc:
            self.error = exc
            self.callback = None


class GuestFiles:
    """VM.files: popek.agent.Files (read, read_to, write, list, stat, remove, mkdir) whose failures caused by the
    VM stopping are VMStopped."""

    def __init__(self, vm: VM, client: AgentClient) -> None:
        files = client.files
        self.read = vm._guarded(files.read)
        self.read_to = vm._guarded(files.read_to)
        self.write = vm._guarded(files.write)
        self.list = vm._guarded(files.list)
        self.stat = vm._guarded(files.stat)
        self.remove = vm._guarded(files.remove)
        self.mkdir = vm._guarded(files.mkdir)


class GuestProcess:
    """A command VM.spawn started: popek.agent.Process (read, write, close_stdin, kill, resize, poll, wait,
    close), whose failures caused by the VM stopping are VMStopped."""

    def __init__(self, vm: VM, process: Process) -> None:
        self.process = process
        self.pid = process.pid
        self.read = vm._guarded(process.read)
        self.write = vm._guarded(process.write)
        self.close_stdin = vm._guarded(process.close_stdin)
        self.kill = vm._guarded(process.kill)
        self.resize = vm._guarded(process.resize)
        self.poll = vm._guarded(process.poll)
        self.wait = vm._guarded(process.wait)

    def close(self) -> None:
        """Close the connection: the agent kills the command if it still runs."""
        self.process.close()

    def __enter__(self) -> GuestProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VM:
    """A guest VM driven from Python. The arguments mirror ``popek run``'s options; kernel=None boots popek's
    default guest (built into the cache first if needed), whose command line ``append`` extends; image="debian"
    boots it into popek's Debian 12 root disk instead of its busybox initramfs (popek/image/rootfs.py: built on
    first use, each VM on its own copy-on-write clone, the first disk /dev/vda). The VM boots on
    ``with`` (or start()) and is stopped by close(); a VM never closed is stopped when it is garbage-collected or
    at interpreter exit (weakref.finalize)."""

    def __init__(
        self,
        *,
        kernel: str | os.PathLike[str] | None = None,
        initrd: str | os.PathLike[str] | None = None,
        image: str = "default",
        append: str | None = None,
        mem: int | str = "512M",
        cpus: int = 1,
        accel: str = "kvm",
        cpu_template: str = "portable",
        disks: Sequence[DiskArg] = (),
        rng: bool = False,
        console2: str | os.PathLike[str] | None = None,
        acpi: bool = True,
        eventfds: bool = True,
        kvm_device: str = "/dev/kvm",
        vsock: VsockSpec | None = None,
        net: str | NetSpec | None = None,
        ports: Sequence[str] = (),
        timeout: float | None = None,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
        agent_timeout: float = DEFAULT_AGENT_TIMEOUT,
        agent_port: int = AGENT_PORT,
        console: Callable[[bytes], object] | None = None,
        console_tail: int = DEFAULT_CONSOLE_TAIL,
        cold: bool = False,
        virtual_time: bool = False,
    ) -> None:
        if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
            raise ConfigError(f"cpus must be a whole number of at least 1, not {cpus!r}")
        if accel not in ACCELS or accel == "lockstep":
            raise ConfigError(f"accel must be 'kvm' or 'soft' (a VM's agent needs a virtio device), not {accel!r}")
        if isinstance(disks, str | bytes | os.PathLike):
            raise ConfigError("disks is a list of disks: disks=[path]")
        _positive("timeout", timeout, optional=True)
        _positive("boot_timeout", boot_timeout)
        _positive("agent_timeout", agent_timeout)
        if isinstance(agent_port, bool) or not isinstance(agent_port, int) or not 0 <= agent_port < 1 << 32:
            raise ConfigError(f"agent_port must be a vsock port (0 to 2**32-1), not {agent_port!r}")
        if isinstance(console_tail, bool) or not isinstance(console_tail, int) or console_tail < 0:
            raise ConfigError(f"console_tail must be a number of bytes, not {console_tail!r}")
        if console is not None and not callable(console):
            raise ConfigError("console must be a callable taking bytes")
        if append is not None and not isinstance(append, str):
            raise ConfigError(f"append must be a string, not {type(append).__name__}")
        from popek.image import rootfs

        self.image = rootfs.check_image_name(image)
        if self.image != rootfs.DEFAULT_IMAGE and (kernel is not None or initrd is not None):
            raise ConfigError(f"image={self.image!r} boots the default kernel and initramfs: give no kernel or initrd")
        self.kernel = None if kernel is None else Path(kernel)
        self.initrd = None if initrd is None else Path(initrd)
        self.append = append
        self.mem = _mem(mem)
        self.cpus = cpus
        self.accel = accel
        self.cpu_template = cpu_template
        self.disks = [_disk(disk) for disk in disks]
        self.rng = bool(rng)
        self.console2 = None if console2 is None else Path(console2)
        self.acpi = bool(acpi)
        self.eventfds = bool(eventfds)
        self.kvm_device = kvm_device
        if vsock is not None and not isinstance(vsock, VsockSpec):
            raise ConfigError(f"vsock is a VsockSpec(cid, uds_path), not {type(vsock).__name__}")
        if vsock is not None:
            vsock.validate()
        self.vsock = vsock
        if isinstance(net, NetSpec):
            if ports:
                raise ConfigError("ports go into the NetSpec (its forwards) when net is a NetSpec")
            net.validate()
            self.net: NetSpec | None = net
        elif net is None or isinstance(net, str):
            if isinstance(ports, str):
                raise ConfigError('ports is a list of "HOST:GUEST" strings: ports=["8080:80"]')
            self.net = net_spec(net, list(ports))
        else:
            raise ConfigError(f"net is 'passt', 'tap:NAME[,mac=..]' or a NetSpec, not {type(net).__name__}")
        self.timeout = timeout
        self.boot_timeout = float(boot_timeout)
        self.agent_timeout = float(agent_timeout)
        self.agent_port = agent_port
        self.console_tail_size = min(console_tail, MAX_CONSOLE_TAIL)
        self._console = _ConsoleSink(console)
        self._runtime: _Runtime | None = None
        self._client: AgentClient | None = None
        self._files: GuestFiles | None = None
        self._uds = Path()
        self._finalizer: weakref.finalize[[], VM] | None = None
        self._start_lock = threading.Lock()
        self.cold = bool(cold)
        self.virtual_time = bool(virtual_time)  # soft only: an idle guest jumps to its next timer (VmSpec)
        self._restore_from: Path | None = None  # VM.restore's snapshot
        self._snapshot_mac: bytes | None = None  # the MAC of the snapshot's virtio-net, which the guest still has
        self._incoming: socket.socket | None = None  # VM.incoming's listening socket
        self.restored = False  # this VM started from a snapshot (VM.restore, or a warm start)
        self.warm_started = False  # ... from the default guest's warm snapshot (popek.warm)
        self._refreshed = False
        self._take_warm: tuple[Path, str] | None = None  # where this cold-booted VM's warm snapshot goes
        self._check_spec()

    # --- the VM's description

    def _guest(self) -> tuple[Path, Path | None, str, RootfsImage | None]:
        """Kernel, initrd, command line and root disk: the default guest's (with append) unless a kernel was
        given; with image="debian" the cached Debian root disk (built first if need be) and its command line."""
        if self.kernel is not None:
            return self.kernel, self.initrd, self.append or "", None
        from popek import image
        from popek.image import rootfs

        root = None
        if self.image == "debian":
            root = rootfs.ensure_rootfs(self.image, progress=False)
            guest, base = root.guest, root.cmdline
        else:
            guest = image.ensure_default_guest(progress=False)
            base = guest.cmdline
        cmdline = " ".join(part for part in (base, self.append) if part)
        return guest.kernel, self.initrd or guest.initrd, cmdline, root

    def _spec(
        self, kernel: Path, initrd: Path | None, cmdline: str, vsock: VsockSpec | None, root_disk: Path | None = None
    ) -> VmSpec:
        """The VmSpec, with the vsock device the agent is reached through and the root disk (vda) if any."""
        from popek.image import rootfs

        disks = list(self.disks)
        if root_disk is not None:
            disks.insert(0, DiskSpec(root_disk, serial=rootfs.ROOT_SERIAL))
        return VmSpec(
            kernel=kernel,
            initrd=initrd,
            cmdline=cmdline,
            mem=self.mem,
            cpus=self.cpus,
            accel=self.accel,
            cpu_template=self.cpu_template,
            timeout=self.timeout,
            kvm_device=self.kvm_device,
            acpi=self.acpi,
            disks=disks,
            rng=self.rng,
            console2=self.console2,
            kvm_eventfds=self.eventfds,
            vsock=vsock,
            net=self.net,
            virtual_time=self.virtual_time,
        )

    def _check_spec(self) -> None:
        """What VmSpec.validate refuses, refused here, before anything is built or booted."""
        spec = self._spec(Path("unused"), None, "", None, Path("unused") if self.image == "debian" else None)
        spec.validate()
        if spec.virtio_devices + 1 > len(VIRTIO_IRQS):  # the vsock device is one more
            raise ConfigError(
                f"at most {len(VIRTIO_IRQS) - 1} virtio devices besides the agent's vsock device (one free ISA "
                f"IRQ each), not {spec.virtio_devices}"
            )

    # --- life cycle

    def start(self, wait: bool = True) -> VM:
        """Boot the VM and (with wait) wait for its agent, at most boot_timeout s: BootTimeout, VMStopped.
        Without wait, the guest boots on while this returns; wait_ready() waits for the agent later.

        The default guest with popek's own devices only starts warm (popek.warm): restored from a snapshot taken
        once after its agent first answered (unless cold=True); the first such VM boots, and takes it when its
        agent first answers (in wait_ready)."""
        with self._start_lock:
            if self._runtime is not None:
                raise VMError("this popek.VM was already started (a VM boots once; make a new one)")
            warm_key = self._warm_key()
            if warm_key is not None:
                from popek import image

                cache = image.cache_dir()
                source = warm.find(cache, warm_key)
                if source is not None:
                    try:
                        self._launch(source)
                        self.warm_started = True
                        if wait:
                            self.wait_ready(timeout=min(self.boot_timeout, WARM_READY_TIMEOUT))
                        return self
                    except (snapshot.SnapshotError, VMError, AgentUnavailable, AgentDisconnected):
                        self._abandon()  # a snapshot of another host CPU, a damaged one: boot cold, replace it
                        warm.discard(cache, warm_key)
                    except BaseException:
                        self.close()
                        raise
                self._take_warm = (cache, warm_key)
            self._launch(self._restore_from)
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.close()
                raise
        return self

    def _ready(self) -> None:
        """Once the agent first answers: a restored guest is refreshed (`_refresh_identity`), and a freshly
        booted one that can start others warm takes the warm snapshot. A warm snapshot that cannot be written
        (a full disk) only costs the next VM its warm start."""
        if self.restored and not self._refreshed:
            self._refresh_identity()
            self._refreshed = True
        if self._take_warm is not None:
            cache, warm_key = self._take_warm
            self._take_warm = None
            with contextlib.suppress(PopekError, OSError):
                self._save_warm(cache, warm_key)

    def _launch(self, source: Path | None) -> None:
        """Build the VM (booted from its kernel, or restored from `source`) and start its thread."""
        workdir = Path(tempfile.mkdtemp(prefix="popek-vm-"))
        runtime = _Runtime(workdir)
        self._runtime = runtime
        self._finalizer = weakref.finalize(self, runtime.shutdown)
        try:
            vsock = self.vsock or VsockSpec(GUEST_CID, workdir / "vsock.sock")
            uds = self._uds = vsock.uds_path
            if self._incoming is not None:
                listener, self._incoming = self._incoming, None
                with listener:
                    conn, _ = listener.accept()
                with conn:
                    # the same machine on the same host: its own vsock socket, the source's disks and network kind
                    own = functools.partial(self._own_vsock, vsock)
                    runtime.vm = popek_migrate.receive(conn, self._console, own)
                spec = runtime.vm.spec
                self.mem, self.cpus, self.accel, self.cpu_template = spec.mem, spec.cpus, spec.accel, spec.cpu_template
            elif source is None:
                from popek.image import rootfs

                kernel, initrd, cmdline, root = self._guest()
                # the run's own copy-on-write clone (in workdir, removed with it): the cached disk stays pristine
                root_disk = rootfs.clone_disk(root, workdir) if root is not None else None
                runtime.vm = Vm(self._spec(kernel, initrd, cmdline, vsock, root_disk), console=self._console)
            else:
                runtime.vm = Vm.restore(source, self._console, adjust=functools.partial(self._adjust, vsock))
                self.restored = True
            runtime.thread = threading.Thread(target=runtime.run, name="popek-vm", daemon=True)
            runtime.thread.start()
            connect = runtime.connector(vsock_unix_connector(uds, self.agent_port, self.agent_timeout))
            self._client = AgentClient(connect, timeout=self.agent_timeout)
            self._files = GuestFiles(self, self._client)
        except BaseException:
            self.close()
            raise

    def _abandon(self) -> None:
        """Stop and forget a VM that did not start right, so that start() can build another."""
        self.close()
        self._runtime = self._client = self._files = self._finalizer = None
        self.restored = self.warm_started = self._refreshed = False

    def _adjust(self, vsock: VsockSpec, saved: VmSpec) -> VmSpec:
        """A restored VM's spec: the snapshot's machine, with this VM's own host resources and limits."""
        return dataclasses.replace(
            saved, vsock=vsock, timeout=self.timeout, disks=list(self.disks), net=self.net, accel=self.accel,
            virtual_time=self.virtual_time,
        )

    def _own_vsock(self, vsock: VsockSpec, saved: VmSpec) -> VmSpec:
        return dataclasses.replace(saved, vsock=vsock, timeout=self.timeout, virtual_time=self.virtual_time)

    def _warm_key(self) -> str | None:
        """The warm snapshot key of this VM, or None if it cannot start warm (see popek.warm)."""
        from popek.image import rootfs

        # a vsock socket of the caller's is fine: every restored VM gets its own socket (and CID) anyway
        own_devices_only = not self.disks and self.net is None and self.console2 is None
        default_guest = self.kernel is None and self.initrd is None and self.image == rootfs.DEFAULT_IMAGE
        elsewhere = self._restore_from is not None or self._incoming is not None  # a snapshot's, a migration's
        if self.cold or elsewhere or not default_guest or not own_devices_only:
            return None
        from popek import image

        guest = image.ensure_default_guest(progress=False)
        cmdline = " ".join(part for part in (guest.cmdline, self.append) if part)
        shape = {"mem": self.mem, "cpus": self.cpus, "accel": self.accel, "cpu_template": self.cpu_template,
                 "acpi": self.acpi, "eventfds": self.eventfds, "rng": self.rng, "agent_port": self.agent_port,
                 "kvm_device": self.kvm_device}  # fmt: skip
        if self.virtual_time:
            shape["virtual_time"] = True  # only when set, so the warm snapshots of every other VM keep their key
        return warm.key(guest.key, cmdline, shape)

    def _save_warm(self, cache: Path, warm_key: str) -> None:
        """Take this freshly booted VM's warm snapshot (paused for the time it takes), for the VMs after it."""
        folder = warm.staging(cache, warm_key)
        try:
            self.snapshot(folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        warm.publish(folder, cache, warm_key)

    def _refresh_identity(self) -> None:
        """A restored guest is a clone: its clock says when the snapshot was taken and its kernel's random
        generator is the snapshot's, as every other clone's. The agent sets the clock to the host's and
        reseeds the generator from fresh host entropy (docs/agent-protocol.md, REFRESH) before any command. A
        clone's network device has a MAC of its own (VM.restore), which the guest's interface takes here: Linux
        read the snapshot's at probe time."""
        assert self._client is not None
        mac = None
        if self._snapshot_mac is not None and self.net is not None and self.net.mac != self._snapshot_mac:
            mac = (self._snapshot_mac, self.net.mac)
        with self._guard():
            self._client.refresh(time_ns=time.time_ns(), entropy=os.urandom(REFRESH_ENTROPY), mac=mac)

    def migrate(self, address: str) -> popek_migrate.MigrationStats:
        """Move this running VM to the popek waiting in VM.incoming(address) (a Unix socket path, or
        tcp:HOST:PORT): pre-copy while the guest runs, then a short stop-and-copy (popek.migrate). On success this
        VM has stopped (StopReason.MIGRATED) and the guest goes on there, its processes included; on failure
        (MigrationError) it runs on here."""
        stats = popek_migrate.send(self._machine(), popek_migrate.connect(address))
        runtime = self._started()
        runtime.done.wait(JOIN_TIMEOUT)
        return stats

    @classmethod
    def incoming(
        cls,
        address: str,
        *,
        timeout: float | None = None,
        boot_timeout: float = DEFAULT_RESTORE_TIMEOUT,
        agent_timeout: float = DEFAULT_AGENT_TIMEOUT,
        agent_port: int = AGENT_PORT,
        console: Callable[[bytes], object] | None = None,
        console_tail: int = DEFAULT_CONSOLE_TAIL,
    ) -> VM:
        """A VM that, on start(), waits for one migration on `address` (VM.migrate from another popek) and runs
        the guest it receives, with a vsock socket of its own. The listening socket exists when this returns, so
        the source can connect at once."""
        vm = cls(
            timeout=timeout, boot_timeout=boot_timeout, agent_timeout=agent_timeout, agent_port=agent_port,
            console=console, console_tail=console_tail, cold=True,
        )  # fmt: skip
        vm._incoming = popek_migrate.listen(address)
        return vm

    @classmethod
    def restore(
        cls,
        path: str | os.PathLike[str],
        *,
        disks: Sequence[DiskArg] | None = None,
        net: str | NetSpec | None = None,
        accel: str | None = None,
        virtual_time: bool = False,
        timeout: float | None = None,
        boot_timeout: float = DEFAULT_RESTORE_TIMEOUT,
        agent_timeout: float = DEFAULT_AGENT_TIMEOUT,
        agent_port: int = AGENT_PORT,
        console: Callable[[bytes], object] | None = None,
        console_tail: int = DEFAULT_CONSOLE_TAIL,
    ) -> VM:
        """A VM that starts (``with``, or start()) from the snapshot in `path` (VM.snapshot, ``popek snapshot``)
        instead of booting: the same machine, with a vsock socket of its own, the disks and network given here
        (by default the snapshot's disk paths and network kind; the disks must hold what the guest expects),
        its clock and RNG refreshed. A clone is a machine of its own on the network too: its virtio-net device
        gets a random MAC (unless `net` names one) and the guest's interface takes it when the agent first
        answers, so clones on one bridge do not answer ARP with one address. `accel` restores the snapshot on
        another backend (kvm <-> soft, docs/snapshot-state.md "Across backends"): what the other backend cannot
        take is a SnapshotError naming it. popek.snapshot.SnapshotError for a snapshot that cannot restore."""
        from popek import vm_snapshot

        saved = snapshot.read(path)
        spec: VmSpec = vm_snapshot.spec_from_state(vm_snapshot.parse_state(saved.state)["spec"])
        if net is None and spec.net is not None:
            net = dataclasses.replace(spec.net, mac=random_mac())  # the snapshot's network kind, a MAC of its own
        vm = cls(
            kernel=spec.kernel, mem=spec.mem, cpus=spec.cpus, accel=spec.accel if accel is None else accel,
            cpu_template=spec.cpu_template, disks=spec.disks if disks is None else disks, rng=spec.rng,
            acpi=spec.acpi, eventfds=spec.kvm_eventfds, kvm_device=spec.kvm_device, net=net, timeout=timeout,
            boot_timeout=boot_timeout, agent_timeout=agent_timeout, agent_port=agent_port, console=console,
            console_tail=console_tail, cold=True, virtual_time=virtual_time,
        )  # fmt: skip
        vm._restore_from = Path(path)
        vm._snapshot_mac = spec.net.mac if spec.net is not None else None
        return vm

    def wait_ready(self, timeout: float | None = None) -> float:
        """Wait for the guest agent (timeout: the boot_timeout by default): the seconds it took. BootTimeout if
        it does not answer in time, VMStopped if the VM stops first."""
        _positive("timeout", timeout, optional=True)
        runtime = self._started()
        assert self._client is not None
        limit = self.boot_timeout if timeout is None else timeout
        started = time.monotonic()
        deadline = started + limit
        while True:
            if runtime.done.is_set():
                raise VMStopped(f"{_describe(runtime.stop)} before its agent answered", runtime.stop, self.console_tail)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BootTimeout(
                    f"the guest agent did not answer within {limit:g} s of the boot (is the guest still booting? "
                    "does its initrd start popek's agent?)",
                    self.console_tail,
                )
            try:
                # one PING per round, bounded by what is left of the boot timeout
                wait = min(self.agent_timeout, max(remaining, 0.5))
                probe = AgentClient(
                    runtime.connector(vsock_unix_connector(self._uds, self.agent_port, wait)), timeout=wait
                )
                probe.wait_ready(timeout=min(1.0, remaining), interval=0.1)
                self._ready()
                return time.monotonic() - started
            except (AgentUnavailable, AgentDisconnected):
                continue

    def __enter__(self) -> VM:
        """Start the VM (unless start() already did) and wait for its agent."""
        if self._runtime is None:
            return self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the VM (bounded wait for its vCPUs), close its devices and memory, remove its socket. Idempotent."""
        if self._finalizer is not None:
            self._finalizer()

    def wait(self, timeout: float | None = None) -> Stop | None:
        """Wait for the VM to stop by itself (the guest powers off or resets): its Stop, or None after timeout."""
        runtime = self._started()
        return runtime.stop if runtime.done.wait(timeout) else None

    # --- pause, resume, snapshots

    def pause(self) -> None:
        """Stop the guest between two instructions, its devices held (popek.vm.Vm.pause); resume() goes on."""
        self._machine().pause()

    def resume(self) -> None:
        self._machine().resume()

    @property
    def paused(self) -> bool:
        vm = None if self._runtime is None else self._runtime.vm
        return vm is not None and vm.state is RunState.PAUSED

    def snapshot(self, path: str | os.PathLike[str], *, diff: bool = False) -> snapshot.Manifest:
        """Write the VM into the snapshot directory `path` (popek.snapshot): a running VM is paused for the time
        it takes and resumed after, a paused one stays paused. diff: only the pages written since this VM's last
        full snapshot into `path`. VM.restore(path) starts a clone of it. Returns what was written (generation,
        sizes, a diff's pages)."""
        vm = self._machine()
        running = vm.state is RunState.RUNNING
        if running:
            vm.pause()
        try:
            return vm.snapshot(path, diff=diff)
        finally:
            if running:
                vm.resume()

    def _machine(self) -> Vm:
        runtime = self._started()
        if runtime.done.is_set() or runtime.vm is None:
            raise VMStopped(_describe(runtime.stop), runtime.stop, self.console_tail)
        return runtime.vm

    # --- state

    @property
    def running(self) -> bool:
        return self._runtime is not None and not self._runtime.done.is_set()

    @property
    def stop_reason(self) -> Stop | None:
        """Why the VM stopped, once it has."""
        return None if self._runtime is None else self._runtime.stop

    @property
    def console_tail(self) -> bytes:
        """The last console_tail bytes the guest wrote to its serial console."""
        vm = None if self._runtime is None else self._runtime.vm
        if vm is None or not self.console_tail_size:
            return b""
        return bytes(vm.serial_log.tail[-self.console_tail_size :])

    def stats(self) -> str:
        """Exit, device and assist counts (as ``popek run --stats`` prints them), also after the VM stopped."""
        runtime = self._started()
        if runtime.done.is_set():
            return runtime.stats
        assert runtime.vm is not None
        return runtime.vm.stats()

    def io_counters(self) -> dict[str, int]:
        """The bytes the VM's disks, network and vsock devices moved so far (popek.vm.IO_COUNTERS)."""
        runtime = self._started()
        if runtime.done.is_set() or runtime.vm is None:
            return runtime.io
        return runtime.vm.io_counters()

    @property
    def client(self) -> AgentClient:
        """The AgentClient this VM's calls go through (its errors are not turned into VMStopped)."""
        self._started()
        assert self._client is not None
        return self._client

    def _started(self) -> _Runtime:
        if self._runtime is None:
            raise VMError("the popek.VM is not started: use it in a with block, or call start()")
        return self._runtime

    @contextlib.contextmanager
    def _guard(self) -> Iterator[_Runtime]:
        """Turn the agent's 'no answer' / 'connection dropped' into VMStopped when the VM is why."""
        runtime = self._started()
        if runtime.done.is_set():
            raise VMStopped(_describe(runtime.stop), runtime.stop, self.console_tail)
        if self._client is None:
            raise VMError("the popek.VM did not finish starting")
        try:
            yield runtime
        except (AgentUnavailable, AgentDisconnected) as exc:
            if runtime.done.wait(STOP_GRACE):
                raise VMStopped(
                    f"{_describe(runtime.stop)} while the agent answered", runtime.stop, self.console_tail
                ) from exc
            raise

    def _guarded(self, call: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(call)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            with self._guard():
                return call(*args, **kwargs)

        return guarded

    # --- the agent

    @property
    def files(self) -> GuestFiles:
        """File operations in the guest (popek.agent.Files)."""
        self._started()
        if self._files is None:
            raise VMError("the popek.VM did not finish starting")
        return self._files

    def exec(
        self,
        command: Command,
        *,
        env: Mapping[str | bytes, str | bytes | None] | None = None,
        clear_env: bool = False,
        cwd: PathLike | None = None,
        stdin: bytes | IO[bytes] | None = None,
        timeout: float | None = None,
        kill_grace: float = protocol.DEFAULT_KILL_GRACE_MS / 1000,
        pty: tuple[int, int] | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        check: bool = False,
    ) -> ExecResult:
        """Run a command to its end (AgentClient.exec): an argv list (looked up in the guest's PATH) or a shell
        string (/bin/sh -c). timeout: the agent kills it after that many seconds (result.timed_out; with
        check=True, CommandTimeout). Callbacks take the output as it comes (it is then not in the result).
        Any number of threads may call this at once: each call has a connection of its own."""
        with self._guard():
            assert self._client is not None
            return self._client.exec(
                command,
                env=env,
                clear_env=clear_env,
                cwd=cwd,
                stdin=stdin,
                timeout=timeout,
                kill_grace=kill_grace,
                pty=pty,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
                check=check,
            )

    def spawn(
        self,
        command: Command,
        *,
        env: Mapping[str | bytes, str | bytes | None] | None = None,
        clear_env: bool = False,
        cwd: PathLike | None = None,
        stdin: bool = True,
        timeout: float | None = None,
        kill_grace: float = protocol.DEFAULT_KILL_GRACE_MS / 1000,
        pty: tuple[int, int] | None = None,
    ) -> GuestProcess:
        """Start a command and return at once (AgentClient.spawn); the GuestProcess reads, writes, kills it."""
        with self._guard():
            assert self._client is not None
            process = self._client.spawn(
                command,
                env=env,
                clear_env=clear_env,
                cwd=cwd,
                stdin=stdin,
                timeout=timeout,
                kill_grace=kill_grace,
                pty=pty,
            )
        return GuestProcess(self, process)
