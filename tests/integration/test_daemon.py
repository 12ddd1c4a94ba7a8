"""The popek daemon with two default-guest VMs (ONE daemon, a module fixture; the two boot in parallel, ~4-6 min
on this nested KVM): create → exec → files → kill -9 of one VM's process (the daemon stays up, the other VM still
answers, the dead one is reported crashed with its cause) → delete both → nothing is left. Each VM's console log
stays in the daemon's state dir under pytest's tmp_path, and a failed boot prints its tail."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from popek import image
from popek.daemon.client import ApiError, Client, RemoteVM

from . import daemons
from .daemons import alive as _alive
from .guests import linux_marks

BOOT_TIMEOUT = 1200  # as test_api_linux: two guests booting at once on 2 shared cores

pytestmark = linux_marks(BOOT_TIMEOUT)


@dataclass
class Daemon:
    server: daemons.Daemon
    a: RemoteVM
    b: RemoteVM

    @property
    def client(self) -> Client:
        return self.server.client

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.server.process

    @property
    def socket(self) -> Path:
        return self.server.socket

    @property
    def state(self) -> Path:
        return self.server.state


def _popek(socket: Path, verb: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "popek", verb, "--socket", str(socket), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def daemon(guest: image.GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with daemons.running(tmp_path_factory.mktemp("daemon")) as server:
        a = server.client.create(name="a", mem="256M", boot_timeout=BOOT_TIMEOUT)
        b = server.client.create(name="b", mem="256M", boot_timeout=BOOT_TIMEOUT)
        for vm in (a, b):
            try:
                vm.wait_ready(timeout=BOOT_TIMEOUT)
            except ApiError as e:
                tail = vm.console().decode(errors="replace")[-6000:]
                pytest.fail(f"VM {vm.name} did not boot to its agent: {e}\nconsole:\n{tail}")
        yield Daemon(server, a, b)


def test_exec_streams_output_and_exit_code_in_both_vms(daemon: Daemon) -> None:
    for vm in (daemon.a, daemon.b):
        r = vm.exec(["sh", "-c", f"echo hello from {vm.name}; echo err >&2; exit 3"])
        assert (r.stdout, r.stderr, r.exit_code, r.signal) == (f"hello from {vm.name}\n".encode(), b"err\n", 3, None)
    r = daemon.a.exec("cat; echo $GREETING", stdin=b"in\n", env={"GREETING": "hi"})
    assert r.stdout == b"in\nhi\n" and r.exit_code == 0
    cli = _popek(daemon.socket, "exec", "b", "--", "uname", "-s")
    assert (cli.returncode, cli.stdout) == (0, "Linux\n"), cli.stderr
    ps = _popek(daemon.socket, "ps")
    assert ps.returncode == 0 and " a " in ps.stdout and " b " in ps.stdout and "running" in ps.stdout, ps.stdout


def test_files_round_trip(daemon: Daemon) -> None:
    files = daemon.a.files
    files.mkdir("/tmp/d/e", parents=True)
    data = bytes(range(256)) * 300
    assert files.write("/tmp/d/e/blob", data, mode=0o600) == len(data)
    assert files.read("/tmp/d/e/blob") == data
    info = files.stat("/tmp/d/e/blob")
    assert info.size == len(data) and info.permissions == 0o600 and info.is_file
    assert [entry.name for entry in files.list("/tmp/d/e")] == ["blob"]
    with pytest.raises(ApiError) as missing:
        files.read("/tmp/d/e/none")
    assert missing.value.status == 404
    with pytest.raises(ApiError) as traversal:
        files.read("/tmp/../etc/passwd")
    assert traversal.value.status == 422
    files.remove("/tmp/d", recursive=True)
    with pytest.raises(ApiError):
        files.stat("/tmp/d")


def test_the_console_log_holds_what_the_guest_writes_to_its_serial_console(daemon: Daemon) -> None:
    # what the guest writes, not its boot log: a VM that started warm (from the warm snapshot) printed no boot log
    daemon.a.exec(["sh", "-c", "echo popek-console-marker > /dev/console"], check=True)
    deadline = time.monotonic() + 30
    while b"popek-console-marker" not in daemon.a.console():
        assert time.monotonic() < deadline, daemon.a.console()[-2000:]
        time.sleep(0.2)


def test_kill_9_of_one_vm_process_leaves_the_daemon_and_the_other_vm(daemon: Daemon) -> None:
    pid = daemon.a.info()["pid"]
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (info := daemon.a.info())["state"] != "crashed":
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
    assert "killed by SIGKILL" in info["cause"]
    assert daemon.process.poll() is None
    assert daemon.b.exec(["echo", "still here"]).stdout == b"still here\n"
    with pytest.raises(ApiError) as stopped:
        daemon.a.exec(["true"])
    assert stopped.value.status == 409
    metrics = daemon.client.metrics()
    by_name = {vm["name"]: vm for vm in metrics["vms"]}
    assert by_name["a"]["state"] == "crashed" and by_name["a"]["rss"] is None
    assert by_name["b"]["state"] == "running" and by_name["b"]["rss"] > 10 << 20
    assert isinstance(by_name["b"]["stats"], str) and by_name["b"]["stats"]  # popek.VM.stats(): exit counts
    io = by_name["b"]["io"]  # popek.VM.io_counters(): b has no disk or network; the agent's traffic is on vsock
    assert io["disk_read_bytes"] == io["net_tx_bytes"] == 0, io
    assert io["vsock_to_host_bytes"] > len("still here") and io["vsock_to_guest_bytes"] > 0, io
    assert by_name["a"]["io"] is None


def test_a_restarted_daemon_adopts_the_live_vm_and_keeps_the_dead_ones_cause(daemon: Daemon) -> None:
    pid_b = daemon.b.info()["pid"]
    assert daemon.server.stop() == 0
    assert not daemon.socket.exists()
    assert _alive(pid_b)  # the VM process outlives its daemon
    daemon.server.start()
    daemon.a, daemon.b = daemon.client.get("a"), daemon.client.get("b")
    info = daemon.b.info()
    assert info["pid"] == pid_b and info["state"] == "running", info
    assert daemon.b.exec(["echo", "adopted"]).stdout == b"adopted\n"
    a = daemon.a.info()
    assert a["state"] == "crashed" and "killed by SIGKILL" in a["cause"]


def test_delete_both_leaves_nothing(daemon: Daemon) -> None:
    pid_b = daemon.b.info()["pid"]
    daemon.a.delete()
    daemon.b.delete()
    assert daemon.client.list() == []
    assert list((daemon.state / "vms").iterdir()) == []
    assert not _alive(pid_b)
    rm = _popek(daemon.socket, "rm", "a")
    assert rm.returncode == 1 and "no VM" in rm.stderr
