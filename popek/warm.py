"""Warm start: the default guest restored from a snapshot taken once, right after its agent first answered, instead
of booted (on a host whose KVM emulates guest ring 0 a boot takes minutes; a restore, a second).

A warm snapshot is a snapshot directory (popek.snapshot) in the cache, `<cache>/warm/<key>`, where the key is a
digest of everything that decides what the snapshot holds: the default guest image (its own cache key), the
command line, the VM's shape (memory, vCPUs, backend, CPU template, ACPI, eventfds, rng) and popek's own
source (a device or backend whose state format changed must not restore an old state). Only VMs whose devices
are all popek's own can start warm: a disk, a network back end or a second console is a host resource the
snapshot's guest has not seen (its driver probed what the first boot had), so such a VM boots cold.

Publishing is atomic: the snapshot is written into a temporary directory beside the entry and renamed into
place; a popek that loses the race discards its own. A warm snapshot that does not restore (another host CPU,
a corrupted file) or whose agent does not answer is removed, and the VM boots cold and makes a new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from popek import snapshot

WARM_DIR = "warm"


def _source_digest() -> str:
    """popek's Python sources, path and content: a changed device state format is a changed source."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def key(image_key: str, cmdline: str, shape: dict[str, Any]) -> str:
    described = {
        "image": image_key,
        "cmdline": cmdline,
        "shape": shape,
        "snapshot format": snapshot.VERSION,
        "popek sources": _source_digest(),
    }
    canonical = json.dumps(described, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]


def entry(cache: Path, warm_key: str) -> Path:
    return cache / WARM_DIR / warm_key


def find(cache: Path, warm_key: str) -> Path | None:
    """The warm snapshot for `warm_key`, if one is published (its manifest checked)."""
    path = entry(cache, warm_key)
    try:
        snapshot.read_manifest(path)
    except snapshot.SnapshotError:
        return None
    return path


def staging(cache: Path, warm_key: str) -> Path:
    """A fresh directory to write a warm snapshot into before `publish`."""
    folder = cache / WARM_DIR / f".staging-{warm_key}-{os.getpid()}-{os.urandom(4).hex()}"
    folder.mkdir(parents=True)
    return folder


def publish(folder: Path, cache: Path, warm_key: str) -> Path:
    """Rename a written snapshot into place (another popek's, if it came first, is kept and ours removed)."""
    target = entry(cache, warm_key)
    try:
        os.rename(folder, target)
    except OSError:
        shutil.rmtree(folder, ignore_errors=True)
    return target


def discard(cache: Path, warm_key: str) -> None:
    """Remove a warm snapshot that did not restore; running clones keep their mappings of its memory file."""
    target = entry(cache, warm_key)
    doomed = target.with_name(f".doomed-{warm_key}-{os.getpid()}-{os.urandom(4).hex()}")
    with contextlib.suppress(OSError):
        os.rename(target, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
