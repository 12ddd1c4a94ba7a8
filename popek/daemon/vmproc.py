"""One VM's process: ``python -m popek.daemon.vmproc DIR`` builds the VM that DIR/spec.json describes with
popek.VM (popek/api.py), and serves a small control API on DIR/control.sock while it runs.

The daemon (popek/daemon/supervisor.py) starts one such process per VM, so a VMM that crashes or is killed takes
only its own VM down. The process keeps to its directory:

- ``vsock.sock``: the VM's vsock device, Firecracker's host-side convention (``CONNECT <port>``), through which the
  daemon reaches the guest agent itself (exec and files never pass through this process);
- ``control.sock``: JSON lines, one request ``{"op": ...}`` and one answer per line, an asyncio stream server
  (no HTTP here: the daemon is the only client). Ops: status, stats, pause, resume, snapshot, stop;
- ``console.log``: the guest's serial console, appended as it comes (at most CONSOLE_LIMIT bytes);
- ``exit.json``: written as the process ends, why the VM stopped (the daemon reads it; a process that is killed
  writes none, which is how the daemon tells a crash from a stop).

Pause, resume and snapshot call popek.VM's methods of those names; a VM in the wrong state answers
``{"error": ..., "status": 409}``, which the daemon passes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONSOLE_LIMIT = 64 << 20  # console bytes kept on disk; a guest that writes more is cut off (said in the log)
MAX_REQUEST = 64 << 10
SPEC_FILE = "spec.json"
CONTROL = "control.sock"
VSOCK = "vsock.sock"
CONSOLE = "console.log"
EXIT_FILE = "exit.json"
HOST_PID: int | None = None  # a jailed VM process is PID 1 of its own namespace: the pid the daemon sees is this


class ConsoleFile:
    """The console sink: appends the guest's output to console.log, bounded by CONSOLE_LIMIT."""

    def __init__(self, path: Path, limit: int = CONSOLE_LIMIT) -> None:
        self.file = path.open("ab", buffering=0)
        self.limit = limit
        self.written = 0
        self.cut = False
        self.lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        with self.lock:
            if self.cut:
                return
            chunk = data[: self.limit - self.written]
            if len(chunk) < len(data):
                chunk += b"\n[popek: console log limit reached; further output dropped]\n"
                self.cut = True
            self.file.write(chunk)
            self.written += len(chunk)


def method_call(target: object, op: str, *args: object) -> dict[str, Any]:
    """Call popek.VM's pause, resume or snapshot: the answer, or the VM's own error as a 409 (the wrong state)."""
    method = getattr(target, op)
    try:
        method(*args)
    except Exception as exc:  # the VM's own errors are the client's answer, not this process's end
        return {"error": f"{op} failed: {type(exc).__name__}: {exc}", "status": 409}
    return {"ok": True}


class Controller:
    """The VM and what the control API reports of it."""

    def __init__(self, vm: Any, stop_event: asyncio.Event, loop: asyncio.AbstractEventLoop) -> None:
        self.vm = vm
        self.state = "booting"
        self.boot_error: str | None = None
        self.stop_event = stop_event
        self.loop = loop

    def wait_ready(self) -> None:
        """Runs on a thread: the VM is 'running' once its agent answers (popek.VM.wait_ready)."""
        try:
            self.vm.wait_ready()
        except Exception as exc:
            self.boot_error = f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            self.loop.call_soon_threadsafe(self.stop_event.set)
            return
        if self.state == "booting":
            self.state = "running"

    def watch(self) -> None:
        """Runs on a thread: ends the process when the VM stops by itself (poweroff, reset, VMM error)."""
        self.vm.wait()
        self.loop.call_soon_threadsafe(self.stop_event.set)

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "status":
            return {"state": self.state, "pid": HOST_PID or os.getpid(), "boot_error": self.boot_error}
        if op == "stats":
            try:
                return {"stats": self.vm.stats(), "io": self.vm.io_counters()}
            except Exception as exc:
                return {"error": f"stats: {exc}", "status": 409}
        if op == "pause":
            if self.state != "running":
                return {"error": f"the VM is {self.state}, not running", "status": 409}
            answer = method_call(self.vm, "pause")
            if "ok" in answer:
                self.state = "paused"
            return answer
        if op == "resume":
            if self.state != "paused":
                return {"error": f"the VM is {self.state}, not paused", "status": 409}
            answer = method_call(self.vm, "resume")
            if "ok" in answer:
                self.state = "running"
            return answer
        if op == "snapshot":
            path = request.get("path")
            if not isinstance(path, str):
                return {"error": "snapshot needs a path", "status": 422}
            return method_call(self.vm, "snapshot", path)
        if op == "stop":
            self.loop.call_soon_threadsafe(self.stop_event.set)
            return {"ok": True}
        return {"error": f"unknown op {op!r}", "status": 400}


async def serve_control(path: Path, handle: Callable[[dict[str, Any]], dict[str, Any]]) -> asyncio.Server:
    """The control socket: one JSON request per line, one JSON answer per line; ops run on a thread (the VM's
    methods block). Mode 0600 as the daemon's own socket: only its owner drives the VM."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("a request is a JSON object")
                    answer = await asyncio.to_thread(handle, request)
                except ValueError as exc:
                    answer = {"error": f"bad request: {exc}", "status": 400}
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    old = os.umask(0o177)
    try:
        return await asyncio.start_unix_server(client, path=str(path), limit=MAX_REQUEST)
    finally:
        os.umask(old)


def build_vm(spec: dict[str, Any], workdir: Path, console: ConsoleFile) -> Any:
    """popek.VM from the daemon's spec (models.VmCreate), its vsock socket in workdir; or popek.VM.restore for a
    snapshot, where this popek has it."""
    import popek
    from popek.api import GUEST_CID
    from popek.devices.virtio.vsock import VsockSpec

    vsock = VsockSpec(GUEST_CID, workdir / VSOCK)
    if spec.get("snapshot"):
        vm = popek.VM.restore(spec["snapshot"], console=console, boot_timeout=spec.get("boot_timeout", 600.0))
        vm.vsock = vsock  # in workdir, where the daemon reaches the agent (start() gives the clone this socket)
        vm.start(wait=False)  # restore() returns a VM that starts from the snapshot instead of booting
        return vm
    vm = popek.VM(
        kernel=spec.get("kernel"),
        initrd=spec.get("initrd"),
        append=spec.get("cmdline"),
        mem=spec.get("mem", "512M"),
        cpus=spec.get("cpus", 1),
        accel=spec.get("accel", "kvm"),
        disks=spec.get("disks", []),
        rng=spec.get("rng", False),
        net=spec.get("net"),
        ports=spec.get("ports", []),
        vsock=vsock,
        boot_timeout=spec.get("boot_timeout", 600.0),
        console=console,
    )
    vm.start(wait=False)
    return vm


def write_exit(workdir: Path, cause: str, **extra: object) -> None:
    tmp = workdir / (EXIT_FILE + ".tmp")
    tmp.write_text(json.dumps({"cause": cause, "time": time.time(), **extra}))
    tmp.replace(workdir / EXIT_FILE)


def jail(spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Confine this process (popek.jail, docs/daemon.md "Confinement") before the VM is built: the spec with the
    default guest's kernel, initrd and command line made explicit (its cache is not in the jail, and a jailed VM
    boots cold: the warm snapshots are not either). Everything else the VM uses is under workdir or bound."""
    from popek import image
    from popek.devices.virtio.blk import DiskSpec
    from popek.devices.virtio.net import net_spec
    from popek.jail import confine_vm

    spec = dict(spec)
    if not spec.get("snapshot") and spec.get("kernel") is None:
        guest = image.ensure_default_guest(progress=False)
        spec["kernel"] = str(guest.kernel)
        spec["initrd"] = str(spec.get("initrd") or guest.initrd)
        spec["cmdline"] = " ".join(part for part in (guest.cmdline, spec.get("cmdline")) if part)
    confine_vm(
        workdir=workdir,
        kernel=spec.get("kernel"),
        initrd=spec.get("initrd"),
        disks=[DiskSpec.parse(text) for text in spec.get("disks", [])],
        net=net_spec(spec.get("net"), spec.get("ports", [])),
        accel=spec.get("accel", "kvm"),
        readonly=[spec["snapshot"]] if spec.get("snapshot") else [],
    )
    return spec


async def amain(workdir: Path, spec: dict[str, Any] | None = None) -> int:
    if spec is None:
        spec = json.loads((workdir / SPEC_FILE).read_text())
    loop = asyncio.get_running_loop()
    stop_event = asyncio.Event()
    requested: list[str] = []

    def on_signal(signum: int) -> None:
        requested.append(signal.Signals(signum).name)
        stop_event.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    # The VM is built on a worker thread (its boot blocks), where a backend cannot install a signal handler: the
    # KVM backend's vCPU kick (SIGUSR1, whose default action ends the process) is made harmless here, on the main
    # thread, before any vCPU thread exists.
    from popek.accel.kvm import install_kick_handler

    install_kick_handler()
    console = ConsoleFile(workdir / CONSOLE)
    try:
        vm = await asyncio.to_thread(build_vm, spec, workdir, console)
    except Exception as exc:
        write_exit(workdir, f"the VM could not be built: {type(exc).__name__}: {exc}", failed=True)
        return 2
    controller = Controller(vm, stop_event, loop)
    server = await serve_control(workdir / CONTROL, controller.handle)
    threading.Thread(target=controller.wait_ready, daemon=True).start()
    threading.Thread(target=controller.watch, daemon=True).start()
    try:
        await stop_event.wait()
    finally:
        server.close()
        stop = getattr(vm, "stop_reason", None)
        if requested:
            cause = f"stopped by {requested[0]}"
        elif controller.boot_error is not None:
            cause = f"boot failed: {controller.boot_error}"
        elif stop is not None:
            cause = f"the VM stopped: {stop.reason.value}" + (f": {stop.detail}" if stop.detail else "")
        else:
            cause = "stopped on request"
        failed = controller.boot_error is not None or (
            stop is not None and stop.reason.value not in ("poweroff", "reset", "user-quit", "halted")
        )
        await asyncio.to_thread(vm.close)
        write_exit(workdir, cause, failed=failed)
        with contextlib.suppress(OSError):
            (workdir / CONTROL).unlink()
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m popek.daemon.vmproc DIR", file=sys.stderr)
        return 2
    workdir = Path(args[0]).absolute()
    spec = json.loads((workdir / SPEC_FILE).read_text())
    if spec.get("jail"):
        from popek.jail import JailError

        global HOST_PID
        HOST_PID = os.getpid()  # the jail's outer process, which the daemon started and watches
        try:
            spec = jail(spec, workdir)
        except Exception as exc:  # a jail that cannot be made: the VM fails, saying why (never runs unconfined)
            write_exit(workdir, f"the VM could not be confined: {type(exc).__name__}: {exc}", failed=True)
            print(f"popek: {exc}" if isinstance(exc, JailError) else f"popek: jail: {exc!r}", file=sys.stderr)
            return 2
    return asyncio.run(amain(workdir, spec))


if __name__ == "__main__":
    sys.exit(main())
