"""A whole VM through pause, snapshot and restore (popek.vm.Vm), on both backends: a guest that keeps a running
hash over a count prints the same hash whether it ran uninterrupted, paused and resumed at a random moment, or was
snapshotted there and restored (twice, into two independent VMs); a damaged snapshot is one SnapshotError."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from popek import snapshot
from popek.accel.exits import Stop, StopReason
from popek.errors import VmStateError
from popek.snapshot import SnapshotError
from popek.vm import RunState, Vm, VmSpec

from .guests import BACKENDS, boot_sector

# iterations of the hash loop per backend: about a second of guest time each (KVM emulates real mode one
# instruction at a time on nested hosts; the software CPU interprets)
TOTAL = {"kvm": 400_000, "soft": 60_000}

# real mode, interrupts off: EBX counts, ECX mixes every count in (a restart or a lost iteration changes it),
# the count is also stored at 0x6000 (memory the snapshot must carry); at the end ECX goes to COM1 as 8 hex
# digits and a newline, then the debug-exit port ends the VM
GUEST = """
    cli
    xor ebx, ebx
    mov ecx, 1
count:
    inc ebx
    imul ecx, ecx, 33
    add ecx, ebx
    mov [0x6000], ebx
    cmp ebx, {total}
    jne count
    mov dx, 0x3f8
    mov si, 8
hex:
    rol ecx, 4
    mov al, cl
    and al, 0xf
    add al, '0'
    cmp al, '9'
    jbe digit
    add al, 7
digit:
    out dx, al
    dec si
    jnz hex
    mov al, 10
    out dx, al
    mov al, 0
    out 0xf4, al
    hlt
"""


def expected_hash(total: int) -> str:
    ecx = 1
    for ebx in range(1, total + 1):
        ecx = (ecx * 33 + ebx) & 0xFFFFFFFF
    return f"{ecx:08X}\n"


class Console:
    def __init__(self) -> None:
        self.out = bytearray()

    def __call__(self, data: bytes) -> None:
        self.out += data


def spec(tmp_path: Path, backend: str) -> VmSpec:
    image = boot_sector(tmp_path, GUEST.format(total=TOTAL[backend]))
    return VmSpec(kernel=image, mem=2 << 20, accel=backend, timeout=300)


def start(vm: Vm) -> tuple[threading.Thread, list[Stop]]:
    stops: list[Stop] = []
    thread = threading.Thread(target=lambda: stops.append(vm.run()), daemon=True)
    thread.start()
    return thread, stops


def finish(thread: threading.Thread, stops: list[Stop]) -> Stop:
    thread.join(300)
    assert not thread.is_alive()
    (stop,) = stops
    return stop


def paused_mid_count(vm: Vm, backend: str, delay: float) -> int:
    """Pause once the guest has counted a little; the count it reached."""
    deadline = time.monotonic() + 60
    while vm.mem.read_u32(0x6000) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    vm.pause()
    assert vm.state is RunState.PAUSED
    count = vm.mem.read_u32(0x6000)
    assert 0 < count < TOTAL[backend], "the guest finished before the pause: make TOTAL larger"
    return count


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_paused_vm_holds_still_and_resumes_to_the_same_result(tmp_path: Path, backend: str) -> None:
    console = Console()
    with Vm(spec(tmp_path, backend), console) as vm:
        thread, stops = start(vm)
        count = paused_mid_count(vm, backend, 0.05)
        time.sleep(0.3)
        assert vm.mem.read_u32(0x6000) == count, "a paused guest went on counting"
        with pytest.raises(VmStateError, match="paused"):
            vm.pause()
        vm.resume()
        with pytest.raises(VmStateError, match="running"):
            vm.resume()
        stop = finish(thread, stops)
    assert stop.reason is StopReason.DEBUG_EXIT, stop
    assert console.out.decode() == expected_hash(TOTAL[backend])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_snapshot_restores_twice_into_vms_that_end_as_the_uninterrupted_run(tmp_path: Path, backend: str) -> None:
    folder = tmp_path / "snap"
    with Vm(spec(tmp_path, backend), Console()) as vm:
        thread, stops = start(vm)
        count = paused_mid_count(vm, backend, 0.1)
        with pytest.raises(VmStateError, match="diff"):
            vm.snapshot(folder, diff=True)  # no full snapshot to follow yet
        vm.snapshot(folder)
        vm.request_stop(Stop(StopReason.USER_QUIT, "the test is done with it"))
        finish(thread, stops)
    for _ in range(2):  # two clones of one snapshot, each on its own
        console = Console()
        with Vm.restore(folder, console) as clone:
            assert clone.mem.read_u32(0x6000) == count
            thread, stops = start(clone)
            stop = finish(thread, stops)
        assert stop.reason is StopReason.DEBUG_EXIT, stop
        assert console.out.decode() == expected_hash(TOTAL[backend])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_diff_snapshot_over_a_full_one_restores_the_later_moment(tmp_path: Path, backend: str) -> None:
    folder = tmp_path / "snap"
    with Vm(spec(tmp_path, backend), Console()) as vm:
        thread, stops = start(vm)
        paused_mid_count(vm, backend, 0.05)
        full = vm.snapshot(folder)
        vm.resume()
        time.sleep(0.2)
        vm.pause()
        later = vm.mem.read_u32(0x6000)
        diff = vm.snapshot(folder, diff=True)
        vm.request_stop(Stop(StopReason.USER_QUIT, "done"))
        finish(thread, stops)
    assert diff.parent == full.generation
    assert diff.diff_pages is not None and 0 < sum(n for _, n in diff.diff_pages) < (2 << 20) // 4096
    console = Console()
    with Vm.restore(folder, console) as clone:
        assert clone.mem.read_u32(0x6000) == later
        thread, stops = start(clone)
        finish(thread, stops)
    assert console.out.decode() == expected_hash(TOTAL[backend])


def test_only_a_paused_vm_is_snapshotted_and_only_a_running_one_pauses(tmp_path: Path) -> None:
    with Vm(spec(tmp_path, "soft"), Console()) as vm:
        with pytest.raises(VmStateError, match="running"):
            vm.pause()
        thread, stops = start(vm)
        deadline = time.monotonic() + 30
        while vm.state is not RunState.RUNNING and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(VmStateError, match="pause the VM"):
            vm.snapshot(tmp_path / "snap")
        finish(thread, stops)
        assert vm.state is RunState.STOPPED
        with pytest.raises(VmStateError):
            vm.pause()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("saved")
    folder = tmp / "snap"
    with Vm(spec(tmp, "soft"), Console()) as vm:
        thread, stops = start(vm)
        paused_mid_count(vm, "soft", 0.0)
        vm.snapshot(folder)
        vm.request_stop(Stop(StopReason.USER_QUIT, "done"))
        finish(thread, stops)
    return folder


def copy_of(folder: Path, to: Path) -> Path:
    to.mkdir()
    for f in folder.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def test_damaged_snapshots_are_one_snapshot_error(saved: Path, tmp_path: Path) -> None:
    manifest = snapshot.read_manifest(saved)
    bad = copy_of(saved, tmp_path / "truncated")
    with open(bad / manifest.memory_file, "r+b") as f:
        f.truncate(4096)
    with pytest.raises(SnapshotError, match="truncated"):
        Vm.restore(bad)
    bad = copy_of(saved, tmp_path / "corrupt")
    data = bytearray((bad / manifest.state_file).read_bytes())
    data[len(data) // 2] ^= 1
    (bad / manifest.state_file).write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="checksum"):
        Vm.restore(bad)
    bad = copy_of(saved, tmp_path / "future")
    m = json.loads((bad / "manifest.json").read_text())
    m["version"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SnapshotError, match="version"):
        Vm.restore(bad)
    with pytest.raises(SnapshotError, match="not a snapshot"):
        Vm.restore(tmp_path)


def test_a_snapshot_restores_on_its_backend_or_the_other_of_kvm_and_soft_only(saved: Path) -> None:
    import dataclasses

    # kvm <-> soft is tests/integration/test_cross_backend_snapshot.py; lockstep takes no snapshot
    with pytest.raises(SnapshotError, match="accel soft"):
        Vm.restore(saved, adjust=lambda s: dataclasses.replace(s, accel="lockstep"))


def restate(folder: Path, to: Path, change: dict[str, object]) -> Path:
    """A copy of a snapshot whose state has `change` merged into the top level, with a valid checksum (what a
    hostile writer can make): restore must check the fields themselves."""
    copy_of(folder, to)
    manifest = snapshot.read_manifest(to)
    state = snapshot.read(to).state
    for key, value in change.items():
        section, _, name = key.partition(".")
        if name:
            state[section][name] = value
        else:
            state[section] = value
    snapshot.write(to, state, snapshot.read(to).memory(snapshot.read_manifest(to).memory_bytes))
    assert snapshot.read_manifest(to).generation != manifest.generation
    return to


KEYS = ["spec.mem", "spec.cpus", "spec.accel", "spec.disks", "spec.vsock", "spec.net", "machine", "accel", "devices",
        "spec.kernel"]  # fmt: skip
VALUES = hs.one_of(
    hs.none(),
    hs.integers(-(2**70), 2**70),
    hs.text(max_size=20),
    hs.lists(hs.integers(), max_size=3),
    hs.dictionaries(hs.text(max_size=5), hs.integers(), max_size=3),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=hs.sampled_from(KEYS), value=VALUES)
def test_a_snapshot_with_hostile_fields_is_refused_with_one_snapshot_error(
    saved: Path, tmp_path_factory: pytest.TempPathFactory, key: str, value: object
) -> None:
    folder = restate(saved, tmp_path_factory.mktemp("hostile") / "snap", {key: value})
    try:
        vm = Vm.restore(folder)
    except SnapshotError:
        return
    vm.close()  # a value that happens to be valid (a spec's kernel path is only a record)
