"""The daemon's VM processes: one per VM (popek/daemon/vmproc.py), started, watched and stopped here.

Each VM process runs in a session of its own (so a signal to the daemon's terminal reaches no VM) with a
directory of its own under the state dir (``vms/<id>/``: its record, spec, sockets, console log, exit file). The
daemon learns of a process's end from a pidfd (pidfd_open(2), Linux 5.3) that becomes readable when it exits; for
its own children it then reads the exit status (waitpid), for processes it adopted after a restart it cannot, and
says so. A process that leaves no exit.json (vmproc writes it on every orderly end) crashed or was killed: the
record says which signal or status, with the tail of the console, where a dying VMM or guest says why.

A restarted daemon reads every ``vms/*/record.json``: a process still alive whose command line names its own
directory (PID reuse cannot fool it) is adopted; the others are recorded as stopped or crashed and their
sockets removed.

Limits through cgroup v2 (Documentation/admin-guide/cgroup-v2.rst: memory.max, cpu.max) where the daemon's own
cgroup has the memory and cpu controllers and is writable; otherwise ``cgroup_note`` says why there are none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from popek.daemon import vmproc
from popek.errors import PopekError

CONTROL_TIMEOUT = 10.0
STATUS_TIMEOUT = 2.0  # one status probe (GET /vms asks every live VM)
UNRESPONSIVE_AFTER = 60.0  # a live VM process whose control socket is silent this long is 'unresponsive'
STOP_TIMEOUT = 40.0  # vmproc closes the VM within popek.api.JOIN_TIMEOUT (30 s), then SIGKILL
CONSOLE_TAIL = 4096
VMM_OVERHEAD = 512 << 20  # memory.max = guest memory + this (the Python VMM, its threads, device buffers)
LIVE_STATES = ("starting", "booting", "running", "paused", "unresponsive")


class SupervisorError(PopekError):
    """A request the supervisor refuses; ``status`` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 409, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


@dataclass
class VmRecord:
    """One VM the daemon manages; what is persisted is ``persist()``'s dict."""

    id: str
    name: str
    spec: dict[str, Any]
    dir: Path
    created: float
    state: str = "created"
    pid: int | None = None
    started: float | None = None
    cause: str | None = None
    cgroup: str | None = None
    adopted: bool = False
    stopping: bool = False
    answered: float | None = None  # time.time() of the VM process's last status answer (this daemon's)
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    pidfd: int | None = field(default=None, repr=False)
    exited: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def persist(self) -> None:
        data = {
            "id": self.id,
            "name": self.name,
            "spec": self.spec,
            "created": self.created,
            "state": self.state,
            "pid": self.pid,
            "started": self.started,
            "cause": self.cause,
            "cgroup": self.cgroup,
        }
        tmp = self.dir / "record.json.tmp"
        tmp.write_text(json.dumps(data))
        tmp.replace(self.dir / "record.json")

    @property
    def live(self) -> bool:
        return self.pid is not None and not self.exited.is_set()

    def console_tail(self, size: int = CONSOLE_TAIL) -> bytes:
        path = self.dir / vmproc.CONSOLE
        try:
            with path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - size))
                return f.read()
        except OSError:
            return b""

    @property
    def vsock_path(self) -> Path:
        return self.dir / vmproc.VSOCK


def vmproc_command(workdir: Path) -> list[str]:
    """The VM process's command line; its last word is its directory (how adoption recognises it)."""
    return [sys.executable, "-m", "popek.daemon.vmproc", str(workdir)]


def _describe_status(status: int | None) -> str:
    if status is None:
        return "the VM process ended (it was not the daemon's child: no exit status)"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"the VM process was killed by {name}"
    return f"the VM process exited with status {status}"


def _cmdline(pid: int) -> list[str]:
    try:
        return [os.fsdecode(word) for word in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if word]
    except OSError:
        return []


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process (proc(5): VmRSS in /proc/PID/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class Cgroups:
    """cgroup v2 limits, where the host lets this process use them; ``note`` says why not otherwise."""

    def __init__(self, root: Path | None = None) -> None:
        self.base: Path | None = None
        self.note = ""
        try:
            self.base = self._detect(root)
        except OSError as exc:
            self.note = f"no cgroup v2 limits: {exc}"

    def _detect(self, root: Path | None) -> Path | None:
        if root is None:
            mount = next(
                (line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines() if " cgroup2 " in line),
                None,
            )
            if mount is None:
                self.note = "no cgroup v2 limits: the host has no cgroup2 file system mounted"
                return None
            own = next(
                (line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::")),
                "/",
            )
            root = Path(mount) / own.lstrip("/")
        controllers = (root / "cgroup.controllers").read_text().split()
        missing = {"memory", "cpu"} - set(controllers)
        if missing:
            self.note = f"no cgroup v2 limits: {root} lacks the {', '.join(sorted(missing))} controller(s)"
            return None
        if not os.access(root, os.W_OK):
            self.note = f"no cgroup v2 limits: {root} is not writable"
            return None
        base = root / "popek"
        base.mkdir(exist_ok=True)
        (root / "cgroup.subtree_control").write_text("+memory +cpu")
        (base / "cgroup.subtree_control").write_text("+memory +cpu")
        return base

    def attach(self, vm_id: str, pid: int, mem: int, cpus: int) -> str | None:
        if self.base is None:
            return None
        group = self.base / f"vm-{vm_id}"
        try:
            group.mkdir(exist_ok=True)
            (group / "memory.max").write_text(str(mem + VMM_OVERHEAD))
            (group / "cpu.max").write_text(f"{cpus * 100000} 100000")
            (group / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            self.note = f"cgroup v2 limits failed for vm {vm_id}: {exc}"
            return None
        return str(group)

    @staticmethod
    def remove(path: str | None) -> None:
        if path is not None:
            with contextlib.suppress(OSError):
                Path(path).rmdir()


class Supervisor:
    """The VMs of one daemon, each in its own process. All methods run on the daemon's event loop."""

    def __init__(
        self,
        state_dir: Path,
        command: Callable[[Path], list[str]] = vmproc_command,
        cgroups: Cgroups | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.vms_dir = state_dir / "vms"
        self.command = command
        self.cgroups = cgroups if cgroups is not None else Cgroups()
        self.vms: dict[str, VmRecord] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- start-up and shut-down

    async def open(self) -> None:
        """Create the state dir (0700) and take over what a previous daemon left: live VM processes are adopted,
        dead ones recorded with their cause and their sockets removed."""
        self._loop = asyncio.get_running_loop()
        self.vms_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.state_dir, 0o700)
        for record_file in sorted(self.vms_dir.glob("*/record.json")):
            try:
                data = json.loads(record_file.read_text())
                record = VmRecord(
                    id=str(data["id"]),
                    name=str(data["name"]),
                    spec=dict(data["spec"]),
                    dir=record_file.parent,
                    created=float(data["created"]),
                    state=str(data["state"]),
                    pid=None if data.get("pid") is None else int(data["pid"]),
                    started=data.get("started"),
                    cause=data.get("cause"),
                    cgroup=data.get("cgroup"),
                )
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a record this daemon cannot read is left for a person to look at
            self.vms[record.id] = record
            if record.state not in LIVE_STATES:
                record.exited.set()
                continue
            if record.pid is not None and str(record.dir) in _cmdline(record.pid)[-1:]:
                record.adopted = True
                self._watch(record)
                continue
            self._ended(record, f"the VM process (pid {record.pid}) ended while no daemon watched it")

    async def close(self) -> None:
        """The daemon stops: its VM processes run on (a restarted daemon adopts them); only the watches end."""
        for record in self.vms.values():
            self._unwatch(record)

    # --- the records

    def find(self, ref: str) -> VmRecord:
        """A VM by id or by name; 404 otherwise."""
        record = self.vms.get(ref)
        if record is None:
            record = next((r for r in self.vms.values() if r.name == ref), None)
        if record is None:
            raise SupervisorError(f"no VM {ref[:80]!r}", status=404)
        return record

    def create(self, spec: dict[str, Any], name: str | None) -> VmRecord:
        vm_id = uuid.uuid4().hex[:12]
        name = name or f"vm-{vm_id[:6]}"
        if any(r.name == name for r in self.vms.values()):
            raise SupervisorError(f"a VM named {name!r} exists already", status=409, field="name")
        workdir = self.vms_dir / vm_id
        workdir.mkdir(mode=0o700)
        record = VmRecord(id=vm_id, name=name, spec=spec, dir=workdir, created=time.time())
        self.vms[vm_id] = record
        record.persist()
        return record

    # --- processes

    def start(self, record: VmRecord) -> None:
        """Start the VM's process (again, after a stop or a crash: the VM boots anew)."""
        if record.live:
            raise SupervisorError(f"VM {record.name} is {record.state}: stop it first", status=409)
        for stale in (vmproc.EXIT_FILE, vmproc.CONTROL, vmproc.VSOCK, vmproc.CONSOLE):
            with contextlib.suppress(OSError):
                (record.dir / stale).unlink()
        (record.dir / vmproc.SPEC_FILE).write_text(json.dumps(record.spec))
        log = (record.dir / "vmproc.log").open("ab")
        try:
            popen = subprocess.Popen(
                self.command(record.dir),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise SupervisorError(f"cannot start the VM process: {exc}", status=500) from exc
        finally:
            log.close()
        record.popen = popen
        record.pid = popen.pid
        record.started = time.time()
        record.cause = None
        record.state = "starting"
        record.answered = None
        record.adopted = False
        record.exited = asyncio.Event()
        mem = record.spec.get("mem_bytes", 512 << 20)
        record.cgroup = self.cgroups.attach(record.id, popen.pid, int(mem), int(record.spec.get("cpus", 1)))
        self._watch(record)
        record.persist()

    def _watch(self, record: VmRecord) -> None:
        assert record.pid is not None and self._loop is not None
        try:
            fd = os.pidfd_open(record.pid)
        except ProcessLookupError:
            self._ended(record, self._cause(record, self._reap(record)))
            return
        record.pidfd = fd
        self._loop.add_reader(fd, self._on_exit, record)

    def _unwatch(self, record: VmRecord) -> None:
        if record.pidfd is not None and self._loop is not None:
            self._loop.remove_reader(record.pidfd)
            os.close(record.pidfd)
            record.pidfd = None

    @staticmethod
    def _reap(record: VmRecord) -> int | None:
        if record.popen is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            return record.popen.wait(timeout=5)
        return None

    def _on_exit(self, record: VmRecord) -> None:
        self._unwatch(record)
        self._ended(record, self._cause(record, self._reap(record)))

    @staticmethod
    def _cause(record: VmRecord, status: int | None) -> str:
        if record.adopted:
            return (
                f"the VM process (pid {record.pid}) ended; it was adopted from an earlier daemon, so its exit "
                "status is unknown"
            )
        return _describe_status(status)

    def _ended(self, record: VmRecord, crash_cause: str) -> None:
        """The VM's process is gone: stopped (it wrote exit.json) or crashed (it did not), and why."""
        exit_info: dict[str, Any] | None = None
        with contextlib.suppress(OSError, ValueError):
            exit_info = json.loads((record.dir / vmproc.EXIT_FILE).read_text())
        if exit_info is not None and isinstance(exit_info.get("cause"), str):
            record.state = "failed" if exit_info.get("failed") else "stopped"
            record.cause = exit_info["cause"]
        elif record.stopping:  # the stop came before the VM process had set itself up
            record.state = "stopped"
            record.cause = f"stopped on request ({crash_cause})"
        else:
            record.state = "crashed"
            record.cause = crash_cause
        tail = record.console_tail(512).decode(errors="replace").strip().splitlines()[-3:]
        if record.state != "stopped" and tail:
            record.cause += " | console: " + " / ".join(tail)
        for stale in (vmproc.CONTROL, vmproc.VSOCK):
            with contextlib.suppress(OSError):
                (record.dir / stale).unlink()
        self.cgroups.remove(record.cgroup)
        record.cgroup = None
        record.popen = None
        record.adopted = False
        record.stopping = False
        record.exited.set()
        with contextlib.suppress(OSError):
            record.persist()

    async def stop(self, record: VmRecord, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (vmproc stops the VM and writes its exit file), SIGKILL after timeout."""
        if not record.live or record.pid is None:
            return
        record.stopping = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(record.exited.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGKILL)
            await asyncio.wait_for(record.exited.wait(), 10)

    async def delete(self, record: VmRecord) -> None:
        await self.stop(record)
        self.vms.pop(record.id, None)
        shutil.rmtree(record.dir, ignore_errors=True)

    # --- the VM process's control socket

    async def control(
        self, record: VmRecord, request: dict[str, Any], timeout: float = CONTROL_TIMEOUT
    ) -> dict[str, Any]:
        """One request to the VM process; SupervisorError (503) if it does not answer."""
        if not record.live:
            raise SupervisorError(f"VM {record.name} is {record.state}", status=409)
        path = record.dir / vmproc.CONTROL
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
        except (OSError, TimeoutError) as exc:
            raise SupervisorError(f"VM {record.name}'s process does not answer yet ({record.state})", 503) from exc
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            line = await asyncio.wait_for(reader.readline(), timeout)
            answer = json.loads(line)
        except (OSError, TimeoutError, ValueError) as exc:
            reason = str(exc) or type(exc).__name__
            raise SupervisorError(f"VM {record.name}'s process did not answer: {reason}", 503) from exc
        finally:
            writer.close()
        if not isinstance(answer, dict):
            raise SupervisorError(f"VM {record.name}'s process answered nonsense", 502)
        return answer

    async def refresh(self, record: VmRecord) -> str:
        """The state of a live VM as its process reports it (booting, running, paused)."""
        if not record.live:
            return record.state
        try:
            answer = await self.control(record, {"op": "status"}, timeout=STATUS_TIMEOUT)
        except SupervisorError:
            if record.live:
                # One slow answer is no news: with many VMs on few cores a busy VM process may miss a probe's
                # deadline, and a running VM must not turn 'starting' (and refuse exec with 409) for that. Only
                # a process that never answered is 'starting', and one silent for UNRESPONSIVE_AFTER s (since its
                # last answer, or its start) is 'unresponsive'.
                now = time.time()
                last = record.answered or record.started or now
                if now - last >= UNRESPONSIVE_AFTER:
                    record.state = "unresponsive"
                elif record.answered is None:
                    record.state = "starting"
            return record.state
        record.answered = time.time()
        state = answer.get("state")
        if isinstance(state, str) and record.live:
            record.state = state
        return record.state
