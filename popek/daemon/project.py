"""The VM file's verbs (`popek up`, status, ssh, provision, sync, halt, suspend, resume, destroy): a project's
machines (popek.toml, popek/daemon/vmfile.py) made real through the daemon, as Vagrant's verbs act through its
provider.

Each machine's state lives in `.popek/<name>/state.json` beside the file (Vagrant's `.vagrant/machines/<name>/`):
the daemon VM's id and name, what the user last made of it (running, halted, suspended) and whether it was
provisioned (Vagrant's `action_provision` marker), so provisioning runs once, at the first `up`, and a halted or
suspended machine comes back as it was left. A suspended machine's snapshot is `.popek/<name>/snapshot/`.

The daemon's VM names are `<folder>-<hash8 of the file's absolute path>-<machine>`, so two projects with a machine
of the same name (or two checkouts of one project) never meet in one daemon.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO, cast

from popek.agent import ExecResult
from popek.daemon import models, vmfile
from popek.daemon.client import ApiError, Client, DaemonUnavailable, RemoteVM
from popek.errors import PopekError

STATE_FILE = "state.json"
SNAPSHOT_DIR = "snapshot"
DEFAULT_BOOT_TIMEOUT = 600.0  # the daemon's default (models.VmCreate.boot_timeout)
HALT_TIMEOUT = 30.0  # how long `halt` waits for the guest to go down by itself before the VM is stopped
PROVISION_DIR = "/tmp/popek-provision"
MAX_SYNC_FILE = 256 << 20  # the daemon moves at most this in one request (popek/daemon/app.py MAX_FILE)
LIVE = ("starting", "booting", "running", "paused", "unresponsive")
STATES = ("not created", "running", "suspended", "halted", "crashed")


class ProjectError(PopekError):
    """A verb that cannot be done: a machine not in the file, a step that failed, a path that is refused."""


@dataclass
class MachineState:
    """What `.popek/<name>/state.json` keeps of one machine."""

    vm_id: str | None = None
    vm_name: str | None = None
    state: str = "not created"  # what the user last made of it: running, halted, suspended
    provisioned: bool = False
    provision_runs: int = 0  # how often provisioning ran (once, unless `popek provision`)


def vm_name(file: Path, machine: str) -> str:
    """The daemon's name for `machine` of the project `file`: unique per file path, within the daemon's
    name pattern (models.NAME_PATTERN, at most 63 characters)."""
    path = file.resolve()
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    folder = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.parent.name).strip("-.")[:20] or "popek"
    if not folder[0].isalnum():
        folder = "p" + folder
    return f"{folder}-{digest}-{machine}"


def checked_guest_path(value: str, what: str) -> str:
    """A guest path from the VM file, refused (one line) where it is relative or climbs with '..'."""
    try:
        return models.guest_path(value)
    except ValueError as exc:
        raise ProjectError(f"{what}: {value!r}: {exc}") from None


def sync_plan(host: Path, guest: str, skip: Sequence[Path] = ()) -> Iterator[tuple[str, str, Path | None, int]]:
    """What copying the folder `host` to `guest` does, in order: ("dir", guest path, None, mode) before what is
    in it, ("file", guest path, host path, mode). Symbolic links and special files are left out (the guest gets
    what they are, not where they point), and so are the folders in `skip` (the project's own .popek/)."""
    skipped = {p.resolve() for p in skip}
    root = host.resolve()
    yield "dir", guest, None, stat.S_IMODE(root.stat().st_mode)
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if (here / d).resolve() not in skipped and not (here / d).is_symlink())
        relative = here.relative_to(root)
        base = guest if str(relative) == "." else f"{guest.rstrip('/')}/{relative.as_posix()}"
        for d in dirs:
            yield "dir", f"{base.rstrip('/')}/{d}", None, stat.S_IMODE((here / d).lstat().st_mode)
        for f in sorted(files):
            info = (here / f).lstat()
            if stat.S_ISREG(info.st_mode):
                yield "file", f"{base.rstrip('/')}/{f}", here / f, stat.S_IMODE(info.st_mode)


def _default_accel() -> str:
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "soft"


class Project:
    """The machines of one popek.toml, driven through a daemon (a popek.Client)."""

    def __init__(
        self,
        file: Path,
        client: Client,
        out: Callable[[str], None] | None = None,
        boot_timeout: float = DEFAULT_BOOT_TIMEOUT,
    ) -> None:
        self.boot_timeout = boot_timeout
        self.file = file.resolve()
        self.root = self.file.parent
        self.config = vmfile.load(self.file)
        self.state_dir = self.root / vmfile.STATE_DIR
        self.client = client
        self.out = out or (lambda line: print(line, flush=True))

    # --- state

    def names(self, wanted: Sequence[str]) -> list[str]:
        """The machines a verb acts on: those named (each must be in the file), or all of them."""
        for name in wanted:
            if name not in self.config.machine:
                known = ", ".join(sorted(self.config.machine))
                raise ProjectError(f"no machine {name!r} in {self.file} (it has: {known})")
        return list(dict.fromkeys(wanted)) if wanted else list(self.config.machine)

    def machine_dir(self, name: str) -> Path:
        return self.state_dir / name

    def snapshot_path(self, name: str) -> Path:
        return self.machine_dir(name) / SNAPSHOT_DIR

    def load_state(self, name: str) -> MachineState:
        path = self.machine_dir(name) / STATE_FILE
        forget = f"`popek destroy {name} -f` forgets it"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return MachineState(vm_name=vm_name(self.file, name))
        except (OSError, ValueError) as exc:
            raise ProjectError(f"{path}: unreadable machine state ({exc}); {forget}") from None
        try:
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            state = MachineState(**data)
            if state.state not in STATES or not isinstance(state.provisioned, bool):
                raise ValueError(f"state {state.state!r}")
        except (TypeError, ValueError) as exc:
            raise ProjectError(f"{path}: unreadable machine state ({exc}); {forget}") from None
        return state

    def save_state(self, name: str, state: MachineState) -> None:
        folder = self.machine_dir(name)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(state), indent=2) + "\n")
        tmp.replace(folder / STATE_FILE)

    def daemon_vm(self, name: str) -> tuple[RemoteVM, dict[str, Any]] | None:
        """The machine's VM in the daemon and its info, or None if the daemon has none by its name."""
        try:
            vm = self.client.get(vm_name(self.file, name))
            return vm, vm.info()
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def status(self, name: str) -> str:
        """not created, running (or booting/paused as the daemon says), suspended, halted, crashed."""
        state = self.load_state(name)
        found = self.daemon_vm(name)
        if found is not None:
            daemon_state = str(found[1]["state"])
            if daemon_state in ("failed", "crashed"):
                return "crashed"
            if daemon_state in LIVE:
                return daemon_state
            return "halted"
        if state.state == "suspended" and self.snapshot_path(name).is_dir():
            return "suspended"
        if state.state == "running":
            return "crashed"  # recorded running, yet the daemon has no such VM (it was removed or lost)
        return state.state

    def rows(self) -> list[dict[str, str]]:
        """`popek status`: a row per machine; with no daemon answering, what .popek/ recorded, marked so."""
        rows = []
        for name in self.config.machine:
            state = self.load_state(name)
            try:
                status = self.status(name)
            except DaemonUnavailable:
                status = f"{state.state} (recorded; no daemon answers)"
            rows.append(
                {
                    "name": name,
                    "state": status,
                    "vm": state.vm_name or vm_name(self.file, name),
                    "provisioned": "yes" if state.provisioned else "no",
                }
            )
        return rows

    # --- checks before anything starts

    def preflight(self, name: str, provision: bool) -> None:
        """Refuse (one line, before a VM is made) a synced folder or provisioning file that is not there, and a
        guest path that is relative or climbs with '..'."""
        machine = self.config.machine[name]
        folder = machine.synced_folder
        if folder is not None:
            checked_guest_path(folder.guest, f"machine.{name}.synced_folder.guest")
            if not Path(folder.host).is_dir():
                raise ProjectError(f"machine.{name}.synced_folder.host: no such folder: {folder.host}")
        if not provision:
            return
        for i, step in enumerate(machine.provision):
            where = f"machine.{name}.provision.{i}"
            if step.script is not None and not Path(step.script).is_file():
                raise ProjectError(f"{where}.script: no such file: {step.script}")
            if step.file is not None:
                checked_guest_path(step.file.destination, f"{where}.file.destination")
                if not Path(step.file.source).exists():
                    raise ProjectError(f"{where}.file.source: no such file: {step.file.source}")

    def spec(self, name: str) -> dict[str, Any]:
        """The daemon's VM spec (POST /vms) for a machine of the file."""
        m = self.config.machine[name]
        spec: dict[str, Any] = {
            "name": vm_name(self.file, name),
            "cpus": m.cpus,
            "mem": m.memory,
            "accel": m.accel or _default_accel(),
            "disks": list(m.disks),
            "ports": list(m.ports),
            "boot_timeout": self.boot_timeout,
        }
        for key, value in (("kernel", m.kernel), ("initrd", m.initrd), ("cmdline", m.append), ("net", m.net)):
            if value is not None:
                spec[key] = value
        return spec

    # --- verbs

    def up(self, names: Sequence[str], provision: bool | None = None) -> None:
        """Boot the machines (or restore those suspended), all at once, then for each as it comes up: sync its
        folder and provision it the first time (`provision` True/False forces/skips it). Everything that can
        be refused (a missing folder or script, a bad guest path) is refused before any VM starts."""
        started: list[tuple[str, RemoteVM, bool]] = []
        plans = []
        for name in names:
            state = self.load_state(name)
            found = self.daemon_vm(name)
            if found is not None and found[1]["state"] in LIVE:
                self.out(f"==> {name}: already {found[1]['state']} ({found[0].name})")
                continue
            self.preflight(name, provision is True or (provision is None and not state.provisioned))
            plans.append((name, state, found))
        for name, state, found in plans:
            resume = state.state == "suspended" and self.snapshot_path(name).is_dir()
            if found is not None:  # a stopped, failed or crashed VM of an earlier up: made anew
                found[0].delete()
            if resume:
                self.out(f"==> {name}: resuming from {self.snapshot_path(name)}")
                vm = self.client.create(
                    name=vm_name(self.file, name),
                    snapshot=str(self.snapshot_path(name)),
                    boot_timeout=self.boot_timeout,
                )
            else:
                machine = self.config.machine[name]
                self.out(f"==> {name}: booting ({machine.cpus} vCPU, {machine.memory})")
                vm = self.client.create(**self.spec(name))
            state.vm_id, state.vm_name, state.state = vm.id, vm.name, "running"
            self.save_state(name, state)
            started.append((name, vm, resume))
        for name, vm, resume in started:
            try:
                took = vm.wait_ready(timeout=self.boot_timeout)
            except ApiError as exc:
                raise ProjectError(
                    f"{name}: the VM did not come up: {exc} (`popek status`; `popek logs {vm.name}`)"
                ) from None
            self.out(f"==> {name}: up in {took:.1f} s")
            if resume:
                shutil.rmtree(self.snapshot_path(name), ignore_errors=True)  # the VM is its own again
            self.sync(name, vm)
            state = self.load_state(name)
            if provision is True or (provision is None and not state.provisioned):
                self.provision(name, vm)
            elif state.provisioned:
                self.out(f"==> {name}: already provisioned (`popek provision {name}` runs it again)")

    def _running(self, name: str) -> RemoteVM:
        found = self.daemon_vm(name)
        if found is None or found[1]["state"] != "running":
            status = self.status(name)
            raise ProjectError(f"machine {name} is {status}, not running (`popek up {name}` starts it)")
        return found[0]

    def sync(self, name: str, vm: RemoteVM | None = None) -> int:
        """Copy the machine's synced folder into the guest (dirs made, files written, modes kept): files copied."""
        folder = self.config.machine[name].synced_folder
        if folder is None:
            if vm is None:
                self.out(f"==> {name}: no synced_folder in {self.file}")
            return 0
        self.preflight(name, provision=False)
        vm = vm or self._running(name)
        guest = checked_guest_path(folder.guest, f"machine.{name}.synced_folder.guest")
        count = 0
        for kind, target, source, mode in sync_plan(Path(folder.host), guest, skip=[self.state_dir]):
            if kind == "dir":
                vm.files.mkdir(target, parents=True, mode=mode)
                continue
            assert source is not None
            if source.stat().st_size > MAX_SYNC_FILE:
                raise ProjectError(f"{source}: larger than {MAX_SYNC_FILE} bytes; not synced")
            vm.files.write(target, source.read_bytes(), mode=mode)
            count += 1
        self.out(f"==> {name}: synced {folder.host} -> {guest} ({count} files)")
        return count

    def provision(self, name: str, vm: RemoteVM | None = None) -> None:
        """Run the machine's provisioning steps in order; the first that fails stops it (ProjectError names it
        and its exit status), and the machine is then not recorded provisioned."""
        machine = self.config.machine[name]
        self.preflight(name, provision=True)
        vm = vm or self._running(name)
        state = self.load_state(name)
        for i, step in enumerate(machine.provision):
            where = f"{name}: provision step {i + 1}"
            if step.file is not None:
                target = checked_guest_path(step.file.destination, f"machine.{name}.provision.{i}.file.destination")
                source = Path(step.file.source)
                self.out(f"==> {where}: file {source} -> {target}")
                if source.is_dir():
                    for kind, path, host, mode in sync_plan(source, target):
                        if kind == "dir":
                            vm.files.mkdir(path, parents=True, mode=mode)
                        else:
                            assert host is not None
                            vm.files.write(path, host.read_bytes(), mode=mode)
                else:
                    parent = target.rsplit("/", 1)[0] or "/"
                    vm.files.mkdir(parent, parents=True)
                    vm.files.write(target, source.read_bytes(), mode=stat.S_IMODE(source.stat().st_mode))
                continue
            if step.script is not None:
                vm.files.mkdir(PROVISION_DIR, parents=True, mode=0o700)
                target = f"{PROVISION_DIR}/{i + 1}-{Path(step.script).name}"
                vm.files.write(target, Path(step.script).read_bytes(), mode=0o755)
                self.out(f"==> {where}: script {step.script}")
                command: list[str] = ["/bin/sh", target]
            else:
                assert step.shell is not None
                self.out(f"==> {where}: shell")
                command = ["/bin/sh", "-c", step.shell]
            result = _stream_exec(vm, command)
            if result.exit_code != 0:
                how = f"signal {result.signal}" if result.signal is not None else f"exit status {result.exit_code}"
                raise ProjectError(f"{where} ({'script' if step.script else 'shell'}) failed with {how}; stopped")
        state.provisioned = True
        state.provision_runs += 1
        self.save_state(name, state)
        self.out(f"==> {name}: provisioned ({len(machine.provision)} steps)")

    def halt(self, name: str, timeout: float = HALT_TIMEOUT) -> None:
        """Shut the guest down (it resets itself, which ends its VM), stop the VM if it has not gone by
        `timeout`, and forget the daemon's VM; the machine is recorded halted (its next up boots it)."""
        state = self.load_state(name)
        found = self.daemon_vm(name)
        if found is None:
            if state.state == "running":
                state.state = "halted"
                self.save_state(name, state)
            self.out(f"==> {name}: not running ({self.status(name)})")
            return
        vm, info = found
        if info["state"] == "running":
            self.out(f"==> {name}: shutting down")
            # the default guest has no ACPI power-off: `reboot -f` with reboot=k resets it, and a guest reset
            # ends its VM; the exec never ends normally (the VM goes away under it), so it runs on a thread
            threading.Thread(target=_shutdown, args=(vm,), daemon=True).start()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and vm.state in LIVE:
                time.sleep(0.5)
        if vm.state in LIVE:
            self.out(f"==> {name}: still up after {timeout:g} s; stopping it")
            _quietly(vm.stop)
        vm.delete()
        state.vm_id, state.state = None, "halted"
        self.save_state(name, state)
        self.out(f"==> {name}: halted")

    def suspend(self, name: str) -> None:
        """Snapshot the running machine into .popek/<name>/snapshot, then stop and forget its VM."""
        vm = self._running(name)
        state = self.load_state(name)
        path = self.snapshot_path(name)
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.out(f"==> {name}: saving its state to {path}")
        vm.snapshot(path)
        vm.delete()
        state.vm_id, state.state = None, "suspended"
        self.save_state(name, state)
        self.out(f"==> {name}: suspended")

    def resume(self, name: str) -> None:
        status = self.status(name)
        if status != "suspended":
            raise ProjectError(f"machine {name} is {status}, not suspended (`popek suspend {name}` first)")
        self.up([name], provision=False)

    def ssh(self, name: str, command: Sequence[str], socket_path: Path) -> int:
        """`popek ssh NAME [-- CMD]`: the command's exit status. Without a command, an interactive shell: on a
        pty in the guest (the agent's, as `popek run -t` gives) when the VM's vsock socket is reachable from
        here (the daemon's default state dir beside its socket), else a line mode through the daemon (each line
        run by /bin/sh -c)."""
        vm = self._running(name)
        if command:
            return _stream_exec(vm, list(command)).status
        from popek.daemon import vmproc
        from popek.daemon.server import state_dir_for

        vsock = state_dir_for(socket_path) / "vms" / vm.id / vmproc.VSOCK
        if vsock.exists() and os.access(vsock, os.R_OK | os.W_OK):
            from popek import cli_agent
            from popek.agent import AgentClient, vsock_unix_connector
            from popek.daemon.app import AGENT_PORT, AGENT_TIMEOUT

            agent = AgentClient(vsock_unix_connector(vsock, AGENT_PORT, AGENT_TIMEOUT), timeout=AGENT_TIMEOUT)
            use_pty = os.isatty(0) and os.isatty(1)
            # _interactive needs only spawn(), which AgentClient has as popek.VM has
            return cli_agent._interactive(cast(Any, agent), cli_agent.DEFAULT_SHELL, use_pty)
        return self.line_shell(name, vm, sys.stdin)

    def line_shell(self, name: str, vm: RemoteVM, lines: TextIO) -> int:
        """A shell without a pty: each line of `lines` runs by /bin/sh -c in the guest; `exit [N]` or the end of
        input ends it, with N or the last command's exit status."""
        status = 0
        prompt = sys.stdin.isatty() and lines is sys.stdin
        while True:
            if prompt:
                print(f"{name}$ ", end="", flush=True)
            line = lines.readline()
            if not line:
                return status
            text = line.strip()
            if not text:
                continue
            words = text.split()
            if words[0] == "exit" and len(words) <= 2:
                return int(words[1]) & 0xFF if len(words) == 2 and words[1].isdigit() else status
            status = _stream_exec(vm, ["/bin/sh", "-c", text]).status

    def destroy(self, name: str) -> None:
        """Stop and delete the VM, remove .popek/<name> (and .popek/ when it is left empty): nothing left."""
        found = self.daemon_vm(name)
        if found is not None:
            found[0].delete()
        shutil.rmtree(self.machine_dir(name), ignore_errors=True)
        with contextlib.suppress(OSError):
            self.state_dir.rmdir()  # only when empty
        self.out(f"==> {name}: destroyed")


def _stream_exec(vm: RemoteVM, command: list[str]) -> ExecResult:
    return vm.exec(
        command,
        on_stdout=lambda data: (sys.stdout.buffer.write(data), sys.stdout.buffer.flush()),
        on_stderr=lambda data: (sys.stderr.buffer.write(data), sys.stderr.buffer.flush()),
    )


def _shutdown(vm: RemoteVM) -> None:
    """The guest's own shutdown; its exec ends with an error when the VM goes away under it (or, if the CLI
    exits first, with its closed client): whichever it is, halt decides by the VM's state, not by this."""
    with contextlib.suppress(Exception):
        vm.exec("sync; reboot -f", timeout=HALT_TIMEOUT)


def _quietly(call: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(PopekError, OSError):
        call(*args)
