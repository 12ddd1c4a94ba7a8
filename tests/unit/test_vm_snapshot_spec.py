"""The VM spec inside a snapshot (popek.vm_snapshot): every VmSpec round-trips through the snapshot's JSON, and a
spec field a hostile writer changed is one SnapshotError naming it, never a TypeError from deep in the builder."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from popek import snapshot, vm_snapshot, warm
from popek.devices.virtio.blk import DiskSpec
from popek.devices.virtio.net import NetSpec
from popek.devices.virtio.vsock import VsockSpec
from popek.snapshot import SnapshotError
from popek.vm import VmSpec

from .state_fuzz import at, json_value, paths

DISKS = hs.builds(DiskSpec, hs.just(Path("/tmp/disk.img")), hs.booleans(), hs.sampled_from(["", "d0"]))
MACS = hs.binary(min_size=6, max_size=6).map(lambda b: bytes([b[0] & 0xFE | 2]) + b[1:])  # unicast, local
NETS = hs.builds(NetSpec, hs.just("passt"), mac=MACS, ports=hs.just(((8080, 80),)))
specs = hs.builds(
    VmSpec,
    kernel=hs.sampled_from(["/boot/vmlinuz", "guest.bin"]),
    initrd=hs.none() | hs.just(Path("/tmp/initrd")),
    cmdline=hs.text(max_size=40) | hs.binary(max_size=40),
    mem=hs.integers(1, 4096).map(lambda n: n << 20),
    cpus=hs.integers(1, 8),
    accel=hs.sampled_from(["kvm", "soft"]),
    timeout=hs.none() | hs.floats(0.5, 1e6),
    acpi=hs.booleans(),
    pc_testdev=hs.booleans(),
    disks=hs.lists(DISKS, max_size=2),
    rng=hs.booleans(),
    vsock=hs.none() | hs.builds(VsockSpec, hs.integers(3, 1000), hs.just(Path("/tmp/v.sock"))),
    kvm_eventfds=hs.booleans(),
    net=hs.none() | NETS,
)


@given(specs)
def test_every_spec_round_trips_through_a_snapshots_state(spec: VmSpec) -> None:
    encoded = snapshot.decode_state(snapshot.encode_state({"spec": vm_snapshot.spec_state(spec)}))["spec"]
    back = vm_snapshot.spec_from_state(encoded)
    assert back == dataclasses.replace(spec, kernel=str(spec.kernel))


SPEC = vm_snapshot.spec_state(VmSpec(kernel="k", disks=[DiskSpec(Path("/d"))], vsock=VsockSpec(3, Path("/v"))))


@given(hs.data())
def test_a_changed_spec_field_is_a_snapshot_error_or_a_valid_spec(data: hs.DataObject) -> None:
    path = data.draw(hs.sampled_from(paths(SPEC)[1:]))
    spec = copy.deepcopy(SPEC)
    *parents, last = path
    at(spec, tuple(parents))[last] = data.draw(json_value)
    try:
        vm_snapshot.spec_from_state(spec)
    except SnapshotError:
        pass


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("mem", 1 << 60, "mem"), ("cpus", 0, "cpus"), ("accel", "qemu", "accel"), ("disks", [{"path": ""}], "disk"),
     ("vsock", {"cid": 1, "uds_path": "/v"}, "CID"), ("kernel", "a\0b", "kernel")],
)  # fmt: skip
def test_named_bad_fields(field: str, value: object, match: str) -> None:
    with pytest.raises(SnapshotError, match=match):
        vm_snapshot.spec_from_state({**SPEC, field: value})


def test_a_warm_key_changes_with_every_input() -> None:
    base = warm.key("img", "console=ttyS0", {"mem": 1, "cpus": 1})
    assert base == warm.key("img", "console=ttyS0", {"cpus": 1, "mem": 1})
    assert base != warm.key("img2", "console=ttyS0", {"mem": 1, "cpus": 1})
    assert base != warm.key("img", "console=ttyS1", {"mem": 1, "cpus": 1})
    assert base != warm.key("img", "console=ttyS0", {"mem": 2, "cpus": 1})


def test_a_warm_entry_is_published_once_and_discarded_whole(tmp_path: Path) -> None:
    assert warm.find(tmp_path, "k") is None
    first = warm.staging(tmp_path, "k")
    snapshot.write(first, {"x": 1}, _memory())
    published = warm.publish(first, tmp_path, "k")
    second = warm.staging(tmp_path, "k")
    snapshot.write(second, {"x": 2}, _memory())
    assert warm.publish(second, tmp_path, "k") == published  # the first one stays
    assert not second.exists()
    assert warm.find(tmp_path, "k") == published
    assert snapshot.read(published).state == {"x": 1}
    warm.discard(tmp_path, "k")
    assert warm.find(tmp_path, "k") is None
    assert [p.name for p in (tmp_path / "warm").iterdir()] == []


def _memory():  # type: ignore[no-untyped-def]
    from popek.memory import GuestMemory

    return GuestMemory(1 << 20)
