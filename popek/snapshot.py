"""Snapshot storage: a VM's state and guest memory in a directory, written atomically, read back with every
field checked (docs/snapshot-format.md is the format's reference).

A snapshot directory holds one *generation* at a time:

    manifest.json      what the generation is: format name and version, the state file and the memory file with
                       their sizes and SHA-256 digests, the memory regions (guest-physical address, size, offset
                       in the memory file), and for a diff snapshot the pages it holds and the generation it
                       applies to
    state-<N>.json     the VM's spec, vCPU and device state (JSON; bytes as {"$bytes": base64})
    memory-<N>.raw     guest RAM, region after region at page-aligned offsets; pages that are zero are holes
                       (lseek(2) past them), so a 4 GiB guest that touched 100 MiB costs 100 MiB of disk

Atomicity (what a crash mid-snapshot leaves): the new generation's files are written under new names and fsynced,
then `manifest.json` is replaced by rename(2) of a fsynced temporary file and the directory is fsynced; only then
are the previous generation's files removed. A crash before the rename leaves the previous manifest naming
files that are still there; after it, the new one. Stray files of an unfinished generation are ignored and
removed by the next write.

Restore maps the memory file privately (`GuestMemory.from_snapshot`: MAP_PRIVATE, so pages are read on demand
by the host kernel, written copy-on-write, and shared by every clone restored from one file): restore time does
not grow with guest memory. That is why the memory digest is checked only when asked (`verify_memory=True`, what
`popek snapshot verify` does; it reads every page), while the state file's digest, the memory file's size and
every manifest field are checked on every load. A snapshot is hostile input like a kernel: a truncated,
corrupted, foreign or future-version one is one `SnapshotError` naming what is wrong, before anything is built.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popek.errors import PopekError
from popek.memory import PAGE_SIZE, GuestMemory, Region, layout

FORMAT = "popek-snapshot"
VERSION = 1
MANIFEST = "manifest.json"
MAX_STATE_BYTES = 64 << 20  # the state of a VM is kilobytes; a bigger file is not one popek wrote
MAX_MANIFEST_BYTES = 16 << 20  # a diff snapshot's page list is the largest part
MAX_REGIONS = 8
_CHUNK = 1 << 20
_ZERO_PAGE = bytes(PAGE_SIZE)
_ZERO_CHUNK = bytes(_CHUNK)
_GENERATION_FILE = re.compile(r"^(state|memory)-([0-9a-f]{16})\.(json|raw)$")


class SnapshotError(PopekError):
    """A snapshot that cannot be written or restored as asked (missing, truncated, corrupted, foreign)."""


@dataclass(frozen=True)
class MemoryRegion:
    """One guest RAM region and where its pages are in the memory file."""

    gpa: int
    size: int
    offset: int


@dataclass(frozen=True)
class Manifest:
    """A generation as `manifest.json` describes it (every field checked by `Manifest.parse`)."""

    generation: str
    state_file: str
    state_size: int
    state_sha256: str
    memory_file: str
    memory_size: int
    memory_sha256: str  # of the regions' contents in order, zeros included
    regions: tuple[MemoryRegion, ...]
    diff_pages: tuple[tuple[int, int], ...] | None  # (first gpa, page count) runs a diff snapshot holds
    parent: str | None  # the generation a diff snapshot applies to

    @property
    def memory_bytes(self) -> int:
        return sum(r.size for r in self.regions)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "generation": self.generation,
            "state": {"file": self.state_file, "size": self.state_size, "sha256": self.state_sha256},
            "memory": {
                "file": self.memory_file,
                "size": self.memory_size,
                "sha256": self.memory_sha256,
                "regions": [{"gpa": r.gpa, "size": r.size, "offset": r.offset} for r in self.regions],
                "diff": None
                if self.diff_pages is None
                else {"parent": self.parent, "pages": [list(run) for run in self.diff_pages]},
            },
        }

    @classmethod
    def parse(cls, data: object) -> Manifest:
        """Check every field of a decoded manifest: its type, its range, and that the regions and files it names
        are consistent with each other."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SnapshotError(f"not a popek snapshot ({MANIFEST} does not say format {FORMAT!r})")
        version = data.get("version")
        if version != VERSION:
            raise SnapshotError(f"snapshot format version {version!r}: this popek reads version {VERSION}")
        generation = _field(data, "generation", str)
        if not re.fullmatch(r"[0-9a-f]{16}", generation):
            raise SnapshotError(f"manifest: generation {generation!r} is not 16 hex digits")
        state = _field(data, "state", dict)
        memory = _field(data, "memory", dict)
        state_file, memory_file = _field(state, "file", str), _field(memory, "file", str)
        if state_file != f"state-{generation}.json" or memory_file != f"memory-{generation}.raw":
            raise SnapshotError("manifest: the state and memory files are not the generation's")
        state_size = _count(state, "size", MAX_STATE_BYTES)
        memory_size = _count(memory, "size", 1 << 52)
        regions: list[MemoryRegion] = []
        raw_regions = _field(memory, "regions", list)
        if not 1 <= len(raw_regions) <= MAX_REGIONS:
            raise SnapshotError(f"manifest: {len(raw_regions)} memory regions (1 to {MAX_REGIONS})")
        end_of_previous = 0
        offset_end = 0
        for raw in raw_regions:
            if not isinstance(raw, dict):
                raise SnapshotError("manifest: a memory region is not an object")
            gpa, size, offset = (_count(raw, key, 1 << 52) for key in ("gpa", "size", "offset"))
            if size == 0 or (gpa | size | offset) % PAGE_SIZE:
                raise SnapshotError(f"manifest: memory region {gpa:#x}+{size:#x} is empty or not page-aligned")
            if gpa < end_of_previous or offset < offset_end:
                raise SnapshotError(f"manifest: memory region {gpa:#x}+{size:#x} overlaps the one before it")
            end_of_previous, offset_end = gpa + size, offset + size
            regions.append(MemoryRegion(gpa, size, offset))
        total = sum(r.size for r in regions)
        if total > 1 << 52 or [(r.gpa, r.size) for r in regions] != layout(total):
            raise SnapshotError("manifest: the memory regions are not popek's RAM layout for their size")
        if memory_size < offset_end:
            raise SnapshotError(
                f"manifest: the memory file is {memory_size} bytes, its regions need {offset_end} bytes"
            )
        diff = memory.get("diff")
        diff_pages: tuple[tuple[int, int], ...] | None = None
        parent: str | None = None
        if diff is not None:
            if not isinstance(diff, dict):
                raise SnapshotError("manifest: memory.diff is not an object")
            parent = _field(diff, "parent", str)
            if not re.fullmatch(r"[0-9a-f]{16}", parent) or parent == generation:
                raise SnapshotError(f"manifest: diff parent {parent!r} is not another generation")
            runs = []
            for run in _field(diff, "pages", list):
                if (not isinstance(run, list) or len(run) != 2
                        or not all(isinstance(x, int) and not isinstance(x, bool) for x in run)):  # fmt: skip
                    raise SnapshotError("manifest: a diff page run is not [gpa, count]")
                first, count = run
                if count <= 0 or first % PAGE_SIZE or not _inside(regions, first, count * PAGE_SIZE):
                    raise SnapshotError(f"manifest: diff pages {first:#x} x {count} are not in guest memory")
                runs.append((first, count))
            diff_pages = tuple(runs)
        return cls(
            generation=generation,
            state_file=state_file,
            state_size=state_size,
            state_sha256=_digest(state, "sha256"),
            memory_file=memory_file,
            memory_size=memory_size,
            memory_sha256=_digest(memory, "sha256"),
            regions=tuple(regions),
            diff_pages=diff_pages,
            parent=parent,
        )


def _field(data: dict[str, Any], key: str, kind: type) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SnapshotError(f"manifest: {key!r} is missing or not a {kind.__name__}")
    return value


def _count(data: dict[str, Any], key: str, limit: int) -> int:
    value = _field(data, key, int)
    if not 0 <= value <= limit:
        raise SnapshotError(f"manifest: {key!r} = {value} is out of range")
    return int(value)


def _digest(data: dict[str, Any], key: str) -> str:
    value = _field(data, key, str)
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise SnapshotError(f"manifest: {key!r} is not a SHA-256 digest")
    return str(value)


def _inside(regions: Iterable[MemoryRegion], gpa: int, size: int) -> bool:
    return any(r.gpa <= gpa and gpa + size <= r.gpa + r.size for r in regions)


# --- state encoding: JSON with bytes ---


def _encode(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise SnapshotError("snapshot state: dictionary keys must be strings")
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise SnapshotError("snapshot state: a float that is not finite")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise SnapshotError(f"snapshot state: {type(value).__name__} is not a state value")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            text = value["$bytes"]
            if not isinstance(text, str):
                raise SnapshotError("snapshot state: a $bytes value is not a string")
            try:
                return base64.b64decode(text, validate=True)
            except ValueError:
                raise SnapshotError("snapshot state: a $bytes value is not base64") from None
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def encode_state(state: dict[str, Any]) -> bytes:
    """The state file's bytes: canonical JSON (sorted keys), so one state always has one digest."""
    return json.dumps(_encode(state), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def decode_state(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise SnapshotError(f"snapshot state is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise SnapshotError("snapshot state is not a JSON object")
    try:
        decoded = _decode(value)
    except RecursionError:
        raise SnapshotError("snapshot state is nested too deeply") from None
    assert isinstance(decoded, dict)
    return decoded


# --- writing ---


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _region_chunks(region: Region) -> Iterator[tuple[int, memoryview]]:
    view = memoryview(region.mapping)
    try:
        for pos in range(0, region.size, _CHUNK):
            yield pos, view[pos : pos + _CHUNK]
    finally:
        view.release()


def _write_memory(fd: int, mem: GuestMemory, regions: list[MemoryRegion], pages: set[int] | None) -> str:
    """Write the regions at their offsets, skipping zero pages (holes) and, for a diff, pages not in `pages`;
    return the digest of the regions' full contents."""
    digest = hashlib.sha256()
    for region, placed in zip(mem.regions, regions, strict=True):
        for pos, chunk in _region_chunks(region):
            digest.update(chunk)
            if pages is None and chunk == _ZERO_CHUNK[: len(chunk)]:
                continue
            for page_at in range(0, len(chunk), PAGE_SIZE):
                if pages is not None and region.gpa + pos + page_at not in pages:
                    continue
                page = chunk[page_at : page_at + PAGE_SIZE]
                if pages is None and page == _ZERO_PAGE:
                    continue
                os.pwrite(fd, page, placed.offset + pos + page_at)
    return digest.hexdigest()


def _runs(pages: Iterable[int]) -> tuple[tuple[int, int], ...]:
    runs: list[list[int]] = []
    for gpa in sorted(pages):
        if runs and runs[-1][0] + runs[-1][1] * PAGE_SIZE == gpa:
            runs[-1][1] += 1
        else:
            runs.append([gpa, 1])
    return tuple((first, count) for first, count in runs)


def write(
    path: str | os.PathLike[str],
    state: dict[str, Any],
    mem: GuestMemory,
    *,
    diff_pages: Iterable[int] | None = None,
) -> Manifest:
    """Write a snapshot of `state` and `mem` into the directory `path` (created if absent), replacing the
    generation there atomically. With `diff_pages` (guest-physical page addresses: the dirty log since the
    generation already in `path`) only those pages are written, and the snapshot applies on top of that
    generation: restoring it needs the parent's memory file, which this write therefore keeps."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SnapshotError(f"snapshot {folder}: {e.strerror}") from None
    parent: Manifest | None = None
    pages: set[int] | None = None
    if diff_pages is not None:
        parent = read_manifest(folder)
        if parent.diff_pages is not None:
            raise SnapshotError(f"snapshot {folder}: a diff applies to a full snapshot, and this one is a diff")
        pages = {gpa - gpa % PAGE_SIZE for gpa in diff_pages}
        if not all(mem.contains(gpa, PAGE_SIZE) for gpa in pages):
            raise SnapshotError("a diff page is not in guest memory")
    generation = secrets.token_hex(8)
    regions, offset = [], 0
    for region in mem.regions:
        regions.append(MemoryRegion(region.gpa, region.size, offset))
        offset += region.size
    if parent is not None and [(r.gpa, r.size) for r in parent.regions] != [(r.gpa, r.size) for r in regions]:
        raise SnapshotError(f"snapshot {folder}: the guest's memory layout is not the parent snapshot's")
    state_bytes = encode_state(state)
    if len(state_bytes) > MAX_STATE_BYTES:
        raise SnapshotError(f"snapshot state of {len(state_bytes)} bytes is over {MAX_STATE_BYTES}")
    state_name, memory_name = f"state-{generation}.json", f"memory-{generation}.raw"
    try:
        with open(folder / state_name, "wb") as f:
            f.write(state_bytes)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(folder / memory_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            memory_sha = _write_memory(fd, mem, regions, pages)
            os.ftruncate(fd, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        manifest = Manifest(
            generation=generation,
            state_file=state_name,
            state_size=len(state_bytes),
            state_sha256=hashlib.sha256(state_bytes).hexdigest(),
            memory_file=memory_name,
            memory_size=offset,
            memory_sha256=memory_sha,
            regions=tuple(regions),
            diff_pages=None if pages is None else _runs(pages),
            parent=None if parent is None else parent.generation,
        )
        temporary = folder / f".{MANIFEST}.{generation}.tmp"
        with open(temporary, "w") as f:
            json.dump(manifest.to_json(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, folder / MANIFEST)
        _fsync_dir(folder)
    except OSError as e:
        for name in (state_name, memory_name, f".{MANIFEST}.{generation}.tmp"):
            with contextlib.suppress(OSError):
                (folder / name).unlink()
        raise SnapshotError(f"snapshot {folder}: {e.strerror or e}") from None
    keep = {generation} | ({parent.generation} if parent is not None else set())
    _remove_other_generations(folder, keep)
    return manifest


def _remove_other_generations(folder: Path, keep: set[str]) -> None:
    for entry in folder.iterdir():
        match = _GENERATION_FILE.match(entry.name)
        stale_manifest = entry.name.startswith(f".{MANIFEST}.") and entry.name.endswith(".tmp")
        if (match and match.group(2) not in keep) or stale_manifest:
            with contextlib.suppress(OSError):
                entry.unlink()


# --- reading ---


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    folder = Path(path)
    try:
        with open(folder / MANIFEST, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise SnapshotError(f"{folder} is not a snapshot (no {MANIFEST})") from None
    except OSError as e:
        raise SnapshotError(f"snapshot {folder}: {e.strerror}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise SnapshotError(f"snapshot {folder}: {MANIFEST} is larger than any popek writes")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise SnapshotError(f"snapshot {folder}: {MANIFEST} is not JSON (corrupted?)") from None
    return Manifest.parse(data)


@dataclass
class Snapshot:
    """A snapshot as read: its manifest, its decoded state, and where its memory is."""

    path: Path
    manifest: Manifest
    state: dict[str, Any]
    parent: Manifest | None = None

    def memory(self, size: int) -> GuestMemory:
        """Guest memory of `size` bytes mapped privately from the snapshot (a diff's pages copied over its
        parent's): pages are read when the guest first touches them."""
        if size != self.manifest.memory_bytes:
            raise SnapshotError(
                f"the snapshot holds {self.manifest.memory_bytes} bytes of guest memory, the VM has {size}"
            )
        base = self.parent if self.parent is not None else self.manifest
        mem = GuestMemory.from_file(self.path / base.memory_file, [(r.gpa, r.size, r.offset) for r in base.regions])
        if self.parent is not None:
            try:
                _apply_diff(mem, self.path / self.manifest.memory_file, self.manifest)
            except BaseException:
                mem.close()
                raise
        return mem


def _apply_diff(mem: GuestMemory, path: Path, manifest: Manifest) -> None:
    assert manifest.diff_pages is not None
    offsets = {r.gpa: r for r in manifest.regions}
    with open(path, "rb") as f:
        for first, count in manifest.diff_pages:
            region = next(r for r in offsets.values() if r.gpa <= first < r.gpa + r.size)
            for i in range(count):
                gpa = first + i * PAGE_SIZE
                page = os.pread(f.fileno(), PAGE_SIZE, region.offset + gpa - region.gpa)
                if len(page) != PAGE_SIZE:
                    raise SnapshotError(f"snapshot {path.parent}: the diff memory file is truncated")
                mem.write(gpa, page)


def _check_file(folder: Path, name: str, size: int) -> None:
    try:
        actual = os.stat(folder / name).st_size
    except FileNotFoundError:
        raise SnapshotError(f"snapshot {folder}: {name} is missing") from None
    except OSError as e:
        raise SnapshotError(f"snapshot {folder}: {name}: {e.strerror}") from None
    if actual != size:
        raise SnapshotError(f"snapshot {folder}: {name} is {actual} bytes, the manifest says {size} (truncated?)")


def memory_digest(path: Path, manifest: Manifest) -> str:
    """The SHA-256 of the regions' contents as the memory file holds them (reads every page)."""
    digest = hashlib.sha256()
    with open(path / manifest.memory_file, "rb") as f:
        for region in manifest.regions:
            for pos in range(region.offset, region.offset + region.size, _CHUNK):
                chunk = os.pread(f.fileno(), min(_CHUNK, region.offset + region.size - pos), pos)
                digest.update(chunk)
    return digest.hexdigest()


def read(path: str | os.PathLike[str], *, verify_memory: bool = False) -> Snapshot:
    """Read and check a snapshot: the manifest's every field, the files' sizes, the state's digest (and the
    memory's with `verify_memory`). Raises SnapshotError naming the first thing wrong."""
    folder = Path(path)
    manifest = read_manifest(folder)
    _check_file(folder, manifest.state_file, manifest.state_size)
    _check_file(folder, manifest.memory_file, manifest.memory_size)
    parent: Manifest | None = None
    if manifest.parent is not None:
        parent = Manifest(
            generation=manifest.parent,
            state_file=f"state-{manifest.parent}.json",
            state_size=0,
            state_sha256="0" * 64,
            memory_file=f"memory-{manifest.parent}.raw",
            memory_size=manifest.memory_size,
            memory_sha256="0" * 64,
            regions=manifest.regions,
            diff_pages=None,
            parent=None,
        )
        _check_file(folder, parent.memory_file, parent.memory_size)
    with open(folder / manifest.state_file, "rb") as f:
        state_bytes = f.read(manifest.state_size + 1)
    if hashlib.sha256(state_bytes).hexdigest() != manifest.state_sha256:
        raise SnapshotError(f"snapshot {folder}: {manifest.state_file} does not match its checksum (corrupted)")
    if verify_memory:
        if parent is not None:
            raise SnapshotError(f"snapshot {folder}: a diff snapshot's memory is verified after it is merged")
        if memory_digest(folder, manifest) != manifest.memory_sha256:
            raise SnapshotError(f"snapshot {folder}: {manifest.memory_file} does not match its checksum (corrupted)")
    return Snapshot(folder, manifest, decode_state(state_bytes), parent)
