"""Snapshot storage (popek/snapshot.py): what is written reads back, memory is sparse and mapped lazily, a crash
mid-write leaves the previous snapshot, and a bad snapshot is one SnapshotError."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popek import snapshot
from popek.memory import PAGE_SIZE, GuestMemory
from popek.snapshot import SnapshotError

MEM = 1 << 20
pages = st.integers(0, MEM // PAGE_SIZE - 1)
writes = st.lists(st.tuples(pages, st.integers(0, PAGE_SIZE - 1), st.binary(min_size=1, max_size=64)), max_size=12)
STATE: dict[str, Any] = {"vcpus": [{"rip": 0xFFFF_FFFF_8100_0000, "xsave": b"\x00\x01\xff" * 5}], "devices": {}}


def _guest(changes: list[tuple[int, int, bytes]]) -> GuestMemory:
    mem = GuestMemory(MEM)
    for page, offset, data in changes:
        at = page * PAGE_SIZE + min(offset, PAGE_SIZE - len(data))
        mem.write(at, data)
    return mem


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=writes)
def test_a_snapshot_restores_the_memory_and_state_it_was_taken_of(tmp_path: Path, changes: list[Any]) -> None:
    folder = tmp_path / f"s{os.urandom(4).hex()}"
    with _guest(changes) as mem:
        snapshot.write(folder, STATE, mem)
        image = mem.read(0, MEM)
    taken = snapshot.read(folder, verify_memory=True)
    assert taken.state == STATE
    with taken.memory(MEM) as restored:
        assert restored.read(0, MEM) == image


def test_memory_that_was_never_written_costs_no_disk(tmp_path: Path) -> None:
    with GuestMemory(64 << 20) as mem:
        mem.write(5 * PAGE_SIZE, b"x")
        manifest = snapshot.write(tmp_path, STATE, mem)
    stat = os.stat(tmp_path / manifest.memory_file)
    assert stat.st_size == 64 << 20
    assert stat.st_blocks * 512 <= 64 * 1024  # one page of data (the filesystem may allocate a little more)


def test_a_restored_guest_writes_copy_on_write_and_leaves_the_snapshot_as_it_was(tmp_path: Path) -> None:
    with _guest([(3, 0, b"original")]) as mem:
        snapshot.write(tmp_path, STATE, mem)
    taken = snapshot.read(tmp_path)
    with taken.memory(MEM) as first, taken.memory(MEM) as second:
        first.write(3 * PAGE_SIZE, b"changed!")
        first.zero(3 * PAGE_SIZE + 8, PAGE_SIZE - 8)
        assert second.read(3 * PAGE_SIZE, 8) == b"original"
    assert snapshot.read(tmp_path, verify_memory=True).state == STATE


def test_a_diff_snapshot_holds_only_the_dirty_pages_and_restores_over_its_parent(tmp_path: Path) -> None:
    with _guest([(1, 0, b"base one"), (2, 0, b"base two")]) as mem:
        snapshot.write(tmp_path, STATE, mem)
        mem.dirty_pages(clear=True)
        mem.write(2 * PAGE_SIZE, b"new two!")
        mem.write(9 * PAGE_SIZE, b"new nine")
        diff = snapshot.write(tmp_path, {**STATE, "n": 2}, mem, diff_pages=mem.dirty_pages())
        image = mem.read(0, MEM)
    assert diff.diff_pages == ((2 * PAGE_SIZE, 1), (9 * PAGE_SIZE, 1))
    taken = snapshot.read(tmp_path)
    assert taken.state["n"] == 2
    with taken.memory(MEM) as restored:
        assert restored.read(0, MEM) == image


def test_a_crash_before_the_manifest_is_replaced_leaves_the_previous_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _guest([(1, 0, b"first")]) as mem:
        snapshot.write(tmp_path, {"n": 1}, mem)
        mem.write(PAGE_SIZE, b"second")

        def crash(*_args: object) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(snapshot.os, "replace", crash)
        with pytest.raises(SnapshotError, match="Input/output error"):
            snapshot.write(tmp_path, {"n": 2}, mem)
    monkeypatch.undo()
    taken = snapshot.read(tmp_path, verify_memory=True)
    assert taken.state == {"n": 1}
    with taken.memory(MEM) as restored:
        assert restored.read(PAGE_SIZE, 5) == b"first"
    assert len(list(tmp_path.iterdir())) == 3  # the new generation's files went with the failed write


def _written(tmp_path: Path) -> snapshot.Manifest:
    with _guest([(1, 0, b"data")]) as mem:
        return snapshot.write(tmp_path, STATE, mem)


def test_a_truncated_memory_file_is_refused_by_name(tmp_path: Path) -> None:
    manifest = _written(tmp_path)
    os.truncate(tmp_path / manifest.memory_file, MEM // 2)
    with pytest.raises(SnapshotError, match="truncated"):
        snapshot.read(tmp_path)


def test_a_corrupted_state_file_fails_its_checksum(tmp_path: Path) -> None:
    manifest = _written(tmp_path)
    path = tmp_path / manifest.state_file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="checksum"):
        snapshot.read(tmp_path)


def test_corrupted_memory_fails_its_checksum_when_verified(tmp_path: Path) -> None:
    manifest = _written(tmp_path)
    with open(tmp_path / manifest.memory_file, "r+b") as f:
        f.seek(PAGE_SIZE)
        f.write(b"DATA")
    snapshot.read(tmp_path)  # a restore does not read every page
    with pytest.raises(SnapshotError, match="checksum"):
        snapshot.read(tmp_path, verify_memory=True)


def test_another_format_version_is_refused(tmp_path: Path) -> None:
    _written(tmp_path)
    data = json.loads((tmp_path / snapshot.MANIFEST).read_text())
    data["version"] = snapshot.VERSION + 1
    (tmp_path / snapshot.MANIFEST).write_text(json.dumps(data))
    with pytest.raises(SnapshotError, match="version"):
        snapshot.read(tmp_path)


def test_a_guest_of_another_size_is_refused(tmp_path: Path) -> None:
    _written(tmp_path)
    with pytest.raises(SnapshotError, match="guest memory"):
        snapshot.read(tmp_path).memory(2 * MEM)


def test_a_directory_without_a_snapshot_is_named(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="not a snapshot"):
        snapshot.read(tmp_path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.lists(st.sampled_from(["memory", "state", "regions", 0, "diff", "pages", "gpa", "size", "offset",
                                   "file", "sha256", "generation", "version", "format", "parent"]), max_size=4),
    value=json_values,
)  # fmt: skip
def test_a_manifest_with_any_field_replaced_is_read_or_refused_with_a_snapshot_error(
    tmp_path: Path, path: list[Any], value: Any
) -> None:
    folder = tmp_path / "s"
    if not folder.exists():
        _written(folder)
        (folder / "good.json").write_text((folder / snapshot.MANIFEST).read_text())
    data = json.loads((folder / "good.json").read_text())
    node = data
    for key in path[:-1]:
        in_dict = isinstance(node, dict) and key in node
        in_list = isinstance(node, list) and isinstance(key, int) and key < len(node)
        if in_dict or in_list:
            node = node[key]
    if path and isinstance(node, dict) and isinstance(path[-1], str):
        node[path[-1]] = value
    elif path and isinstance(node, list) and node:
        node[0] = value
    else:
        data = value
    (folder / snapshot.MANIFEST).write_text(json.dumps(data))
    try:
        taken = snapshot.read(folder)
    except SnapshotError:
        return
    with taken.memory(taken.manifest.memory_bytes) as mem:  # whatever passed the checks maps within the file
        assert mem.size == taken.manifest.memory_bytes
