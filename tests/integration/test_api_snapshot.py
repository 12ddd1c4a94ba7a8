"""popek.VM snapshots of the default Linux guest: one running VM (warm-started where the cache allows; the
warm-start test below proves the boot-to-snapshot path with a cache of its own) is snapshotted while it runs and
goes on; two clones restored from the snapshot answer at once, are independent of each other (a file written in
one is absent from the other), and each is refreshed as a clone must be (its clock is the host's, its random
numbers are its own); a damaged snapshot is one SnapshotError and starts nothing; a warm start restores the
default guest's cached snapshot."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import popek
from popek import snapshot
from popek.accel.exits import StopReason
from popek.api import VM
from popek.snapshot import SnapshotError

from .guests import KVM_MARKS

pytestmark = [*KVM_MARKS, pytest.mark.linux, pytest.mark.slow]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, VM]]:
    folder = tmp_path_factory.mktemp("api-snapshot") / "snap"
    vm = popek.VM(mem="256M")  # warm where the warm snapshot exists: a restored VM snapshots as a booted one
    with vm:
        vm.exec(["sh", "-c", "echo before > /root/marker"], check=True)
        # a clock far in the past: a clone that still shows it was not refreshed (whatever KVM's clock does)
        vm.exec(["date", "-u", "-s", "@1000000000"], check=True)
        vm.snapshot(folder)
        yield folder, vm


def test_a_running_vm_goes_on_after_its_snapshot(saved: tuple[Path, VM]) -> None:
    folder, vm = saved
    assert not vm.paused
    assert vm.exec(["cat", "/root/marker"], check=True).stdout == b"before\n"
    manifest = snapshot.read_manifest(folder)
    assert manifest.memory_bytes == 256 << 20
    # holes where the guest never wrote: the memory file takes less disk than guest RAM
    assert (folder / manifest.memory_file).stat().st_blocks * 512 < manifest.memory_bytes


def test_two_clones_of_one_snapshot_are_independent_and_refreshed(saved: tuple[Path, VM]) -> None:
    folder, _ = saved
    with VM.restore(folder) as first, VM.restore(folder) as second:
        assert first.restored and second.restored
        for clone in (first, second):
            assert clone.exec(["cat", "/root/marker"], check=True).stdout == b"before\n"
        first.exec(["sh", "-c", "echo first > /root/only-first"], check=True)
        assert second.exec(["test", "-e", "/root/only-first"]).exit_code == 1
        draw = ["sh", "-c", "head -c 32 /dev/urandom | od -An -tx1"]
        draws = [c.exec(draw, check=True).stdout for c in (first, second)]
        assert draws[0] != draws[1], "two clones drew the same random numbers"
        for clone in (first, second):
            guest_now = int(clone.exec(["date", "+%s"], check=True).stdout)
            assert abs(guest_now - time.time()) < 30, "a clone's clock still says when the snapshot was taken"


def test_a_corrupted_snapshot_starts_no_vm(saved: tuple[Path, VM], tmp_path: Path) -> None:
    folder, _ = saved
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    manifest = snapshot.read_manifest(copy)
    state = bytearray((copy / manifest.state_file).read_bytes())
    state[10] ^= 0x40
    (copy / manifest.state_file).write_bytes(bytes(state))
    with pytest.raises(SnapshotError, match="checksum"):
        VM.restore(copy)


def test_a_warm_start_restores_the_default_guests_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    from popek import image

    real = Path.home() / ".cache" / "popek"
    (tmp_path / "cache").mkdir()
    # the image entries of the real cache (so nothing is built), and an empty warm directory of its own
    for entry in real.glob("guest-*"):
        (tmp_path / "cache" / "popek").mkdir(exist_ok=True)
        (tmp_path / "cache" / "popek" / entry.name).symlink_to(entry)
    assert image.cached_default_guest() is not None
    with popek.VM(mem="256M") as first:
        assert not first.warm_started  # nothing cached yet: it boots, then takes the warm snapshot
        assert first.exec(["echo", "cold"], check=True).stdout == b"cold\n"
    assert list((tmp_path / "cache" / "popek" / "warm").iterdir())
    started = time.monotonic()
    with popek.VM(mem="256M") as second:
        assert second.warm_started
        assert second.exec(["echo", "warm"], check=True).stdout == b"warm\n"
    assert time.monotonic() - started < 60


def test_a_clone_migrates_live_and_its_processes_go_on_in_the_target(saved: tuple[Path, VM], tmp_path: Path) -> None:
    folder, _ = saved
    address = str(tmp_path / "migrate.sock")
    target = VM.incoming(address)
    started = threading.Thread(target=target.start)
    started.start()
    try:
        with VM.restore(folder) as source:
            # each count written whole (a rename), so a read never sees a file the loop is halfway through
            step = "echo $i > /root/count.new; mv /root/count.new /root/count"
            loop = f"i=0; while true; do i=$((i+1)); {step}; sleep 0.2; done"
            source.exec(["sh", "-c", f"setsid sh -c '{loop}' </dev/null >/dev/null 2>&1 &"], check=True)
            time.sleep(1)
            stats = source.migrate(address)
            assert source.stop_reason is not None and source.stop_reason.reason is StopReason.MIGRATED
        started.join(180)
        assert target.running
        first = int(target.exec(["cat", "/root/count"], check=True).stdout)
        time.sleep(1.5)
        assert int(target.exec(["cat", "/root/count"], check=True).stdout) > first  # the loop goes on there
        assert target.exec(["cat", "/root/marker"], check=True).stdout == b"before\n"
        assert stats.downtime_s < stats.total_s and stats.bytes_sent > 0
    finally:
        target.close()


def test_the_cli_shows_and_restores_a_snapshot(saved: tuple[Path, VM]) -> None:
    folder, _ = saved
    info = subprocess.run([sys.executable, "-m", "popek", "snapshot", "info", str(folder), "--verify"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert info.returncode == 0, info.stderr
    assert "256 MiB" in info.stdout and "checksum verified" in info.stdout and "virtio-vsock" in info.stdout
    run = subprocess.run([sys.executable, "-m", "popek", "restore", str(folder), "--", "cat", "/root/marker"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert (run.returncode, run.stdout) == (0, "before\n"), run.stderr
    broken = subprocess.run([sys.executable, "-m", "popek", "restore", str(folder / "nope"), "--", "true"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert broken.returncode == 1 and broken.stderr.count("\n") == 1 and "not a snapshot" in broken.stderr
    # the default guest saw the portable CPUID template, which offers more than the software CPU implements: its
    # snapshot does not cross to --accel soft, and says so in one line (options may follow the snapshot's folder)
    soft = subprocess.run([sys.executable, "-m", "popek", "restore", str(folder), "--accel", "soft", "--", "true"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert soft.returncode == 1 and soft.stderr.count("\n") == 1, soft.stderr
    assert "cannot cross backends" in soft.stderr and "--cpu-template soft" in soft.stderr, soft.stderr
