"""Live migration between two popek processes (popek.migrate): a guest counting with a running hash migrates
mid-count over a Unix socket and over loopback TCP, and ends in the target with the hash of an uninterrupted
run; a target that dies mid-stream, or refuses the VM, leaves the source running to the same end; a hostile
stream is one MigrationError on the target."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from popek import migrate
from popek.accel.exits import StopReason
from popek.migrate import MigrationError
from popek.vm import Vm

from .guests import BACKENDS
from .test_vm_snapshot import TOTAL, Console, expected_hash, finish, paused_mid_count, spec, start

TARGET = """
import sys
from popek import migrate
listener = migrate.listen(sys.argv[1])
print("listening", flush=True)
conn, _ = listener.accept()
if sys.argv[2] == "die":
    conn.recv(64 << 10)
    import os
    os._exit(9)
out = bytearray()
vm = migrate.receive(conn, console=out.extend)
stop = vm.run()
print(stop.reason.value, out.decode(), end="", flush=True)
"""


def target(address: str, mode: str = "run") -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", TARGET, address, mode], stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "listening"
    return proc


def addresses(tmp_path: Path) -> list[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [str(tmp_path / "migrate.sock"), f"tcp:127.0.0.1:{port}"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_a_counting_guest_migrates_with_its_count_intact(tmp_path: Path, backend: str, transport: str) -> None:
    address = addresses(tmp_path)[transport == "tcp"]
    proc = target(address)
    with Vm(spec(tmp_path, backend), Console()) as vm:
        thread, stops = start(vm)
        paused_mid_count(vm, backend, 0.05)
        vm.resume()  # running again: the migration's pre-copy runs beside the guest
        stats = migrate.send(vm, migrate.connect(address))
        stop = finish(thread, stops)
    assert stop.reason is StopReason.MIGRATED
    out, _ = proc.communicate(timeout=300)
    assert out == "debug-exit " + expected_hash(TOTAL[backend])
    assert stats.pages_sent >= 1 and stats.downtime_s < stats.total_s


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_target_that_dies_leaves_the_source_running_to_the_same_end(tmp_path: Path, backend: str) -> None:
    address = str(tmp_path / "migrate.sock")
    proc = target(address, "die")
    console = Console()
    with Vm(spec(tmp_path, backend), console) as vm:
        thread, stops = start(vm)
        paused_mid_count(vm, backend, 0.05)
        vm.resume()
        with pytest.raises(MigrationError):
            migrate.send(vm, migrate.connect(address))
        stop = finish(thread, stops)
    proc.wait(60)
    assert stop.reason is StopReason.DEBUG_EXIT
    assert console.out.decode() == expected_hash(TOTAL[backend])


def hostile_stream(frames: bytes) -> str:
    """Feed `frames` to a target; the MigrationError (or SnapshotError) message it raised."""
    a, b = socket.socketpair()
    errors: list[str] = []

    def serve() -> None:
        try:
            migrate.receive(b).close()
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=serve)
    thread.start()
    a.sendall(frames)
    a.shutdown(socket.SHUT_WR)
    thread.join(30)
    a.close()
    b.close()
    assert errors, "the target took a hostile stream"
    return errors[0]


def hello(spec_state: object) -> bytes:
    from popek import snapshot

    payload = snapshot.encode_state({"format": migrate.FORMAT, "version": migrate.VERSION, "spec": spec_state})
    return struct.pack("<BI", migrate.HELLO, len(payload)) + payload


def test_hostile_streams_are_one_migration_error(tmp_path: Path) -> None:
    from popek import vm_snapshot

    good = vm_snapshot.spec_state(spec(tmp_path, "soft"))
    assert "MigrationError" in hostile_stream(struct.pack("<BI", migrate.PAGES, 10))  # no HELLO first
    assert "more than" in hostile_stream(struct.pack("<BI", migrate.HELLO, 1 << 30))  # a 1 GiB HELLO
    assert "SnapshotError" in hostile_stream(hello({**good, "mem": -1}))
    outside = struct.pack("<BI", migrate.PAGES, 12 + 4096) + struct.pack("<QI", 1 << 40, 1) + bytes(4096)
    assert "outside guest RAM" in hostile_stream(hello(good) + outside)
    unaligned = struct.pack("<BI", migrate.PAGES, 12 + 4096) + struct.pack("<QI", 12, 1) + bytes(4096)
    assert "outside guest RAM" in hostile_stream(hello(good) + unaligned)
    lying = struct.pack("<BI", migrate.PAGES, 12 + 4096) + struct.pack("<QI", 0, 1000)
    assert "1000 pages" in hostile_stream(hello(good) + lying)
    cut = struct.pack("<BI", migrate.PAGES, 12 + 4096) + struct.pack("<QI", 0, 1) + bytes(20)
    assert "mid-frame" in hostile_stream(hello(good) + cut)
    bad_state = b"not json"
    assert "Error" in hostile_stream(hello(good) + struct.pack("<BI", migrate.STATE, len(bad_state)) + bad_state)


def test_addresses_are_checked() -> None:
    assert migrate.parse_address("unix:/tmp/x")[1] == "/tmp/x"
    assert migrate.parse_address("/tmp/x")[1] == "/tmp/x"
    assert migrate.parse_address("tcp:127.0.0.1:4000")[1] == ("127.0.0.1", 4000)
    with pytest.raises(MigrationError, match="TCP port"):
        migrate.parse_address("127.0.0.1:70000")
    with pytest.raises(MigrationError):
        migrate.connect(f"/nonexistent/{time.time()}")


def test_a_stale_unix_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "m.sock")
    first = migrate.listen(path)
    with pytest.raises(MigrationError, match="in use"):
        migrate.listen(path)  # a live listener keeps its address
    first.close()
    migrate.listen(path).close()  # the file of a listener that ended is replaced
