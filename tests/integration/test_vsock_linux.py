"""The default Linux guest with a vsock device on the KVM backend: Linux's virtio_vsock driver and the guest agent
(started by the guest's init on vsock port 1024) reached through Firecracker's convention — AgentClient over
`vsock_unix_connector` — runs commands, several connections at once, and moves a 1 MiB file (16 credit
windows) both ways intact.
One boot serves the module; the VM is stopped from inside the guest at the end, and popek removes its socket."""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from popek import image
from popek.agent import AgentClient, AgentUnavailable, vsock_unix_connector

from .guests import linux_marks

BOOT_TIMEOUT = 1200
PORT = 1024
STOP_FILE = "/tmp/popek-stop"

pytestmark = linux_marks(BOOT_TIMEOUT)


@dataclass
class RunningVm:
    process: subprocess.Popen[bytes]
    socket: Path
    client: AgentClient


def wait_for_agent(process: subprocess.Popen[bytes], client: AgentClient) -> None:
    """PING until the agent answers, while popek runs (a VM that ended will not answer)."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while process.poll() is None and time.monotonic() < deadline:
        try:
            client.wait_ready(timeout=5, interval=0.5)
            return
        except AgentUnavailable:
            continue
    raise AgentUnavailable(f"no answer from the agent (popek's exit status: {process.poll()})")


@pytest.fixture(scope="module")
def vm(guest: image.GuestImage) -> Iterator[RunningVm]:
    # a short folder: a Unix socket path holds at most 107 bytes, pytest's tmp paths can be longer
    folder = Path(tempfile.mkdtemp(prefix="popek-vsock-"))
    path = folder / "v.sock"
    out, err = folder / "stdout", folder / "stderr"  # files, not pipes: readable while it runs
    # the guest's command waits for the test to say it is done (through the agent), then the VM resets
    command = f"while [ ! -e {STOP_FILE} ]; do sleep 0.2; done; echo vsock-test-done"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "popek", "run", "--accel", "kvm", "--timeout", str(BOOT_TIMEOUT), "--stats",
             "--vsock", f"3:{path}", "--no-agent", "--", "sh", "-c", command],
            stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
        )  # fmt: skip

    def log() -> str:
        return f"stdout:\n{out.read_text(errors='replace')[-6000:]}\nstderr:\n{err.read_text(errors='replace')[-4000:]}"

    client = AgentClient(vsock_unix_connector(path, PORT), timeout=120)
    try:
        try:
            wait_for_agent(process, client)
        except AgentUnavailable as e:
            pytest.fail(f"{e}\n{log()}")
        yield RunningVm(process, path, client)
        client.exec(["touch", STOP_FILE], check=True)  # the guest's command ends: popek-exit-status 0, reset
        process.wait(300)
        assert "vsock-test-done" in out.read_text() and "popek-exit-status: 0" in out.read_text(), log()
        assert process.returncode == 0, log()
        assert "virtio-vsock" in err.read_text() and "connections=" in err.read_text(), log()  # --stats
        assert not path.exists()  # removed at close
    finally:
        if process.poll() is None:
            process.terminate()  # only ours, by its pid
            process.wait(60)
        shutil.rmtree(folder, ignore_errors=True)


def test_the_agent_runs_commands_over_vsock(vm: RunningVm) -> None:
    result = vm.client.exec("echo out; echo err >&2; exit 3")
    assert (result.stdout, result.stderr, result.exit_code) == (b"out\n", b"err\n", 3)
    assert vm.client.exec(["test", "-c", "/dev/vsock"]).ok
    big = vm.client.exec("head -c 300000 /dev/zero | tr '\\0' x")  # output larger than any credit window
    assert big.stdout == b"x" * 300_000 and big.exit_code == 0


# each command starts three guest processes; where guest ring 0 is emulated a process start takes seconds, so the
# connections overlap without a sleep of their own, and the count of commands is what the test's time is
PIPED = 10_000  # bytes each command pipes in the guest, times its thread's number
THREADS, ROUNDS = 4, 2


def test_several_connections_at_once(vm: RunningVm) -> None:
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(ROUNDS):
                result = vm.client.exec(f"echo {n}-{i}; head -c {PIPED * (n + 1)} /dev/zero | wc -c")
                assert result.exit_code == 0
                results[n * 10 + i] = result.stdout
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []
    expected = {n * 10 + i: f"{n}-{i}\n{PIPED * (n + 1)}\n".encode() for n in range(THREADS) for i in range(ROUNDS)}
    assert results == expected


def test_a_1_mib_file_goes_to_the_guest_and_back_intact(vm: RunningVm) -> None:
    data = random.Random(1024).randbytes(1 << 20)
    digest = hashlib.sha256(data).hexdigest()
    assert vm.client.files.write("/tmp/blob", data) == len(data)
    assert vm.client.exec(["sha256sum", "/tmp/blob"]).stdout.split()[0].decode() == digest  # the guest's view
    back = vm.client.files.read("/tmp/blob")
    assert len(back) == len(data) and hashlib.sha256(back).hexdigest() == digest
    vm.client.files.remove("/tmp/blob")
